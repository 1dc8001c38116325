package admin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"k8s.io/klog/v2"
)

// PrefetchRequest warms the cache with a model. Secrets are the keys of the
// node-publish secret pods use (RCLONE_CONFIG_<REMOTE>_*, AWS_*, ...).
type PrefetchRequest struct {
	URI     string            `json:"uri"`
	Secrets map[string]string `json:"secrets"`
}

// PrefetchEvent is one line of a prefetch's newline-delimited JSON reply:
// "progress" lines while the download runs, then one "done" or "error".
type PrefetchEvent struct {
	Event   string `json:"event"`
	Done    int64  `json:"done,omitempty"`
	Total   int64  `json:"total,omitempty"`
	Tree    string `json:"tree,omitempty"`
	Files   int    `json:"files,omitempty"`
	Fetched bool   `json:"fetched,omitempty"` // false: it was already cached
	Took    string `json:"took,omitempty"`
	Error   string `json:"error,omitempty"`
}

func (s *Server) prefetch(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var req PrefetchRequest
	if !decode(w, r, &req) {
		return
	}
	ctx := r.Context()
	remote, err := s.Resolver.Resolve(ctx, req.URI, req.Secrets)
	if err != nil {
		fail(w, sourceStatus(err), err)
		return
	}
	m, err := remote.List(ctx)
	if err != nil {
		fail(w, sourceStatus(err), err)
		return
	}
	key := source.ContentKey(remote.Identity(), m)
	_, cached := s.Store.Cached(key)
	_, running := s.Store.Downloading(key)
	if !cached && !running {
		// As for publishes: a drained node serves what it has and lets a
		// running download be joined, but starts none.
		if drained, err := s.State.Drained(); err != nil || drained {
			fail(w, http.StatusConflict, errors.Join(errors.New("the node is drained and starts no downloads; run modelcachectl undrain first"), err))
			return
		}
	}

	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	flush := func(ev PrefetchEvent) {
		_ = enc.Encode(ev)
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
	type result struct {
		tree    store.Tree
		fetched bool
		err     error
	}
	done := make(chan result, 1)
	go func() {
		// The download is the store's: a client that goes away stops
		// waiting, not the download.
		t, fetched, err := s.Store.Ensure(ctx, key, m, remote)
		done <- result{t, fetched, err}
	}()
	every := s.ProgressEvery
	if every <= 0 {
		every = time.Second
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			if p, ok := s.Store.Downloading(key); ok {
				flush(PrefetchEvent{Event: "progress", Done: p.Done(), Total: p.Total})
			}
		case res := <-done:
			if res.err == nil && !res.fetched {
				// Cached, or fetched by someone else: these credentials
				// are recorded only once they read every object's metadata.
				res.err = remote.Verify(ctx, m)
			}
			if res.err != nil {
				flush(PrefetchEvent{Event: "error", Error: res.err.Error()})
				return
			}
			if err := s.State.RecordSource(source.SourceKey(remote), state.Source{Tree: res.tree.Digest, URI: req.URI, Checked: time.Now()}); err != nil {
				flush(PrefetchEvent{Event: "error", Error: fmt.Sprintf("recording the prefetched tree: %v", err)})
				return
			}
			klog.InfoS("prefetched", "model", req.URI, "tree", res.tree.Digest, "fetched", res.fetched, "took", time.Since(start))
			flush(PrefetchEvent{Event: "done", Done: res.tree.Size, Total: res.tree.Size, Tree: res.tree.Digest, Files: res.tree.Files,
				Fetched: res.fetched, Took: time.Since(start).Round(time.Millisecond).String()})
			return
		}
	}
}

// sourceStatus turns a pkg/source error into the HTTP status of the reply.
func sourceStatus(err error) int {
	switch {
	case errors.Is(err, source.ErrInvalid), errors.Is(err, source.ErrUnsafePath):
		return http.StatusBadRequest
	case errors.Is(err, source.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, source.ErrDenied):
		return http.StatusForbidden
	default:
		return http.StatusBadGateway
	}
}
