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
	"syscall"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/source"
	"k8s.io/klog/v2"
)

// Server serves the operator API over the node's cache.
type Server struct {
	Cache    *cache.Cache
	Resolver source.Resolver
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

func (s *Server) listTrees(w http.ResponseWriter, _ *http.Request) {
	trees, err := s.Cache.Trees()
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	out := make([]adminapi.Tree, 0, len(trees))
	for _, t := range trees {
		out = append(out, wireTree(t))
	}
	reply(w, out)
}

func (s *Server) inspect(w http.ResponseWriter, r *http.Request) {
	t, err := s.Cache.Find(r.URL.Query().Get("ref"))
	if err != nil {
		failCache(w, err)
		return
	}
	files, err := s.Cache.Files(t.Digest)
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	out := adminapi.Inspection{Tree: wireTree(t)}
	for _, f := range files {
		out.Contents = append(out.Contents, adminapi.File{Path: f.Path, Size: f.Size, Sha256: f.Sha256})
	}
	reply(w, out)
}

func (s *Server) du(w http.ResponseWriter, _ *http.Request) {
	u, err := s.Cache.Usage()
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	drained, _ := s.Cache.IsDrained()
	reply(w, adminapi.DiskUsage{
		BlobBytes: u.BlobBytes, Blobs: u.Blobs, TreeBytes: u.TreeBytes, Trees: u.Trees,
		IngestBytes: u.IngestBytes, Quarantined: u.Quarantined, FSSize: u.FSSize, FSFree: u.FSFree,
		SavedBytes: u.Saved(), Drained: drained,
	})
}

func (s *Server) pin(on bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req adminapi.RefRequest
		if !decode(w, r, &req) {
			return
		}
		t, err := s.Cache.Pin(req.Ref, on)
		if err != nil {
			failCache(w, err)
			return
		}
		reply(w, wireTree(t))
	}
}

func (s *Server) evict(w http.ResponseWriter, r *http.Request) {
	var req adminapi.RefRequest
	if !decode(w, r, &req) {
		return
	}
	res, err := s.Cache.Evict(req.Ref, req.WhenUnused)
	if err != nil {
		failCache(w, err)
		return
	}
	reply(w, adminapi.EvictResult{Tree: res.Tree, Removed: res.Removed, Freed: res.Freed, Pending: res.Pending})
}

func (s *Server) gc(w http.ResponseWriter, r *http.Request) {
	var req adminapi.RefRequest
	if !decode(w, r, &req) {
		return
	}
	plan, warning, err := s.Cache.GC(req.DryRun)
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	res := adminapi.GCResult{Freed: plan.Freed, Over: plan.Over, DryRun: req.DryRun, Warning: warning}
	for _, c := range plan.Evicted {
		res.Evicted = append(res.Evicted, adminapi.Candidate{Digest: c.Digest, Size: c.Size})
	}
	reply(w, res)
}

func (s *Server) drain(on bool) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		res := adminapi.DrainResult{Drained: on, Removed: []string{}, Pending: []string{}}
		if !on {
			if err := s.Cache.Undrain(); err != nil {
				fail(w, http.StatusInternalServerError, err)
				return
			}
			reply(w, res)
			return
		}
		d, err := s.Cache.Drain()
		if err != nil {
			fail(w, http.StatusInternalServerError, err)
			return
		}
		res.Removed, res.Freed, res.Pending = d.Removed, d.Freed, d.Pending
		reply(w, res)
	}
}

func (s *Server) verify(w http.ResponseWriter, _ *http.Request) {
	v, err := s.Cache.Verify()
	if err != nil {
		fail(w, http.StatusInternalServerError, err)
		return
	}
	reply(w, adminapi.VerifyReport{
		Blobs: v.Blobs, Bytes: v.Bytes, Corrupt: v.Corrupt, Damaged: v.Damaged, Took: v.Took, Quarantined: v.Quarantined,
		Removed: v.Removed, Invalidated: v.Invalidated, OK: len(v.Corrupt) == 0,
	})
}

// wireTree is a cached tree as the API reports it.
func wireTree(t cache.Tree) adminapi.Tree {
	out := adminapi.Tree{
		Digest: t.Digest, Size: t.Size, Files: t.Files, URIs: t.URIs, Revisions: t.Revisions, LastUsed: t.LastUsed,
		Pinned: t.Pinned, PinnedAt: t.PinnedAt, Doomed: t.Doomed, Present: t.Present,
		From: adminapi.BytesFrom{Origin: t.From.Origin, Peers: t.From.Peers},
	}
	for _, n := range t.From.Nodes {
		out.From.Nodes = append(out.From.Nodes, adminapi.NodeBytes{Node: n.Node, Bytes: n.Bytes})
	}
	for _, r := range t.Refs {
		out.Refs = append(out.Refs, adminapi.Ref{
			VolumeID: r.VolumeID, TargetPath: r.TargetPath, Tree: r.Tree, ArgsHash: r.ArgsHash, URI: r.URI, Revision: r.Revision,
			PodName: r.PodName, PodNS: r.PodNS, PodUID: r.PodUID, Published: r.Published,
		})
	}
	return out
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

func fail(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(adminapi.Error{Error: err.Error()})
}

// failCache answers a cache error with the status that says whose fault it is.
func failCache(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, cache.ErrNoTree):
		fail(w, http.StatusNotFound, err)
	case errors.Is(err, cache.ErrAmbiguous), errors.Is(err, cache.ErrInUse):
		fail(w, http.StatusConflict, err)
	default:
		fail(w, http.StatusInternalServerError, err)
	}
}
