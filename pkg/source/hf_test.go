package source

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/egress"
	"github.com/modelcache/modelcache/pkg/source/hftest"
)

// hfToken is the test token: no error text may hold it.
const hfToken = "hf_TestTokenDoNotLeak0123456789abcdef"

// hfHosts names the stand-in's servers: the CDN is a subdomain of the Hub,
// where Go's client on its own would forward Authorization.
var hfHosts = map[string][]string{"hub.test": {"127.0.0.1"}, "cdn.hub.test": {"127.0.0.1"}}

type hfFixture struct {
	hub    *hftest.Hub
	src    *Sources
	commit string
	files  map[string][]byte
}

// hfModel is a model: two small files (one in a directory) and two LFS
// files, one large enough for ranged reads.
func hfModel() map[string][]byte {
	rng := rand.New(rand.NewPCG(1, 2))
	big := make([]byte, 300_000)
	for i := range big {
		big[i] = byte(rng.UintN(256))
	}
	return map[string][]byte{
		"config.json":             []byte(`{"architectures":["LlamaForCausalLM"],"hidden_size":64}`),
		"__init__.py":             {},
		"tokenizer/vocab.txt":     []byte("hello\nworld\n"),
		"model.safetensors":       big,
		"extra/weights-00001.bin": bytes.Repeat([]byte("w"), 5000),
	}
}

func newHFFixture(t *testing.T, opt hftest.Options, srcOpts ...Option) *hfFixture {
	t.Helper()
	hub := hftest.New(t, opt)
	hub.AddToken(hfToken)
	hub.CreateRepo("org/model", hftest.Repo{})
	files := hfModel()
	commit := hub.Commit("org/model", "main", files)
	src, _ := newTestRclone(t, hfHosts, append([]Option{WithAllowedEndpoints(loopback)}, srcOpts...)...)
	return &hfFixture{hub: hub, src: src, commit: commit, files: files}
}

func (f *hfFixture) secrets(token string) map[string]string {
	s := map[string]string{"HF_ENDPOINT": f.hub.URL}
	if token != "" {
		s["HF_TOKEN"] = token
	}
	return s
}

func (f *hfFixture) resolve(t *testing.T, uri, token string) *hfRemote {
	t.Helper()
	r, err := f.src.Resolve(context.Background(), uri, f.secrets(token))
	if err != nil {
		t.Fatalf("Resolve(%s): %v", uri, err)
	}
	return r.(*hfRemote)
}

// noToken fails the test when an error's text holds the token.
func noToken(t *testing.T, err error) {
	t.Helper()
	if err != nil && strings.Contains(err.Error(), hfToken) {
		t.Fatalf("error text holds the token: %v", err)
	}
}

