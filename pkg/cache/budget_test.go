package cache

// Unit tests of the cache's eviction policy: which trees go to make room,
// in what order, which stay, and what a budget that cannot be met says.
// A real store and state database in a temporary directory; the holdings
// eviction reads are faked where a test sets candidates, pins and uses
// directly. No root.

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// fakeHoldings are holdings whose candidates and protections a test sets:
// CachedTrees lists the candidates in the given order, then trees that
// hold what held says; CachedTree reports a tree protected by a pin.
type fakeHoldings struct {
	mu        sync.Mutex
	cands     []Candidate
	held      Held
	protected map[string]bool
	asked     []string // digests asked about just before removal
	forgotten []string
	log       *storetest.EventLog // when set, ForgetTree is logged
}

func (f *fakeHoldings) CachedTrees() ([]state.CachedTree, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []state.CachedTree
	for _, c := range f.cands {
		out = append(out, state.CachedTree{TreeRecord: state.TreeRecord{Tree: store.Tree{Digest: c.Digest, Size: c.Size}}})
	}
	for i := range f.held.InUseTrees {
		t := state.CachedTree{Refs: []state.Ref{{VolumeID: "in-use"}}}
		if i == 0 {
			t.Size = f.held.InUseBytes
		}
		out = append(out, t)
	}
	for i := range f.held.PinnedTrees {
		t := state.CachedTree{Pinned: true}
		if i == 0 {
			t.Size = f.held.PinnedBytes
		}
		out = append(out, t)
	}
	return out, nil
}

func (f *fakeHoldings) CachedTree(digest string) (state.CachedTree, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked = append(f.asked, digest)
	return state.CachedTree{TreeRecord: state.TreeRecord{Tree: store.Tree{Digest: digest}}, Pinned: f.protected[digest]}, true, nil
}

func (f *fakeHoldings) Referenced(string) (bool, error) { return false, nil }

func (f *fakeHoldings) ContentKeys(string) ([]string, error) { return nil, nil }

func (f *fakeHoldings) ForgetTree(digest string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.forgotten = append(f.forgotten, digest)
	if f.log != nil {
		f.log.Add("forget " + digest)
	}
	return nil
}

func (f *fakeHoldings) forgottenList() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.forgotten)
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
	log   *storetest.EventLog
}

func (r *evictRecorder) onEvict(reason EvictReason, freed int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, evictCall{string(reason), freed})
	if r.log != nil {
		r.log.Add("evict " + string(reason))
	}
}

func (r *evictRecorder) list() []evictCall {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.calls)
}

// budgetCache is a cache over a temporary directory holding models, each
// downloaded once without a budget (content key "key-<name>"), then
// limited by opt's budget; with holdings set, eviction reads them instead
// of the state database.
type budgetCache struct {
	*Cache
	dir   string
	res   *sourcetest.Resolver
	trees map[string]store.Tree
}

func openBudgetCache(t *testing.T, models map[string]map[string][]byte, opt Options, hold *fakeHoldings) *budgetCache {
	t.Helper()
	dir := t.TempDir()
	opt.Mounter = mount.NewFake()
	c, err := Open(dir, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = c.Close()
		_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				_ = os.Chmod(p, 0o700)
			}
			return nil
		})
	})
	b := &budgetCache{Cache: c, dir: dir, res: sourcetest.NewResolver(), trees: map[string]store.Tree{}}
	for name, files := range models {
		r := b.model(t, name, files)
		m, err := r.List(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		// The store's Ensure runs no gate: seeding makes no room.
		tr, _, err := c.store.Ensure(context.Background(), "key-"+name, m, r)
		if err != nil {
			t.Fatalf("seeding model %s: %v", name, err)
		}
		b.trees[name] = tr
	}
	if hold != nil {
		c.budget.records = hold
	}
	return b
}

