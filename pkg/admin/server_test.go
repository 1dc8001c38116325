package admin_test

// Unit tests of the operator API with a real store and state database in a
// temporary directory and a fake remote. They need no root and no network.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/admin"
	"github.com/modelcache/modelcache/pkg/adminapi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/cache/cachetest"
	"github.com/modelcache/modelcache/pkg/klogtest"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
	"k8s.io/klog/v2"
)

// TestMain keeps klog's lines out of test output; tests that check logging
// capture it themselves.
func TestMain(m *testing.M) {
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	os.Exit(m.Run())
}

const waitLimit = 60 * time.Second

// Credentials of the fake remote; no response or log line may hold them.
const (
	secretKey = sourcetest.SecretKey
	accessKey = sourcetest.AccessKey
)

var secretValues = []string{secretKey, accessKey}

func testSecrets() map[string]string { return sourcetest.Secrets() }

// memFetcher serves files from memory, for building trees directly.
type memFetcher map[string][]byte

func (f memFetcher) Open(_ context.Context, e source.Entry) (io.ReadCloser, error) {
	b, ok := f[e.Path]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

// harness is an admin.Server over a real cache.
type harness struct {
	t     *testing.T
	dir   string
	ct    *cachetest.Harness
	cache *cache.Cache
	store *store.Store
	db    *state.DB
	res   *sourcetest.Resolver
	srv   *admin.Server
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{t: t, dir: t.TempDir(), res: sourcetest.NewResolver()}
	h.open(cache.Options{})
	return h
}

// open (re)opens the cache with opt, as a restart of the node plugin with
// other flags does.
func (h *harness) open(opt cache.Options) {
	h.t.Helper()
	if h.ct != nil {
		if err := h.ct.Close(); err != nil {
			h.t.Fatal(err)
		}
	}
	if opt.ProgressEvery == 0 {
		opt.ProgressEvery = 5 * time.Millisecond
	}
	h.ct = cachetest.Open(h.t, h.dir, opt)
	h.cache, h.store, h.db = h.ct.Cache, h.ct.Store, h.ct.State
	h.srv = &admin.Server{Cache: h.cache, Resolver: h.res}
}

// build commits files as a tree fetched as uri, the way a publish or a
// prefetch leaves it: content key "key-<uri>", source "src-<uri>".
func (h *harness) build(uri string, files map[string][]byte) string {
	h.t.Helper()
	tr, _, err := h.store.Ensure(context.Background(), "key-"+uri, sourcetest.ManifestOf(files, time.Time{}), memFetcher(files))
	if err != nil {
		h.t.Fatalf("building %s: %v", uri, err)
	}
	if err := h.db.RecordSource("src-"+uri, state.Source{Tree: tr.Digest, URI: uri}); err != nil {
		h.t.Fatal(err)
	}
	return tr.Digest
}

// mount records that a pod mounts tree at target.
func (h *harness) mount(target, tree, ns, pod string) {
	h.t.Helper()
	r := state.Ref{VolumeID: "vol-" + pod, TargetPath: target, Tree: tree, URI: "mys3:whatever", PodName: pod, PodNS: ns, PodUID: "uid-" + pod, Published: time.Now()}
	if err := h.db.AddRef(r, ""); err != nil {
		h.t.Fatal(err)
	}
}

// do calls the API and checks no secret value is in the response.
func (h *harness) do(method, path string, body any) *httptest.ResponseRecorder {
	h.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			h.t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req := httptest.NewRequest(method, path, rd)
	rec := httptest.NewRecorder()
	h.srv.Handler().ServeHTTP(rec, req)
	wantNoSecrets(h.t, rec.Body.String())
	return rec
}

// call does a request that must answer code, and decodes its JSON body into out.
func (h *harness) call(method, path string, body any, code int, out any) {
	h.t.Helper()
	rec := h.do(method, path, body)
	if rec.Code != code {
		h.t.Fatalf("%s %s = %d %s, want %d", method, path, rec.Code, rec.Body, code)
	}
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/") || !strings.Contains(ct, "json") {
		h.t.Errorf("%s %s Content-Type %q, want JSON", method, path, ct)
	}
	if out != nil {
		if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
			h.t.Fatalf("decoding %s %s reply %q: %v", method, path, rec.Body, err)
		}
	}
}

// wantError checks an error reply: its code, a JSON {"error": ...} that
// holds every hint.
func (h *harness) wantError(method, path string, body any, code int, hints ...string) string {
	h.t.Helper()
	var e adminapi.Error
	h.call(method, path, body, code, &e)
	if strings.TrimSpace(e.Error) == "" {
		h.t.Errorf("%s %s: empty error message", method, path)
	}
	for _, s := range hints {
		if !strings.Contains(e.Error, s) {
			h.t.Errorf("%s %s: error %q does not contain %q", method, path, e.Error, s)
		}
	}
	return e.Error
}

func wantNoSecrets(t *testing.T, s string) {
	t.Helper()
	for _, v := range secretValues {
		if strings.Contains(s, v) {
			t.Fatalf("output leaks a secret: %q", s)
		}
	}
}

