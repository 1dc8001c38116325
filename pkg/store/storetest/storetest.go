// Package storetest is the conformance suite of store.Content: what the
// cache relies on from any content store, run against the real one by
// pkg/store's tests (as containerd runs content/testsuite against its
// stores). TreeDigestOf gives the tests of every layer above the store the
// digest it must give a model's files; MakeWritable and EventLog are the
// small helpers their tests share.
package storetest

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
)

// Open returns an empty store for one test; the test's cleanup closes it.
type Open func(t *testing.T) store.Content

const uri = "mys3:models/conformance"

// Run runs every conformance test against stores open makes.
func Run(t *testing.T, open Open) {
	for _, tc := range []struct {
		name string
		test func(*testing.T, store.Content)
	}{
		{"CommitIsVisibleReadOnlyAndByContent", commitVisible},
		{"ConcurrentEnsuresDownloadOnce", concurrentOnce},
		{"SameContentOneTree", sameContentOneTree},
		{"RemoveKeepsSharedBlobs", removeKeepsShared},
		{"FailedDownloadLeavesNothing", failedLeavesNothing},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.test(t, open(t)) })
	}
}

func model() map[string][]byte {
	return map[string][]byte{
		"config.json":       []byte(`{"model":"conformance"}`),
		"weights/model.bin": sourcetest.Bytes("weights", 300<<10),
		"tokenizer.json":    sourcetest.Bytes("tokenizer", 10<<10),
	}
}

