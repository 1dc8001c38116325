// Package hftest is a Hugging Face Hub stand-in for tests: two HTTP
// servers on 127.0.0.1, the Hub and its download CDN, answering the
// requests huggingface_hub and @huggingface/hub make, with the Hub's
// response shapes: a model's revision (/api/models/{repo}/revision/{rev},
// JSON with "sha"), its tree (/api/models/{repo}/tree/{rev}, JSON arrays
// of {type, oid, size, path, lfs{oid, size, pointerSize}} in pages linked
// by a Link header), and its files (/{repo}/resolve/{rev}/{path}): small
// files served directly with X-Repo-Commit and ETag (the git blob oid),
// LFS files as a 302 to the CDN with a signed URL that expires, as the
// Hub sends them to its CDN. Private and gated repositories, tokens, rate
// limits (429 with Retry-After) and X-Error-Code on errors behave as the
// Hub's do. test/hfclient keeps it honest against the official client.
package hftest

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Options configure a Hub.
type Options struct {
	// HubHost and CDNHost, when set, name the two servers in the URLs the
	// Hub hands out ("hub.test" for http://hub.test:<port>) instead of
	// 127.0.0.1, for a client whose DNS maps them to loopback.
	HubHost, CDNHost string
	// PageSize is how many entries a tree page holds (the Hub: 1000).
	PageSize int
	// LFSAbove makes files larger than it LFS files (default 1024 bytes).
	LFSAbove int
}

// Hub is the stand-in. Its methods are safe for concurrent use.
type Hub struct {
	// URL is the Hub's endpoint, what HF_ENDPOINT or hubUrl names.
	URL string
	// CDNURL is where LFS downloads are redirected.
	CDNURL string

	opt      Options
	hub, cdn *httptest.Server
	signKey  []byte

	mu         sync.Mutex
	repos      map[string]*repo
	tokens     map[string]bool
	throttle   int
	retryAfter string
	expired    int
	lfsBase    string // overrides CDNURL in redirects
	corrupt    map[string][]byte
	requests   []Request
	seq        int
}

// Request is one request a server received.
type Request struct {
	Server string // "hub" or "cdn"
	Method string
	Path   string // escaped
	Query  string
	// Authorization, Range and Accept are the headers as received ("" when
	// absent).
	Authorization, Range, Accept string
}

// Repo says who may read a repository.
type Repo struct {
	// Private repositories exist only for tokens in Access: for others
	// the Hub answers RepoNotFound.
	Private bool
	// Gated repositories list their files for anyone, but serve them only
	// to tokens in Access (whose owners accepted the terms).
	Gated  bool
	Access []string
}

type repo struct {
	Repo
	refs    map[string]string // branch or tag → commit
	commits map[string]*commit
}

type commit struct {
	sha   string
	files map[string]*file
}

type file struct {
	data []byte
	oid  string // git blob oid: of the data, or of the LFS pointer
	lfs  bool
	sha  string // sha256 of data, the LFS oid
	ptr  int    // LFS pointer size
}

// New starts a Hub and its CDN; both stop when the test ends.
func New(t testing.TB, opt Options) *Hub {
	t.Helper()
	h := Start(opt)
	t.Cleanup(h.Close)
	return h
}

// Start starts a Hub and its CDN outside a test (test/benchrun); Close
// stops them.
func Start(opt Options) *Hub {
	if opt.PageSize <= 0 {
		opt.PageSize = 1000
	}
	if opt.LFSAbove <= 0 {
		opt.LFSAbove = 1024
	}
	h := &Hub{opt: opt, repos: map[string]*repo{}, tokens: map[string]bool{}, corrupt: map[string][]byte{}, signKey: []byte("hftest signing key")}
	h.hub = httptest.NewServer(http.HandlerFunc(h.serveHub))
	h.cdn = httptest.NewServer(http.HandlerFunc(h.serveCDN))
	h.URL = withHost(h.hub.URL, opt.HubHost)
	h.CDNURL = withHost(h.cdn.URL, opt.CDNHost)
	return h
}

// Close stops both servers.
func (h *Hub) Close() {
	h.cdn.Close()
	h.hub.Close()
}

func withHost(u, host string) string {
	if host == "" {
		return u
	}
	return strings.Replace(u, "127.0.0.1", host, 1)
}

// AddToken makes tok a valid token; others are refused as the Hub
// refuses them ("Invalid credentials in Authorization header").
func (h *Hub) AddToken(tok string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.tokens[tok] = true
}

// CreateRepo creates repository id ("org/model" or "model").
func (h *Hub) CreateRepo(id string, r Repo) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.repos[id] = &repo{Repo: r, refs: map[string]string{}, commits: map[string]*commit{}}
}