func readAll(t *testing.T, rc io.ReadCloser, err error) ([]byte, error) {
	t.Helper()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func entryOf(t *testing.T, m Manifest, p string) Entry {
	t.Helper()
	for _, e := range m {
		if e.Path == p {
			return e
		}
	}
	t.Fatalf("%s not listed in %v", p, m)
	return Entry{}
}

func hexSum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestHFListPinsRevision(t *testing.T) {
	f := newHFFixture(t, hftest.Options{HubHost: "hub.test", CDNHost: "cdn.hub.test"})
	r := f.resolve(t, "hf://org/model", hfToken)
	m, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if r.Revision() != f.commit {
		t.Fatalf("Revision() = %q, want %q", r.Revision(), f.commit)
	}
	var _ Pinned = r
	if len(m) != len(f.files) {
		t.Fatalf("listed %d files, want %d: %v", len(m), len(f.files), m)
	}
	for _, e := range m {
		data := f.files[e.Path]
		if e.Size != int64(len(data)) {
			t.Errorf("%s: size %d, want %d", e.Path, e.Size, len(data))
		}
		lfs := strings.HasSuffix(e.Path, ".safetensors") || strings.HasSuffix(e.Path, ".bin")
		switch {
		case lfs && (e.SHA256 != hexSum(data) || e.Hash != ""):
			t.Errorf("%s: LFS entry %+v, want SHA256 %s and no Hash", e.Path, e, hexSum(data))
		case !lfs && (e.SHA256 != "" || e.Hash != "" || e.Version != "gitoid:"+hftest.GitBlobOID(data)):
			t.Errorf("%s: entry %+v, want Version gitoid:%s", e.Path, e, hftest.GitBlobOID(data))
		}
		if ObjectKey(r.Identity(), e) == "" {
			t.Errorf("%s: no object key", e.Path)
		}
	}
	// One revision lookup, then everything names the commit.
	revs := f.hub.CountRequests(func(q hftest.Request) bool { return strings.Contains(q.Path, "/revision/") })
	trees := f.hub.CountRequests(func(q hftest.Request) bool {
		return strings.HasPrefix(q.Path, "/api/models/org/model/tree/"+f.commit) && strings.Contains(q.Query, "recursive=true")
	})
	if revs != 1 || trees != 1 {
		t.Fatalf("%d revision and %d tree requests at the commit, want 1 and 1: %v", revs, trees, f.hub.Requests())
	}

	// A new commit on main with a small file changed in place (same size):
	// a new revision and a new content key.
	files := hfModel()
	files["config.json"] = bytes.ToUpper(files["config.json"])
	next := f.hub.Commit("org/model", "main", files)
	m2, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if r.Revision() != next || ContentKey(r.Identity(), m2) == ContentKey(r.Identity(), m) {
		t.Fatalf("after a new commit: revision %s (want %s), content keys equal: %v", r.Revision(), next, ContentKey(r.Identity(), m2) == ContentKey(r.Identity(), m))
	}
}

func TestHFRevisionForms(t *testing.T) {
	f := newHFFixture(t, hftest.Options{})
	pr := f.hub.Commit("org/model", "refs/pr/1", map[string][]byte{"a.txt": []byte("pr")})
	tag := f.hub.Commit("org/model", "v1.0", map[string][]byte{"b.txt": []byte("tag")})
	for _, tc := range []struct{ uri, want, path string }{
		{"hf://org/model@refs/pr/1", pr, "/api/models/org/model/revision/refs%2Fpr%2F1"},
		{"hf://org/model@v1.0", tag, "/api/models/org/model/revision/v1.0"},
		{"hf://org/model@" + f.commit, f.commit, "/api/models/org/model/revision/" + f.commit},
	} {
		r := f.resolve(t, tc.uri, "")
		if _, err := r.List(context.Background()); err != nil {
			t.Fatalf("%s: %v", tc.uri, err)
		}
		if r.Revision() != tc.want {
			t.Errorf("%s: revision %s, want %s", tc.uri, r.Revision(), tc.want)
		}
		if n := f.hub.CountRequests(func(q hftest.Request) bool { return q.Path == tc.path }); n == 0 {
			t.Errorf("%s: no request for %s", tc.uri, tc.path)
		}
	}
	// Two revisions of one model are one identity but never one source.
	a, b := f.resolve(t, "hf://org/model@main", hfToken), f.resolve(t, "hf://org/model@v1.0", hfToken)
	if a.Identity() != b.Identity() || SourceKey(a) == SourceKey(b) {
		t.Fatalf("identities equal %v (want true), source keys equal %v (want false)", a.Identity() == b.Identity(), SourceKey(a) == SourceKey(b))
	}
}

func TestHFListPages(t *testing.T) {
	f := newHFFixture(t, hftest.Options{PageSize: 2})
	r := f.resolve(t, "hf://org/model", "")
	m, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != len(f.files) {
		t.Fatalf("listed %d files, want %d", len(m), len(f.files))
	}
	// 5 files and 2 directories in pages of 2.
	if n := f.hub.CountRequests(func(q hftest.Request) bool { return strings.Contains(q.Path, "/tree/") }); n != 4 {
		t.Fatalf("%d tree pages fetched, want 4", n)
	}
	if n := f.hub.CountRequests(func(q hftest.Request) bool { return strings.Contains(q.Query, "cursor=") }); n != 3 {
		t.Fatalf("%d pages followed, want 3", n)
	}

	small, _ := newTestRclone(t, hfHosts, WithAllowedEndpoints(loopback), WithMaxFiles(3))
	rs, err := small.Resolve(context.Background(), "hf://org/model", f.secrets(""))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rs.List(context.Background()); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("List past --max-files: %v, want ErrTooLarge", err)
	}
}