func ensure(t *testing.T, s store.Content, res *sourcetest.Resolver, key, u string) (store.Tree, bool) {
	t.Helper()
	r, err := res.Resolve(context.Background(), u, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr, fetched, err := s.Ensure(context.Background(), key, res.Manifest(u), r)
	if err != nil {
		t.Fatalf("Ensure(%s): %v", key, err)
	}
	return tr, fetched
}

// A committed tree is found by its key, named by its content, holds the
// files byte for byte, and is read-only: files 0444, directories 0555.
func commitVisible(t *testing.T, s store.Content) {
	res := sourcetest.NewResolver()
	files := model()
	res.SetModel(uri, files)
	if _, ok := s.Cached("key-1"); ok {
		t.Fatal("an empty store has a tree")
	}
	tr, fetched := ensure(t, s, res, "key-1", uri)
	if !fetched || tr.Digest != TreeDigestOf(files) || tr.Size != sourcetest.SizeOf(files) || tr.Files != len(files) {
		t.Fatalf("Ensure = %+v (fetched %v), want the tree of the model's content", tr, fetched)
	}
	if got, ok := s.Cached("key-1"); !ok || got != tr || !s.HasTree(tr.Digest) {
		t.Fatalf("Cached = %+v, %v after commit", got, ok)
	}
	listed, err := s.TreeFiles(tr.Digest)
	if err != nil || len(listed) != len(files) {
		t.Fatalf("TreeFiles = %d files, %v", len(listed), err)
	}
	for _, f := range listed {
		if f.Sha256 != sourcetest.Sha256Hex(files[f.Path]) || f.Size != int64(len(files[f.Path])) {
			t.Errorf("TreeFiles says %s is %d bytes with sha256 %s", f.Path, f.Size, f.Sha256)
		}
	}
	err = filepath.WalkDir(s.TreePath(tr.Digest), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		want := fs.FileMode(0o444)
		if d.IsDir() {
			want = 0o555
		} else {
			rel, _ := filepath.Rel(s.TreePath(tr.Digest), p)
			if b, err := os.ReadFile(p); err != nil || string(b) != string(files[filepath.ToSlash(rel)]) {
				t.Errorf("%s does not hold the model's bytes (%v)", rel, err)
			}
		}
		if fi.Mode().Perm() != want || !(fi.Mode().IsRegular() || fi.IsDir()) {
			t.Errorf("%s has mode %v, want %v", p, fi.Mode(), want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, fetched := ensure(t, s, res, "key-1", uri); fetched || res.OpenTotal() != len(files) {
		t.Fatalf("a second Ensure fetched (%v, %d opens)", fetched, res.OpenTotal())
	}
}

// However many callers ask for one key at once, each object is opened once.
func concurrentOnce(t *testing.T, s store.Content) {
	res := sourcetest.NewResolver()
	files := model()
	res.SetModel(uri, files)
	res.WithGate(1024)
	var wg sync.WaitGroup
	digests := make([]string, 16)
	r, err := res.Resolve(context.Background(), uri, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range digests {
		wg.Go(func() {
			tr, _, err := s.Ensure(context.Background(), "key-1", res.Manifest(uri), r)
			if err != nil {
				t.Errorf("Ensure: %v", err)
			}
			digests[i] = tr.Digest
		})
	}
	sourcetest.Recv(t, res.Blocked(), time.Minute, "a download to start")
	res.Release()
	wg.Wait()
	for p := range files {
		if n := res.OpenCount(uri, p); n != 1 {
			t.Errorf("%s opened %d times by 16 concurrent Ensures, want 1", p, n)
		}
	}
	for _, d := range digests {
		if d != TreeDigestOf(files) {
			t.Fatalf("a caller got tree %s", d)
		}
	}
}

// Two keys (two URIs, two credentials) with the same files share one tree.
func sameContentOneTree(t *testing.T, s store.Content) {
	res := sourcetest.NewResolver()
	res.SetModel(uri, model())
	res.SetModel(uri+"-copy", model())
	a, _ := ensure(t, s, res, "key-a", uri)
	b, _ := ensure(t, s, res, "key-b", uri+"-copy")
	if a.Digest != b.Digest || s.TreePath(a.Digest) != s.TreePath(b.Digest) {
		t.Fatalf("the same files made trees %s and %s", a.Digest, b.Digest)
	}
}

// Removing a tree frees the blobs only it links and keeps those another
// tree still links.
func removeKeepsShared(t *testing.T, s store.Content) {
	res := sourcetest.NewResolver()
	base := model()
	variant := model()
	variant["weights/model.bin"] = sourcetest.Bytes("other weights", 200<<10)
	res.SetModel(uri, base)
	res.SetModel(uri+"-variant", variant)
	a, _ := ensure(t, s, res, "key-a", uri)
	b, _ := ensure(t, s, res, "key-b", uri+"-variant")
	freed, err := s.RemoveTree(a.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(len(base["weights/model.bin"])); freed != want {
		t.Errorf("RemoveTree freed %d bytes, want %d (only the blob no other tree links)", freed, want)
	}
	if s.HasTree(a.Digest) || !s.HasTree(b.Digest) {
		t.Fatal("RemoveTree removed the wrong tree")
	}
	for p, want := range variant {
		if got, err := os.ReadFile(filepath.Join(s.TreePath(b.Digest), p)); err != nil || string(got) != string(want) {
			t.Errorf("%s of the remaining tree is damaged: %v", p, err)
		}
	}
}

// A download that fails commits no tree and records no key.
func failedLeavesNothing(t *testing.T, s store.Content) {
	res := sourcetest.NewResolver()
	res.SetModel(uri, model())
	res.Set(func(r *sourcetest.Resolver) { r.OpenErr = os.ErrPermission })
	r, err := res.Resolve(context.Background(), uri, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Ensure(context.Background(), "key-1", res.Manifest(uri), r); err == nil {
		t.Fatal("Ensure succeeded although every Open failed")
	}
	if _, ok := s.Cached("key-1"); ok || s.HasTree(TreeDigestOf(model())) {
		t.Fatal("a failed download left a tree")
	}
}

// TreeDigestOf is the digest the store must give a model's files.
func TreeDigestOf(files map[string][]byte) string {
	m := sourcetest.ManifestOf(files, time.Time{})
	sums := make([]string, len(m))
	for i, e := range m {
		sums[i] = sourcetest.Sha256Hex(files[e.Path])
	}
	return store.TreeDigest(m, sums)
}

// MakeWritable restores the write bits of the sealed directories under
// dir, so that a test run as a user other than root can remove them.
func MakeWritable(dir string) {
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o700)
		}
		return nil
	})
}

// EventLog records what happened, in order, across goroutines: the order
// of hooks (an open, an eviction, a forgotten record) tests assert.
type EventLog struct {
	mu     sync.Mutex
	events []string
}

// Add records one event.
func (l *EventLog) Add(s string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, s)
}

// List returns the events so far, in order.
func (l *EventLog) List() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.events)
}