func treeURL(ref string) string { return "/v1/tree?ref=" + url.QueryEscape(ref) }

func (h *harness) cached(digest string) (state.CachedTree, bool) {
	h.t.Helper()
	c, ok, err := h.db.CachedTree(digest)
	if err != nil {
		h.t.Fatal(err)
	}
	return c, ok
}

// Two small models sharing a tokenizer, as in docs/design.md.
var (
	tokenizer = sourcetest.Bytes("tokenizer", 3000)
	bertFiles = map[string][]byte{
		"config.json":    []byte(`{"model_type":"bert"}`),
		"tokenizer.json": tokenizer,
		"model.bin":      sourcetest.Bytes("bert", 5000),
	}
	robertaFiles = map[string][]byte{
		"config.json":        []byte(`{"model_type":"roberta"}`),
		"tok/tokenizer.json": tokenizer,
		"model.bin":          sourcetest.Bytes("roberta", 4000),
	}
	irisFiles = map[string][]byte{"model.joblib": sourcetest.Bytes("iris", 1500)}
)

const (
	bertURI    = "mys3:models/bert"
	robertaURI = "mys3:models/roberta"
	irisURI    = "mys3:models/iris"
)

func TestListTrees(t *testing.T) {
	h := newHarness(t)
	rec := h.do("GET", "/v1/trees", nil)
	if rec.Code != 200 || strings.TrimSpace(rec.Body.String()) != "[]" {
		t.Errorf("ls of an empty cache = %d %q, want 200 []", rec.Code, rec.Body)
	}

	bert := h.build(bertURI, bertFiles)
	roberta := h.build(robertaURI, robertaFiles)
	iris := h.build(irisURI, irisFiles)
	h.mount("/t/a", bert, "serving", "bert-0")
	h.mount("/t/b", bert, "serving", "bert-1")
	if err := h.db.SetPinned(roberta, true); err != nil {
		t.Fatal(err)
	}
	var trees []adminapi.Tree
	h.call("GET", "/v1/trees", nil, 200, &trees)
	byDigest := map[string]adminapi.Tree{}
	for _, tr := range trees {
		byDigest[tr.Digest] = tr
	}
	tests := []struct {
		digest string
		files  map[string][]byte
		uri    string
		pods   []string
		pinned bool
	}{
		{bert, bertFiles, bertURI, []string{"bert-0", "bert-1"}, false},
		{roberta, robertaFiles, robertaURI, nil, true},
		{iris, irisFiles, irisURI, nil, false},
	}
	if len(trees) != len(tests) {
		t.Errorf("ls lists %d trees, want %d", len(trees), len(tests))
	}
	for _, tt := range tests {
		got, ok := byDigest[tt.digest]
		if !ok {
			t.Errorf("ls does not list %s", tt.uri)
			continue
		}
		var pods []string
		for _, r := range got.Refs {
			pods = append(pods, r.PodName)
		}
		slices.Sort(pods)
		if !got.Present || got.Size != sourcetest.SizeOf(tt.files) || got.Files != len(tt.files) || !slices.Contains(got.URIs, tt.uri) ||
			!slices.Equal(pods, tt.pods) || got.Pinned != tt.pinned {
			t.Errorf("ls entry for %s = %+v; want present, size %d, %d files, URI, pods %v, pinned %v",
				tt.uri, got, sourcetest.SizeOf(tt.files), len(tt.files), tt.pods, tt.pinned)
		}
	}

	// A record whose tree is gone from disk is listed as not present.
	if _, err := h.store.RemoveTree(iris); err != nil {
		t.Fatal(err)
	}
	h.call("GET", "/v1/trees", nil, 200, &trees)
	for _, tr := range trees {
		if tr.Digest == iris && tr.Present {
			t.Error("ls reports a removed tree as present")
		}
	}
}

func TestInspect(t *testing.T) {
	h := newHarness(t)
	bert := h.build(bertURI, bertFiles)
	h.build(robertaURI, robertaFiles)
	// A model updated at the remote: two trees fetched as one URI.
	updated := map[string][]byte{"model.joblib": sourcetest.Bytes("iris-v2", 1500)}
	h.build(irisURI, irisFiles)
	tr, _, err := h.store.Ensure(context.Background(), "key-iris-v2", sourcetest.ManifestOf(updated, time.Time{}), memFetcher(updated))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.db.RecordSource("src-iris-v2", state.Source{Tree: tr.Digest, URI: irisURI}); err != nil {
		t.Fatal(err)
	}

	hexOf := strings.TrimPrefix(bert, "sha256:")
	tests := []struct {
		name string
		ref  string
		code int
		hint string
	}{
		{"digest", bert, 200, ""},
		{"hex without prefix", hexOf, 200, ""},
		{"12 hex digits", hexOf[:12], 200, ""},
		{"sha256 and 12 hex digits", "sha256:" + hexOf[:12], 200, ""},
		{"model URI", bertURI, 200, ""},
		{"11 hex digits are too few", hexOf[:11], 404, hexOf[:11]},
		{"unknown digest", "sha256:" + strings.Repeat("0", 64), 404, "modelcachectl ls"},
		{"unknown URI", "mys3:models/none", 404, "mys3:models/none"},
		{"empty", "", 404, "digest"},
		{"ambiguous URI", irisURI, 409, "name one by digest"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := *h
			h.t = t
			if tt.code != 200 {
				h.wantError("GET", treeURL(tt.ref), nil, tt.code, tt.hint)
				return
			}
			var got adminapi.Inspection
			h.call("GET", treeURL(tt.ref), nil, 200, &got)
			if got.Digest != bert || !got.Present || !slices.Contains(got.URIs, bertURI) {
				t.Errorf("inspect %q = %s (present %v, URIs %v), want %s", tt.ref, got.Digest, got.Present, got.URIs, bert)
			}
			files := map[string]adminapi.File{}
			for _, f := range got.Contents {
				files[f.Path] = f
			}
			if len(files) != len(bertFiles) {
				t.Errorf("inspect lists %d files, want %d", len(got.Contents), len(bertFiles))
			}
			for p, b := range bertFiles {
				if f := files[p]; f.Size != int64(len(b)) || f.Sha256 != sourcetest.Sha256Hex(b) {
					t.Errorf("file %s = %+v, want size %d sha256 %s", p, f, len(b), sourcetest.Sha256Hex(b))
				}
			}
		})
	}
}

