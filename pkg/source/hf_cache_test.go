package source_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/cache/cachetest"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/hftest"
	"github.com/modelcache/modelcache/pkg/store"
)

// treeFiles reads every file of a tree.
func treeFiles(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[filepath.ToSlash(rel)], err = os.ReadFile(p)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameFiles(t *testing.T, got, want map[string][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("tree holds %d files, want %d", len(got), len(want))
	}
	for p, w := range want {
		if !bytes.Equal(got[p], w) {
			t.Fatalf("%s: %d bytes in the tree, not the %d committed", p, len(got[p]), len(w))
		}
	}
}

// An hf:// model through the whole cache: downloaded byte-exact (its large
// LFS file in ranged chunks from the CDN), refused to a token that has not
// accepted a gated model's terms, served from the cache at its commit with
// pullPolicy IfNotPresent after main moved, and the new commit fetched
// with Always, the unchanged LFS file linked, not downloaded again.
func TestHFThroughTheCache(t *testing.T) {
	const granted, other = "hf_GrantedToken0123456789abcdef", "hf_OtherToken0123456789abcdef"
	hub := hftest.New(t, hftest.Options{PageSize: 3})
	hub.AddToken(granted)
	hub.AddToken(other)
	hub.CreateRepo("org/model", hftest.Repo{Gated: true, Access: []string{granted}})
	rng := rand.New(rand.NewPCG(5, 6))
	big := make([]byte, 2_500_000)
	for i := range big {
		big[i] = byte(rng.UintN(256))
	}
	files := map[string][]byte{
		"config.json":       []byte(`{"hidden_size":64}`),
		"tokenizer.json":    []byte(`{"model":{"vocab":{"a":0}}}`),
		"model.safetensors": big,
		"empty.txt":         {},
	}
	first := hub.Commit("org/model", "main", files)

	h := cachetest.Open(t, t.TempDir(), cache.Options{Store: store.Options{RangeCutoff: 1 << 20, RangeChunk: 256 << 10, RangeSpan: 512 << 10}})
	src := source.NewSources([]byte("node key"), source.WithAllowedEndpoints([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}))
	prefetch := func(uri, token, policy string) (cache.Fetched, source.Remote, error) {
		r, err := src.Resolve(context.Background(), uri, map[string]string{"HF_ENDPOINT": hub.URL, "HF_TOKEN": token})
		if err != nil {
			t.Fatal(err)
		}
		f, err := h.Cache.Prefetch(context.Background(), cache.FetchRequest{URI: uri, Remote: r, Policy: policy})
		return f, r, err
	}

	f1, r, err := prefetch("hf://org/model", granted, "")
	if err != nil {
		t.Fatalf("first fetch: %v", err)
	}
	sameFiles(t, treeFiles(t, h.TreePath(f1.Tree.Digest)), files)
	if rev := r.(source.Pinned).Revision(); rev != first {
		t.Fatalf("Revision() = %s, want %s", rev, first)
	}
	ranged := hub.CountRequests(func(q hftest.Request) bool { return q.Server == "cdn" && q.Range != "" })
	if ranged < 2 {
		t.Fatalf("%d ranged CDN requests, want the large file in chunks", ranged)
	}

	_, _, err = prefetch("hf://org/model", other, "")
	if !errors.Is(err, source.ErrDenied) || !strings.Contains(err.Error(), "accept the model's terms") || strings.Contains(err.Error(), other) {
		t.Fatalf("fetch with a token that has not accepted the terms: %v, want ErrDenied with the hint and no token", err)
	}

	changed := map[string][]byte{}
	for p, d := range files {
		changed[p] = d
	}
	changed["config.json"] = []byte(`{"hidden_size":128}`)
	hub.Commit("org/model", "main", changed)
	revisions := func() int {
		return hub.CountRequests(func(q hftest.Request) bool { return strings.Contains(q.Path, "/revision/") })
	}
	before := revisions()
	f2, _, err := prefetch("hf://org/model", granted, cache.PullIfNotPresent)
	if err != nil || !f2.Hit || f2.Tree.Digest != f1.Tree.Digest || revisions() != before {
		t.Fatalf("IfNotPresent after main moved: hit %v, same tree %v, %d revision lookups, %v; want the cached commit, no lookup", f2.Hit, f2.Tree.Digest == f1.Tree.Digest, revisions()-before, err)
	}

	cdnBefore := hub.CountRequests(func(q hftest.Request) bool { return q.Server == "cdn" })
	f3, r3, err := prefetch("hf://org/model", granted, cache.PullAlways)
	if err != nil || f3.Tree.Digest == f1.Tree.Digest {
		t.Fatalf("Always after main moved: %v, new tree %v", err, f3.Tree.Digest != f1.Tree.Digest)
	}
	sameFiles(t, treeFiles(t, h.TreePath(f3.Tree.Digest)), changed)
	if r3.(source.Pinned).Revision() == first {
		t.Fatal("Always kept the old commit")
	}
	if n := hub.CountRequests(func(q hftest.Request) bool { return q.Server == "cdn" }) - cdnBefore; n != 0 {
		t.Fatalf("the unchanged LFS file was downloaded again (%d CDN requests)", n)
	}
}
