package hftest

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"
)

// signedURLTTL is how long a CDN URL the Hub hands out stays valid.
const signedURLTTL = time.Hour

func (h *Hub) serveHub(w http.ResponseWriter, r *http.Request) {
	h.record("hub", r)
	if h.throttled(w) {
		return
	}
	segs := strings.Split(strings.TrimPrefix(r.URL.EscapedPath(), "/"), "/")
	if len(segs) > 2 && segs[0] == "api" && segs[1] == "models" {
		id, op, rest, ok := h.splitRepo(segs[2:])
		switch {
		case ok && op == "revision" && len(rest) == 1 && r.Method == http.MethodGet:
			h.serveRevision(w, r, id, rest[0])
		case ok && op == "tree" && len(rest) >= 1 && r.Method == http.MethodGet:
			h.serveTree(w, r, id, rest[0], rest[1:])
		default:
			hubError(w, http.StatusNotFound, "", "Not Found")
		}
		return
	}
	id, op, rest, ok := h.splitRepo(segs)
	if !ok || op != "resolve" || len(rest) < 2 || (r.Method != http.MethodGet && r.Method != http.MethodHead) {
		hubError(w, http.StatusNotFound, "", "Not Found")
		return
	}
	h.serveResolve(w, r, id, rest[0], rest[1:])
}

func (h *Hub) throttled(w http.ResponseWriter) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.throttle == 0 {
		return false
	}
	h.throttle--
	w.Header().Set("Retry-After", h.retryAfter)
	hubError(w, http.StatusTooManyRequests, "", "You have exceeded our hourly quotas for action: resolve. We invite you to retry later.")
	return true
}

// splitRepo splits escaped path segments into a repository id ("model"
// or "org/model"), the operation after it and what follows. A repository
// that exists wins over one that does not.
func (h *Hub) splitRepo(segs []string) (id, op string, rest []string, ok bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var fallback []int
	for _, n := range []int{2, 1} {
		if len(segs) <= n {
			continue
		}
		switch segs[n] {
		case "revision", "tree", "resolve":
		default:
			continue
		}
		if h.repos[strings.Join(segs[:n], "/")] != nil {
			return strings.Join(segs[:n], "/"), segs[n], segs[n+1:], true
		}
		fallback = append(fallback, n)
	}
	if len(fallback) == 0 {
		return "", "", nil, false
	}
	n := fallback[0]
	return strings.Join(segs[:n], "/"), segs[n], segs[n+1:], true
}

func hubError(w http.ResponseWriter, status int, code, msg string) {
	if code != "" {
		w.Header().Set("X-Error-Code", code)
	}
	w.Header().Set("X-Error-Message", msg)
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// access finds repository id for the request's token, or answers the
// error the Hub would. content: the request reads a file, which a gated
// repository serves only to tokens with access.
func (h *Hub) access(w http.ResponseWriter, r *http.Request, id string, content bool) (*repo, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	tok, hasTok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if r.Header.Get("Authorization") != "" && (!hasTok || !h.tokens[tok]) {
		hubError(w, http.StatusUnauthorized, "", "Invalid credentials in Authorization header")
		return nil, false
	}
	rp := h.repos[id]
	granted := rp != nil && hasTok && slices.Contains(rp.Access, tok)
	if rp == nil || rp.Private && !granted {
		// The Hub does not tell a private repository from a missing one.
		status := http.StatusUnauthorized
		if hasTok {
			status = http.StatusNotFound
		}
		hubError(w, status, "RepoNotFound", "Repository not found")
		return nil, false
	}
	if rp.Gated && content && !granted {
		if !hasTok {
			hubError(w, http.StatusUnauthorized, "GatedRepo", fmt.Sprintf("Access to model %s is restricted. You must have access to it and be authenticated to access it. Please log in.", id))
		} else {
			hubError(w, http.StatusForbidden, "GatedRepo", fmt.Sprintf("Access to model %s is restricted and you are not in the authorized list. Visit %s/%s to ask for access.", id, h.URL, id))
		}
		return nil, false
	}
	return rp, true
}

// commitOf finds the commit an escaped revision names.
func (h *Hub) commitOf(w http.ResponseWriter, rp *repo, escRev string) (*commit, bool) {
	rev, err := url.PathUnescape(escRev)
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		if c := rp.commits[rev]; c != nil {
			return c, true
		}
		if c := rp.commits[rp.refs[rev]]; c != nil {
			return c, true
		}
	}
	hubError(w, http.StatusNotFound, "RevisionNotFound", "Invalid rev id: "+rev)
	return nil, false
}