// Commit makes files the whole content of ref (a branch or tag) in a new
// commit and returns its 40-hex id. Files larger than Options.LFSAbove,
// and .safetensors and .bin files, are LFS files.
func (h *Hub) Commit(id, ref string, files map[string][]byte) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.repos[id]
	if r == nil {
		panic("hftest: no repository " + id)
	}
	c := &commit{files: map[string]*file{}}
	sum := sha1.New()
	h.seq++
	fmt.Fprintf(sum, "commit %d of %s\x00", h.seq, id)
	for _, p := range slices.Sorted(maps.Keys(files)) {
		f := newFile(files[p], len(files[p]) > h.opt.LFSAbove || strings.HasSuffix(p, ".safetensors") || strings.HasSuffix(p, ".bin"))
		c.files[p] = f
		fmt.Fprintf(sum, "%s\x00%s\n", p, f.oid)
	}
	c.sha = hex.EncodeToString(sum.Sum(nil))
	r.commits[c.sha] = c
	r.refs[ref] = c.sha
	return c.sha
}

func newFile(data []byte, lfs bool) *file {
	f := &file{data: data, lfs: lfs}
	s := sha256.Sum256(data)
	f.sha = hex.EncodeToString(s[:])
	if !lfs {
		f.oid = GitBlobOID(data)
		return f
	}
	ptr := fmt.Sprintf("version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n", f.sha, len(data))
	f.ptr = len(ptr)
	f.oid = GitBlobOID([]byte(ptr))
	return f
}

// GitBlobOID is git's object id of a blob: the sha1 of "blob <size>\0"
// and the content.
func GitBlobOID(data []byte) string {
	h := sha1.New()
	fmt.Fprintf(h, "blob %d\x00", len(data))
	h.Write(data)
	return hex.EncodeToString(h.Sum(nil))
}

// Corrupt makes every download of path in repository id return data
// instead of the committed bytes, as a broken cache between the Hub and
// a client would.
func (h *Hub) Corrupt(id, path string, data []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.corrupt[id+"/"+path] = data
}

// Throttle answers the next n requests to the Hub (not the CDN) with 429
// Too Many Requests and Retry-After: retryAfter.
func (h *Hub) Throttle(n int, retryAfter string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.throttle, h.retryAfter = n, retryAfter
}

// ExpireSignedURLs makes the next n LFS redirects carry a signed URL that
// expired already: the CDN refuses it with 403, as S3 and CloudFront do.
func (h *Hub) ExpireSignedURLs(n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.expired = n
}

// RedirectLFSTo sends LFS redirects to base (scheme://host:port) instead
// of the CDN: a Hub, or a mirror, pointing its clients somewhere else.
func (h *Hub) RedirectLFSTo(base string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lfsBase = base
}

// Requests returns the requests both servers received so far.
func (h *Hub) Requests() []Request {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.requests)
}

// CountRequests counts received requests for which match is true.
func (h *Hub) CountRequests(match func(Request) bool) int {
	n := 0
	for _, r := range h.Requests() {
		if match(r) {
			n++
		}
	}
	return n
}

func (h *Hub) record(server string, r *http.Request) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.requests = append(h.requests, Request{Server: server, Method: r.Method, Path: r.URL.EscapedPath(), Query: r.URL.RawQuery, Authorization: r.Header.Get("Authorization"), Range: r.Header.Get("Range"), Accept: r.Header.Get("Accept")})
}

// sign returns the CDN's signed query for content sha expiring at exp.
func (h *Hub) sign(sha string, exp int64) string {
	m := hmac.New(sha256.New, h.signKey)
	fmt.Fprintf(m, "%s\x00%d", sha, exp)
	return fmt.Sprintf("Expires=%d&Signature=%s", exp, hex.EncodeToString(m.Sum(nil)))
}

func (h *Hub) serveCDN(w http.ResponseWriter, r *http.Request) {
	h.record("cdn", r)
	sha, ok := strings.CutPrefix(r.URL.Path, "/repos/")
	var exp int64
	fmt.Sscan(r.URL.Query().Get("Expires"), &exp)
	want := h.sign(sha, exp)
	got := fmt.Sprintf("Expires=%s&Signature=%s", r.URL.Query().Get("Expires"), r.URL.Query().Get("Signature"))
	switch {
	case !ok || !hmac.Equal([]byte(want), []byte(got)):
		s3Error(w, http.StatusForbidden, "AccessDenied", "Invalid signature")
		return
	case time.Now().Unix() > exp:
		s3Error(w, http.StatusForbidden, "AccessDenied", "Request has expired")
		return
	}
	data, found := h.lfsData(sha)
	if !found {
		s3Error(w, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.")
		return
	}
	w.Header().Set("ETag", `"`+sha+`"`)
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
}

func s3Error(w http.ResponseWriter, code int, c, msg string) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(code)
	fmt.Fprintf(w, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>", c, msg)
}

// lfsData finds the bytes of LFS content sha in any repository, corrupted
// when Corrupt said so.
func (h *Hub) lfsData(sha string) ([]byte, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, r := range h.repos {
		for _, c := range r.commits {
			for p, f := range c.files {
				if f.lfs && f.sha == sha {
					if d, ok := h.corrupt[id+"/"+p]; ok {
						return d, true
					}
					return f.data, true
				}
			}
		}
	}
	return nil, false
}
