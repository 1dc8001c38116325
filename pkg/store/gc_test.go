package store_test

// Unit tests of the cache's garbage collection: usage, tree removal with
// blob reference counting, budget enforcement through an Evictor, verify
// with quarantine and in-place repair. They need no root.

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/store"
)

// fakeEvictor is a store.Evictor whose candidates and protections a test sets.
type fakeEvictor struct {
	mu        sync.Mutex
	cands     []store.Candidate
	held      store.Held
	protected map[string]bool
	asked     []string // digests Protected was asked about
	forgotten []string
	log       *eventLog // when set, Forget is logged
}

func (e *fakeEvictor) Candidates() ([]store.Candidate, store.Held, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.cands), e.held, nil
}

func (e *fakeEvictor) Protected(digest string) (bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.asked = append(e.asked, digest)
	return e.protected[digest], nil
}

func (e *fakeEvictor) Forget(digest string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.forgotten = append(e.forgotten, digest)
	if e.log != nil {
		e.log.add("forget " + digest)
	}
	return nil
}

func (e *fakeEvictor) forgottenList() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.forgotten)
}

// eventLog records what happened, in order, across goroutines.
type eventLog struct {
	mu     sync.Mutex
	events []string
}

func (l *eventLog) add(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, s)
}

func (l *eventLog) list() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.events)
}

// evictCall is one OnEvict call.
type evictCall struct {
	reason string
	freed  int64
}

// evictRecorder collects OnEvict calls.
type evictRecorder struct {
	mu    sync.Mutex
	calls []evictCall
	log   *eventLog
}

func (r *evictRecorder) onEvict(reason store.EvictReason, freed int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, evictCall{string(reason), freed})
	if r.log != nil {
		r.log.add("evict " + string(reason))
	}
}

func (r *evictRecorder) list() []evictCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

// openWith opens a store on dir with opt, closed at cleanup.
func openWith(t *testing.T, dir string, idx store.Index, opt store.Options) *store.Store {
	t.Helper()
	s, err := store.Open(dir, idx, opt)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() {
		_ = s.Close()
		makeWritable(dir)
	})
	return s
}

// seedStore commits models into dir with a store that has no budget and
// closes it, so a test can reopen dir with the budget under test. Keys are
// "key-<name>".
func seedStore(t *testing.T, dir string, idx store.Index, models map[string]map[string][]byte) map[string]store.Tree {
	t.Helper()
	s, err := store.Open(dir, idx, store.Options{})
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	defer s.Close()
	trees := map[string]store.Tree{}
	for name, files := range models {
		tr, _, err := s.Ensure(context.Background(), "key-"+name, manifestOf(files), newFetcher(files))
		if err != nil {
			t.Fatalf("seeding model %s: %v", name, err)
		}
		trees[name] = tr
	}
	return trees
}

// corruptBlob flips the first byte of a committed blob in place, as a
// failing disk would; the tree files linking it change with it.
func corruptBlob(t *testing.T, p string) {
	t.Helper()
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o444); err != nil {
		t.Fatal(err)
	}
}

// forgetKey drops a content key from the fake index, as state.Invalidate does.
func (x *memIndex) forgetKey(key string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	delete(x.trees, key)
}

func TestUsage(t *testing.T) {
	shared, a, b := bytesOf("shared", 3000), bytesOf("a", 1000), bytesOf("b", 500)
	tests := []struct {
		name   string
		models map[string]map[string][]byte
		want   store.Usage // FS fields are not compared
		saved  int64
	}{
		{"empty cache", nil, store.Usage{}, 0},
		{"one tree", map[string]map[string][]byte{
			"one": {"a.bin": a, "b.bin": b},
		}, store.Usage{BlobBytes: 1500, Blobs: 2, TreeBytes: 1500, Trees: 1}, 0},
		{"two trees sharing a blob", map[string]map[string][]byte{
			"one": {"shared.bin": shared, "a.bin": a},
			"two": {"tokenizer/shared.bin": shared, "b.bin": b},
		}, store.Usage{BlobBytes: 4500, Blobs: 3, TreeBytes: 7500, Trees: 2}, 3000},
		{"one tree with the same bytes at two paths", map[string]map[string][]byte{
			"one": {"x/shared.bin": shared, "y/shared.bin": shared},
		}, store.Usage{BlobBytes: 3000, Blobs: 1, TreeBytes: 6000, Trees: 1}, 3000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			idx := newIndex()
			seedStore(t, dir, idx, tt.models)
			s := openWith(t, dir, idx, store.Options{})
			u, err := s.Usage()
			if err != nil {
				t.Fatalf("Usage: %v", err)
			}
			if u.FSSize <= 0 || u.FSFree <= 0 || u.FSFree > u.FSSize {
				t.Errorf("filesystem size/free = %d/%d", u.FSSize, u.FSFree)
			}
			got := u
			got.FSSize, got.FSFree = 0, 0
			if got != tt.want {
				t.Errorf("Usage = %+v, want %+v", got, tt.want)
			}
			if u.Saved() != tt.saved {
				t.Errorf("Saved = %d, want %d", u.Saved(), tt.saved)
			}
		})
	}
}