func TestPinUnpin(t *testing.T) {
	h := newHarness(t)
	bert := h.build(bertURI, bertFiles)
	steps := []struct {
		path       string
		ref        string
		code       int
		wantPinned bool
	}{
		{"/v1/pin", bertURI, 200, true},
		{"/v1/pin", bert, 200, true}, // again: idempotent
		{"/v1/unpin", bert[:19], 200, false},
		{"/v1/unpin", bertURI, 200, false},
		{"/v1/pin", "mys3:models/none", 404, false},
		{"/v1/unpin", "", 404, false},
	}
	for _, st := range steps {
		if st.code != 200 {
			h.wantError("POST", st.path, adminapi.RefRequest{Ref: st.ref}, st.code)
		} else {
			var got state.CachedTree
			h.call("POST", st.path, adminapi.RefRequest{Ref: st.ref}, 200, &got)
			if got.Digest != bert || got.Pinned != st.wantPinned {
				t.Errorf("%s %q replied %s pinned %v, want %s %v", st.path, st.ref, got.Digest, got.Pinned, bert, st.wantPinned)
			}
		}
		if c, _ := h.cached(bert); c.Pinned != st.wantPinned {
			t.Errorf("after %s %q: pinned = %v, want %v", st.path, st.ref, c.Pinned, st.wantPinned)
		}
	}
}

func TestEvict(t *testing.T) {
	tests := []struct {
		name        string
		pinned      bool
		mounted     bool
		whenUnused  bool
		code        int
		wantRemoved bool
		wantPending bool
		hint        string
	}{
		{name: "unused", code: 200, wantRemoved: true},
		{name: "unused and pinned: evict overrides the pin", pinned: true, code: 200, wantRemoved: true},
		{name: "in use", mounted: true, code: 409, hint: "serving/bert-0"},
		{name: "in use, when unused", mounted: true, whenUnused: true, code: 200, wantPending: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			bert := h.build(bertURI, bertFiles)
			roberta := h.build(robertaURI, robertaFiles)
			if tt.pinned {
				if err := h.db.SetPinned(bert, true); err != nil {
					t.Fatal(err)
				}
			}
			if tt.mounted {
				h.mount("/t/a", bert, "serving", "bert-0")
			}
			req := adminapi.RefRequest{Ref: bertURI, WhenUnused: tt.whenUnused}
			if tt.code != 200 {
				h.wantError("POST", "/v1/evict", req, tt.code, tt.hint, "--when-unused")
			} else {
				var got adminapi.EvictResult
				h.call("POST", "/v1/evict", req, 200, &got)
				wantFreed := int64(0)
				if tt.wantRemoved {
					// The shared tokenizer stays with roberta.
					wantFreed = sourcetest.SizeOf(bertFiles) - int64(len(tokenizer))
				}
				if got != (adminapi.EvictResult{Tree: bert, Removed: tt.wantRemoved, Freed: wantFreed, Pending: tt.wantPending}) {
					t.Errorf("evict = %+v; want removed %v, freed %d, pending %v", got, tt.wantRemoved, wantFreed, tt.wantPending)
				}
			}
			c, recorded := h.cached(bert)
			if h.store.HasTree(bert) == tt.wantRemoved || recorded == tt.wantRemoved {
				t.Errorf("after evict: on disk %v, recorded %v; want both %v", h.store.HasTree(bert), recorded, !tt.wantRemoved)
			}
			wantDoomed := ""
			if tt.wantPending {
				wantDoomed = "operator"
			}
			if recorded && c.Doomed != wantDoomed {
				t.Errorf("doomed = %q, want %q", c.Doomed, wantDoomed)
			}
			if !h.store.HasTree(roberta) {
				t.Error("evicting bert removed roberta")
			}
			if files, err := h.store.TreeFiles(roberta); err != nil {
				t.Fatal(err)
			} else {
				for _, f := range files {
					if f.Sha256 == "" {
						t.Errorf("roberta's %s lost its blob", f.Path)
					}
				}
			}
		})
	}
	t.Run("unknown", func(t *testing.T) {
		h := newHarness(t)
		h.wantError("POST", "/v1/evict", adminapi.RefRequest{Ref: "sha256:" + strings.Repeat("e", 64)}, 404)
	})
}

