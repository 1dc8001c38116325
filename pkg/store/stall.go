package store

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/units"
)

// Defaults of the bounds on slow and abandoned downloads (Options).
const (
	// DefaultMinStreamRate is far below any object store's stream (tens of
	// MB/s) and above a remote that trickles to hold its slots.
	DefaultMinStreamRate = 64 << 10
	// DefaultStallWindow is long enough for a first byte behind a busy
	// remote, short enough that a trickling one is cut soon.
	DefaultStallWindow = 30 * time.Second
	// DefaultStallTimeout leaves a stalled chunk its three attempts of one
	// window each, and then some.
	DefaultStallTimeout = 2 * time.Minute
	// DefaultDownloadGrace is well above kubelet's longest back-off between
	// two NodePublishVolume retries (about 2 minutes).
	DefaultDownloadGrace = 10 * time.Minute
)

// download is one running download of a model: the unit the node's
// connections and chunk buffers are shared out to, and what the
// watchdog cancels.
type download struct {
	key  string
	p    *Progress
	from fromCounts // where its bytes came from
}

// streamGuard cuts one remote stream that delivers less than the minimum
// rate over a window, first byte included: rclone's idle timeout only
// trips on a stream that sends nothing, and one that sends a byte a second
// would hold its connection and chunk buffer for as long as it likes.
type streamGuard struct {
	n      atomic.Int64
	last   int64
	min    int64 // bytes a window must bring
	rate   int64 // the minimum rate, for the message
	window time.Duration
	timer  *time.Timer
	cancel context.CancelCauseFunc
	slow   atomic.Bool
	mu     sync.Mutex
	done   bool
}

// guardStream returns the context one stream of e runs on, cancelled when
// the stream is too slow, and its guard; a nil guard when the store has
// no minimum rate. Call stop when the stream ends.
func (s *Store) guardStream(ctx context.Context) (context.Context, *streamGuard) {
	if s.minStreamRate <= 0 || s.stallWindow <= 0 {
		return ctx, nil
	}
	gctx, cancel := context.WithCancelCause(ctx)
	g := &streamGuard{min: int64(float64(s.minStreamRate) * s.stallWindow.Seconds()), rate: s.minStreamRate, window: s.stallWindow, cancel: cancel}
	g.timer = time.AfterFunc(g.window, g.check)
	return gctx, g
}

func (g *streamGuard) check() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.done {
		return
	}
	n := g.n.Load()
	if n-g.last < g.min {
		g.slow.Store(true)
		g.cancel(errSlowStream)
		return
	}
	g.last = n
	g.timer.Reset(g.window)
}

// add counts bytes the stream delivered.
func (g *streamGuard) add(n int) {
	if g != nil {
		g.n.Add(int64(n))
	}
}

// stop ends the guard and releases its context.
func (g *streamGuard) stop() {
	if g == nil {
		return
	}
	g.mu.Lock()
	g.done = true
	g.timer.Stop()
	g.mu.Unlock()
	g.cancel(nil)
}

// err is what a stream's failure err means: the guard's cut, saying so,
// when it cut the stream. Callers name the object and the bytes.
func (g *streamGuard) err(err error) error {
	if g == nil || !g.slow.Load() {
		return err
	}
	return fmt.Errorf("%w: the remote sent less than %s/s over %s (--min-stream-rate, --stall-window)", source.ErrUnavailable, units.Bytes(g.rate), g.window)
}

// errSlowStream is the cause a guard cancels a stream's context with.
var errSlowStream = fmt.Errorf("%w: stream below the minimum rate", source.ErrUnavailable)

// guardedReader counts what a stream delivers for its guard.
type guardedReader struct {
	io.Reader
	g *streamGuard
}

func (r guardedReader) Read(p []byte) (int, error) {
	n, err := r.Reader.Read(p)
	r.g.add(n)
	return n, err
}

// wanted counts the callers waiting for a key's download, and since when
// none has.
type wanted struct {
	n     int
	since time.Time
}

// want records that a caller waits for key's download until the returned
// func is called.
func (s *Store) want(key string) (done func()) {
	s.mu.Lock()
	w := s.wants[key]
	if w == nil {
		w = &wanted{}
		s.wants[key] = w
	}
	w.n++
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		w.n--
		w.since = time.Now()
		if _, running := s.running[key]; w.n == 0 && !running {
			delete(s.wants, key)
		}
	}
}

// watch cancels d's context with a cause when the download makes no
// progress for the stall timeout, or when no caller has waited for it for
// the grace period: downloads outlive the RPCs that start them so that
// kubelet's retries join them, and one nobody retries for is abandoned.
func (s *Store) watch(d *download, cancel context.CancelCauseFunc) (stop func()) {
	var every time.Duration
	for _, t := range []time.Duration{s.stallTimeout, s.grace} {
		if t > 0 && (every == 0 || t < every) {
			every = t
		}
	}
	if every == 0 {
		return func() {}
	}
	every = min(max(every/8, 10*time.Millisecond), 5*time.Second)
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(every)
		defer tick.Stop()
		last, lastAt := d.p.Done(), time.Now()
		for {
			select {
			case <-done:
				return
			case now := <-tick.C:
				if n := d.p.Done(); n != last {
					last, lastAt = n, now
				}
				if s.stallTimeout > 0 && now.Sub(lastAt) > s.stallTimeout {
					cancel(fmt.Errorf("%w: the download made no progress for %s (--download-stall-timeout) at %s of %s", source.ErrUnavailable, s.stallTimeout, units.Bytes(last), units.Bytes(d.p.Total)))
					return
				}
				s.mu.Lock()
				w := s.wants[d.key]
				idle := w.n == 0 && now.Sub(w.since) > s.grace // the flight keeps w
				s.mu.Unlock()
				if s.grace > 0 && idle {
					cancel(fmt.Errorf("%w: no publish waited for the download for %s (--download-grace); cancelled at %s of %s, and the next publish starts it again", source.ErrUnavailable, s.grace, units.Bytes(last), units.Bytes(d.p.Total)))
					return
				}
			}
		}
	}()
	return func() { close(done) }
}