// Bytes of a running download show as ingest, and only while it runs.
func TestUsageCountsIngest(t *testing.T) {
	s := openStore(t, newIndex())
	files := map[string][]byte{"weights.bin": bytesOf("w", 10000)}
	f := newFetcher(files).withGate(4096)
	ch := ensureAsync(context.Background(), s, "key", manifestOf(files), f)
	f.waitBlocked(t, 1)
	u, err := s.Usage()
	if err != nil {
		t.Fatal(err)
	}
	if u.IngestBytes != 4096 || u.Trees != 0 || u.BlobBytes != 0 {
		t.Errorf("during download: ingest %d, trees %d, blobs %d bytes; want 4096, 0, 0", u.IngestBytes, u.Trees, u.BlobBytes)
	}
	f.release()
	if r := waitResult(t, ch, "Ensure"); r.err != nil {
		t.Fatal(r.err)
	}
	u, err = s.Usage()
	if err != nil {
		t.Fatal(err)
	}
	if u.IngestBytes != 0 || u.Trees != 1 || u.BlobBytes != 10000 {
		t.Errorf("after download: ingest %d, trees %d, blobs %d bytes; want 0, 1, 10000", u.IngestBytes, u.Trees, u.BlobBytes)
	}
}

// RemoveTree frees exactly the blobs no other tree links.
func TestRemoveTree(t *testing.T) {
	shared, a, b := bytesOf("shared", 3000), bytesOf("a", 1000), bytesOf("b", 500)
	models := map[string]map[string][]byte{
		"one": {"shared.bin": shared, "a.bin": a},
		"two": {"tok/shared.bin": shared, "b.bin": b},
	}
	type step struct {
		tree      string // model name; "" is an absent tree
		wantFreed int64
		wantBlobs [][]byte
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"first then second", []step{
			{"one", 1000, [][]byte{shared, b}},
			{"two", 3500, nil},
		}},
		{"second then first", []step{
			{"two", 500, [][]byte{shared, a}},
			{"one", 4000, nil},
		}},
		{"twice", []step{
			{"one", 1000, [][]byte{shared, b}},
			{"one", 0, [][]byte{shared, b}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			idx := newIndex()
			trees := seedStore(t, dir, idx, models)
			s := openWith(t, dir, idx, store.Options{})
			removed := map[string]bool{}
			for _, st := range tt.steps {
				freed, err := s.RemoveTree(trees[st.tree].Digest)
				if err != nil {
					t.Fatalf("RemoveTree(%s): %v", st.tree, err)
				}
				if freed != st.wantFreed {
					t.Errorf("RemoveTree(%s) freed %d, want %d", st.tree, freed, st.wantFreed)
				}
				removed[st.tree] = true
				checkBlobs(t, dir, st.wantBlobs...)
				for name, tr := range trees {
					if removed[name] {
						if s.HasTree(tr.Digest) {
							t.Errorf("tree %s still present after RemoveTree", name)
						}
						continue
					}
					checkTree(t, s, tr, models[name])
				}
			}
		})
	}
}

func TestRemoveTreeRejectsInvalidDigest(t *testing.T) {
	s := openStore(t, newIndex())
	for _, d := range []string{"", "sha256:", "sha256:../../etc", "sha256:" + strings.Repeat("A", 64), strings.Repeat("a", 64)} {
		if _, err := s.RemoveTree(d); err == nil {
			t.Errorf("RemoveTree(%q) succeeded", d)
		}
	}
}

