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

// fakeFetcher serves objects from memory, counts Opens per path and can hold
// or break a download at a chosen byte offset.
type fakeFetcher struct {
	files map[string][]byte
	opens map[string]*atomic.Int64 // fixed at construction; values are atomic

	// gate, when non-nil, stops every reader once it has delivered gateAfter
	// bytes until gate is closed or the download's context ends. Each reader
	// that reaches the gate sends its path on blocked first.
	gate      chan struct{}
	gateAfter int
	blocked   chan string
	passed    chan string // each reader sends its path once it is through the gate

	// failPath's reader returns failErr once it has delivered failAt bytes.
	failPath string
	failAt   int
	failErr  error

	// openErr, when set, is returned by Open for every path.
	openErr error

	readers   atomic.Int64 // readers handed out
	closed    atomic.Int64 // readers closed
	cancelled atomic.Int64 // readers that stopped because their context ended
}

func newFetcher(files map[string][]byte) *fakeFetcher {
	f := &fakeFetcher{files: files, opens: map[string]*atomic.Int64{}}
	for p := range files {
		f.opens[p] = new(atomic.Int64)
	}
	return f
}

// withGate makes every reader stop after n bytes until release is called.
func (f *fakeFetcher) withGate(n int) *fakeFetcher {
	f.gate = make(chan struct{})
	f.gateAfter = n
	f.blocked = make(chan string, 1024)
	f.passed = make(chan string, 1024)
	return f
}

func (f *fakeFetcher) release() { close(f.gate) }

func (f *fakeFetcher) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	c, ok := f.opens[e.Path]
	if !ok {
		return nil, fmt.Errorf("fake remote has no object %q: %w", e.Path, fs.ErrNotExist)
	}
	c.Add(1)
	if f.openErr != nil {
		return nil, f.openErr
	}
	f.readers.Add(1)
	return &fakeReader{ctx: ctx, f: f, path: e.Path, data: f.files[e.Path]}, nil
}

// openCount is how many times path was opened.
func (f *fakeFetcher) openCount(path string) int64 {
	if c, ok := f.opens[path]; ok {
		return c.Load()
	}
	return 0
}

// totalOpens is the number of Open calls over every path.
func (f *fakeFetcher) totalOpens() int64 {
	var n int64
	for _, c := range f.opens {
		n += c.Load()
	}
	return n
}

// waitBlocked waits until n readers have reached the gate.
func (f *fakeFetcher) waitBlocked(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(waitLimit)
	for i := 0; i < n; i++ {
		select {
		case <-f.blocked:
		case <-timeout:
			t.Fatalf("only %d of %d readers reached the gate", i, n)
		}
	}
}

// waitPassed waits until n readers are through the gate; from then on
// nothing a test does to contexts can stop them.
func (f *fakeFetcher) waitPassed(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(waitLimit)
	for i := 0; i < n; i++ {
		select {
		case <-f.passed:
		case <-timeout:
			t.Fatalf("only %d of %d readers passed the gate", i, n)
		}
	}
}

func timeAfter() <-chan time.Time { return time.After(waitLimit) }

type fakeReader struct {
	ctx    context.Context
	f      *fakeFetcher
	path   string
	data   []byte
	off    int
	passed bool // past the gate
}

func (r *fakeReader) Read(p []byte) (int, error) {
	f := r.f
	failing := f.failErr != nil && f.failPath == r.path
	if failing && r.off >= f.failAt {
		return 0, f.failErr
	}
	if f.gate != nil && !r.passed && r.off >= f.gateAfter {
		f.blocked <- r.path
		select {
		case <-f.gate:
			r.passed = true
			f.passed <- r.path
		case <-r.ctx.Done():
			f.cancelled.Add(1)
			return 0, r.ctx.Err()
		}
	}
	if r.off >= len(r.data) {
		return 0, io.EOF
	}
	end := len(r.data)
	if f.gate != nil && !r.passed && f.gateAfter < end {
		end = f.gateAfter
	}
	if failing && f.failAt < end {
		end = f.failAt
	}
	n := copy(p, r.data[r.off:end])
	r.off += n
	return n, nil
}

func (r *fakeReader) Close() error {
	r.f.closed.Add(1)
	return nil
}

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
