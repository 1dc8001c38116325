package store_test

// Unit tests of the store's removal mechanism: usage, tree removal with
// blob reference counting, removal under the tree lock, the gate of a new
// download, verify with quarantine and in-place repair. Which trees go is
// the cache's choice, tested in pkg/cache. They need no root.

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
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// openWith opens a store on dir with opt, closed at cleanup.
func openWith(t *testing.T, dir string, idx store.Index, opt store.Options) *store.Store {
	t.Helper()
	s, err := store.Open(dir, idx, opt)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() {
		_ = s.Close()
		storetest.MakeWritable(dir)
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

// loggingFetcher logs each Open before delegating.
type loggingFetcher struct {
	*fakeFetcher
	log *storetest.EventLog
}

func (f loggingFetcher) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	f.log.Add("open " + e.Path)
	return f.fakeFetcher.Open(ctx, e)
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
			f.failAt("w.bin", 2500, errBoom)
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

// RemoveTreeIf asks keep under the tree lock, leaves a kept tree alone,
// and forgets a removed tree's records before the lock is let go.
func TestRemoveTreeIf(t *testing.T) {
	files := map[string][]byte{"a.bin": bytesOf("a", 1000), "b.bin": bytesOf("b", 200)}
	tests := []struct {
		name        string
		keep        bool
		keepErr     error
		wantRemoved bool
		wantFreed   int64
	}{
		{"removed", false, nil, true, 1200},
		{"kept", true, nil, false, 0},
		{"keep fails", false, errBoom, false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			idx := newIndex()
			tr := seedStore(t, dir, idx, map[string]map[string][]byte{"m": files})["m"]
			s := openWith(t, dir, idx, store.Options{})
			log := &storetest.EventLog{}
			freed, removed, err := s.RemoveTreeIf(tr.Digest,
				func() (bool, error) {
					log.Add("keep")
					// Under the tree lock: a publish mounting it waits.
					done := make(chan struct{})
					go func() {
						defer close(done)
						_ = s.UseTree(tr.Digest, func() error { return nil })
					}()
					select {
					case <-done:
						t.Error("UseTree ran while keep was asked")
					case <-time.After(20 * time.Millisecond):
					}
					t.Cleanup(func() { <-done })
					return tt.keep, tt.keepErr
				},
				func() error {
					if s.HasTree(tr.Digest) {
						t.Error("forget ran before the tree was removed")
					}
					log.Add("forget")
					return nil
				})
			if !errors.Is(err, tt.keepErr) {
				t.Fatalf("RemoveTreeIf err = %v, want %v", err, tt.keepErr)
			}
			if removed != tt.wantRemoved || freed != tt.wantFreed {
				t.Errorf("RemoveTreeIf = %d, %v; want %d, %v", freed, removed, tt.wantFreed, tt.wantRemoved)
			}
			want := []string{"keep"}
			if tt.wantRemoved {
				want = append(want, "forget")
				checkBlobs(t, dir)
				if s.HasTree(tr.Digest) {
					t.Error("tree still present")
				}
			} else {
				checkTree(t, s, tr, files)
			}
			if got := log.List(); !slices.Equal(got, want) {
				t.Errorf("calls %v, want %v", got, want)
			}
		})
	}
}

// The gate of a new download runs once, after the download is registered
// (Reservations count it, so room made there is room for it) and before
// any object is opened; a gate's error refuses the download. A caller that
// finds the tree committed, or joins the running download, runs no gate.
func TestEnsureGatedGate(t *testing.T) {
	files := map[string][]byte{"d.bin": bytesOf("d", 3000), "e/f.bin": bytesOf("f", 10)}
	m := manifestOf(files)
	tests := []struct {
		name    string
		gateErr error
	}{
		{"gate lets it start", nil},
		{"gate refuses", errBoom},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openWith(t, dir, newIndex(), store.Options{})
			f := newFetcher(files)
			log := &storetest.EventLog{}
			gate := func() error {
				bytes, inodes := s.Reservations()
				// Two files, one directory, the tree's and the ingest directory's own.
				if bytes != 3010 || inodes != 5 {
					t.Errorf("in the gate Reservations = %d bytes, %d inodes; want 3010, 5", bytes, inodes)
				}
				if _, ok := s.Downloading("key"); !ok {
					t.Error("the download is not registered when the gate runs")
				}
				log.Add("gate")
				return tt.gateErr
			}
			e, err := s.EnsureGated(context.Background(), "key", m, loggingFetcher{f, log}, gate)
			if !errors.Is(err, tt.gateErr) {
				t.Fatalf("EnsureGated err = %v, want %v", err, tt.gateErr)
			}
			if b, i := s.Reservations(); b != 0 || i != 0 {
				t.Errorf("after the download Reservations = %d, %d; want 0, 0", b, i)
			}
			if tt.gateErr != nil {
				if n := f.totalOpens(); n != 0 {
					t.Errorf("a refused download opened %d objects", n)
				}
				checkIngestEmpty(t, dir)
				return
			}
			if !e.Fetched || e.Joined {
				t.Errorf("Ensured = %+v, want Fetched and not Joined", e)
			}
			if got := log.List(); len(got) != 3 || got[0] != "gate" {
				t.Errorf("calls %v, want the gate, then two opens", got)
			}
			again, err := s.EnsureGated(context.Background(), "key", m, f, func() error {
				t.Error("gate ran for a committed tree")
				return nil
			})
			if err != nil || again.Fetched || again.Joined || again.Tree != e.Tree {
				t.Errorf("second EnsureGated = %+v, %v; want the committed tree, neither fetched nor joined", again, err)
			}
		})
	}
}