// Evict asks the Evictor again under the tree lock and leaves a protected
// tree alone.
func TestEvict(t *testing.T) {
	files := map[string][]byte{"a.bin": bytesOf("a", 1000), "b.bin": bytesOf("b", 200)}
	tests := []struct {
		name        string
		protected   bool
		wantRemoved bool
		wantFreed   int64
	}{
		{"unprotected", false, true, 1200},
		{"protected", true, false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			idx := newIndex()
			tr := seedStore(t, dir, idx, map[string]map[string][]byte{"m": files})["m"]
			ev := &fakeEvictor{protected: map[string]bool{tr.Digest: tt.protected}}
			rec := &evictRecorder{}
			s := openWith(t, dir, idx, store.Options{Evictor: ev, OnEvict: rec.onEvict})
			freed, removed, err := s.Evict(tr.Digest, "operator")
			if err != nil {
				t.Fatalf("Evict: %v", err)
			}
			if removed != tt.wantRemoved || freed != tt.wantFreed {
				t.Errorf("Evict = %d, %v; want %d, %v", freed, removed, tt.wantFreed, tt.wantRemoved)
			}
			if s.HasTree(tr.Digest) == tt.wantRemoved {
				t.Errorf("HasTree after Evict = %v", s.HasTree(tr.Digest))
			}
			var wantForgot []string
			var wantCalls []evictCall
			if tt.wantRemoved {
				wantForgot = []string{tr.Digest}
				wantCalls = []evictCall{{"operator", tt.wantFreed}}
				checkBlobs(t, dir)
			} else {
				checkTree(t, s, tr, files)
			}
			if got := ev.forgottenList(); !slices.Equal(got, wantForgot) {
				t.Errorf("Forget calls %v, want %v", got, wantForgot)
			}
			if got := rec.list(); !slices.Equal(got, wantCalls) {
				t.Errorf("OnEvict calls %v, want %v", got, wantCalls)
			}
		})
	}
}

// MakeRoom evicts in the Evictor's order until the budget is met, and no
// further; it reports what it cannot do.
func TestMakeRoom(t *testing.T) {
	// Three trees of one distinct file each: a 1000, b 2000, c 4000 bytes.
	models := map[string]map[string][]byte{
		"a": {"a.bin": bytesOf("a", 1000)},
		"b": {"b.bin": bytesOf("b", 2000)},
		"c": {"c.bin": bytesOf("c", 4000)},
	}
	sizes := map[string]int64{"a": 1000, "b": 2000, "c": 4000}
	tests := []struct {
		name        string
		maxBytes    int64
		need        int64
		order       []string // candidates, as the Evictor gives them
		held        store.Held
		protect     []string // protected at eviction time
		dryRun      bool
		wantEvicted []string
		wantOver    int64
		wantNoRoom  bool
	}{
		{name: "no budget", maxBytes: 0, order: []string{"a", "b", "c"}},
		{name: "under budget", maxBytes: 7000, order: []string{"a", "b", "c"}},
		{name: "first candidate is enough", maxBytes: 5500, order: []string{"b", "a", "c"}, wantEvicted: []string{"b"}},
		{name: "candidate order, not size order", maxBytes: 6500, order: []string{"c", "a", "b"}, wantEvicted: []string{"c"}},
		{name: "several until it fits", maxBytes: 4200, order: []string{"a", "b", "c"}, wantEvicted: []string{"a", "b"}},
		{name: "room for need", maxBytes: 7000, need: 1500, order: []string{"a", "b", "c"}, wantEvicted: []string{"a", "b"}},
		{name: "candidates run out", maxBytes: 3000, order: []string{"a", "b"},
			held:        store.Held{InUseTrees: 1, InUseBytes: 4000, PinnedTrees: 2, PinnedBytes: 77},
			wantEvicted: []string{"a", "b"}, wantOver: 1000, wantNoRoom: true},
		{name: "no candidates", maxBytes: 6000, held: store.Held{PinnedTrees: 3, PinnedBytes: 7000}, wantOver: 1000, wantNoRoom: true},
		{name: "protected at eviction time is skipped", maxBytes: 5500, order: []string{"a", "b", "c"}, protect: []string{"a"},
			wantEvicted: []string{"b"}},
		{name: "dry run", maxBytes: 4200, order: []string{"a", "b", "c"}, dryRun: true, wantEvicted: []string{"a", "b"}},
		{name: "dry run without room", maxBytes: 500, order: []string{"a"}, dryRun: true,
			wantEvicted: []string{"a"}, wantOver: 5500, wantNoRoom: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			idx := newIndex()
			trees := seedStore(t, dir, idx, models)
			ev := &fakeEvictor{held: tt.held, protected: map[string]bool{}}
			for _, n := range tt.order {
				ev.cands = append(ev.cands, store.Candidate{Digest: trees[n].Digest, Size: sizes[n]})
			}
			for _, n := range tt.protect {
				ev.protected[trees[n].Digest] = true
			}
			rec := &evictRecorder{}
			s := openWith(t, dir, idx, store.Options{Budget: store.Budget{MaxBytes: tt.maxBytes}, Evictor: ev, OnEvict: rec.onEvict})

			plan, err := s.MakeRoom(tt.need, tt.dryRun)
			var noRoom *store.NoRoomError
			switch {
			case tt.wantNoRoom:
				if !errors.As(err, &noRoom) {
					t.Fatalf("MakeRoom err = %v, want a *NoRoomError", err)
				}
				if !errors.Is(err, store.ErrNoSpace) {
					t.Errorf("NoRoomError %v does not match ErrNoSpace", err)
				}
				if noRoom.Held != tt.held {
					t.Errorf("NoRoomError.Held = %+v, want %+v", noRoom.Held, tt.held)
				}
				if noRoom.Limit != tt.maxBytes {
					t.Errorf("NoRoomError.Limit = %d, want %d", noRoom.Limit, tt.maxBytes)
				}
				if msg := err.Error(); !strings.Contains(msg, "in-use") || !strings.Contains(msg, "pinned") {
					t.Errorf("NoRoomError message %q does not say what holds the cache", msg)
				}
			case err != nil:
				t.Fatalf("MakeRoom: %v", err)
			}

			var wantEvicted []store.Candidate
			var wantFreed int64
			var wantCalls []evictCall
			var wantForgot []string
			gone := map[string]bool{}
			for _, n := range tt.wantEvicted {
				wantEvicted = append(wantEvicted, store.Candidate{Digest: trees[n].Digest, Size: sizes[n]})
				wantFreed += sizes[n]
				if !tt.dryRun {
					wantCalls = append(wantCalls, evictCall{"budget", sizes[n]})
					wantForgot = append(wantForgot, trees[n].Digest)
					gone[n] = true
				}
			}
			if !slices.Equal(plan.Evicted, wantEvicted) {
				t.Errorf("plan evicted %v, want %v (%v)", plan.Evicted, wantEvicted, tt.wantEvicted)
			}
			if plan.Freed != wantFreed || plan.Over != tt.wantOver {
				t.Errorf("plan freed %d, over %d; want %d, %d", plan.Freed, plan.Over, wantFreed, tt.wantOver)
			}
			for n, tr := range trees {
				if gone[n] {
					if s.HasTree(tr.Digest) {
						t.Errorf("tree %s was not removed", n)
					}
					if _, err := os.Stat(blobPath(s, models[n][n+".bin"])); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("blob of evicted tree %s is still there (%v)", n, err)
					}
					continue
				}
				checkTree(t, s, tr, models[n])
			}
			if got := rec.list(); !slices.Equal(got, wantCalls) {
				t.Errorf("OnEvict calls %v, want %v", got, wantCalls)
			}
			if got := ev.forgottenList(); !slices.Equal(got, wantForgot) {
				t.Errorf("Forget calls %v, want %v", got, wantForgot)
			}
			for _, n := range tt.protect {
				if !slices.Contains(ev.asked, trees[n].Digest) {
					t.Errorf("Protected was not asked about %s before its eviction", n)
				}
			}
		})
	}
}