// Once its last mount goes, a tree that evict --when-unused or drain
// reported as pending must be removable: nothing may still protect it.
func TestPendingTreesAreReleasedAtLastUnmount(t *testing.T) {
	tests := []struct {
		name   string
		pinned bool
		call   func(h *harness, digest string)
		reason string
		bug    string
	}{
		{"evict when unused", false, func(h *harness, d string) {
			h.call("POST", "/v1/evict", adminapi.RefRequest{Ref: d, WhenUnused: true}, 200, nil)
		}, "operator", ""},
		{"evict when unused, pinned", true, func(h *harness, d string) {
			h.call("POST", "/v1/evict", adminapi.RefRequest{Ref: d, WhenUnused: true}, 200, nil)
		}, "operator", ""},
		{"drain", false, func(h *harness, d string) {
			h.call("POST", "/v1/drain", nil, 200, nil)
		}, "drain", ""},
		{"drain, pinned", true, func(h *harness, d string) {
			h.call("POST", "/v1/drain", nil, 200, nil)
		}, "drain", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.bug != "" {
				t.Skip("BUG: " + tt.bug)
			}
			h := newHarness(t)
			var reasons []string
			h.open(cache.Options{OnEvict: func(r cache.EvictReason, _ int64) { reasons = append(reasons, string(r)) }})
			bert := h.build(bertURI, bertFiles)
			if tt.pinned {
				if err := h.db.SetPinned(bert, true); err != nil {
					t.Fatal(err)
				}
			}
			h.mount("/t/a", bert, "serving", "bert-0")
			tt.call(h, bert)
			if !h.store.HasTree(bert) {
				t.Fatal("a tree in use was removed")
			}
			// The last unpublish removes the pending tree.
			if err := h.cache.ReleaseTarget("/t/a"); err != nil {
				t.Fatal(err)
			}
			if h.store.HasTree(bert) {
				t.Error("the pending tree stayed after its last unmount")
			}
			if _, ok := h.cached(bert); ok {
				t.Error("the pending tree's records stayed after its last unmount")
			}
			if !slices.Equal(reasons, []string{tt.reason}) {
				t.Errorf("evictions %v, want one for %q", reasons, tt.reason)
			}
		})
	}
}

func TestGC(t *testing.T) {
	tests := []struct {
		name        string
		maxBytes    int64
		dryRun      bool
		mountAll    bool
		wantEvicted []string // model URIs, oldest first
		wantWarning bool
	}{
		{name: "no budget", maxBytes: 0},
		{name: "under budget", maxBytes: 1 << 20},
		// bert holds 8021 bytes, iris 1500.
		{name: "dry run", maxBytes: 9000, dryRun: true, wantEvicted: []string{irisURI}},
		{name: "over budget", maxBytes: 9000, wantEvicted: []string{irisURI}},
		{name: "everything in use", maxBytes: 9000, mountAll: true, wantWarning: true},
		{name: "not enough even so", maxBytes: 2000, wantEvicted: []string{irisURI}, wantWarning: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			// Used in this order: iris is the least recently used and the
			// only unused one; bert is mounted.
			iris := h.build(irisURI, irisFiles)
			bert := h.build(bertURI, bertFiles)
			h.mount("/t/bert", bert, "serving", "bert-0")
			if tt.mountAll {
				h.mount("/t/iris", iris, "serving", "iris-0")
			}
			h.open(cache.Options{Budget: cache.Budget{MaxBytes: tt.maxBytes}})
			var got adminapi.GCResult
			h.call("POST", "/v1/gc", adminapi.RefRequest{DryRun: tt.dryRun}, 200, &got)
			var want []string
			for _, u := range tt.wantEvicted {
				want = append(want, map[string]string{irisURI: iris, bertURI: bert}[u])
			}
			var gotDigests []string
			for _, c := range got.Evicted {
				gotDigests = append(gotDigests, c.Digest)
			}
			if !slices.Equal(gotDigests, want) || got.DryRun != tt.dryRun {
				t.Errorf("gc = %+v, want evicted %v, dryRun %v", got, want, tt.dryRun)
			}
			if (got.Warning != "") != tt.wantWarning {
				t.Errorf("gc warning %q, want one: %v", got.Warning, tt.wantWarning)
			}
			if tt.wantWarning && (got.Over <= 0 || !strings.Contains(got.Warning, "in-use")) {
				t.Errorf("gc warning %q, over %d: want what holds the cache", got.Warning, got.Over)
			}
			irisGone := len(want) > 0 && !tt.dryRun
			if h.store.HasTree(iris) == irisGone {
				t.Errorf("iris on disk = %v, want %v", h.store.HasTree(iris), !irisGone)
			}
			if _, ok := h.cached(iris); ok == irisGone {
				t.Errorf("iris recorded = %v, want %v", ok, !irisGone)
			}
			if !h.store.HasTree(bert) {
				t.Error("gc removed a tree in use")
			}
		})
	}
}

