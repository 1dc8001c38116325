package store_test

// Fakes and assertions shared by the store's unit tests. They need no root
// and no network: the Fetcher serves bytes from memory and the Index is a
// map (pkg/state imports pkg/store, so the real database cannot be used here).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// waitLimit bounds every wait on another goroutine. It is generous on
// purpose: correctness never depends on it, it only turns a hang into a
// failure on a loaded two-core machine.
const waitLimit = 60 * time.Second

// fakeFetcher is sourcetest's in-memory remote as the store's tests steer
// it: a store.Fetcher only (whole objects, no ranged reads), counting
// Opens per path, able to hold every reader at a byte offset or to break
// one object's download at one.
type fakeFetcher struct {
	remote *sourcetest.Remote
}

func newFetcher(files map[string][]byte) *fakeFetcher {
	return &fakeFetcher{remote: sourcetest.NewFetcher(files)}
}

func (f *fakeFetcher) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	return f.remote.Open(ctx, e)
}

// withGate makes every reader stop after n bytes until release is called.
func (f *fakeFetcher) withGate(n int) *fakeFetcher {
	f.remote.Resolver().WithGate(n)
	return f
}

func (f *fakeFetcher) release() { f.remote.Resolver().Release() }

// failAt makes path's readers fail with err once they delivered n bytes.
func (f *fakeFetcher) failAt(path string, n int, err error) {
	f.remote.Resolver().Set(func(r *sourcetest.Resolver) { r.FailPath, r.FailAt, r.FailErr = path, n, err })
}

// failOpens makes every Open fail with err.
func (f *fakeFetcher) failOpens(err error) {
	f.remote.Resolver().Set(func(r *sourcetest.Resolver) { r.OpenErr = err })
}

// readers returns the readers handed out, closed, and stopped at the gate
// because their context ended.
func (f *fakeFetcher) readers() (opened, closed, cancelled int) {
	f.remote.Resolver().Set(func(r *sourcetest.Resolver) {
		opened, closed, cancelled = r.ReadersOpened, r.ReadersClosed, r.ReadersCancelled
	})
	return opened, closed, cancelled
}

func (f *fakeFetcher) readersOpened() int    { o, _, _ := f.readers(); return o }
func (f *fakeFetcher) readersClosed() int    { _, c, _ := f.readers(); return c }
func (f *fakeFetcher) readersCancelled() int { _, _, c := f.readers(); return c }

// openCount is how many times path was opened.
func (f *fakeFetcher) openCount(path string) int64 { return int64(f.remote.OpenCount(path)) }

// totalOpens is the number of Open calls over every path.
func (f *fakeFetcher) totalOpens() int64 { return int64(f.remote.Resolver().OpenTotal()) }

// waitBlocked waits until n readers have reached the gate.
func (f *fakeFetcher) waitBlocked(t *testing.T, n int) {
	t.Helper()
	for i := range n {
		sourcetest.Recv(t, f.remote.Resolver().Blocked(), waitLimit, fmt.Sprintf("reader %d of %d at the gate", i+1, n))
	}
}

// waitPassed waits until n readers are through the gate; from then on
// nothing a test does to contexts can stop them.
func (f *fakeFetcher) waitPassed(t *testing.T, n int) {
	t.Helper()
	for i := range n {
		sourcetest.Recv(t, f.remote.Resolver().Passed(), waitLimit, fmt.Sprintf("reader %d of %d through the gate", i+1, n))
	}
}

func timeAfter() <-chan time.Time { return time.After(waitLimit) }

// memIndex is an in-memory store.Index.
type memIndex struct {
	mu      sync.Mutex
	trees   map[string]store.Tree
	records atomic.Int64

	lookupErr error // returned by TreeForKey when set
	recordErr error // returned by RecordTree when set
}

func newIndex() *memIndex { return &memIndex{trees: map[string]store.Tree{}} }

