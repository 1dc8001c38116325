package source

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/modelcache/modelcache/pkg/source/remotespec"
)

// The hf:// source reads models from the Hugging Face Hub (or a mirror of
// it) with the Hub's HTTP API, as huggingface_hub and @huggingface/hub do:
// the revision resolves to a commit once per List, and the listing and
// every download name that commit, so a publish reads one version however
// the branch moves meanwhile.

// Secret keys of an hf:// model.
const (
	hfTokenKey    = "HF_TOKEN"
	hfEndpointKey = "HF_ENDPOINT"
)

// hfDefaultEndpoint is the Hub itself.
const hfDefaultEndpoint = "https://huggingface.co"

const (
	// hfMaxJSON bounds one JSON answer held in memory: a revision's
	// model info, one page of a tree listing (the Hub's pages of 1000
	// entries are a few hundred KB).
	hfMaxJSON = 16 << 20
	// hfMaxTokenLen bounds HF_TOKEN (the Hub's are 37 characters).
	hfMaxTokenLen = 4096
)

var (
	hfCommit = regexp.MustCompile(`^[0-9a-f]{40}$`)
	hexSHA1  = hfCommit
	hexSHA   = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// hfRemote is one model at the Hub, read with one request's token.
type hfRemote struct {
	uri      URI
	endpoint *url.URL // scheme://host[:port][/path], no trailing slash
	token    string
	secrets  map[string]string // for Scrub
	identity string
	credID   string
	maxFiles int

	client     *http.Client // follows redirects; Authorization only to the endpoint's origin
	headClient *http.Client // Verify's: follows none
	conns      *activity
	// deferredCheck is the endpoint check Resolve could not finish.
	deferredCheck func(ctx context.Context) error

	mu     sync.Mutex
	commit string // what the last List pinned the revision to
}

// resolveHF builds the hf:// remote from its secret: HF_TOKEN (optional;
// public models need none) and HF_ENDPOINT (optional, a mirror's http(s)
// URL; default https://huggingface.co). A chosen endpoint is checked like
// every endpoint a secret names; the Hub itself is not looked up.
func (r *Sources) resolveHF(ctx context.Context, u URI, secrets map[string]string) (Remote, error) {
	for _, k := range slices.Sorted(maps.Keys(secrets)) {
		if k != hfTokenKey && k != hfEndpointKey {
			return nil, fmt.Errorf("%w: secret key %q is not read for hf:// models; the accepted keys are %s (optional, a Hub access token) and %s (optional, a Hub mirror's URL)", ErrInvalid, k, hfTokenKey, hfEndpointKey)
		}
	}
	token := strings.TrimSpace(secrets[hfTokenKey])
	if len(token) > hfMaxTokenLen || strings.ContainsFunc(token, func(c rune) bool { return c <= ' ' || c > '~' }) {
		return nil, fmt.Errorf("%w: %s is not a Hub access token (printable ASCII without spaces, at most %d characters)", ErrInvalid, hfTokenKey, hfMaxTokenLen)
	}
	ep, err := hfEndpoint(secrets[hfEndpointKey])
	if err != nil {
		return nil, err
	}
	remote := &hfRemote{
		uri: u, endpoint: ep, token: token, secrets: secrets, maxFiles: r.maxFiles,
		identity: "hf\x00" + ep.String() + "\x00" + u.Path,
		credID:   hfCredentialID(r.fingerprintKey, ep.String(), token),
	}
	remote.initClients(r.egress())
	if v := secrets[hfEndpointKey]; v != "" {
		eps := []remotespec.Endpoint{{Key: hfEndpointKey, URL: ep}}
		if err := r.checkEndpoints(ctx, eps); err != nil {
			if !errors.Is(err, ErrUnavailable) {
				return nil, err
			}
			// DNS is down: a cache hit needs no remote, so the check
			// waits for the first call that does.
			remote.deferredCheck = func(ctx context.Context) error { return r.checkEndpoints(ctx, eps) }
		}
	}
	return remote, nil
}

// hfEndpoint parses HF_ENDPOINT ("" is the Hub) into its normal form:
// lower-case scheme and host, no default port, no trailing slash. A
// mirror may serve the Hub under a path. http:// is accepted for a mirror
// inside the cluster; HF_TOKEN then crosses the network in clear.
func hfEndpoint(v string) (*url.URL, error) {
	if v == "" {
		v = hfDefaultEndpoint
	}
	ep, err := remotespec.ParseEndpointURL(hfEndpointKey, strings.TrimSpace(v), false)
	if err != nil {
		return nil, err
	}
	u := ep.URL
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		return nil, fmt.Errorf("%w: %s must be a plain URL (scheme, host, optional port and path): no user info, query or fragment; put the token in %s", ErrInvalid, hfEndpointKey, hfTokenKey)
	}
	host := strings.ToLower(u.Hostname())
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	if p := u.Port(); p != "" && !(u.Scheme == "https" && p == "443" || u.Scheme == "http" && p == "80") {
		host += ":" + p
	}
	p := strings.TrimRight(u.EscapedPath(), "/")
	out, err := url.Parse(strings.ToLower(u.Scheme) + "://" + host + p)
	if err != nil {
		return nil, fmt.Errorf("%w: %s has an invalid path", ErrInvalid, hfEndpointKey)
	}
	return out, nil
}