// model puts files at the remote as model name and returns its remote.
func (b *budgetCache) model(t *testing.T, name string, files map[string][]byte) source.Remote {
	t.Helper()
	uri := "mys3:models/" + name
	b.res.SetModel(uri, files)
	r, err := b.res.Resolve(context.Background(), uri, sourcetest.Secrets())
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// checkTree checks a tree is present with exactly the bytes of files.
func (b *budgetCache) checkTree(t *testing.T, name string, files map[string][]byte) {
	t.Helper()
	tr := b.trees[name]
	if !b.store.HasTree(tr.Digest) {
		t.Fatalf("tree %s is gone", name)
	}
	for p, want := range files {
		got, err := os.ReadFile(filepath.Join(b.store.TreePath(tr.Digest), p))
		if err != nil || string(got) != string(want) {
			t.Errorf("tree %s: %s differs (%v)", name, p, err)
		}
	}
}

// blobs are the names in blobs/.
func (b *budgetCache) blobs(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(b.dir, store.BlobsDir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func (b *budgetCache) hasBlob(t *testing.T, content []byte) bool {
	return slices.Contains(b.blobs(t), sourcetest.Sha256Hex(content))
}

// evict asks holdings again just before removal and leaves a protected
// tree alone; a removed tree's records are forgotten and OnEvict told.
func TestBudgetEvict(t *testing.T) {
	files := map[string][]byte{"a.bin": sourcetest.Bytes("a", 1000), "b.bin": sourcetest.Bytes("b", 200)}
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
			rec := &evictRecorder{}
			hold := &fakeHoldings{protected: map[string]bool{}}
			b := openBudgetCache(t, map[string]map[string][]byte{"m": files}, Options{OnEvict: rec.onEvict}, hold)
			tr := b.trees["m"]
			hold.protected[tr.Digest] = tt.protected
			freed, removed, err := b.budget.evict(tr.Digest, EvictOperator)
			if err != nil {
				t.Fatalf("evict: %v", err)
			}
			if removed != tt.wantRemoved || freed != tt.wantFreed {
				t.Errorf("evict = %d, %v; want %d, %v", freed, removed, tt.wantFreed, tt.wantRemoved)
			}
			if b.store.HasTree(tr.Digest) == tt.wantRemoved {
				t.Errorf("HasTree after evict = %v", b.store.HasTree(tr.Digest))
			}
			var wantForgot []string
			var wantCalls []evictCall
			if tt.wantRemoved {
				wantForgot = []string{tr.Digest}
				wantCalls = []evictCall{{"operator", tt.wantFreed}}
				if left := b.blobs(t); len(left) != 0 {
					t.Errorf("blobs/ holds %v after the only tree went", left)
				}
			} else {
				b.checkTree(t, "m", files)
			}
			if got := hold.forgottenList(); !slices.Equal(got, wantForgot) {
				t.Errorf("ForgetTree calls %v, want %v", got, wantForgot)
			}
			if got := rec.list(); !slices.Equal(got, wantCalls) {
				t.Errorf("OnEvict calls %v, want %v", got, wantCalls)
			}
		})
	}
}

// makeRoom evicts in the candidates' order until the budget is met, and no
// further; it reports what it cannot do.
func TestMakeRoom(t *testing.T) {
	// Three trees of one distinct file each: a 1000, b 2000, c 4000 bytes.
	models := map[string]map[string][]byte{
		"a": {"a.bin": sourcetest.Bytes("a", 1000)},
		"b": {"b.bin": sourcetest.Bytes("b", 2000)},
		"c": {"c.bin": sourcetest.Bytes("c", 4000)},
	}
	sizes := map[string]int64{"a": 1000, "b": 2000, "c": 4000}
	tests := []struct {
		name        string
		maxBytes    int64
		need        int64
		order       []string // candidates, least recently used first
		held        Held
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
			held:        Held{InUseTrees: 1, InUseBytes: 4000, PinnedTrees: 2, PinnedBytes: 77},
			wantEvicted: []string{"a", "b"}, wantOver: 1000, wantNoRoom: true},
		{name: "no candidates", maxBytes: 6000, held: Held{PinnedTrees: 3, PinnedBytes: 7000}, wantOver: 1000, wantNoRoom: true},
		{name: "protected at eviction time is skipped", maxBytes: 5500, order: []string{"a", "b", "c"}, protect: []string{"a"},
			wantEvicted: []string{"b"}},
		{name: "dry run", maxBytes: 4200, order: []string{"a", "b", "c"}, dryRun: true, wantEvicted: []string{"a", "b"}},
		{name: "dry run without room", maxBytes: 500, order: []string{"a"}, dryRun: true,
			wantEvicted: []string{"a"}, wantOver: 5500, wantNoRoom: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hold := &fakeHoldings{held: tt.held, protected: map[string]bool{}}
			rec := &evictRecorder{}
			b := openBudgetCache(t, models, Options{Budget: Budget{MaxBytes: tt.maxBytes}, OnEvict: rec.onEvict}, hold)
			for _, n := range tt.order {
				hold.cands = append(hold.cands, Candidate{Digest: b.trees[n].Digest, Size: sizes[n]})
			}
			for _, n := range tt.protect {
				hold.protected[b.trees[n].Digest] = true
			}

			plan, err := b.budget.makeRoom(tt.need, tt.dryRun)
			var noRoom *NoRoomError
			switch {
			case tt.wantNoRoom:
				if !errors.As(err, &noRoom) {
					t.Fatalf("makeRoom err = %v, want a *NoRoomError", err)
				}
				if !errors.Is(err, ErrNoSpace) {
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
				t.Fatalf("makeRoom: %v", err)
			}

			var wantEvicted []Candidate
			var wantFreed int64
			var wantCalls []evictCall
			var wantForgot []string
			gone := map[string]bool{}
			for _, n := range tt.wantEvicted {
				wantEvicted = append(wantEvicted, Candidate{Digest: b.trees[n].Digest, Size: sizes[n]})
				wantFreed += sizes[n]
				if !tt.dryRun {
					wantCalls = append(wantCalls, evictCall{"budget", sizes[n]})
					wantForgot = append(wantForgot, b.trees[n].Digest)
					gone[n] = true
				}
			}
			if !slices.Equal(plan.Evicted, wantEvicted) {
				t.Errorf("plan evicted %v, want %v (%v)", plan.Evicted, wantEvicted, tt.wantEvicted)
			}
			if plan.Freed != wantFreed || plan.Over != tt.wantOver {
				t.Errorf("plan freed %d, over %d; want %d, %d", plan.Freed, plan.Over, wantFreed, tt.wantOver)
			}
			for n, tr := range b.trees {
				if gone[n] {
					if b.store.HasTree(tr.Digest) {
						t.Errorf("tree %s was not removed", n)
					}
					if b.hasBlob(t, models[n][n+".bin"]) {
						t.Errorf("blob of evicted tree %s is still there", n)
					}
					continue
				}
				b.checkTree(t, n, models[n])
			}
			if got := rec.list(); !slices.Equal(got, wantCalls) {
				t.Errorf("OnEvict calls %v, want %v", got, wantCalls)
			}
			if got := hold.forgottenList(); !slices.Equal(got, wantForgot) {
				t.Errorf("ForgetTree calls %v, want %v", got, wantForgot)
			}
			for _, n := range tt.protect {
				if !slices.Contains(hold.asked, b.trees[n].Digest) {
					t.Errorf("protection was not asked about %s before its eviction", n)
				}
			}
		})
	}
}