func (x *memIndex) TreeForKey(key string) (store.Tree, bool, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.lookupErr != nil {
		return store.Tree{}, false, x.lookupErr
	}
	t, ok := x.trees[key]
	return t, ok, nil
}

func (x *memIndex) RecordTree(key string, t store.Tree) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.recordErr != nil {
		return x.recordErr
	}
	x.records.Add(1)
	x.trees[key] = t
	return nil
}

func (x *memIndex) get(key string) (store.Tree, bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	t, ok := x.trees[key]
	return t, ok
}

func (x *memIndex) setLookupErr(err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.lookupErr = err
}

func (x *memIndex) setRecordErr(err error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.recordErr = err
}

// openStore opens a store in a fresh temporary directory, closed at cleanup.
func openStore(t *testing.T, idx store.Index) *store.Store {
	t.Helper()
	return openStoreAt(t, t.TempDir(), idx)
}

func openStoreAt(t *testing.T, dir string, idx store.Index) *store.Store {
	t.Helper()
	s, err := store.Open(dir, idx, store.Options{})
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() {
		_ = s.Close()
		storetest.MakeWritable(dir)
	})
	return s
}

// manifestOf lists files the way source.Remote does: sorted by path, each
// with its size.
func manifestOf(files map[string][]byte) source.Manifest {
	var m source.Manifest
	for p, b := range files {
		m = append(m, source.Entry{Path: p, Size: int64(len(b)), Hash: "etag-" + p})
	}
	slices.SortFunc(m, func(a, b source.Entry) int { return strings.Compare(a.Path, b.Path) })
	return m
}

// sha256Hex is the hex sha256 of b.
func sha256Hex(b []byte) string { return sourcetest.Sha256Hex(b) }

// sumsOf returns the file digests of m's entries, in manifest order.
func sumsOf(m source.Manifest, files map[string][]byte) []string {
	sums := make([]string, len(m))
	for i, e := range m {
		sums[i] = sha256Hex(files[e.Path])
	}
	return sums
}

// bytesOf makes n deterministic bytes that differ per seed.
func bytesOf(seed string, n int) []byte { return sourcetest.Bytes(seed, n) }

func statT(t *testing.T, p string) (fs.FileInfo, *syscall.Stat_t) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatalf("lstat: %v", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		t.Fatalf("no stat_t for %s", p)
	}
	return fi, st
}

func blobPath(s *store.Store, content []byte) string {
	return filepath.Join(s.Dir(), store.BlobsDir, sha256Hex(content))
}

