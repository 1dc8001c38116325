// Package hfclient keeps pkg/source/hftest, the Hub stand-in the hf://
// source is tested against, honest: the official JavaScript client
// (@huggingface/hub, pinned in the Makefile and installed by make into
// bin/npm) lists and downloads models from it, and must get exactly the
// files committed, byte for byte.
package hfclient_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source/hftest"
	"github.com/modelcache/modelcache/test/testenv"
)

// result is what check.mjs prints.
type result struct {
	Version string `json:"version"`
	SHA     string `json:"sha"`
	Files   []struct {
		Path       string `json:"path"`
		Size       int64  `json:"size"`
		OID        string `json:"oid"`
		LFSOID     string `json:"lfsOid"`
		LFSSize    int64  `json:"lfsSize"`
		InfoSize   int64  `json:"infoSize"`
		InfoETag   string `json:"infoEtag"`
		Downloaded int64  `json:"downloaded"`
		SHA256     string `json:"sha256"`
	} `json:"files"`
}

// pinned is the client version the Makefile installs.
func pinned(t *testing.T, root string) string {
	t.Helper()
	mk, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^HF_HUB_VERSION\s*:=\s*(\S+)`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("the Makefile pins no HF_HUB_VERSION")
	}
	return string(m[1])
}

func model() map[string][]byte {
	rng := rand.New(rand.NewPCG(3, 4))
	// Over 1 MB: the client reads it in ranges from the CDN.
	big := make([]byte, 1_500_000)
	for i := range big {
		big[i] = byte(rng.UintN(256))
	}
	return map[string][]byte{
		"config.json":             []byte(`{"architectures":["BertModel"],"hidden_size":32}`),
		"tokenizer/vocab.txt":     []byte("[PAD]\n[UNK]\nhello\n"),
		"model.safetensors":       big,
		"weights/part-00001.bin":  bytes.Repeat([]byte{7}, 3000),
		"README.md":               bytes.Repeat([]byte("A model card line.\n"), 100), // over LFSAbove: an LFS text file
		"nested/deeper/notes.txt": []byte("n"),
	}
}

func TestOfficialClientAgainstStandIn(t *testing.T) {
	root := testenv.RepoRoot()
	version := pinned(t, root)
	npmDir := filepath.Join(root, "bin", "npm")
	if _, err := os.Stat(filepath.Join(npmDir, "node_modules", "@huggingface", "hub", "package.json")); err != nil {
		t.Fatalf("@huggingface/hub is not installed in bin/npm: run `make hfhub` (make unit does it first)")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node is not installed: this test runs the official JavaScript Hub client (apt-get install nodejs npm)")
	}
	const token = "hf_OfficialClientToken0123456789"
	hub := hftest.New(t, hftest.Options{PageSize: 2})
	hub.AddToken(token)
	files := model()
	hub.CreateRepo("org/public", hftest.Repo{})
	hub.CreateRepo("org/gated", hftest.Repo{Gated: true, Access: []string{token}})
	commits := map[string]string{
		"org/public": hub.Commit("org/public", "main", files),
		"org/gated":  hub.Commit("org/gated", "main", files),
	}
	for _, tc := range []struct{ repo, token string }{{"org/public", ""}, {"org/gated", token}} {
		t.Run(tc.repo, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, node, "check.mjs", npmDir, hub.URL, tc.repo, "main", tc.token)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("check.mjs: %v\n%s", err, stderr.String())
			}
			var res result
			if err := json.Unmarshal(out, &res); err != nil {
				t.Fatalf("check.mjs printed %q: %v", out, err)
			}
			if res.Version != version || res.SHA != commits[tc.repo] || len(res.Files) != len(files) {
				t.Fatalf("client %s (want %s) resolved main to %s (want %s) and listed %d files (want %d)", res.Version, version, res.SHA, commits[tc.repo], len(res.Files), len(files))
			}
			for _, f := range res.Files {
				checkFile(t, files, f.Path, f.Size, f.OID, f.LFSOID, f.LFSSize, f.InfoSize, f.InfoETag, f.Downloaded, f.SHA256)
			}
		})
	}
	if n := hub.CountRequests(func(q hftest.Request) bool { return strings.Contains(q.Query, "cursor=") }); n == 0 {
		t.Fatal("the client never followed a Link header to a next page")
	}
}

func checkFile(t *testing.T, files map[string][]byte, p string, size int64, oid, lfsOID string, lfsSize, infoSize int64, etag string, downloaded int64, sum string) {
	t.Helper()
	data, ok := files[p]
	if !ok {
		t.Fatalf("the client listed %q, which was not committed", p)
	}
	want := sha256.Sum256(data)
	wantSum, n := hex.EncodeToString(want[:]), int64(len(data))
	if sum != wantSum || downloaded != n || size != n || infoSize != n {
		t.Errorf("%s: downloaded %d bytes with sha256 %s, listed size %d, download info size %d; want %d bytes, sha256 %s", p, downloaded, sum, size, infoSize, n, wantSum)
	}
	etag = strings.Trim(strings.TrimPrefix(etag, "W/"), `"`)
	lfs := lfsOID != ""
	switch {
	case lfs && (lfsOID != wantSum || lfsSize != n || etag != wantSum):
		t.Errorf("%s: LFS oid %s, size %d, etag %s; want the sha256 %s and %d", p, lfsOID, lfsSize, etag, wantSum, n)
	case !lfs && (oid != hftest.GitBlobOID(data) || etag != oid):
		t.Errorf("%s: git oid %s, etag %s; want %s", p, oid, etag, hftest.GitBlobOID(data))
	}
}
