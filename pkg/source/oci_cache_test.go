package source_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/cache/cachetest"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/ocitest"
)

// An oci:// model through the whole cache: published byte-exact, a second
// tenant's credentials checked on the hit, wrong ones refused, and a
// second model sharing a layer with the first sharing its blob.
func TestOCIThroughTheCache(t *testing.T) {
	reg := ocitest.New(t, ocitest.Options{Users: map[string]string{"alice": "alice-password", "bob": "bob-password"}})
	tokenizer := ocitest.File{Path: "tokenizer.json", Data: bytes.Repeat([]byte(`{"tok":1}`), 300), Format: ocitest.TarGzip}
	first := []ocitest.File{
		{Path: "config.json", Data: []byte(`{"model_type":"llama"}`)},
		{Path: "weights/model.safetensors", Data: bytes.Repeat([]byte("weights!"), 20_000), Format: ocitest.Tar},
		tokenizer,
	}
	reg.PushModel(t, "models/llama", "v1", first...)
	reg.PushModel(t, "models/llama-ft", "v1", ocitest.File{Path: "config.json", Data: []byte(`{"model_type":"llama","ft":true}`)}, tokenizer)

	h := cachetest.Open(t, t.TempDir(), cache.Options{})
	s := source.NewSources([]byte("node key"), source.WithAllowedEndpoints([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}), source.WithPlainHTTPRegistries(reg.Host))
	secret := func(user, pass string) map[string]string {
		a := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
		return map[string]string{".dockerconfigjson": fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, reg.Host, a)}
	}
	fetch := func(uri string, secrets map[string]string) (cache.Fetched, error) {
		r, err := s.Resolve(context.Background(), uri, secrets)
		if err != nil {
			t.Fatal(err)
		}
		return h.Cache.Prefetch(context.Background(), cache.FetchRequest{URI: uri, Remote: r})
	}
	uri := "oci://" + reg.Host + "/models/llama:v1"
	f, err := fetch(uri, secret("alice", "alice-password"))
	if err != nil {
		t.Fatal(err)
	}
	root := h.TreePath(f.Tree.Digest)
	for _, file := range first {
		got, err := os.ReadFile(filepath.Join(root, file.Path))
		if err != nil || !bytes.Equal(got, file.Data) {
			t.Fatalf("%s in the tree: %d bytes, %v; want the %d pushed", file.Path, len(got), err, len(file.Data))
		}
	}
	if hit, err := fetch(uri, secret("bob", "bob-password")); err != nil || !hit.Hit || hit.Tree.Digest != f.Tree.Digest {
		t.Fatalf("another tenant's fetch: hit %v, %v", hit.Hit, err)
	}
	if _, err := fetch(uri, secret("bob", "wrong-password")); !errors.Is(err, source.ErrDenied) {
		t.Fatalf("fetch with a wrong password: %v, want ErrDenied", err)
	}
	ft, err := fetch("oci://"+reg.Host+"/models/llama-ft:v1", secret("alice", "alice-password"))
	if err != nil {
		t.Fatal(err)
	}
	a, errA := os.Stat(filepath.Join(root, "tokenizer.json"))
	b, errB := os.Stat(filepath.Join(h.TreePath(ft.Tree.Digest), "tokenizer.json"))
	if errA != nil || errB != nil || !os.SameFile(a, b) {
		t.Fatalf("the shared tokenizer is not one blob: %v, %v", errA, errB)
	}
}