// loggingFetcher logs each Open before delegating.
type loggingFetcher struct {
	*fakeFetcher
	log *eventLog
}

func (f loggingFetcher) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	f.log.add("open " + e.Path)
	return f.fakeFetcher.Open(ctx, e)
}

// Ensure makes room before it downloads, and downloads nothing when it cannot.
func TestEnsureMakesRoomFirst(t *testing.T) {
	models := map[string]map[string][]byte{
		"a": {"a.bin": bytesOf("a", 1000)},
		"b": {"b.bin": bytesOf("b", 2000)},
	}
	next := map[string][]byte{"d.bin": bytesOf("d", 3000)}
	tests := []struct {
		name       string
		maxBytes   int64
		order      []string
		wantGone   []string
		wantNoRoom bool
	}{
		{"fits without eviction", 6000, []string{"a", "b"}, nil, false},
		{"evicts least recently used first", 5000, []string{"a", "b"}, []string{"a"}, false},
		{"evicts as many as needed", 3500, []string{"b", "a"}, []string{"b", "a"}, false},
		{"nothing evictable", 5000, nil, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			idx := newIndex()
			trees := seedStore(t, dir, idx, models)
			log := &eventLog{}
			ev := &fakeEvictor{protected: map[string]bool{}, log: log}
			for _, n := range tt.order {
				ev.cands = append(ev.cands, store.Candidate{Digest: trees[n].Digest, Size: trees[n].Size})
			}
			rec := &evictRecorder{log: log}
			s := openWith(t, dir, idx, store.Options{Budget: store.Budget{MaxBytes: tt.maxBytes}, Evictor: ev, OnEvict: rec.onEvict})
			f := newFetcher(next)

			tr, fetched, err := s.Ensure(context.Background(), "key-d", manifestOf(next), loggingFetcher{f, log})
			if tt.wantNoRoom {
				if !errors.Is(err, store.ErrNoSpace) {
					t.Fatalf("Ensure err = %v, want ErrNoSpace", err)
				}
				if n := f.totalOpens(); n != 0 {
					t.Errorf("Ensure without room opened %d objects", n)
				}
				if got := entries(t, dir, store.TreesDir); len(got) != 2 {
					t.Errorf("trees/ holds %v, want the 2 seeded trees", got)
				}
				checkIngestEmpty(t, dir)
				return
			}
			if err != nil || !fetched {
				t.Fatalf("Ensure = %v, %v", fetched, err)
			}
			checkTree(t, s, tr, next)
			// Every eviction (Forget, OnEvict) comes before the first Open.
			var forgets, opened []string
			evicts := 0
			for _, ev := range log.list() {
				switch {
				case strings.HasPrefix(ev, "open "):
					opened = append(opened, ev)
				case len(opened) > 0:
					t.Errorf("%q after the download started", ev)
				case strings.HasPrefix(ev, "forget "):
					forgets = append(forgets, strings.TrimPrefix(ev, "forget "))
				case ev == "evict budget":
					evicts++
				}
			}
			var wantForgets []string
			for _, n := range tt.wantGone {
				wantForgets = append(wantForgets, trees[n].Digest)
			}
			if !slices.Equal(forgets, wantForgets) || evicts != len(tt.wantGone) || len(opened) != 1 {
				t.Errorf("evicted %v (%d OnEvict), opened %v; want %v evicted, then one open", forgets, evicts, opened, wantForgets)
			}
			for n, old := range trees {
				if slices.Contains(tt.wantGone, n) == s.HasTree(old.Digest) {
					t.Errorf("tree %s present = %v, want %v", n, s.HasTree(old.Digest), !slices.Contains(tt.wantGone, n))
				}
			}
		})
	}
}