func TestHFNextPage(t *testing.T) {
	f := newHFFixture(t, hftest.Options{})
	r := f.resolve(t, "hf://org/model", "")
	for _, tc := range []struct {
		link, want string
		err        error
	}{
		{"", "", nil},
		{`<` + f.hub.URL + `/api/models/org/model/tree/x?cursor=abc>; rel="next"`, f.hub.URL + "/api/models/org/model/tree/x?cursor=abc", nil},
		{`</api/models/org/model/tree/x?cursor=abc>; rel="next"`, f.hub.URL + "/api/models/org/model/tree/x?cursor=abc", nil},
		{`<https://elsewhere.example/api/models/org/model/tree/x?cursor=abc>; rel="next"`, "", ErrInvalid},
		{`<` + strings.Replace(f.hub.URL, "http:", "https:", 1) + `/x>; rel="next"`, "", ErrInvalid},
		{`<` + f.hub.URL + `/x>; rel="prev"`, "", nil},
	} {
		got, err := r.nextPage("listing", tc.link)
		if got != tc.want || !errors.Is(err, tc.err) && (err != nil || tc.err != nil) {
			t.Errorf("nextPage(%q) = %q, %v; want %q, %v", tc.link, got, err, tc.want, tc.err)
		}
	}
}

func TestHFOpen(t *testing.T) {
	for _, tc := range []struct {
		name string
		opt  hftest.Options
	}{
		{"CDN on a subdomain", hftest.Options{HubHost: "hub.test", CDNHost: "cdn.hub.test"}},
		{"CDN on another port of the same host", hftest.Options{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newHFFixture(t, tc.opt)
			r := f.resolve(t, "hf://org/model", hfToken)
			m, err := r.List(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range m {
				rc, err := r.Open(context.Background(), e)
				got, err := readAll(t, rc, err)
				if err != nil || !bytes.Equal(got, f.files[e.Path]) {
					t.Fatalf("Open(%s): %d bytes, %v; want %d bytes", e.Path, len(got), err, len(f.files[e.Path]))
				}
			}
			var cdn, hubAuth, hub int
			for _, q := range f.hub.Requests() {
				switch {
				case q.Server == "cdn":
					cdn++
					if q.Authorization != "" {
						t.Errorf("the CDN received Authorization %q for %s", q.Authorization, q.Path)
					}
				case q.Server == "hub":
					hub++
					if strings.Contains(q.Accept, "xet") {
						t.Errorf("%s asked for Xet file info (Accept %q)", q.Path, q.Accept)
					}
					if q.Authorization == "Bearer "+hfToken {
						hubAuth++
					}
				}
			}
			if cdn != 2 || hubAuth != hub {
				t.Fatalf("%d CDN requests (want 2, one per LFS file); %d of %d Hub requests had the token", cdn, hubAuth, hub)
			}
		})
	}
}

func TestHFCorruptSmallFile(t *testing.T) {
	f := newHFFixture(t, hftest.Options{})
	r := f.resolve(t, "hf://org/model", "")
	m, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	e := entryOf(t, m, "config.json")
	orig := f.files["config.json"]
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"same size", bytes.ToUpper(orig)},
		{"shorter", orig[:len(orig)-1]},
		{"longer", append(bytes.Clone(orig), '\n')},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f.hub.Corrupt("org/model", "config.json", tc.data)
			rc, err := r.Open(context.Background(), e)
			got, err := readAll(t, rc, err)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Open of a corrupted file: %d bytes, %v; want ErrCorrupt", len(got), err)
			}
			// A ranged read that stops at its window's end sees it too.
			rc, err = r.OpenRange(context.Background(), e, 0, 5)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 5)
			_, err = io.ReadFull(rc, buf)
			rc.Close()
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("ranged read of a corrupted file: %v; want ErrCorrupt", err)
			}
		})
	}
}