func TestDrainUndrain(t *testing.T) {
	h := newHarness(t)
	iris := h.build(irisURI, irisFiles)
	roberta := h.build(robertaURI, robertaFiles)
	bert := h.build(bertURI, bertFiles)
	if err := h.db.SetPinned(roberta, true); err != nil {
		t.Fatal(err)
	}
	h.mount("/t/bert", bert, "serving", "bert-0")

	steps := []struct {
		path        string
		wantDrained bool
		wantRemoved []string
		wantPending []string
		wantFreed   int64
	}{
		// Pinned trees go too; the tokenizer stays with bert.
		{"/v1/drain", true, []string{iris, roberta}, []string{bert}, sourcetest.SizeOf(irisFiles) + sourcetest.SizeOf(robertaFiles) - int64(len(tokenizer))},
		{"/v1/drain", true, []string{}, []string{bert}, 0},
		{"/v1/undrain", false, []string{}, []string{}, 0},
		{"/v1/undrain", false, []string{}, []string{}, 0},
	}
	for i, st := range steps {
		var got adminapi.DrainResult
		h.call("POST", st.path, nil, 200, &got)
		slices.Sort(got.Removed)
		slices.Sort(st.wantRemoved)
		if got.Drained != st.wantDrained || !slices.Equal(got.Removed, st.wantRemoved) || !slices.Equal(got.Pending, st.wantPending) || got.Freed != st.wantFreed {
			t.Errorf("step %d %s = %+v; want drained %v, removed %v, pending %v, freed %d", i, st.path, got, st.wantDrained, st.wantRemoved, st.wantPending, st.wantFreed)
		}
		if d, err := h.db.Drained(); err != nil || d != st.wantDrained {
			t.Errorf("step %d: state drained = %v, %v", i, d, err)
		}
		var du adminapi.DiskUsage
		h.call("GET", "/v1/du", nil, 200, &du)
		if du.Drained != st.wantDrained {
			t.Errorf("step %d: du drained = %v", i, du.Drained)
		}
		for _, d := range []string{iris, roberta} {
			if h.store.HasTree(d) {
				t.Errorf("step %d: drained tree %s still on disk", i, d[:16])
			}
			if _, ok := h.cached(d); ok {
				t.Errorf("step %d: drained tree %s still recorded", i, d[:16])
			}
		}
		if !h.store.HasTree(bert) {
			t.Fatalf("step %d: drain removed a tree in use", i)
		}
	}
}

func TestVerify(t *testing.T) {
	h := newHarness(t)
	bert := h.build(bertURI, bertFiles)
	roberta := h.build(robertaURI, robertaFiles)
	iris := h.build(irisURI, irisFiles)
	h.mount("/t/roberta", roberta, "serving", "roberta-0")

	var clean adminapi.VerifyReport
	h.call("POST", "/v1/verify", nil, 200, &clean)
	if !clean.OK || len(clean.Corrupt) != 0 || len(clean.Removed) != 0 || len(clean.Invalidated) != 0 || clean.Blobs != 6 {
		t.Errorf("verify of a clean cache = %+v", clean)
	}

	// The shared tokenizer rots on disk.
	blob := filepath.Join(h.dir, store.BlobsDir, sourcetest.Sha256Hex(tokenizer))
	if err := os.Chmod(blob, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(blob, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("rot"), 100); err != nil {
		t.Fatal(err)
	}
	f.Close()

	var rep adminapi.VerifyReport
	h.call("POST", "/v1/verify", nil, 200, &rep)
	slices.Sort(rep.Damaged)
	wantDamaged := []string{bert, roberta}
	slices.Sort(wantDamaged)
	if rep.OK || !slices.Equal(rep.Corrupt, []string{sourcetest.Sha256Hex(tokenizer)}) || !slices.Equal(rep.Damaged, wantDamaged) ||
		!slices.Equal(rep.Removed, []string{bert}) || !slices.Equal(rep.Invalidated, []string{roberta}) {
		t.Errorf("verify = %+v; want not ok, tokenizer corrupt, bert removed, roberta invalidated", rep)
	}
	// The unused damaged tree is gone with its records.
	if h.store.HasTree(bert) {
		t.Error("unused damaged tree still on disk")
	}
	if _, ok := h.cached(bert); ok {
		t.Error("unused damaged tree still recorded")
	}
	// The damaged tree in use stays listed but is no longer served.
	if c, ok := h.cached(roberta); !ok || len(c.Refs) != 1 || !h.store.HasTree(roberta) {
		t.Errorf("damaged tree in use: recorded %v, refs %d, on disk %v; want kept", ok, len(c.Refs), h.store.HasTree(roberta))
	}
	if _, ok, _ := h.db.TreeForKey("key-" + robertaURI); ok {
		t.Error("damaged tree in use is still served for its content key")
	}
	if _, ok, _ := h.db.SourceTree("src-" + robertaURI); ok {
		t.Error("damaged tree in use is still served for its source")
	}
	// The clean tree is untouched.
	if _, ok, _ := h.db.TreeForKey("key-" + irisURI); !ok || !h.store.HasTree(iris) {
		t.Error("verify touched a clean tree")
	}
	var du adminapi.DiskUsage
	h.call("GET", "/v1/du", nil, 200, &du)
	if du.Quarantined != 1 {
		t.Errorf("du quarantined = %d, want 1", du.Quarantined)
	}
}

func TestDiskUsage(t *testing.T) {
	h := newHarness(t)
	var du adminapi.DiskUsage
	h.call("GET", "/v1/du", nil, 200, &du)
	if du.Trees != 0 || du.BlobBytes != 0 || du.SavedBytes != 0 || du.FSSize <= 0 {
		t.Errorf("du of an empty cache = %+v", du)
	}
	h.build(bertURI, bertFiles)
	h.build(robertaURI, robertaFiles)
	h.call("GET", "/v1/du", nil, 200, &du)
	want := adminapi.DiskUsage{
		BlobBytes: sourcetest.SizeOf(bertFiles) + sourcetest.SizeOf(robertaFiles) - int64(len(tokenizer)), Blobs: 5,
		TreeBytes: sourcetest.SizeOf(bertFiles) + sourcetest.SizeOf(robertaFiles), Trees: 2,
		FSSize: du.FSSize, FSFree: du.FSFree,
		SavedBytes: int64(len(tokenizer)),
	}
	if du != want {
		t.Errorf("du = %+v, want %+v", du, want)
	}
}

// readEvents reads NDJSON prefetch events until "done" or "error" (or EOF).
func readEvents(t *testing.T, r io.Reader, onLine func(adminapi.PrefetchEvent)) []adminapi.PrefetchEvent {
	t.Helper()
	var evs []adminapi.PrefetchEvent
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		wantNoSecrets(t, line)
		var ev adminapi.PrefetchEvent
		dec := json.NewDecoder(strings.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&ev); err != nil {
			t.Fatalf("prefetch line %q is not one event: %v", line, err)
		}
		evs = append(evs, ev)
		if onLine != nil {
			onLine(ev)
		}
		if ev.Event == "done" || ev.Event == "error" {
			break
		}
	}
	return evs
}