// OnDownload is told once per download, with the bytes transferred.
func TestOnDownloadHook(t *testing.T) {
	files := map[string][]byte{"w.bin": bytesOf("w", 7000)}
	m := manifestOf(files)
	type call struct {
		bytes int64
		err   error
	}
	tests := []struct {
		name      string
		run       func(t *testing.T, s *store.Store)
		wantCalls int
		wantBytes int64
		wantErr   bool
	}{
		{"cold download", func(t *testing.T, s *store.Store) {
			if _, _, err := s.Ensure(context.Background(), "k", m, newFetcher(files)); err != nil {
				t.Fatal(err)
			}
		}, 1, 7000, false},
		{"cache hit is no download", func(t *testing.T, s *store.Store) {
			for range 3 {
				if _, _, err := s.Ensure(context.Background(), "k", m, newFetcher(files)); err != nil {
					t.Fatal(err)
				}
			}
		}, 1, 7000, false},
		{"joined download counts once", func(t *testing.T, s *store.Store) {
			f := newFetcher(files).withGate(100)
			var chs []<-chan result
			for range 3 {
				chs = append(chs, ensureAsync(context.Background(), s, "k", m, f))
			}
			f.waitBlocked(t, 1)
			f.release()
			for _, ch := range chs {
				if r := waitResult(t, ch, "Ensure"); r.err != nil {
					t.Fatal(r.err)
				}
			}
		}, 1, 7000, false},
		{"failed download", func(t *testing.T, s *store.Store) {
			f := newFetcher(files)
			f.failPath, f.failAt, f.failErr = "w.bin", 2500, errBoom
			if _, _, err := s.Ensure(context.Background(), "k", m, f); err == nil {
				t.Fatal("Ensure succeeded with a failing remote")
			}
		}, 1, 2500, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mu sync.Mutex
			var starts int
			var calls []call
			hook := func() func(int64, error) {
				mu.Lock()
				starts++
				mu.Unlock()
				return func(n int64, err error) {
					mu.Lock()
					defer mu.Unlock()
					calls = append(calls, call{n, err})
				}
			}
			dir := t.TempDir()
			s := openWith(t, dir, newIndex(), store.Options{OnDownload: hook})
			tt.run(t, s)
			mu.Lock()
			defer mu.Unlock()
			if starts != tt.wantCalls || len(calls) != tt.wantCalls {
				t.Fatalf("OnDownload started %d, ended %d times; want %d", starts, len(calls), tt.wantCalls)
			}
			if c := calls[0]; c.bytes != tt.wantBytes || (c.err != nil) != tt.wantErr {
				t.Errorf("OnDownload done(%d, %v); want %d bytes, error %v", c.bytes, c.err, tt.wantBytes, tt.wantErr)
			}
		})
	}
}

func TestVerifyCleanStore(t *testing.T) {
	s := openStore(t, newIndex())
	files := sampleModel()
	if _, _, err := s.Ensure(context.Background(), "k", manifestOf(files), newFetcher(files)); err != nil {
		t.Fatal(err)
	}
	u, err := s.Usage()
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.Verify()
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if len(res.Corrupt) != 0 || len(res.Damaged) != 0 || len(res.Quarantined) != 0 {
		t.Errorf("Verify of a clean store = %+v", res)
	}
	if res.Blobs != u.Blobs || res.Bytes != u.BlobBytes || res.Blobs != 6 {
		t.Errorf("Verify checked %d blobs, %d bytes; want %d, %d", res.Blobs, res.Bytes, u.Blobs, u.BlobBytes)
	}
	if _, err := os.Stat(filepath.Join(s.Dir(), store.QuarantineDir)); err == nil {
		if q := entries(t, s.Dir(), store.QuarantineDir); len(q) != 0 {
			t.Errorf("quarantine holds %v after a clean verify", q)
		}
	}
}