func TestHFOpenRange(t *testing.T) {
	f := newHFFixture(t, hftest.Options{HubHost: "hub.test", CDNHost: "cdn.hub.test"})
	r := f.resolve(t, "hf://org/model", hfToken)
	m, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path     string
		off, len int64
	}{
		{"model.safetensors", 0, 100},
		{"model.safetensors", 150_000, 150_000},
		{"model.safetensors", 299_999, 1},
		{"model.safetensors", 0, 300_000},
		{"config.json", 3, 10},
		{"config.json", 0, int64(len(f.files["config.json"]))},
	} {
		e := entryOf(t, m, tc.path)
		rc, err := r.OpenRange(context.Background(), e, tc.off, tc.len)
		if err != nil {
			t.Fatalf("OpenRange(%s, %d, %d): %v", tc.path, tc.off, tc.len, err)
		}
		// As the store reads a chunk: the window, then one byte more.
		buf := make([]byte, tc.len)
		_, err = io.ReadFull(rc, buf)
		k, _ := rc.Read(make([]byte, 1))
		rc.Close()
		if err != nil || k != 0 || !bytes.Equal(buf, f.files[tc.path][tc.off:tc.off+tc.len]) {
			t.Fatalf("OpenRange(%s, %d, %d): %v, %d bytes past the window, bytes equal: %v", tc.path, tc.off, tc.len, err, k, bytes.Equal(buf, f.files[tc.path][tc.off:tc.off+tc.len]))
		}
	}
	if n := f.hub.CountRequests(func(q hftest.Request) bool { return q.Server == "cdn" && q.Authorization != "" }); n != 0 {
		t.Fatalf("%d CDN requests carried Authorization", n)
	}
}

// A server that ignores Range sends the whole file: the window is cut
// out of it; a 206 must say it holds the window of a file of the listed
// size.
func TestHFWindow(t *testing.T) {
	r := &hfRemote{uri: URI{Scheme: SchemeHF, Path: "org/model", Ref: "main"}}
	e := Entry{Path: "f", Size: 10}
	data := "0123456789"
	for _, tc := range []struct {
		name   string
		status int
		cr     string
		body   string
		want   string
		err    error
	}{
		{"200 to a range", 200, "", data, "3456", nil},
		{"206", 206, "bytes 3-6/10", "3456", "3456", nil},
		{"206 other size", 206, "bytes 3-6/11", "3456", "", ErrChanged},
		{"206 other range", 206, "bytes 0-3/10", "0123", "", ErrUnavailable},
		{"206 no Content-Range", 206, "", "3456", "", ErrUnavailable},
	} {
		resp := &http.Response{StatusCode: tc.status, Header: http.Header{}, Body: io.NopCloser(strings.NewReader(tc.body))}
		if tc.cr != "" {
			resp.Header.Set("Content-Range", tc.cr)
		}
		body, err := r.window("reading", resp, e, 3, 4)
		if !errors.Is(err, tc.err) && (err != nil || tc.err != nil) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.err)
			continue
		}
		if err == nil {
			got, _ := io.ReadAll(body)
			if string(got) != tc.want {
				t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
			}
		}
	}
}