func prefetchReq(uri string) adminapi.PrefetchRequest {
	return adminapi.PrefetchRequest{URI: uri, Secrets: testSecrets()}
}

// Prefetch streams progress while the download runs and ends with "done";
// a second prefetch finds the model cached.
func TestPrefetchStreams(t *testing.T) {
	h := newHarness(t)
	files := map[string][]byte{"a.bin": sourcetest.Bytes("a", 8000), "b.bin": sourcetest.Bytes("b", 6000)}
	h.res.SetModel(bertURI, files)
	h.res.WithGate(1000)
	// Unflushed, ~40 progress lines (800ms) would fill the server's
	// buffer before the client saw the first.
	h.open(cache.Options{ProgressEvery: 20 * time.Millisecond})
	ts := httptest.NewServer(h.srv.Handler())
	defer ts.Close()

	raw, _ := json.Marshal(prefetchReq(bertURI))
	resp, err := http.Post(ts.URL+"/v1/prefetch", "application/json", bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("prefetch = %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	released := false
	evs := readEvents(t, resp.Body, func(ev adminapi.PrefetchEvent) {
		// Release the remote once a progress line has arrived while the
		// download is held: the reply streams, it is not buffered.
		if ev.Event == "progress" && !released {
			released = true
			h.res.Release()
		}
	})
	if !released {
		t.Fatalf("no progress line before the end: %+v", evs)
	}
	last := evs[len(evs)-1]
	want := adminapi.PrefetchEvent{Event: "done", Done: 14000, Total: 14000, Tree: storetest.TreeDigestOf(files), Files: 2, Fetched: true, Took: last.Took}
	if last != want || last.Took == "" {
		t.Errorf("last event = %+v, want %+v", last, want)
	}
	for _, ev := range evs[:len(evs)-1] {
		if ev.Event != "progress" || ev.Total != 14000 || ev.Done < 0 || ev.Done > 14000 {
			t.Errorf("unexpected event before done: %+v", ev)
		}
	}
	if len(evs) > 20 {
		t.Errorf("%d progress lines arrived before the first was read: the reply is buffered, not streamed", len(evs)-1)
	}

	// The prefetch is recorded: listed under its URI, and the same
	// credentials hit the cache.
	c, ok := h.cached(last.Tree)
	if !ok || !slices.Contains(c.URIs, bertURI) {
		t.Errorf("prefetched tree record = %+v, %v; want it listed under %s", c, ok, bertURI)
	}
	remote, _ := h.res.Resolve(context.Background(), bertURI, testSecrets())
	if src, ok, err := h.db.SourceTree(source.SourceKey(remote)); err != nil || !ok || src.Tree != last.Tree {
		t.Errorf("source of the prefetch = %+v, %v, %v; want tree %s", src, ok, err, last.Tree)
	}

	opens := h.res.OpenTotal()
	rec := h.do("POST", "/v1/prefetch", prefetchReq(bertURI))
	evs = readEvents(t, rec.Body, nil)
	if rec.Code != 200 || len(evs) != 1 || evs[0].Event != "done" || evs[0].Fetched || evs[0].Tree != last.Tree {
		t.Errorf("second prefetch = %d %+v; want one done event with fetched false", rec.Code, evs)
	}
	if h.res.OpenTotal() != opens {
		t.Error("second prefetch downloaded again")
	}
}

func TestPrefetchDownloadFailure(t *testing.T) {
	h := newHarness(t)
	h.res.SetModel(bertURI, bertFiles)
	h.res.Set(func(r *sourcetest.Resolver) {
		r.OpenErr = fmt.Errorf("reading model.bin: %w: access denied", source.ErrDenied)
	})
	rec := h.do("POST", "/v1/prefetch", prefetchReq(bertURI))
	evs := readEvents(t, rec.Body, nil)
	if rec.Code != 200 || len(evs) == 0 || evs[len(evs)-1].Event != "error" || !strings.Contains(evs[len(evs)-1].Error, "access denied") {
		t.Errorf("prefetch with a failing download = %d %+v; want a final error event", rec.Code, evs)
	}
	if entries, _ := os.ReadDir(filepath.Join(h.dir, store.TreesDir)); len(entries) != 0 {
		t.Errorf("a failed prefetch left trees %v", entries)
	}
}

func TestPrefetchWhenDrained(t *testing.T) {
	tests := []struct {
		name   string
		cached bool
		code   int
	}{
		{"not cached", false, 409},
		{"cached", true, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.res.SetModel(bertURI, bertFiles)
			if tt.cached {
				h.call("POST", "/v1/prefetch", prefetchReq(bertURI), 200, nil)
				// Drained without drain's removals, as if a mount held it.
				if err := h.db.SetDrained(true); err != nil {
					t.Fatal(err)
				}
			} else {
				h.call("POST", "/v1/drain", nil, 200, nil)
			}
			opens := h.res.OpenTotal()
			if tt.code != 200 {
				h.wantError("POST", "/v1/prefetch", prefetchReq(bertURI), tt.code, "drained", "undrain")
			} else {
				rec := h.do("POST", "/v1/prefetch", prefetchReq(bertURI))
				evs := readEvents(t, rec.Body, nil)
				if rec.Code != 200 || len(evs) != 1 || evs[0].Event != "done" || evs[0].Fetched {
					t.Errorf("prefetch of a cached model on a drained node = %d %+v", rec.Code, evs)
				}
			}
			if h.res.OpenTotal() != opens {
				t.Error("a drained node downloaded")
			}
		})
	}
}

func TestPrefetchSourceErrors(t *testing.T) {
	tests := []struct {
		name       string
		uri        string
		resolveErr error
		listErr    error
		code       int
	}{
		{"invalid modelUri", "ftp://host/x", nil, nil, 400},
		{"connection string", ":s3,access_key_id=x:bucket", nil, nil, 400},
		{"empty modelUri", "", nil, nil, 400},
		{"invalid secret", bertURI, fmt.Errorf("%w: option not allowed", source.ErrInvalid), nil, 400},
		{"unsafe key", bertURI, nil, fmt.Errorf("%w: \"../x\"", source.ErrUnsafePath), 400},
		{"denied", bertURI, nil, fmt.Errorf("listing: %w", source.ErrDenied), 403},
		{"not found at the remote", "mys3:models/none", nil, nil, 404},
		{"not found", bertURI, fmt.Errorf("%w: no bucket", source.ErrNotFound), nil, 404},
		{"unavailable", bertURI, nil, fmt.Errorf("%w: connection refused", source.ErrUnavailable), 502},
		{"anything else", bertURI, nil, errors.New("boom"), 502},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.res.SetModel(bertURI, bertFiles)
			h.res.Set(func(r *sourcetest.Resolver) { r.ResolveErr, r.ListErr = tt.resolveErr, tt.listErr })
			h.wantError("POST", "/v1/prefetch", prefetchReq(tt.uri), tt.code)
			if n := h.res.OpenTotal(); n != 0 {
				t.Errorf("a refused prefetch opened %d objects", n)
			}
		})
	}
}