// A flipped byte is found: the blob goes to quarantine, exactly the trees
// linking it are damaged, and the next download of a damaged model repairs
// its tree in place.
func TestVerifyQuarantinesAndRepair(t *testing.T) {
	shared, a, b, c := bytesOf("shared", 3000), bytesOf("a", 1000), bytesOf("b", 500), bytesOf("c", 700)
	models := map[string]map[string][]byte{
		"one":   {"shared.bin": shared, "a.bin": a},
		"two":   {"tok/shared.bin": shared, "b.bin": b},
		"three": {"c.bin": c},
	}
	tests := []struct {
		name        string
		corrupt     []byte
		wantDamaged []string
	}{
		{"blob shared by two trees", shared, []string{"one", "two"}},
		{"blob of one tree", b, []string{"two"}},
		{"blob of a tree of its own", c, []string{"three"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			idx := newIndex()
			trees := seedStore(t, dir, idx, models)
			s := openWith(t, dir, idx, store.Options{})
			bad := blobPath(s, tt.corrupt)
			_, badSt := statT(t, bad)
			corruptBlob(t, bad)

			res, err := s.Verify()
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			hex := sha256Hex(tt.corrupt)
			if !slices.Equal(res.Corrupt, []string{hex}) {
				t.Errorf("Corrupt = %v, want [%s]", res.Corrupt, hex)
			}
			var want []string
			for _, n := range tt.wantDamaged {
				want = append(want, trees[n].Digest)
			}
			got := slices.Clone(res.Damaged)
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("Damaged = %v, want %v", res.Damaged, want)
			}
			if res.Blobs != 4 {
				t.Errorf("Verify checked %d blobs, want 4", res.Blobs)
			}
			if _, err := os.Stat(bad); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("corrupt blob still in blobs/ (%v)", err)
			}
			q := entries(t, dir, store.QuarantineDir)
			if len(q) != 1 || !strings.HasPrefix(q[0], hex+"-") || !slices.Equal(res.Quarantined, q) {
				t.Errorf("quarantine holds %v, reported %v; want one file named after %s", q, res.Quarantined, hex)
			} else if _, st := statT(t, filepath.Join(dir, store.QuarantineDir, q[0])); st.Ino != badSt.Ino {
				t.Errorf("quarantined file is inode %d, the corrupt blob was %d", st.Ino, badSt.Ino)
			}
			if u, err := s.Usage(); err != nil || u.Quarantined != 1 {
				t.Errorf("Usage.Quarantined = %d (%v), want 1", u.Quarantined, err)
			}
			if again, err := s.Verify(); err != nil || len(again.Corrupt) != 0 || len(again.Damaged) != 0 {
				t.Errorf("second Verify = %+v, %v; want clean", again, err)
			}

			// Repair: the caller stopped serving the damaged trees (their
			// keys are gone from the index); the next download of each
			// rewrites its tree in place.
			for _, n := range tt.wantDamaged {
				idx.forgetKey("key-" + n)
				tr, fetched, err := s.Ensure(context.Background(), "key-"+n, manifestOf(models[n]), newFetcher(models[n]))
				if err != nil || !fetched {
					t.Fatalf("Ensure of damaged %s = %v, %v", n, fetched, err)
				}
				if tr != trees[n] {
					t.Errorf("repaired tree %+v, want %+v", tr, trees[n])
				}
				// Same inode as the new blob, right bytes, modes, no leftovers.
				checkTree(t, s, tr, models[n])
			}
			checkBlobs(t, dir, shared, a, b, c)
			checkIngestEmpty(t, dir)
			if _, st := statT(t, bad); st.Ino == badSt.Ino {
				t.Error("the corrupt inode was committed again")
			}
		})
	}
}

// hookFetcher runs a function once just before an object is opened.
type hookFetcher struct {
	*fakeFetcher
	before map[string]func()
	once   sync.Map
}

func (f *hookFetcher) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	if fn := f.before[e.Path]; fn != nil {
		if _, done := f.once.LoadOrStore(e.Path, true); !done {
			fn()
		}
	}
	return f.fakeFetcher.Open(ctx, e)
}