func TestHFExpiredSignedURL(t *testing.T) {
	f := newHFFixture(t, hftest.Options{})
	r := f.resolve(t, "hf://org/model", hfToken)
	m, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	e := entryOf(t, m, "model.safetensors")
	resolves := func() int {
		return f.hub.CountRequests(func(q hftest.Request) bool { return strings.Contains(q.Path, "/resolve/") })
	}

	f.hub.ExpireSignedURLs(1)
	rc, err := r.Open(context.Background(), e)
	got, err := readAll(t, rc, err)
	if err != nil || !bytes.Equal(got, f.files[e.Path]) {
		t.Fatalf("Open after an expired signed URL: %v", err)
	}
	if n := resolves(); n != 2 {
		t.Fatalf("%d resolve requests, want 2 (the second for a fresh URL)", n)
	}

	// Only once: a CDN that keeps refusing is a failure to retry later.
	f.hub.ExpireSignedURLs(2)
	_, err = r.Open(context.Background(), e)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "signed URL") {
		t.Fatalf("Open with two expired URLs: %v, want ErrUnavailable about the signed URL", err)
	}
	if strings.Contains(err.Error(), "Signature=") {
		t.Fatalf("error text holds the signed URL: %v", err)
	}
}

func TestHFDenied(t *testing.T) {
	f := newHFFixture(t, hftest.Options{})
	const other = "hf_OtherTokenWithoutAccess987654321"
	f.hub.AddToken(other)
	f.hub.CreateRepo("org/gated", hftest.Repo{Gated: true, Access: []string{hfToken}})
	f.hub.Commit("org/gated", "main", hfModel())
	f.hub.CreateRepo("org/private", hftest.Repo{Private: true, Access: []string{hfToken}})
	f.hub.Commit("org/private", "main", hfModel())

	for _, tc := range []struct {
		name, uri, token string
		list, open       error // want
		hint             string
	}{
		{"gated without a token", "hf://org/gated", "", nil, ErrDenied, "accept the model's terms"},
		{"gated, terms not accepted", "hf://org/gated", other, nil, ErrDenied, "accept the model's terms"},
		{"gated, terms accepted", "hf://org/gated", hfToken, nil, nil, ""},
		{"wrong token", "hf://org/model", "hf_NotAValidToken000000000000000", ErrDenied, nil, "does not accept HF_TOKEN"},
		{"private without a token", "hf://org/private", "", ErrNotFound, nil, "if it is private, give an HF_TOKEN"},
		{"private with another's token", "hf://org/private", other, ErrNotFound, nil, "if it is private"},
		{"private with its token", "hf://org/private", hfToken, nil, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := f.resolve(t, tc.uri, tc.token)
			m, err := r.List(context.Background())
			noToken(t, err)
			if !errors.Is(err, tc.list) && (err != nil || tc.list != nil) {
				t.Fatalf("List: %v, want %v", err, tc.list)
			}
			if err != nil {
				if !strings.Contains(err.Error(), tc.hint) || strings.Contains(err.Error(), tc.token) && tc.token != "" {
					t.Fatalf("List: %q, want the hint %q and no token", err, tc.hint)
				}
				return
			}
			e := entryOf(t, m, "model.safetensors")
			rc, err := r.Open(context.Background(), e)
			_, err = readAll(t, rc, err)
			verr := r.Verify(context.Background(), m)
			noToken(t, err)
			noToken(t, verr)
			if !errors.Is(err, tc.open) && (err != nil || tc.open != nil) || !errors.Is(verr, tc.open) && (verr != nil || tc.open != nil) {
				t.Fatalf("Open: %v, Verify: %v; want %v", err, verr, tc.open)
			}
			if err != nil && (!strings.Contains(err.Error(), tc.hint) || !strings.Contains(verr.Error(), tc.hint) || strings.Contains(err.Error(), other)) {
				t.Fatalf("Open: %q, Verify: %q; want the hint %q", err, verr, tc.hint)
			}
		})
	}
}