func TestBadRequests(t *testing.T) {
	h := newHarness(t)
	h.build(bertURI, bertFiles)
	bodies := []struct {
		name string
		body string
	}{
		{"not JSON", "{"},
		{"wrong type", `{"ref": 12}`},
		{"unknown field", `{"ref": "` + bertURI + `", "force": true}`},
	}
	for _, path := range []string{"/v1/pin", "/v1/unpin", "/v1/evict", "/v1/gc"} {
		for _, b := range bodies {
			t.Run(path+" "+b.name, func(t *testing.T) {
				h := *h
				h.t = t
				h.wantError("POST", path, b.body, 400, "decoding request")
			})
		}
	}
	prefetchBodies := []string{
		"{",
		`{"uri": "` + bertURI + `", "secret": {"A": "b"}}`,
		`{"uri": "` + bertURI + `", "secrets": ["` + secretKey + `"]}`,
		`{"uri": "` + bertURI + `", "secrets": {"K": 12}}`,
		`{"uri": "` + bertURI + `", "secrets": {"K": "` + secretKey + `"}, "extra": "` + accessKey + `"}`,
		`{"uri": "` + bertURI + `", "secrets": {"K": ` + secretKey + `}}`,
	}
	for i, b := range prefetchBodies {
		t.Run(fmt.Sprintf("prefetch %d", i), func(t *testing.T) {
			h := *h
			h.t = t
			h.wantError("POST", "/v1/prefetch", b, 400, "decoding request")
		})
	}
	// Methods are part of the routes.
	for _, c := range []struct{ method, path string }{
		{"GET", "/v1/pin"}, {"GET", "/v1/evict"}, {"POST", "/v1/trees"}, {"DELETE", "/v1/tree"},
	} {
		if rec := h.do(c.method, c.path, nil); rec.Code != http.StatusMethodNotAllowed {
			t.Errorf("%s %s = %d, want 405", c.method, c.path, rec.Code)
		}
	}
	if rec := h.do("GET", "/v1/nothing", nil); rec.Code != http.StatusNotFound {
		t.Errorf("unknown path = %d, want 404", rec.Code)
	}
}

