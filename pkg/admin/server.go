// Package admin is the node plugin's operator API: JSON over HTTP on a unix
// socket that only root can open (0600), used by modelcachectl. It lists,
// inspects, prefetches, pins, evicts, garbage-collects, drains and verifies
// the node's cache. Secrets sent for a prefetch are used in memory for that
// request and never logged or stored.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"k8s.io/klog/v2"
)

// Server serves the operator API.
type Server struct {
	Store    *store.Store
	State    *state.DB
	Resolver source.Resolver
	// ProgressEvery is how often a prefetch reports progress (default 1s).
	ProgressEvery time.Duration
}

// Handler routes the API. Every response is JSON; errors are
// {"error": "..."} with a status code that says whose fault it is.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/trees", s.listTrees)
	mux.HandleFunc("GET /v1/tree", s.inspect)
	mux.HandleFunc("GET /v1/du", s.du)
	mux.HandleFunc("POST /v1/prefetch", s.prefetch)
	mux.HandleFunc("POST /v1/pin", s.pin(true))
	mux.HandleFunc("POST /v1/unpin", s.pin(false))
	mux.HandleFunc("POST /v1/evict", s.evict)
	mux.HandleFunc("POST /v1/gc", s.gc)
	mux.HandleFunc("POST /v1/drain", s.drain(true))
	mux.HandleFunc("POST /v1/undrain", s.drain(false))
	mux.HandleFunc("POST /v1/verify", s.verify)
	return mux
}

// Serve listens on socket (mode 0600) and serves until ctx ends.
func Serve(ctx context.Context, socket string, h http.Handler) error {
	if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
		return fmt.Errorf("creating admin socket directory: %w", err)
	}
	if err := os.Remove(socket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing stale admin socket: %w", err)
	}
	// The umask makes the socket 0600 from the start: no window in which
	// another user could connect.
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", socket)
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("listening on admin socket %s: %w", socket, err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		l.Close()
		return fmt.Errorf("restricting admin socket: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	klog.InfoS("admin API listening", "socket", socket)
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Tree is one cached model as the API reports it.
type Tree struct {
	state.CachedTree
	Present bool `json:"present"` // the tree directory exists
}

func (s *Server) listTrees(w http.ResponseWriter, _ *http.Request) {
	trees, err := s.State.CachedTrees()
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	out := make([]Tree, 0, len(trees))
	for _, t := range trees {
		out = append(out, Tree{CachedTree: t, Present: s.Store.HasTree(t.Digest)})
	}
	reply(w, out)
}

// File is one file of a tree.
type File struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	Sha256 string `json:"sha256"`
}

// Inspection is a tree with its files ("files" is their count).
type Inspection struct {
	Tree
	Contents []File `json:"contents"`
}

func (s *Server) inspect(w http.ResponseWriter, r *http.Request) {
	t, err := s.find(r.URL.Query().Get("ref"))
	if err != nil {
		failFind(w, err)
		return
	}
	files, err := s.Store.TreeFiles(t.Digest)
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	out := Inspection{Tree: Tree{CachedTree: t, Present: s.Store.HasTree(t.Digest)}}
	for _, f := range files {
		out.Contents = append(out.Contents, File{Path: f.Path, Size: f.Size, Sha256: f.Sha256})
	}
	reply(w, out)
}

// DiskUsage is what du reports.
type DiskUsage struct {
	store.Usage
	SavedBytes int64 `json:"savedBytes"`
	Drained    bool  `json:"drained"`
}

func (s *Server) du(w http.ResponseWriter, _ *http.Request) {
	u, err := s.Store.Usage()
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	drained, _ := s.State.Drained()
	reply(w, DiskUsage{Usage: u, SavedBytes: u.Saved(), Drained: drained})
}

// RefRequest names a tree by digest or by a model URI it was fetched as.
type RefRequest struct {
	Ref        string `json:"ref"`
	WhenUnused bool   `json:"whenUnused,omitempty"`
	DryRun     bool   `json:"dryRun,omitempty"`
}

func (s *Server) pin(on bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req RefRequest
		if !decode(w, r, &req) {
			return
		}
		t, err := s.find(req.Ref)
		if err != nil {
			failFind(w, err)
			return
		}
		if err := s.State.SetPinned(t.Digest, on); err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		klog.InfoS("pin changed", "tree", t.Digest, "pinned", on)
		t.Pinned = on
		reply(w, t)
	}
}