func TestHFNotFound(t *testing.T) {
	f := newHFFixture(t, hftest.Options{})
	r := f.resolve(t, "hf://org/model", hfToken)
	m, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	missing := Entry{Path: "nope.json", Size: 3, Version: "gitoid:" + strings.Repeat("0", 40)}
	for _, tc := range []struct {
		name string
		call func() error
		want string
	}{
		{"repository", func() error {
			_, err := f.resolve(t, "hf://org/nothing", hfToken).List(context.Background())
			return err
		}, "repository org/nothing not found"},
		{"revision", func() error {
			_, err := f.resolve(t, "hf://org/model@nobranch", hfToken).List(context.Background())
			return err
		}, `revision "nobranch" not found`},
		{"file", func() error { _, err := r.Open(context.Background(), missing); return err }, "not in this commit"},
		{"file at Verify", func() error { return r.Verify(context.Background(), append(Manifest{missing}, m...)) }, "not in this commit"},
	} {
		err := tc.call()
		noToken(t, err)
		if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrNotFound saying %q", tc.name, err, tc.want)
		}
	}
}

func TestHFThrottled(t *testing.T) {
	f := newHFFixture(t, hftest.Options{})
	r := f.resolve(t, "hf://org/model", "")
	throttled := func() int {
		n := 0
		for range f.hub.Requests() {
			n++
		}
		return n
	}
	f.hub.Throttle(2, "1")
	before := throttled()
	if _, err := r.List(context.Background()); err != nil {
		t.Fatalf("List after two 429s: %v", err)
	}
	// Two refused and retried, then the revision and the tree.
	if n := throttled() - before; n != 4 {
		t.Fatalf("%d requests, want 4", n)
	}

	f.hub.Throttle(1, "120")
	_, err := r.List(context.Background())
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "retry after 2m0s") {
		t.Fatalf("List asked to wait 2 minutes: %v, want ErrUnavailable with the wait", err)
	}
	f.hub.Throttle(0, "")
	if _, err := r.List(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for v, want := range map[string]time.Duration{
		"1": time.Second, " 30 ": 30 * time.Second, "-5": 0, "": hfDefaultRetryAfter, "soon": hfDefaultRetryAfter,
		now.Add(90 * time.Second).Format(http.TimeFormat): 90 * time.Second,
		now.Add(-time.Hour).Format(http.TimeFormat):       0,
	} {
		if got := retryAfter(v, now); got != want {
			t.Errorf("retryAfter(%q) = %s, want %s", v, got, want)
		}
	}
}

// recordingDial dials through a net.Dialer and records every address.
type recordingDial struct {
	mu    sync.Mutex
	addrs []string
}

func (d *recordingDial) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.addrs = append(d.addrs, addr)
	d.mu.Unlock()
	return (&net.Dialer{}).DialContext(ctx, network, addr)
}

func TestHFRedirectRefused(t *testing.T) {
	// A listener on 127.0.0.2 that the rules refuse: only 127.0.0.1 is allowed.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	for _, target := range []string{"http://169.254.169.254", "http://" + ln.Addr().String()} {
		t.Run(target, func(t *testing.T) {
			hub := hftest.New(t, hftest.Options{})
			hub.CreateRepo("org/model", hftest.Repo{})
			hub.Commit("org/model", "main", hfModel())
			hub.RedirectLFSTo(target)
			dial := &recordingDial{}
			dns := &fakeDNS{}
			g := egress.New(egress.Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}},
				egress.WithResolver(dns), egress.WithDialer(dial.dial),
				egress.WithInterfaceAddrs(func() ([]net.Addr, error) { return nil, nil }))
			src := NewSources([]byte("k"), WithEgress(g))
			rem, err := src.Resolve(context.Background(), "hf://org/model", map[string]string{"HF_ENDPOINT": hub.URL})
			if err != nil {
				t.Fatal(err)
			}
			m, err := rem.List(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			_, err = rem.Open(context.Background(), entryOf(t, m, "model.safetensors"))
			if !errors.Is(err, ErrRefused) {
				t.Fatalf("Open redirected to %s: %v, want ErrRefused", target, err)
			}
			for _, a := range dial.addrs {
				if !strings.HasPrefix(a, "127.0.0.1:") {
					t.Fatalf("dialled %s", a)
				}
			}
			if accepted.Load() != 0 {
				t.Fatalf("the refused listener accepted %d connections", accepted.Load())
			}
		})
	}
}