// checkTree asserts the committed tree for tr holds exactly files, with the
// right bytes, as 0444 hardlinks of the blobs named by their sha256, under
// 0555 directories, and that tr describes it.
func checkTree(t *testing.T, s *store.Store, tr store.Tree, files map[string][]byte) {
	t.Helper()
	m := manifestOf(files)
	if want := store.TreeDigest(m, sumsOf(m, files)); tr.Digest != want {
		t.Errorf("tree digest = %s, want %s", tr.Digest, want)
	}
	if tr.Size != m.Size() || tr.Files != len(m) {
		t.Errorf("tree size/files = %d/%d, want %d/%d", tr.Size, tr.Files, m.Size(), len(m))
	}
	if !s.HasTree(tr.Digest) {
		t.Fatalf("HasTree(%s) = false after commit", tr.Digest)
	}
	root := s.TreePath(tr.Digest)
	if want := filepath.Join(s.Dir(), store.TreesDir, strings.TrimPrefix(tr.Digest, "sha256:")); root != want {
		t.Errorf("TreePath = %s, want %s", root, want)
	}
	seen := map[string]bool{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, st := statT(t, p)
		rel, _ := filepath.Rel(root, p)
		rel = filepath.ToSlash(rel)
		switch {
		case fi.IsDir():
			if fi.Mode() != fs.ModeDir|0o555 {
				t.Errorf("tree directory %q has mode %v, want dr-xr-xr-x", rel, fi.Mode())
			}
		case fi.Mode().IsRegular():
			want, ok := files[rel]
			if !ok {
				t.Errorf("tree holds unexpected file %q", rel)
				return nil
			}
			seen[rel] = true
			if fi.Mode() != 0o444 {
				t.Errorf("tree file %q has mode %v, want -r--r--r--", rel, fi.Mode())
			}
			got, err := os.ReadFile(p)
			if err != nil {
				t.Errorf("reading %q: %v", rel, err)
			} else if string(got) != string(want) {
				t.Errorf("tree file %q holds %d bytes that differ from the %d listed", rel, len(got), len(want))
			}
			bfi, bst := statT(t, blobPath(s, want))
			if bfi.Mode() != 0o444 {
				t.Errorf("blob for %q has mode %v, want -r--r--r--", rel, bfi.Mode())
			}
			if st.Ino != bst.Ino || st.Dev != bst.Dev {
				t.Errorf("tree file %q is not a hardlink of its blob (inode %d, blob %d)", rel, st.Ino, bst.Ino)
			}
		default:
			t.Errorf("tree holds %q of type %v; only files and directories may exist", rel, fi.Mode().Type())
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walking tree: %v", err)
	}
	for p := range files {
		if !seen[p] {
			t.Errorf("tree is missing %q", p)
		}
	}
}

// checkBlobs asserts every blob is named by the sha256 of its content, has
// mode 0444, and that the blob set is exactly want (by content).
func checkBlobs(t *testing.T, dir string, want ...[]byte) {
	t.Helper()
	wantNames := map[string]bool{}
	for _, b := range want {
		wantNames[sha256Hex(b)] = true
	}
	ents, err := os.ReadDir(filepath.Join(dir, store.BlobsDir))
	if err != nil {
		t.Fatalf("reading blobs: %v", err)
	}
	got := map[string]bool{}
	for _, e := range ents {
		p := filepath.Join(dir, store.BlobsDir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			t.Errorf("reading blob %s: %v", e.Name(), err)
			continue
		}
		if sum := sha256Hex(b); sum != e.Name() {
			t.Errorf("blob %s holds content with sha256 %s", e.Name(), sum)
		}
		if fi, _ := statT(t, p); fi.Mode() != 0o444 {
			t.Errorf("blob %s has mode %v, want -r--r--r--", e.Name(), fi.Mode())
		}
		got[e.Name()] = true
	}
	for n := range wantNames {
		if !got[n] {
			t.Errorf("blob %s missing", n)
		}
	}
	for n := range got {
		if !wantNames[n] {
			t.Errorf("unexpected blob %s", n)
		}
	}
}

// entries lists the names in dir/sub.
func entries(t *testing.T, dir, sub string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, sub))
	if err != nil {
		t.Fatalf("reading %s: %v", sub, err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func checkIngestEmpty(t *testing.T, dir string) {
	t.Helper()
	if left := entries(t, dir, store.IngestDir); len(left) != 0 {
		t.Errorf("ingest/ holds %v after the download ended", left)
	}
}

func checkNoTrees(t *testing.T, dir string) {
	t.Helper()
	if left := entries(t, dir, store.TreesDir); len(left) != 0 {
		t.Errorf("trees/ holds %v after a failed download; a partial model must never be visible", left)
	}
}

// result is what one Ensure call returned.
type result struct {
	tree    store.Tree
	fetched bool
	err     error
}

// ensureAsync runs Ensure in a goroutine and delivers its result.
func ensureAsync(ctx context.Context, s *store.Store, key string, m source.Manifest, f store.Fetcher) <-chan result {
	ch := make(chan result, 1)
	go func() {
		t, fetched, err := s.Ensure(ctx, key, m, f)
		ch <- result{t, fetched, err}
	}()
	return ch
}

func waitResult(t *testing.T, ch <-chan result, what string) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(waitLimit):
		t.Fatalf("%s did not return", what)
		return result{}
	}
}

var (
	errBoom  = errors.New("connection reset by fake remote")
	errIndex = errors.New("fake index is broken")
)
