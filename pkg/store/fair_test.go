package store_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
)

// stallFetcher holds some of sourcetest's in-memory objects, whole or in
// ranges: reads of the objects slow names are held, the range at offset 0
// of a ranged read or every byte of a whole one. trickle, when positive,
// lets a held read deliver one byte per trickle instead of none until its
// context ends.
type stallFetcher struct {
	remote  *sourcetest.Remote
	slow    map[string]bool
	trickle time.Duration
	all     bool         // hold reads from any offset, not only from 0
	held    atomic.Int64 // held reads started
	ended   atomic.Int64 // held reads whose context ended
}

func (f *stallFetcher) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	return f.OpenRange(ctx, e, 0, e.Size)
}

func (f *stallFetcher) OpenRange(ctx context.Context, e source.Entry, off, n int64) (io.ReadCloser, error) {
	rc, err := f.remote.OpenRange(ctx, e, off, n)
	if err != nil || !f.slow[e.Path] || off != 0 && !f.all {
		return rc, err
	}
	f.held.Add(1)
	return &heldReader{ctx: ctx, src: rc, f: f}, nil
}

// heldReader delivers src one byte per trickle, or nothing until its
// context ends.
type heldReader struct {
	ctx context.Context
	src io.ReadCloser
	f   *stallFetcher
}

func (r *heldReader) Read(p []byte) (int, error) {
	var tick <-chan time.Time
	if r.f.trickle > 0 {
		tick = time.After(r.f.trickle)
	}
	select {
	case <-r.ctx.Done():
		r.f.ended.Add(1)
		return 0, fmt.Errorf("%w: %w", source.ErrUnavailable, r.ctx.Err())
	case <-tick:
	}
	return r.src.Read(p[:min(len(p), 1)])
}

func (r *heldReader) Close() error { return r.src.Close() }

func openOpts(t *testing.T, opt store.Options) *store.Store {
	t.Helper()
	return openWith(t, t.TempDir(), newIndex(), opt)
}

// A download whose first chunk never arrives, while every later chunk
// comes at once, holds no more than its share of the node's chunk buffers:
// its finished chunks give theirs back when another download waits, and
// that download finishes while the first is still stalled. The rate guard
// is off, so nothing but the sharing lets the second through.
func TestFair_StalledChunk_OtherDownloadFinishes(t *testing.T) {
	for _, streams := range []int{1, 3} {
		t.Run(fmt.Sprintf("streams=%d", streams), func(t *testing.T) {
			s := openOpts(t, store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeStreams: streams,
				MinStreamRate: -1, StallTimeout: -1, DownloadGrace: -1})
			slow := map[string][]byte{"slow.bin": bytesOf("slow", 40*rangeChunk)}
			fast := map[string][]byte{"fast.bin": bytesOf("fast", 40*rangeChunk+7)}
			fs := &stallFetcher{remote: sourcetest.NewFetcher(slow), slow: map[string]bool{"slow.bin": true}}
			stalled := ensureAsync(context.Background(), s, "slow", manifestOf(slow), fs)
			waitFor(t, "the first chunk to stall", func() bool { return fs.held.Load() > 0 })
			// Give its other streams time to fill the pool with finished chunks.
			time.Sleep(100 * time.Millisecond)

			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			tr, _, err := s.Ensure(ctx, "fast", manifestOf(fast), &stallFetcher{remote: sourcetest.NewFetcher(fast)})
			if err != nil {
				t.Fatalf("a download beside a stalled one: %v", err)
			}
			checkTree(t, s, tr, fast)
			select {
			case r := <-stalled:
				t.Fatalf("the stalled download ended: %v", r.err)
			default:
			}
		})
	}
}

// A stream that trickles below the minimum rate is cut after the stall
// window and retried; a chunk cut on every attempt fails the download with
// ErrUnavailable naming the flags, in bounded time, and a download beside
// it finishes meanwhile.
func TestFair_TricklingStream_CutRetriedThenUnavailable(t *testing.T) {
	const window = 200 * time.Millisecond
	s := openOpts(t, store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeStreams: 2,
		MinStreamRate: 1000, StallWindow: window, StallTimeout: -1, DownloadGrace: -1})
	for _, tt := range []struct {
		name  string
		size  int  // above rangeCutoff: ranged chunks; below: one stream
		all   bool // every read trickles, not only those from offset 0
		reads int64
	}{
		// The chunk at 0, and its two retries from where each was cut.
		{"ranged", 10 * rangeChunk, true, 3},
		// The stream, and three resumes from where it was cut.
		{"one stream", 900, true, 4},
	} {
		t.Run(tt.name, func(t *testing.T) {
			files := map[string][]byte{"t.bin": bytesOf("t"+tt.name, tt.size)}
			f := &stallFetcher{remote: sourcetest.NewFetcher(files), slow: map[string]bool{"t.bin": true}, trickle: 20 * time.Millisecond, all: tt.all}
			start := time.Now()
			_, _, err := s.Ensure(context.Background(), "trickle-"+tt.name, manifestOf(files), f)
			took := time.Since(start)
			if !errors.Is(err, source.ErrUnavailable) || !strings.Contains(err.Error(), "--min-stream-rate") {
				t.Fatalf("err %v, want ErrUnavailable naming --min-stream-rate", err)
			}
			// Attempts of one window each: not before, and not much after.
			if held := f.held.Load(); held != tt.reads {
				t.Errorf("%d reads of the trickling object, want %d", held, tt.reads)
			}
			if want := time.Duration(tt.reads) * window; took < want || took > want+5*time.Second {
				t.Errorf("failed after %v, want about %v", took, want)
			}
		})
	}
}