func TestHFSecrets(t *testing.T) {
	hosts := map[string][]string{"mirror.example": {"93.184.215.14"}, "meta.example": {"169.254.169.254"}}
	src, _ := newTestRclone(t, hosts)
	for _, tc := range []struct {
		name    string
		secrets map[string]string
		err     error
		want    string // in the message
	}{
		{"none", nil, nil, ""},
		{"token", map[string]string{"HF_TOKEN": hfToken}, nil, ""},
		{"token with a newline, as from a file", map[string]string{"HF_TOKEN": hfToken + "\n"}, nil, ""},
		{"mirror", map[string]string{"HF_ENDPOINT": "https://mirror.example/hf/"}, nil, ""},
		{"http mirror", map[string]string{"HF_ENDPOINT": "http://mirror.example:8080"}, nil, ""},
		{"other key", map[string]string{"HF_TOKEN": hfToken, "AWS_ACCESS_KEY_ID": "x"}, ErrInvalid, "the accepted keys are HF_TOKEN"},
		{"HF_HOME", map[string]string{"HF_HOME": "/root"}, ErrInvalid, "HF_ENDPOINT"},
		{"token with a space", map[string]string{"HF_TOKEN": "hf_abc def"}, ErrInvalid, "not a Hub access token"},
		{"endpoint not a URL", map[string]string{"HF_ENDPOINT": "mirror.example"}, ErrInvalid, "HF_ENDPOINT is not an http(s) URL"},
		{"endpoint ftp", map[string]string{"HF_ENDPOINT": "ftp://mirror.example"}, ErrInvalid, "not an http(s) URL"},
		{"endpoint with user info", map[string]string{"HF_ENDPOINT": "https://u:" + hfToken + "@mirror.example"}, ErrInvalid, "no user info"},
		{"endpoint with a query", map[string]string{"HF_ENDPOINT": "https://mirror.example/?token=" + hfToken}, ErrInvalid, "no user info, query"},
		{"endpoint at the metadata service", map[string]string{"HF_ENDPOINT": "http://169.254.169.254"}, ErrInvalid, "link-local"},
		{"endpoint resolving to it", map[string]string{"HF_ENDPOINT": "https://meta.example"}, ErrInvalid, "link-local"},
		{"endpoint at loopback", map[string]string{"HF_ENDPOINT": "http://127.0.0.1:8080"}, ErrInvalid, "--allow-endpoint"},
		{"endpoint not resolving", map[string]string{"HF_ENDPOINT": "https://nowhere.example"}, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := src.Resolve(context.Background(), "hf://org/model", tc.secrets)
			noToken(t, err)
			if !errors.Is(err, tc.err) && (err != nil || tc.err != nil) || err != nil && !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Resolve: %v, want %v saying %q", err, tc.err, tc.want)
			}
		})
	}
}