// hfCredentialID fingerprints the endpoint and token: the same token at
// another endpoint is other credentials.
func hfCredentialID(key []byte, endpoint, token string) string {
	mac := hmac.New(sha256.New, key)
	fmt.Fprintf(mac, "hf\x00%s\x00%s", endpoint, token)
	return hex.EncodeToString(mac.Sum(nil))
}

func (r *hfRemote) URI() URI             { return r.uri }
func (r *hfRemote) Identity() string     { return r.identity }
func (r *hfRemote) CredentialID() string { return r.credID }

// Revision is the commit the last List resolved the revision to.
func (r *hfRemote) Revision() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.commit
}

// List resolves the revision to its commit and lists that commit's files,
// every page of the listing, bounded by --max-files.
func (r *hfRemote) List(ctx context.Context) (Manifest, error) {
	defer r.conns.begin()()
	if err := r.checkDeferred(ctx); err != nil {
		return nil, err
	}
	commit, err := r.resolveRevision(ctx)
	if err != nil {
		return nil, err
	}
	m, err := r.listTree(ctx, commit)
	if err != nil {
		return nil, err
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("%w: %s (commit %s) holds no files", ErrNotFound, r.uri, commit)
	}
	if m, err = remotespec.CheckManifest(m); err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.commit = commit
	r.mu.Unlock()
	return m, nil
}

func (r *hfRemote) checkDeferred(ctx context.Context) error {
	r.mu.Lock()
	check := r.deferredCheck
	r.mu.Unlock()
	if check == nil {
		return nil
	}
	if err := check(ctx); err != nil {
		return err
	}
	r.mu.Lock()
	r.deferredCheck = nil
	r.mu.Unlock()
	return nil
}

// pinned is the commit of the last List, or, for a call that comes
// without one, the revision's commit now.
func (r *hfRemote) pinned(ctx context.Context) (string, error) {
	r.mu.Lock()
	c := r.commit
	r.mu.Unlock()
	if c != "" {
		return c, nil
	}
	if err := r.checkDeferred(ctx); err != nil {
		return "", err
	}
	c, err := r.resolveRevision(ctx)
	if err != nil {
		return "", err
	}
	r.mu.Lock()
	r.commit = c
	r.mu.Unlock()
	return c, nil
}

// resolveRevision asks the Hub which commit the revision names now
// (GET /api/models/{repo}/revision/{rev}, the revision one path segment,
// as both official clients send it; expand=sha keeps the answer to that
// field, as @huggingface/hub's modelInfo asks for its fields).
func (r *hfRemote) resolveRevision(ctx context.Context) (string, error) {
	u := r.apiURL("api/models", r.uri.Path, "revision", url.PathEscape(r.uri.Ref)) + "?expand=sha"
	op := fmt.Sprintf("resolving %s to a commit", r.uri)
	resp, err := r.get(ctx, op, u)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var info struct {
		SHA string `json:"sha"`
	}
	if err := r.decodeJSON(op, resp, &info); err != nil {
		return "", err
	}
	if !hfCommit.MatchString(info.SHA) {
		return "", fmt.Errorf("%w: %s: the Hub answered without a commit id (\"sha\" is %q); is %s a Hub?", ErrUnavailable, op, clip(info.SHA), r.endpoint)
	}
	return info.SHA, nil
}

// hfTreeEntry is one entry of GET /api/models/{repo}/tree/{rev}.
type hfTreeEntry struct {
	Type string `json:"type"`
	Path string `json:"path"`
	Size *int64 `json:"size"`
	OID  string `json:"oid"`
	LFS  *struct {
		OID  string `json:"oid"`
		Size *int64 `json:"size"`
	} `json:"lfs"`
}