// A blob this download found committed may be swept before the tree is
// built; the download commits its own copy again and still succeeds.
func TestIngestRecommitsSweptBlob(t *testing.T) {
	shared, z := bytesOf("shared", 3000), bytesOf("z", 1000)
	old := map[string][]byte{"old/shared.bin": shared}
	next := map[string][]byte{"a-shared.bin": shared, "z-last.bin": z}
	tests := []struct {
		name  string
		seed  bool
		sweep func(t *testing.T, s *store.Store, old store.Tree)
	}{
		// The other tree that held the blob is evicted meanwhile; this
		// download's ingest copy is a separate inode, so the sweep takes
		// the committed blob.
		{"other tree evicted", true, func(t *testing.T, s *store.Store, old store.Tree) {
			if _, err := s.RemoveTree(old.Digest); err != nil {
				t.Errorf("RemoveTree: %v", err)
			}
		}},
		// The blob this download committed itself disappears from blobs/.
		{"own blob removed", false, func(t *testing.T, s *store.Store, _ store.Tree) {
			if err := os.Remove(blobPath(s, shared)); err != nil {
				t.Errorf("removing blob: %v", err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			idx := newIndex()
			var oldTree store.Tree
			if tt.seed {
				oldTree = seedStore(t, dir, idx, map[string]map[string][]byte{"old": old})["old"]
			}
			// One transfer: files are ingested in path order.
			s := openWith(t, dir, idx, store.Options{Transfers: 1})
			swept := false
			f := &hookFetcher{fakeFetcher: newFetcher(next), before: map[string]func(){
				"z-last.bin": func() {
					tt.sweep(t, s, oldTree)
					_, err := os.Stat(blobPath(s, shared))
					swept = errors.Is(err, os.ErrNotExist)
				},
			}}
			tr, fetched, err := s.Ensure(context.Background(), "key-next", manifestOf(next), f)
			if !swept {
				t.Fatal("the shared blob was not swept before the last file: the test does not exercise the fallback")
			}
			if err != nil || !fetched {
				t.Fatalf("Ensure after a sweep = %v, %v", fetched, err)
			}
			checkTree(t, s, tr, next)
			checkBlobs(t, dir, shared, z)
			checkIngestEmpty(t, dir)
			if _, st := statT(t, blobPath(s, shared)); st.Nlink != 2 {
				t.Errorf("re-committed blob has %d links, want 2 (blob + tree)", st.Nlink)
			}
		})
	}
}

func TestTreeFiles(t *testing.T) {
	s := openStore(t, newIndex())
	files := sampleModel()
	tr, _, err := s.Ensure(context.Background(), "k", manifestOf(files), newFetcher(files))
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.TreeFiles(tr.Digest)
	if err != nil {
		t.Fatalf("TreeFiles: %v", err)
	}
	if len(got) != len(files) {
		t.Errorf("TreeFiles listed %d files, want %d: %+v", len(got), len(files), got)
	}
	for _, f := range got {
		want, ok := files[f.Path]
		if !ok {
			t.Errorf("TreeFiles lists unknown file %q", f.Path)
			continue
		}
		if f.Size != int64(len(want)) || f.Sha256 != sha256Hex(want) {
			t.Errorf("%s: size %d sha256 %s; want %d %s", f.Path, f.Size, f.Sha256, len(want), sha256Hex(want))
		}
	}

	for _, d := range []string{
		"sha256:" + strings.Repeat("0", 64), // valid, not cached
		"sha256:../x",
		"",
	} {
		if _, err := s.TreeFiles(d); !errors.Is(err, store.ErrNoTree) {
			t.Errorf("TreeFiles(%q) err = %v, want ErrNoTree", d, err)
		}
	}
}

func TestTreeDigests(t *testing.T) {
	dir := t.TempDir()
	idx := newIndex()
	trees := seedStore(t, dir, idx, map[string]map[string][]byte{
		"a": {"a": bytesOf("a", 10)},
		"b": {"b": bytesOf("b", 10)},
	})
	s := openWith(t, dir, idx, store.Options{})
	// Not trees: a stray file and a directory with a name that is no digest.
	if err := os.WriteFile(filepath.Join(dir, store.TreesDir, "stray"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, store.TreesDir, "not-a-digest"), 0o700); err != nil {
		t.Fatal(err)
	}
	got, err := s.TreeDigests()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{trees["a"].Digest, trees["b"].Digest}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("TreeDigests = %v, want %v", got, want)
	}
}

// Blob link counts are what sweepBlobs relies on; a filesystem without them
// would free blobs in use.
func TestBlobLinkCountsTrackTrees(t *testing.T) {
	dir := t.TempDir()
	shared := bytesOf("s", 100)
	trees := seedStore(t, dir, newIndex(), map[string]map[string][]byte{
		"a": {"s": shared},
		"b": {"t/s": shared},
	})
	p := filepath.Join(dir, store.BlobsDir, sha256Hex(shared))
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Nlink != 3 {
		t.Errorf("blob shared by %d trees has %d links, want 3", len(trees), st.Nlink)
	}
}

// A dry run reports what a real run would remove. Candidates carry the
// tree sizes pkg/state records (the sum of the listed files), as in
// production.
func TestMakeRoomDryRunMatchesRealRun(t *testing.T) {
	shared := bytesOf("shared", 3000)
	tests := []struct {
		name     string
		models   map[string]map[string][]byte
		order    []string
		maxBytes int64
		bug      string // a known bug: the case is skipped until it is fixed
	}{
		{"distinct blobs", map[string]map[string][]byte{
			"a": {"a.bin": bytesOf("a", 1000)},
			"b": {"b.bin": bytesOf("b", 2000)},
			"c": {"c.bin": bytesOf("c", 4000)},
		}, []string{"a", "b", "c"}, 4200, ""},
		{"trees sharing a blob", map[string]map[string][]byte{
			"a": {"shared.bin": shared, "a.bin": bytesOf("a", 100)},
			"b": {"shared.bin": shared, "b.bin": bytesOf("b", 100)},
			"c": {"c.bin": bytesOf("c", 1000)},
		}, []string{"a", "b", "c"}, 3500, ""},
		{"tree with the same bytes at two paths", map[string]map[string][]byte{
			"a": {"x/shared.bin": shared, "y/shared.bin": shared},
			"b": {"b.bin": bytesOf("b", 3000)},
		}, []string{"a", "b"}, 500, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.bug != "" {
				t.Skip("BUG: " + tt.bug)
			}
			dir := t.TempDir()
			idx := newIndex()
			trees := seedStore(t, dir, idx, tt.models)
			ev := &fakeEvictor{protected: map[string]bool{}}
			for _, n := range tt.order {
				ev.cands = append(ev.cands, store.Candidate{Digest: trees[n].Digest, Size: trees[n].Size})
			}
			s := openWith(t, dir, idx, store.Options{Budget: store.Budget{MaxBytes: tt.maxBytes}, Evictor: ev})
			dry, derr := s.MakeRoom(0, true)
			for n, tr := range trees {
				if !s.HasTree(tr.Digest) {
					t.Fatalf("dry run removed tree %s", n)
				}
			}
			real, rerr := s.MakeRoom(0, false)
			if (derr == nil) != (rerr == nil) {
				t.Errorf("dry run err %v, real run err %v", derr, rerr)
			}
			var dryDigests, realDigests []string
			for _, c := range dry.Evicted {
				dryDigests = append(dryDigests, c.Digest)
			}
			for _, c := range real.Evicted {
				realDigests = append(realDigests, c.Digest)
			}
			if !slices.Equal(dryDigests, realDigests) {
				names := func(ds []string) []string {
					var out []string
					for _, d := range ds {
						for n, tr := range trees {
							if tr.Digest == d {
								out = append(out, n)
							}
						}
					}
					return out
				}
				t.Errorf("dry run plans to evict %v (frees %d), the real run evicted %v (freed %d)",
					names(dryDigests), dry.Freed, names(realDigests), real.Freed)
			}
		})
	}
}