func TestHFIdentity(t *testing.T) {
	src, _ := newTestRclone(t, map[string][]string{"hub.example": {"93.184.215.14"}, "other.example": {"93.184.215.15"}})
	rem := func(uri string, s map[string]string) Remote {
		r, err := src.Resolve(context.Background(), uri, s)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	a := rem("hf://org/model", nil)
	if a.Identity() != "hf\x00https://huggingface.co\x00org/model" {
		t.Fatalf("Identity() = %q", a.Identity())
	}
	same := []Remote{
		rem("hf://org/model@main", map[string]string{"HF_ENDPOINT": "https://huggingface.co/"}),
		rem("hf://org/model", map[string]string{"HF_ENDPOINT": "HTTPS://HuggingFace.co:443"}),
		rem("hf://org/model", map[string]string{"HF_TOKEN": ""}),
	}
	for _, r := range same {
		if r.Identity() != a.Identity() || r.CredentialID() != a.CredentialID() {
			t.Errorf("%v: identity %q or credentials differ from %q", r.URI(), r.Identity(), a.Identity())
		}
	}
	tok := rem("hf://org/model", map[string]string{"HF_TOKEN": hfToken})
	tok2 := rem("hf://org/model", map[string]string{"HF_TOKEN": hfToken + "x"})
	mirror := rem("hf://org/model", map[string]string{"HF_ENDPOINT": "https://hub.example", "HF_TOKEN": hfToken})
	if tok.Identity() != a.Identity() || tok.CredentialID() == a.CredentialID() || tok2.CredentialID() == tok.CredentialID() {
		t.Error("a token must change the credentials, not the identity")
	}
	if mirror.Identity() == a.Identity() || mirror.CredentialID() == tok.CredentialID() {
		t.Error("another endpoint must change the identity and the credentials")
	}
	for _, r := range []Remote{tok, tok2, mirror} {
		if strings.Contains(r.CredentialID(), hfToken) || strings.Contains(fmt.Sprint(r.URI()), hfToken) {
			t.Errorf("the token shows in %v", r.URI())
		}
	}
}

func TestHFVerify(t *testing.T) {
	f := newHFFixture(t, hftest.Options{})
	r := f.resolve(t, "hf://org/model", hfToken)
	m, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	before := len(f.hub.Requests())
	if err := r.Verify(context.Background(), m); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	for _, q := range f.hub.Requests()[before:] {
		if q.Server != "hub" || q.Method != http.MethodHead {
			t.Fatalf("Verify made %s %s on the %s; want HEADs on the Hub only", q.Method, q.Path, q.Server)
		}
	}
	if n := len(f.hub.Requests()) - before; n != len(m) {
		t.Fatalf("Verify made %d requests for %d files", n, len(m))
	}
	for _, tc := range []struct {
		name string
		edit func(*Entry)
	}{
		{"LFS sha256", func(e *Entry) { e.SHA256 = strings.Repeat("a", 64) }},
		{"LFS size", func(e *Entry) { e.Size++ }},
	} {
		changed := append(Manifest(nil), m...)
		for i := range changed {
			if changed[i].SHA256 != "" {
				tc.edit(&changed[i])
				break
			}
		}
		if err := r.Verify(context.Background(), changed); !errors.Is(err, ErrChanged) {
			t.Errorf("%s: Verify: %v, want ErrChanged", tc.name, err)
		}
	}
	small := entryOf(t, m, "config.json")
	small.Version = "gitoid:" + strings.Repeat("b", 40)
	if err := r.Verify(context.Background(), Manifest{small}); !errors.Is(err, ErrChanged) {
		t.Errorf("other git oid: Verify: %v, want ErrChanged", err)
	}
	if err := r.Verify(context.Background(), nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("empty manifest: %v, want ErrInvalid", err)
	}
}

func TestHFCheckRedirect(t *testing.T) {
	ep, err := hfEndpoint("https://hub.example")
	if err != nil {
		t.Fatal(err)
	}
	r := &hfRemote{endpoint: ep}
	for _, tc := range []struct {
		from, to string
		auth     bool
		err      error
	}{
		{"https://hub.example/a", "https://hub.example/b", true, nil},
		{"https://hub.example/a", "https://hub.example:443/b", true, nil},
		{"https://hub.example/a", "https://cdn.hub.example/b", false, nil},
		{"https://hub.example/a", "https://hub.example:8443/b", false, nil},
		{"https://hub.example/a", "https://cdn.other.example/b", false, nil},
		{"https://hub.example/a", "http://hub.example/b", false, errHFDowngrade},
	} {
		from, _ := http.NewRequest(http.MethodGet, tc.from, nil)
		to, _ := http.NewRequest(http.MethodGet, tc.to, nil)
		to.Header.Set("Authorization", "Bearer "+hfToken)
		err := r.checkRedirect(to, []*http.Request{from})
		if !errors.Is(err, tc.err) && (err != nil || tc.err != nil) || tc.err == nil && (to.Header.Get("Authorization") != "") != tc.auth {
			t.Errorf("%s → %s: %v, Authorization kept %v; want %v, %v", tc.from, tc.to, err, to.Header.Get("Authorization") != "", tc.err, tc.auth)
		}
	}
}