// EvictResult says what evict did.
type EvictResult struct {
	Tree    string `json:"tree"`
	Removed bool   `json:"removed"`
	Freed   int64  `json:"freed"`
	// Pending: in use, and marked to go when its last mount goes.
	Pending bool `json:"pending"`
}

func (s *Server) evict(w http.ResponseWriter, r *http.Request) {
	var req RefRequest
	if !decode(w, r, &req) {
		return
	}
	t, err := s.find(req.Ref)
	if err != nil {
		failFind(w, err)
		return
	}
	if len(t.Refs) > 0 {
		if !req.WhenUnused {
			fail(w, http.StatusConflict, fmt.Errorf("tree %s is mounted by %s; it cannot be removed under running pods: pass --when-unused to remove it when its last mount goes", t.Digest, users(t.Refs)))
			return
		}
		// An operator's evict overrides a pin: it names this tree.
		err := s.State.SetPinned(t.Digest, false)
		if err == nil {
			err = s.State.Doom(t.Digest, "operator")
		}
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		reply(w, EvictResult{Tree: t.Digest, Pending: true})
		return
	}
	// An operator's evict overrides a pin: it names this tree.
	if err := s.State.SetPinned(t.Digest, false); err != nil && !errors.Is(err, state.ErrUnknownTree) {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	freed, removed, err := s.Store.Evict(t.Digest, "operator")
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	if !removed {
		fail(w, http.StatusConflict, fmt.Errorf("tree %s was mounted again meanwhile; pass --when-unused to remove it when its last mount goes", t.Digest))
		return
	}
	reply(w, EvictResult{Tree: t.Digest, Removed: true, Freed: freed})
}

// GCResult is what gc did, or would do with DryRun.
type GCResult struct {
	store.Plan
	DryRun bool `json:"dryRun"`
	// Warning says why the budget still cannot be met, if it cannot.
	Warning string `json:"warning,omitempty"`
}

func (s *Server) gc(w http.ResponseWriter, r *http.Request) {
	var req RefRequest
	if !decode(w, r, &req) {
		return
	}
	plan, err := s.Store.MakeRoom(0, req.DryRun)
	res := GCResult{Plan: plan, DryRun: req.DryRun}
	var noRoom *store.NoRoomError
	switch {
	case errors.As(err, &noRoom):
		// Not a failure of gc: it did what it could; say what is over.
		res.Warning = noRoom.Error()
	case err != nil:
		fail(w, http.StatusInternalServerError, err)
		return
	}
	reply(w, res)
}

// DrainResult says what drain or undrain did.
type DrainResult struct {
	Drained bool     `json:"drained"`
	Removed []string `json:"removed"`
	Freed   int64    `json:"freed"`
	Pending []string `json:"pending"` // in use; removed when their last mount goes
}

func (s *Server) drain(on bool) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		if err := s.State.SetDrained(on); err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		res := DrainResult{Drained: on, Removed: []string{}, Pending: []string{}}
		if !on {
			klog.InfoS("node undrained")
			reply(w, res)
			return
		}
		trees, err := s.State.CachedTrees()
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		for _, t := range trees {
			// Drain empties the node, pinned trees included.
			if err := s.State.SetPinned(t.Digest, false); err != nil {
				fail(w, http.StatusInternalServerError, err)
				return
			}
			if len(t.Refs) > 0 {
				res.Pending = append(res.Pending, t.Digest)
				continue
			}
			freed, removed, err := s.Store.Evict(t.Digest, "drain")
			if err != nil {
				fail(w, http.StatusInternalServerError, err)
				return
			}
			if removed {
				res.Removed = append(res.Removed, t.Digest)
				res.Freed += freed
			} else {
				res.Pending = append(res.Pending, t.Digest)
			}
		}
		klog.InfoS("node drained", "removed", len(res.Removed), "pending", len(res.Pending), "freed", store.HumanBytes(res.Freed))
		reply(w, res)
	}
}