// loggingRemote logs each Open before delegating.
type loggingRemote struct {
	source.Remote
	log *storetest.EventLog
}

func (r loggingRemote) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	r.log.Add("open " + e.Path)
	return r.Remote.Open(ctx, e)
}

// A fetch makes room before it downloads, and downloads nothing when it
// cannot.
func TestFetchMakesRoomFirst(t *testing.T) {
	models := map[string]map[string][]byte{
		"a": {"a.bin": sourcetest.Bytes("a", 1000)},
		"b": {"b.bin": sourcetest.Bytes("b", 2000)},
	}
	next := map[string][]byte{"d.bin": sourcetest.Bytes("d", 3000)}
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
			log := &storetest.EventLog{}
			hold := &fakeHoldings{protected: map[string]bool{}, log: log}
			rec := &evictRecorder{log: log}
			b := openBudgetCache(t, models, Options{Budget: Budget{MaxBytes: tt.maxBytes}, OnEvict: rec.onEvict}, hold)
			for _, n := range tt.order {
				hold.cands = append(hold.cands, Candidate{Digest: b.trees[n].Digest, Size: b.trees[n].Size})
			}
			r := b.model(t, "d", next)
			opens := b.res.OpenTotal()

			f, err := b.Fetch(context.Background(), FetchRequest{URI: "mys3:models/d", Remote: loggingRemote{r, log}})
			if tt.wantNoRoom {
				if !errors.Is(err, ErrNoSpace) {
					t.Fatalf("Fetch err = %v, want ErrNoSpace", err)
				}
				if n := b.res.OpenTotal() - opens; n != 0 {
					t.Errorf("a fetch without room opened %d objects", n)
				}
				if got, err := os.ReadDir(filepath.Join(b.dir, store.TreesDir)); err != nil || len(got) != 2 {
					t.Errorf("trees/ holds %v (%v), want the 2 seeded trees", got, err)
				}
				if left, err := os.ReadDir(filepath.Join(b.dir, store.IngestDir)); err != nil || len(left) != 0 {
					t.Errorf("ingest/ holds %v (%v) after a refused download", left, err)
				}
				return
			}
			if err != nil || f.Hit {
				t.Fatalf("Fetch = hit %v, %v", f.Hit, err)
			}
			// Every eviction (ForgetTree, OnEvict) comes before the first Open.
			var forgets, opened []string
			evicts := 0
			for _, ev := range log.List() {
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
				wantForgets = append(wantForgets, b.trees[n].Digest)
			}
			if !slices.Equal(forgets, wantForgets) || evicts != len(tt.wantGone) || len(opened) != 1 {
				t.Errorf("evicted %v (%d OnEvict), opened %v; want %v evicted, then one open", forgets, evicts, opened, wantForgets)
			}
			for n, old := range b.trees {
				if slices.Contains(tt.wantGone, n) == b.store.HasTree(old.Digest) {
					t.Errorf("tree %s present = %v, want %v", n, b.store.HasTree(old.Digest), !slices.Contains(tt.wantGone, n))
				}
			}
		})
	}
}