// listTree lists every file of commit, following the listing's Link
// pages: at most limit files, limit/100+100 pages (the Hub's pages hold
// 1000 entries) and hfMaxJSON bytes a page.
func (r *hfRemote) listTree(ctx context.Context, commit string) (Manifest, error) {
	limit := maxFilesOr(r.maxFiles)
	maxPages := limit/100 + 100
	op := fmt.Sprintf("listing %s (commit %s)", r.uri, commit)
	next := r.apiURL("api/models", r.uri.Path, "tree", commit) + "?recursive=true&expand=false"
	var m Manifest
	for page := 0; next != ""; page++ {
		if page == maxPages {
			return nil, fmt.Errorf("%w: %s: the listing goes on past %d pages; nothing was downloaded", ErrTooLarge, op, maxPages)
		}
		entries, link, err := r.treePage(ctx, op, next)
		if err != nil {
			return nil, err
		}
		for _, te := range entries {
			e, isFile, err := hfEntry(te)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", op, err)
			}
			if !isFile {
				continue
			}
			if len(m) == limit {
				return nil, tooManyFiles(r.uri, limit)
			}
			m = append(m, e)
		}
		if next, err = r.nextPage(op, link); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (r *hfRemote) treePage(ctx context.Context, op, u string) ([]hfTreeEntry, string, error) {
	resp, err := r.get(ctx, op, u)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	var entries []hfTreeEntry
	if err := r.decodeJSON(op, resp, &entries); err != nil {
		return nil, "", err
	}
	return entries, resp.Header.Get("Link"), nil
}

// hfEntry turns a listed file into an Entry: an LFS file is named by its
// sha256 (the LFS oid), which the store checks; any other by its git blob
// oid, which Open checks.
func hfEntry(te hfTreeEntry) (Entry, bool, error) {
	switch te.Type {
	case "directory":
		return Entry{}, false, nil
	case "file":
	default:
		return Entry{}, false, fmt.Errorf("%w: the Hub lists %q as %q, neither a file nor a directory, which modelcache cannot reproduce", ErrUnavailable, clip(te.Path), clip(te.Type))
	}
	if te.LFS != nil {
		if !hexSHA.MatchString(te.LFS.OID) || te.LFS.Size == nil || *te.LFS.Size < 0 {
			return Entry{}, false, fmt.Errorf("%w: the Hub lists LFS file %q without a sha256 oid and size", ErrUnavailable, clip(te.Path))
		}
		return Entry{Path: te.Path, Size: *te.LFS.Size, SHA256: te.LFS.OID, Version: "lfs:" + te.LFS.OID}, true, nil
	}
	if !hexSHA1.MatchString(te.OID) || te.Size == nil || *te.Size < 0 {
		return Entry{}, false, fmt.Errorf("%w: the Hub lists file %q without a git oid and size, so nothing could check its bytes", ErrUnavailable, clip(te.Path))
	}
	return Entry{Path: te.Path, Size: *te.Size, Version: "gitoid:" + te.OID}, true, nil
}

// linkNext matches a Link header's rel="next" target, as both official
// clients read it.
var linkNext = regexp.MustCompile(`<([^>]+)>\s*;\s*rel="?next"?`)

// nextPage is the next page's URL from a Link header, or "". A next page
// elsewhere than the endpoint would take the token there: refused.
func (r *hfRemote) nextPage(op, link string) (string, error) {
	mt := linkNext.FindStringSubmatch(link)
	if mt == nil {
		return "", nil
	}
	u, err := r.endpoint.Parse(mt[1])
	if err != nil || !sameOrigin(u, r.endpoint) {
		return "", fmt.Errorf("%w: %s: the listing's next page is not at %s; %s must name the Hub or a mirror that pages on its own host", ErrInvalid, op, r.endpoint, hfEndpointKey)
	}
	return u.String(), nil
}

// apiURL joins the endpoint and path parts (already escaped).
func (r *hfRemote) apiURL(parts ...string) string {
	return r.endpoint.String() + "/" + strings.Join(parts, "/")
}

// resolveURL is where the Hub serves path at commit.
func (r *hfRemote) resolveURL(commit, path string) string {
	segs := strings.Split(path, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return r.apiURL(r.uri.Path, "resolve", commit, strings.Join(segs, "/"))
}

// decodeJSON decodes a JSON answer of at most hfMaxJSON bytes.
func (r *hfRemote) decodeJSON(op string, resp *http.Response, v any) error {
	body := io.LimitReader(resp.Body, hfMaxJSON+1)
	data, err := io.ReadAll(body)
	if err != nil {
		return r.netError(op, err)
	}
	if len(data) > hfMaxJSON {
		return fmt.Errorf("%w: %s: the Hub's answer is larger than %d MiB", ErrTooLarge, op, hfMaxJSON>>20)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%w: %s: the Hub's answer is not the JSON expected: %v; is %s a Hub?", ErrUnavailable, op, err, r.endpoint)
	}
	return nil
}

// clip shortens a server-given string for a message.
func clip(s string) string {
	if len(s) > 200 {
		return s[:200] + "..."
	}
	return s
}

// sameOrigin reports whether two URLs have one scheme, host and port.
func sameOrigin(a, b *url.URL) bool {
	return strings.EqualFold(a.Scheme, b.Scheme) && strings.EqualFold(a.Hostname(), b.Hostname()) && effectivePort(a) == effectivePort(b)
}

func effectivePort(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	if strings.EqualFold(u.Scheme, "https") {
		return "443"
	}
	return "80"
}