// The NoRoomError of a dry run says what was asked for, as a real run's does.
func TestNoRoomErrorNeed(t *testing.T) {
	models := map[string]map[string][]byte{
		"a": {"a.bin": bytesOf("a", 1000)},
		"b": {"b.bin": bytesOf("b", 2000)},
	}
	tests := []struct {
		name   string
		need   int64
		dryRun bool
		bug    string
	}{
		{"real run", 0, false, ""},
		{"real run with need", 700, false, ""},
		{"dry run", 0, true, ""},
		{"dry run with need", 700, true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.bug != "" {
				t.Skip("BUG: " + tt.bug)
			}
			dir := t.TempDir()
			idx := newIndex()
			trees := seedStore(t, dir, idx, models)
			// a can go, b is in use; the budget cannot hold b.
			ev := &fakeEvictor{
				cands: []store.Candidate{{Digest: trees["a"].Digest, Size: 1000}},
				held:  store.Held{InUseTrees: 1, InUseBytes: 2000},
			}
			s := openWith(t, dir, idx, store.Options{Budget: store.Budget{MaxBytes: 1500}, Evictor: ev})
			_, err := s.MakeRoom(tt.need, tt.dryRun)
			var noRoom *store.NoRoomError
			if !errors.As(err, &noRoom) {
				t.Fatalf("MakeRoom err = %v, want a *NoRoomError", err)
			}
			if noRoom.Need != tt.need || strings.Contains(err.Error(), "needs -") {
				t.Errorf("NoRoomError.Need = %d, want %d: %v", noRoom.Need, tt.need, err)
			}
		})
	}
}