// VerifyReport is what verify found and did.
type VerifyReport struct {
	store.VerifyResult
	Removed     []string `json:"removed"`     // damaged trees no pod used: removed
	Invalidated []string `json:"invalidated"` // damaged trees in use: no longer served, repaired by the next download
	OK          bool     `json:"ok"`
}

func (s *Server) verify(w http.ResponseWriter, _ *http.Request) {
	res, err := s.Store.Verify()
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	rep := VerifyReport{VerifyResult: res, Removed: []string{}, Invalidated: []string{}, OK: len(res.Corrupt) == 0}
	for _, d := range res.Damaged {
		used, err := s.State.Referenced(d)
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		if !used {
			_ = s.State.SetPinned(d, false)
			if _, removed, err := s.Store.Evict(d, "corrupt"); err == nil && removed {
				rep.Removed = append(rep.Removed, d)
				continue
			}
		}
		if err := s.State.Invalidate(d); err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		rep.Invalidated = append(rep.Invalidated, d)
	}
	reply(w, rep)
}

// errNoTree and errAmbiguous are find's answers an operator can fix.
var (
	errNoTree    = errors.New("no cached tree matches")
	errAmbiguous = errors.New("more than one cached tree matches")
)

// find resolves a digest, a digest prefix of at least 12 hex digits, or a
// model URI a tree was fetched as.
func (s *Server) find(ref string) (state.CachedTree, error) {
	if ref == "" {
		return state.CachedTree{}, fmt.Errorf("%w: name a tree by digest (sha256:...) or by model URI", errNoTree)
	}
	trees, err := s.State.CachedTrees()
	if err != nil {
		return state.CachedTree{}, err
	}
	hex := strings.TrimPrefix(ref, "sha256:")
	var hits []state.CachedTree
	for _, t := range trees {
		byDigest := len(hex) >= 12 && strings.HasPrefix(strings.TrimPrefix(t.Digest, "sha256:"), hex)
		if byDigest || slices.Contains(t.URIs, ref) {
			hits = append(hits, t)
		}
	}
	switch len(hits) {
	case 0:
		return state.CachedTree{}, fmt.Errorf("%w %q (see modelcachectl ls)", errNoTree, ref)
	case 1:
		return hits[0], nil
	default:
		var ds []string
		for _, h := range hits {
			ds = append(ds, h.Digest)
		}
		return state.CachedTree{}, fmt.Errorf("%w %q: %s; name one by digest", errAmbiguous, ref, strings.Join(ds, ", "))
	}
}

func users(refs []state.Ref) string {
	var out []string
	for _, r := range refs {
		who := r.VolumeID
		if r.PodName != "" {
			who = r.PodNS + "/" + r.PodName
		}
		out = append(out, who)
	}
	slices.Sort(out)
	return strings.Join(slices.Compact(out), ", ")
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	// An empty body stands for an empty request.
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		fail(w, http.StatusBadRequest, fmt.Errorf("decoding request: %w", err))
		return false
	}
	return true
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

// Error is the body of every failed call.
type Error struct {
	Error string `json:"error"`
}

func fail(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(Error{Error: err.Error()})
}

func failFind(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, errNoTree):
		fail(w, http.StatusNotFound, err)
	case errors.Is(err, errAmbiguous):
		fail(w, http.StatusConflict, err)
	default:
		fail(w, http.StatusInternalServerError, err)
	}
}