// A dry run reports what a real run would remove. Candidates carry the
// tree sizes pkg/state records (the sum of the listed files), as in
// production.
func TestMakeRoomDryRunMatchesRealRun(t *testing.T) {
	shared := sourcetest.Bytes("shared", 3000)
	tests := []struct {
		name     string
		models   map[string]map[string][]byte
		order    []string
		maxBytes int64
	}{
		{"distinct blobs", map[string]map[string][]byte{
			"a": {"a.bin": sourcetest.Bytes("a", 1000)},
			"b": {"b.bin": sourcetest.Bytes("b", 2000)},
			"c": {"c.bin": sourcetest.Bytes("c", 4000)},
		}, []string{"a", "b", "c"}, 4200},
		{"trees sharing a blob", map[string]map[string][]byte{
			"a": {"shared.bin": shared, "a.bin": sourcetest.Bytes("a", 100)},
			"b": {"shared.bin": shared, "b.bin": sourcetest.Bytes("b", 100)},
			"c": {"c.bin": sourcetest.Bytes("c", 1000)},
		}, []string{"a", "b", "c"}, 3500},
		{"tree with the same bytes at two paths", map[string]map[string][]byte{
			"a": {"x/shared.bin": shared, "y/shared.bin": shared},
			"b": {"b.bin": sourcetest.Bytes("b", 3000)},
		}, []string{"a", "b"}, 500},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hold := &fakeHoldings{protected: map[string]bool{}}
			b := openBudgetCache(t, tt.models, Options{Budget: Budget{MaxBytes: tt.maxBytes}}, hold)
			for _, n := range tt.order {
				hold.cands = append(hold.cands, Candidate{Digest: b.trees[n].Digest, Size: b.trees[n].Size})
			}
			dry, derr := b.budget.makeRoom(0, true)
			for n, tr := range b.trees {
				if !b.store.HasTree(tr.Digest) {
					t.Fatalf("dry run removed tree %s", n)
				}
			}
			real, rerr := b.budget.makeRoom(0, false)
			if (derr == nil) != (rerr == nil) {
				t.Errorf("dry run err %v, real run err %v", derr, rerr)
			}
			names := func(cs []Candidate) []string {
				var out []string
				for _, c := range cs {
					for n, tr := range b.trees {
						if tr.Digest == c.Digest {
							out = append(out, n)
						}
					}
				}
				return out
			}
			if d, r := names(dry.Evicted), names(real.Evicted); !slices.Equal(d, r) {
				t.Errorf("dry run plans to evict %v (frees %d), the real run evicted %v (freed %d)", d, dry.Freed, r, real.Freed)
			}
		})
	}
}

// The NoRoomError of a dry run says what was asked for, as a real run's does.
func TestNoRoomErrorNeed(t *testing.T) {
	models := map[string]map[string][]byte{
		"a": {"a.bin": sourcetest.Bytes("a", 1000)},
		"b": {"b.bin": sourcetest.Bytes("b", 2000)},
	}
	tests := []struct {
		name   string
		need   int64
		dryRun bool
	}{
		{"real run", 0, false},
		{"real run with need", 700, false},
		{"dry run", 0, true},
		{"dry run with need", 700, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// a can go, b is in use; the budget cannot hold b.
			hold := &fakeHoldings{held: Held{InUseTrees: 1, InUseBytes: 2000}}
			b := openBudgetCache(t, models, Options{Budget: Budget{MaxBytes: 1500}}, hold)
			hold.cands = []Candidate{{Digest: b.trees["a"].Digest, Size: 1000}}
			_, err := b.budget.makeRoom(tt.need, tt.dryRun)
			var noRoom *NoRoomError
			if !errors.As(err, &noRoom) {
				t.Fatalf("makeRoom err = %v, want a *NoRoomError", err)
			}
			if noRoom.Need != tt.need || strings.Contains(err.Error(), "needs -") {
				t.Errorf("NoRoomError.Need = %d, want %d: %v", noRoom.Need, tt.need, err)
			}
		})
	}
}