func (h *Hub) serveRevision(w http.ResponseWriter, r *http.Request, id, escRev string) {
	rp, ok := h.access(w, r, id, false)
	if !ok {
		return
	}
	c, ok := h.commitOf(w, rp, escRev)
	if !ok {
		return
	}
	full := map[string]any{
		"_id": "0123456789abcdef01234567", "id": id, "modelId": id, "sha": c.sha,
		"private": rp.Private, "gated": gatedValue(rp.Gated), "disabled": false,
		"lastModified": "2026-01-01T00:00:00.000Z", "tags": []string{}, "downloads": 0, "likes": 0,
		"library_name": "transformers", "siblings": siblings(c),
	}
	out := full
	if expand := r.URL.Query()["expand"]; len(expand) > 0 {
		// Only the properties asked for, as the Hub answers expand.
		out = map[string]any{"_id": full["_id"], "id": id}
		for _, k := range expand {
			if v, ok := full[k]; ok {
				out[k] = v
			}
		}
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	json.NewEncoder(w).Encode(out)
}

func gatedValue(g bool) any {
	if g {
		return "auto"
	}
	return false
}

func siblings(c *commit) []map[string]string {
	var out []map[string]string
	for _, p := range slices.Sorted(maps.Keys(c.files)) {
		out = append(out, map[string]string{"rfilename": p})
	}
	return out
}

// treeEntry is one entry of a tree listing, as the Hub sends it.
type treeEntry struct {
	Type    string    `json:"type"`
	OID     string    `json:"oid"`
	Size    int64     `json:"size"`
	LFS     *lfsEntry `json:"lfs,omitempty"`
	XetHash string    `json:"xetHash,omitempty"`
	Path    string    `json:"path"`
}

type lfsEntry struct {
	OID         string `json:"oid"`
	Size        int64  `json:"size"`
	PointerSize int    `json:"pointerSize"`
}

// entries lists c under dir: files and directories, all levels when
// recursive, directories first at each level as git sorts them not; by
// path, which is all a client may rely on.
func entries(c *commit, dir string, recursive bool) []treeEntry {
	var out []treeEntry
	dirs := map[string]bool{}
	for p, f := range c.files {
		rel := p
		if dir != "" {
			var ok bool
			if rel, ok = strings.CutPrefix(p, dir+"/"); !ok {
				continue
			}
		}
		parts := strings.Split(rel, "/")
		for i := 1; i < len(parts); i++ {
			if !recursive && i > 1 {
				break
			}
			dirs[path.Join(dir, strings.Join(parts[:i], "/"))] = true
		}
		if !recursive && len(parts) > 1 {
			continue
		}
		e := treeEntry{Type: "file", OID: f.oid, Size: int64(len(f.data)), Path: p}
		if f.lfs {
			e.LFS = &lfsEntry{OID: f.sha, Size: int64(len(f.data)), PointerSize: f.ptr}
			e.XetHash = GitBlobOID([]byte(f.sha)) + GitBlobOID([]byte(p))[:24]
		}
		out = append(out, e)
	}
	for d := range dirs {
		out = append(out, treeEntry{Type: "directory", OID: GitBlobOID([]byte("tree " + d)), Size: 0, Path: d})
	}
	slices.SortFunc(out, func(a, b treeEntry) int { return strings.Compare(a.Path, b.Path) })
	return out
}

func (h *Hub) serveTree(w http.ResponseWriter, r *http.Request, id, escRev string, dir []string) {
	rp, ok := h.access(w, r, id, false)
	if !ok {
		return
	}
	c, ok := h.commitOf(w, rp, escRev)
	if !ok {
		return
	}
	d, err := url.PathUnescape(strings.Join(dir, "/"))
	if err != nil {
		hubError(w, http.StatusBadRequest, "", "Invalid path")
		return
	}
	q := r.URL.Query()
	h.mu.Lock()
	all := entries(c, d, q.Get("recursive") == "true" || q.Get("recursive") == "True" || q.Get("recursive") == "1")
	h.mu.Unlock()
	if d != "" && len(all) == 0 {
		hubError(w, http.StatusNotFound, "EntryNotFound", fmt.Sprintf("%s does not exist on %q", d, c.sha))
		return
	}
	start := 0
	if cur := q.Get("cursor"); cur != "" {
		b, err := base64.RawURLEncoding.DecodeString(cur)
		if start, err = strconv.Atoi(strings.TrimPrefix(string(b), "after:")); err != nil || start < 0 || start > len(all) {
			hubError(w, http.StatusBadRequest, "", "Invalid cursor")
			return
		}
	}
	end := min(start+h.opt.PageSize, len(all))
	if end < len(all) {
		q.Set("cursor", base64.RawURLEncoding.EncodeToString([]byte("after:"+strconv.Itoa(end))))
		w.Header().Set("Link", fmt.Sprintf("<%s%s?%s>; rel=\"next\"", h.URL, r.URL.EscapedPath(), q.Encode()))
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	json.NewEncoder(w).Encode(all[start:end])
}

func (h *Hub) serveResolve(w http.ResponseWriter, r *http.Request, id, escRev string, escPath []string) {
	rp, ok := h.access(w, r, id, true)
	if !ok {
		return
	}
	c, ok := h.commitOf(w, rp, escRev)
	if !ok {
		return
	}
	p, err := url.PathUnescape(strings.Join(escPath, "/"))
	h.mu.Lock()
	f := c.files[p]
	data, corrupted := h.corrupt[id+"/"+p]
	h.mu.Unlock()
	if err != nil || f == nil {
		hubError(w, http.StatusNotFound, "EntryNotFound", "Entry not found")
		return
	}
	w.Header().Set("X-Repo-Commit", c.sha)
	w.Header().Set("Access-Control-Expose-Headers", "X-Repo-Commit,X-Linked-Size,X-Linked-ETag,ETag,Content-Range,Link")
	if f.lfs {
		w.Header().Set("X-Linked-Size", strconv.Itoa(len(f.data)))
		w.Header().Set("X-Linked-ETag", `"`+f.sha+`"`)
		w.Header().Set("ETag", `"`+f.oid+`"`)
		http.Redirect(w, r, h.signedURL(f.sha, path.Base(p)), http.StatusFound)
		return
	}
	if !corrupted {
		data = f.data
	}
	w.Header().Set("ETag", `"`+f.oid+`"`)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
}

// signedURL is where the Hub sends a client for LFS content sha: the CDN
// (or what RedirectLFSTo named) with a signature valid for an hour, or
// already expired when ExpireSignedURLs said so.
func (h *Hub) signedURL(sha, name string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	exp := time.Now().Add(signedURLTTL)
	if h.expired > 0 {
		h.expired--
		exp = time.Now().Add(-time.Minute)
	}
	base := h.CDNURL
	if h.lfsBase != "" {
		base = h.lfsBase
	}
	disp := url.QueryEscape(fmt.Sprintf("attachment; filename*=UTF-8''%s; filename=\"%s\";", url.PathEscape(name), name))
	return fmt.Sprintf("%s/repos/%s?response-content-disposition=%s&%s", base, sha, disp, h.sign(sha, exp.Unix()))
}