// A download that makes no progress for the stall timeout fails with
// ErrUnavailable saying so, even when no stream is cut for its rate.
func TestStall_NoProgress_FailsUnavailable(t *testing.T) {
	s := openOpts(t, store.Options{MinStreamRate: -1, StallTimeout: 300 * time.Millisecond, DownloadGrace: -1})
	files := map[string][]byte{"a.bin": bytesOf("a", 100)}
	f := &stallFetcher{remote: sourcetest.NewFetcher(files), slow: map[string]bool{"a.bin": true}}
	_, _, err := s.Ensure(context.Background(), "k", manifestOf(files), f)
	if !errors.Is(err, source.ErrUnavailable) || !strings.Contains(err.Error(), "--download-stall-timeout") {
		t.Fatalf("err %v, want ErrUnavailable naming --download-stall-timeout", err)
	}
	if f.ended.Load() != 1 {
		t.Errorf("%d held reads saw their context end, want 1", f.ended.Load())
	}
}

// A download whose callers all stopped waiting is cancelled once none has
// asked for it within the grace period; one a caller keeps asking for
// (kubelet's retries) runs on.
func TestGrace_AbandonedCancelled_WantedKept(t *testing.T) {
	const grace = 300 * time.Millisecond
	for _, tt := range []struct {
		name      string
		retry     bool
		cancelled bool
	}{
		{"abandoned", false, true},
		{"retried", true, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := openOpts(t, store.Options{MinStreamRate: -1, StallTimeout: -1, DownloadGrace: grace})
			files := map[string][]byte{"a.bin": bytesOf("a", 100)}
			f := &stallFetcher{remote: sourcetest.NewFetcher(files), slow: map[string]bool{"a.bin": true}}
			ask := func() {
				ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
				defer cancel()
				if _, _, err := s.Ensure(ctx, "k", manifestOf(files), f); !store.IsInProgress(err) {
					t.Fatalf("err %v, want the download still in progress", err)
				}
			}
			ask()
			for end := time.Now().Add(4 * grace); time.Now().Before(end); time.Sleep(grace / 3) {
				if tt.retry {
					ask()
				}
			}
			_, running := s.Downloading("k")
			if cancelled := f.ended.Load() == 1; cancelled != tt.cancelled || running == cancelled {
				t.Errorf("download cancelled %v (still running %v), want cancelled %v", cancelled, running, tt.cancelled)
			}
		})
	}
}

// Connections are shared as buffers are: a model whose every stream
// trickles gives back the connection of each stream cut for its rate, and
// queues for it again behind another download, whose objects download
// while the first still trickles (it fails only after three resumes of a
// stall window each).
func TestFair_TricklingObjects_ConnectionsShared(t *testing.T) {
	const window = 300 * time.Millisecond
	s := openOpts(t, store.Options{MaxConnections: 4, Transfers: 8, MinStreamRate: 1000, StallWindow: window,
		StallTimeout: -1, DownloadGrace: -1})
	slow, fast := map[string][]byte{}, map[string][]byte{}
	held := map[string]bool{}
	for i := range 8 {
		slow[fmt.Sprintf("s%d", i)] = bytesOf(fmt.Sprint("s", i), 100_000)
		held[fmt.Sprintf("s%d", i)] = true
		fast[fmt.Sprintf("f%d", i)] = bytesOf(fmt.Sprint("f", i), 100)
	}
	fs := &stallFetcher{remote: sourcetest.NewFetcher(slow), slow: held, trickle: 40 * time.Millisecond, all: true}
	start := time.Now()
	stalled := ensureAsync(context.Background(), s, "slow", manifestOf(slow), fs)
	waitFor(t, "the trickling streams", func() bool { return fs.held.Load() >= 4 })
	tr, _, err := s.Ensure(context.Background(), "fast", manifestOf(fast), &stallFetcher{remote: sourcetest.NewFetcher(fast)})
	if err != nil {
		t.Fatal(err)
	}
	checkTree(t, s, tr, fast)
	var r result
	select {
	case r = <-stalled:
		t.Errorf("the fast model waited for the trickling one to end (%v after %v)", r.err, time.Since(start))
	default:
		r = waitResult(t, stalled, "the trickling model")
	}
	if !errors.Is(r.err, source.ErrUnavailable) {
		t.Errorf("the trickling model: err %v, want ErrUnavailable", r.err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(waitLimit); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