// The candidates are exactly the trees no mount uses and no pin holds, least
// recently used first (doomed ones too), with what the others hold; a tree
// is protected while a mount uses it or a pin holds it. Read from the real
// state database.
func TestCandidatesAndProtected(t *testing.T) {
	b := openBudgetCache(t, nil, Options{}, nil)
	db := b.state
	digestOf := func(c string) string { return "sha256:" + strings.Repeat(c, 64) }
	t0 := time.Date(2025, 6, 1, 8, 0, 0, 0, time.UTC)
	seed := func(key, digest string, size int64, at time.Time) {
		t.Helper()
		if err := db.RecordTree(key, store.Tree{Digest: digest, Size: size, Files: 1}); err != nil {
			t.Fatal(err)
		}
		touch := "/touch/" + digest
		if err := db.AddRef(state.Ref{VolumeID: "touch", TargetPath: touch, Tree: digest, URI: "uri-of-" + key, Published: at}, ""); err != nil {
			t.Fatal(err)
		}
		if err := db.DeleteRef(touch); err != nil {
			t.Fatal(err)
		}
	}
	addRef := func(target, digest string, at time.Time) {
		t.Helper()
		if err := db.AddRef(state.Ref{VolumeID: "vol" + target, TargetPath: target, Tree: digest, URI: "uri-ref", Published: at}, ""); err != nil {
			t.Fatal(err)
		}
	}
	a, bb, c, d, e, f := digestOf("a"), digestOf("b"), digestOf("c"), digestOf("d"), digestOf("e"), digestOf("f")
	seed("ka", a, 100, t0.Add(-5*time.Hour))  // in use
	seed("kb", bb, 200, t0.Add(-4*time.Hour)) // pinned
	seed("kc", c, 300, t0.Add(2*time.Hour))   // plain, newest
	seed("kd", d, 400, t0)                    // plain, oldest plain
	seed("ke", e, 500, t0.Add(-6*time.Hour))  // in use and pinned
	seed("kf", f, 600, t0.Add(time.Hour))     // doomed, unused
	addRef("/t/a", a, t0.Add(-5*time.Hour))
	addRef("/t/e1", e, t0.Add(-6*time.Hour))
	addRef("/t/e2", e, t0.Add(-6*time.Hour))
	for _, p := range []string{bb, e} {
		if err := db.SetPinned(p, true); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Doom(f, "operator"); err != nil {
		t.Fatal(err)
	}

	cands, held, err := b.budget.candidates()
	if err != nil {
		t.Fatal(err)
	}
	want := []Candidate{{Digest: d, Size: 400}, {Digest: f, Size: 600}, {Digest: c, Size: 300}}
	if !slices.Equal(cands, want) {
		t.Errorf("candidates = %v, want %v", cands, want)
	}
	if wantHeld := (Held{InUseTrees: 2, InUseBytes: 600, PinnedTrees: 1, PinnedBytes: 200}); held != wantHeld {
		t.Errorf("held = %+v, want %+v", held, wantHeld)
	}
	for _, tt := range []struct {
		digest string
		want   bool
	}{
		{a, true}, {bb, true}, {c, false}, {d, false}, {e, true}, {f, false}, {digestOf("9"), false},
	} {
		got, err := b.budget.protected(tt.digest)
		if err != nil || got != tt.want {
			t.Errorf("protected(%s) = %v, %v; want %v", tt.digest[:12], got, err, tt.want)
		}
		ref, err := db.Referenced(tt.digest)
		wantRef := tt.digest == a || tt.digest == e
		if err != nil || ref != wantRef {
			t.Errorf("Referenced(%s) = %v, %v; want %v", tt.digest[:12], ref, err, wantRef)
		}
	}

	// Released trees become candidates again.
	if err := db.DeleteRef("/t/a"); err != nil {
		t.Fatal(err)
	}
	if err := db.SetPinned(bb, false); err != nil {
		t.Fatal(err)
	}
	cands, held, err = b.budget.candidates()
	if err != nil {
		t.Fatal(err)
	}
	want = []Candidate{{Digest: a, Size: 100}, {Digest: bb, Size: 200}, {Digest: d, Size: 400}, {Digest: f, Size: 600}, {Digest: c, Size: 300}}
	if !slices.Equal(cands, want) {
		t.Errorf("candidates after release = %v, want %v", cands, want)
	}
	if wantHeld := (Held{InUseTrees: 1, InUseBytes: 500}); held != wantHeld {
		t.Errorf("held after release = %+v, want %+v", held, wantHeld)
	}
}
