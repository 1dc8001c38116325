package admin

import (
	"encoding/json"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/source"
	"k8s.io/klog/v2"
)

// prefetch warms the cache through the same fetch as a publish, streaming
// progress lines, then records the model's source without a mount.
func (s *Server) prefetch(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var req adminapi.PrefetchRequest
	if !decode(w, r, &req) {
		return
	}
	ctx := r.Context()
	remote, err := s.Resolver.Resolve(ctx, req.URI, req.Secrets)
	if err != nil {
		fail(w, sourceStatus(err), err)
		return
	}
	lines := &progressLines{w: w}
	// The download is the cache's: a client that goes away stops waiting,
	// not the download.
	f, err := s.Cache.Prefetch(ctx, cache.FetchRequest{URI: req.URI, Remote: remote, Observer: lines})
	switch {
	case errors.Is(err, cache.ErrDrained) && !lines.sent():
		fail(w, http.StatusConflict, errors.New("the node is drained and starts no downloads; run modelcachectl undrain first"))
		return
	case err != nil && !lines.sent():
		fail(w, sourceStatus(err), err)
		return
	case err != nil:
		lines.send(adminapi.PrefetchEvent{Event: "error", Error: err.Error()})
		return
	}
	klog.InfoS("prefetched", "model", req.URI, "tree", f.Tree.Digest, "fetched", !f.Hit, "took", time.Since(start))
	lines.send(adminapi.PrefetchEvent{Event: "done", Done: f.Tree.Size, Total: f.Tree.Size, Tree: f.Tree.Digest, Revision: f.Revision, Files: f.Tree.Files,
		Fetched: !f.Hit, Took: time.Since(start).Round(time.Millisecond).String()})
}

// progressLines writes a prefetch's newline-delimited JSON reply.
type progressLines struct {
	w       http.ResponseWriter
	mu      sync.Mutex
	started bool
}

func (p *progressLines) send(ev adminapi.PrefetchEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.started {
		p.w.Header().Set("Content-Type", "application/x-ndjson")
		p.started = true
	}
	_ = json.NewEncoder(p.w).Encode(ev)
	if f, ok := p.w.(http.Flusher); ok {
		f.Flush()
	}
}

func (p *progressLines) sent() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.started
}

func (p *progressLines) Resolved(string)     {}
func (p *progressLines) Hit(cache.ModelTree) {}
func (p *progressLines) Started(total int64) {
	p.send(adminapi.PrefetchEvent{Event: "progress", Total: total})
}
func (p *progressLines) Progress(done, total int64, _ float64) {
	p.send(adminapi.PrefetchEvent{Event: "progress", Done: done, Total: total})
}
func (p *progressLines) Finished(cache.ModelTree, time.Duration, cache.Checks, cache.BytesFrom) {}
func (p *progressLines) Failed(error)                                                           {}

// sourceStatus turns an error of resolving or fetching a model into the
// HTTP status of the reply.
func sourceStatus(err error) int {
	switch {
	case errors.Is(err, source.ErrInvalid), errors.Is(err, source.ErrUnsafePath):
		return http.StatusBadRequest
	case errors.Is(err, source.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, source.ErrDenied):
		return http.StatusForbidden
	case errors.Is(err, cache.ErrNoSpace):
		return http.StatusInsufficientStorage
	default:
		return http.StatusBadGateway
	}
}