// captureKlog sends klog's output at verbosity v to a buffer for one test.
func captureKlog(t *testing.T, v int) *klogtest.Capture { return klogtest.Start(t, v) }

// Secrets sent for a prefetch are used in memory only: no reply, log line
// (at any verbosity) or database byte holds them (the "secrets stay in memory" invariant).
func TestSecretsNeverLeave(t *testing.T) {
	logs := captureKlog(t, 10)
	h := newHarness(t)
	h.res.SetModel(bertURI, bertFiles)
	h.res.SetModel(irisURI, irisFiles)

	var out strings.Builder
	record := func(rec *httptest.ResponseRecorder) { out.WriteString(rec.Body.String()) }
	record(h.do("POST", "/v1/prefetch", prefetchReq(bertURI)))
	record(h.do("POST", "/v1/prefetch", prefetchReq(bertURI)))
	h.res.Set(func(r *sourcetest.Resolver) { r.OpenErr = fmt.Errorf("%w: 403 Forbidden", source.ErrDenied) })
	record(h.do("POST", "/v1/prefetch", prefetchReq(irisURI)))
	h.res.Set(func(r *sourcetest.Resolver) { r.ListErr = fmt.Errorf("%w: 403 Forbidden", source.ErrDenied) })
	record(h.do("POST", "/v1/prefetch", prefetchReq(irisURI)))
	record(h.do("POST", "/v1/prefetch", `{"uri":"`+irisURI+`","secrets":{"K":"`+secretKey+`"},"x":"`+accessKey+`"}`))
	record(h.do("GET", "/v1/trees", nil))
	record(h.do("GET", treeURL(bertURI), nil))
	record(h.do("GET", "/v1/du", nil))
	record(h.do("POST", "/v1/verify", nil))
	record(h.do("POST", "/v1/drain", nil))

	if !strings.Contains(out.String(), `"event":"done"`) {
		t.Fatalf("the prefetch did not succeed; the test checks nothing: %s", out.String())
	}
	got := logs.String()
	if !strings.Contains(got, "prefetched") {
		t.Fatalf("captured no prefetch log line; the test checks nothing: %q", got)
	}
	wantNoSecrets(t, got)
	wantNoSecrets(t, out.String())

	raw, err := os.ReadFile(filepath.Join(h.dir, "state", "modelcache.db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range secretValues {
		if bytes.Contains(raw, []byte(v)) {
			t.Errorf("the state database holds a secret value")
		}
	}
}

// Serve listens on a 0600 socket, replacing a stale one, and stops with its context.
func TestServe(t *testing.T) {
	h := newHarness(t)
	h.build(irisURI, irisFiles)
	sock := filepath.Join(t.TempDir(), "run", "admin.sock")
	if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(sock, []byte("stale"), 0o666); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- admin.Serve(ctx, sock, h.srv.Handler()) }()

	deadline := time.Now().Add(waitLimit)
	for {
		fi, err := os.Lstat(sock)
		if err == nil && fi.Mode()&fs.ModeSocket != 0 {
			if perm := fi.Mode().Perm(); perm != 0o600 {
				t.Errorf("admin socket mode %v, want 0600", perm)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin socket not created: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	client := adminapi.NewClient(sock)
	client.Strict = true
	if trees, err := client.Trees(ctx); err != nil || len(trees) != 1 {
		t.Errorf("GET /v1/trees over the socket = %d trees, %v; want 1", len(trees), err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve returned %v after its context ended, want nil", err)
		}
	case <-time.After(waitLimit):
		t.Fatal("Serve did not return after its context ended")
	}
	if c, err := net.Dial("unix", sock); err == nil {
		c.Close()
		t.Error("the socket still accepts connections after Serve returned")
	}
}

func TestServeFailsOnBadPath(t *testing.T) {
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	if err := admin.Serve(ctx, filepath.Join(notDir, "admin.sock"), http.NotFoundHandler()); err == nil {
		t.Error("Serve under a file succeeded")
	}
}
