package store_test

// Unit tests of the store's running counts and of removals that look only
// at the removed tree's blobs, on the real filesystem. They need no root.

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// diskCounts is what a walk of the cache directory finds, as Usage found
// it before the store kept counts: the truth the counts must match.
func diskCounts(t *testing.T, dir string) store.Counts {
	t.Helper()
	var c store.Counts
	blobs, err := os.ReadDir(filepath.Join(dir, store.BlobsDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range blobs {
		fi, err := b.Info()
		if err != nil {
			t.Fatal(err)
		}
		c.Blobs++
		c.BlobBytes += fi.Size()
	}
	trees, err := os.ReadDir(filepath.Join(dir, store.TreesDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, tr := range trees {
		if !tr.IsDir() || !store.ValidDigest("sha256:"+tr.Name()) {
			continue
		}
		c.Trees++
		err := filepath.WalkDir(filepath.Join(dir, store.TreesDir, tr.Name()), func(_ string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			fi, err := d.Info()
			c.TreeBytes += fi.Size()
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if q, err := os.ReadDir(filepath.Join(dir, store.QuarantineDir)); err == nil {
		c.Quarantined = len(q)
	}
	return c
}

// usageCounts is the part of Usage the running counts serve.
func usageCounts(t *testing.T, s *store.Store) store.Counts {
	t.Helper()
	u, err := s.Usage()
	if err != nil {
		t.Fatalf("Usage: %v", err)
	}
	return store.Counts{BlobBytes: u.BlobBytes, Blobs: u.Blobs, TreeBytes: u.TreeBytes, Trees: u.Trees, Quarantined: u.Quarantined}
}

// The counts follow every change, and a store opened again counts the
// same from the disk.
func TestCountsFollowChanges(t *testing.T) {
	shared, a, b := bytesOf("shared", 3000), bytesOf("a", 1000), bytesOf("b", 500)
	one := map[string][]byte{"shared.bin": shared, "a.bin": a}
	two := map[string][]byte{"tok/shared.bin": shared, "b.bin": b, "copy/b.bin": b}
	dir := t.TempDir()
	s := openWith(t, dir, newIndex(), store.Options{})
	trees := map[string]store.Tree{}
	steps := []struct {
		name string
		do   func(t *testing.T)
		want store.Counts
	}{
		{"empty", func(*testing.T) {}, store.Counts{}},
		{"commit", func(t *testing.T) {
			tr, _, err := s.Ensure(context.Background(), "one", manifestOf(one), newFetcher(one))
			trees["one"] = tr
			if err != nil {
				t.Fatal(err)
			}
		}, store.Counts{BlobBytes: 4000, Blobs: 2, TreeBytes: 4000, Trees: 1}},
		{"commit sharing a blob, one blob at two paths", func(t *testing.T) {
			tr, _, err := s.Ensure(context.Background(), "two", manifestOf(two), newFetcher(two))
			trees["two"] = tr
			if err != nil {
				t.Fatal(err)
			}
		}, store.Counts{BlobBytes: 4500, Blobs: 3, TreeBytes: 8000, Trees: 2}},
		{"the same model again", func(t *testing.T) {
			if _, _, err := s.Ensure(context.Background(), "two-again", manifestOf(two), newFetcher(two)); err != nil {
				t.Fatal(err)
			}
		}, store.Counts{BlobBytes: 4500, Blobs: 3, TreeBytes: 8000, Trees: 2}},
		{"remove the first", func(t *testing.T) {
			if freed, err := s.RemoveTree(trees["one"].Digest); err != nil || freed != 1000 {
				t.Fatalf("RemoveTree = %d, %v; want 1000", freed, err)
			}
		}, store.Counts{BlobBytes: 3500, Blobs: 2, TreeBytes: 4000, Trees: 1}},
		{"remove it again", func(t *testing.T) {
			if freed, err := s.RemoveTree(trees["one"].Digest); err != nil || freed != 0 {
				t.Fatalf("RemoveTree = %d, %v; want 0", freed, err)
			}
		}, store.Counts{BlobBytes: 3500, Blobs: 2, TreeBytes: 4000, Trees: 1}},
		{"open again", func(t *testing.T) {
			s.Close()
			s = openWith(t, dir, newIndex(), store.Options{})
		}, store.Counts{BlobBytes: 3500, Blobs: 2, TreeBytes: 4000, Trees: 1}},
		{"remove the last", func(t *testing.T) {
			if freed, err := s.RemoveTree(trees["two"].Digest); err != nil || freed != 3500 {
				t.Fatalf("RemoveTree = %d, %v; want 3500", freed, err)
			}
		}, store.Counts{}},
	}
	for _, st := range steps {
		st.do(t)
		if got := usageCounts(t, s); got != st.want {
			t.Errorf("%s: Usage counts %+v, want %+v", st.name, got, st.want)
		}
		if disk := diskCounts(t, dir); disk != st.want {
			t.Errorf("%s: the disk holds %+v, want %+v", st.name, disk, st.want)
		}
	}
}

// A verify that finds the counts drifted from the disk says so and
// corrects them; one that finds them right reports nothing.
func TestVerifyCorrectsDriftedCounts(t *testing.T) {
	files := map[string][]byte{"a.bin": bytesOf("a", 1000), "b.bin": bytesOf("b", 200)}
	tests := []struct {
		name   string
		tamper func(t *testing.T, dir string)
	}{
		{"none", func(*testing.T, string) {}},
		{"a blob put there behind the store's back", func(t *testing.T, dir string) {
			stray := bytesOf("stray", 300)
			if err := os.WriteFile(filepath.Join(dir, store.BlobsDir, sha256Hex(stray)), stray, 0o444); err != nil {
				t.Fatal(err)
			}
		}},
		{"a tree removed behind the store's back", func(t *testing.T, dir string) {
			ents := entries(t, dir, store.TreesDir)
			storetest.MakeWritable(dir)
			if err := os.RemoveAll(filepath.Join(dir, store.TreesDir, ents[0])); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openWith(t, dir, newIndex(), store.Options{})
			if _, _, err := s.Ensure(context.Background(), "k", manifestOf(files), newFetcher(files)); err != nil {
				t.Fatal(err)
			}
			was := usageCounts(t, s)
			tt.tamper(t, dir)
			disk := diskCounts(t, dir)
			res, err := s.Verify()
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			switch {
			case disk == was && res.Recounted != nil:
				t.Errorf("Verify of counts that agree reported %+v", *res.Recounted)
			case disk != was && res.Recounted == nil:
				t.Errorf("Verify did not report counts %+v drifted from the disk's %+v", was, disk)
			case disk != was && (res.Recounted.Was != was || res.Recounted.Now != disk):
				t.Errorf("Verify reported %+v, want was %+v, now %+v", *res.Recounted, was, disk)
			}
			if got := usageCounts(t, s); got != disk {
				t.Errorf("after Verify, Usage counts %+v, want the disk's %+v", got, disk)
			}
		})
	}
}

// A removal looks at the removed tree's blobs and those the store knows
// may be linked by nothing, not at all of blobs/: a blob put there behind
// its back (so known to nobody) survives a removal until the store is
// opened again after a crash, whose count from the disk finds it linked by
// nothing. Were a removal to sweep all of blobs/ again, the first removal
// would take it.
func TestRemovalLooksOnlyAtItsOwnBlobs(t *testing.T) {
	a, b := bytesOf("a", 1000), bytesOf("b", 500)
	dir := t.TempDir()
	trees := seedStore(t, dir, newIndex(), map[string]map[string][]byte{
		"one": {"a.bin": a},
		"two": {"b.bin": b},
	})
	s := openWith(t, dir, newIndex(), store.Options{})
	stray := bytesOf("stray", 300)
	strayPath := filepath.Join(dir, store.BlobsDir, sha256Hex(stray))
	if err := os.WriteFile(strayPath, stray, 0o444); err != nil {
		t.Fatal(err)
	}
	if freed, err := s.RemoveTree(trees["one"].Digest); err != nil || freed != 1000 {
		t.Fatalf("RemoveTree(one) = %d, %v; want 1000", freed, err)
	}
	if _, err := os.Stat(strayPath); err != nil {
		t.Fatalf("a removal of another tree swept a blob it had no reason to look at: %v", err)
	}
	s.Close()
	crashed(t, dir)
	s = openWith(t, dir, newIndex(), store.Options{})
	if freed, err := s.RemoveTree(trees["two"].Digest); err != nil || freed != 800 {
		t.Fatalf("RemoveTree(two) after opening again = %d, %v; want 800 (its blob and the one linked by nothing)", freed, err)
	}
	checkBlobs(t, dir)
}

// The blobs a failed download committed stay for a retry to link, and go
// with the next removal, as they did when every removal swept blobs/.
func TestFailedDownloadBlobsGoWithTheNextRemoval(t *testing.T) {
	kept, first, last := bytesOf("kept", 700), bytesOf("first", 1000), bytesOf("last", 500)
	dir := t.TempDir()
	trees := seedStore(t, dir, newIndex(), map[string]map[string][]byte{"kept": {"k.bin": kept}, "other": {"o.bin": bytesOf("o", 10)}})
	s := openWith(t, dir, newIndex(), store.Options{Transfers: 1})
	files := map[string][]byte{"a.bin": first, "z.bin": last}
	f := newFetcher(files)
	f.failAt("z.bin", 100, errors.New("connection reset"))
	if _, _, err := s.Ensure(context.Background(), "k", manifestOf(files), f); err == nil {
		t.Fatal("Ensure succeeded; want the download to fail")
	}
	if _, err := os.Stat(blobPath(s, first)); err != nil {
		t.Fatalf("the failed download's committed blob is gone before any removal: %v", err)
	}
	if freed, err := s.RemoveTree(trees["other"].Digest); err != nil || freed != 1010 {
		t.Fatalf("RemoveTree = %d, %v; want 1010 (its blob and the failed download's)", freed, err)
	}
	checkBlobs(t, dir, kept)
	if got, want := usageCounts(t, s), diskCounts(t, dir); got != want {
		t.Errorf("Usage counts %+v, the disk holds %+v", got, want)
	}
}

// Trees committed before the store kept lists of their blobs get one when
// the store is opened, and are counted and removed as trees committed
// since are; a list whose tree is gone is dropped.
func TestOpenListsTreesCommittedWithoutLists(t *testing.T) {
	shared, a, b := bytesOf("shared", 3000), bytesOf("a", 1000), bytesOf("b", 500)
	dir := t.TempDir()
	trees := seedStore(t, dir, newIndex(), map[string]map[string][]byte{
		"one": {"shared.bin": shared, "a.bin": a},
		"two": {"tok/shared.bin": shared, "b.bin": b},
	})
	if err := os.RemoveAll(filepath.Join(dir, store.TreeBlobsDir)); err != nil {
		t.Fatal(err)
	}
	s := openWith(t, dir, newIndex(), store.Options{})
	if got, want := usageCounts(t, s), diskCounts(t, dir); got != want {
		t.Errorf("Usage counts %+v, the disk holds %+v", got, want)
	}
	lists := entries(t, dir, store.TreeBlobsDir)
	if len(lists) != 2 {
		t.Fatalf("lists after Open: %v, want one per tree", lists)
	}
	raw, err := os.ReadFile(filepath.Join(dir, store.TreeBlobsDir, strings.TrimPrefix(trees["one"].Digest, "sha256:")))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(raw), "2 4000\n"+sortedLines(sha256Hex(shared), sha256Hex(a)); got != want {
		t.Errorf("list of tree one = %q, want %q", got, want)
	}
	if freed, err := s.RemoveTree(trees["one"].Digest); err != nil || freed != 1000 {
		t.Fatalf("RemoveTree(one) = %d, %v; want 1000", freed, err)
	}
	checkBlobs(t, dir, shared, b)

	// A list left by a crash after its tree's removal is dropped at Open.
	stray := filepath.Join(dir, store.TreeBlobsDir, strings.TrimPrefix(trees["one"].Digest, "sha256:"))
	if err := os.WriteFile(stray, []byte("1 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s.Close()
	openWith(t, dir, newIndex(), store.Options{})
	if _, err := os.Stat(stray); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the list of a gone tree is still there after Open (%v)", err)
	}
}

// crashed makes dir look as a store that stopped without Close leaves it.
func crashed(t *testing.T, dir string) {
	t.Helper()
	if err := os.Remove(filepath.Join(dir, "counts.json")); err != nil {
		t.Fatalf("a closed store left no counts: %v", err)
	}
}

// A clean Close saves the counts and the loose blobs for the next Open,
// which removes the file (a crash after it counts from the disk); saved
// counts that disagree with the trees on disk are not used.
func TestOpenAfterCloseOrCrash(t *testing.T) {
	a, b := bytesOf("a", 1000), bytesOf("b", 500)
	files := map[string][]byte{"a.bin": a, "z.bin": b}
	tests := []struct {
		name   string
		before func(t *testing.T, dir string)
	}{
		{"clean close", func(*testing.T, string) {}},
		{"crash", crashed},
		{"saved counts disagree with the disk", func(t *testing.T, dir string) {
			ents := entries(t, dir, store.TreesDir)
			storetest.MakeWritable(dir)
			if err := os.RemoveAll(filepath.Join(dir, store.TreesDir, ents[0])); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			trees := seedStore(t, dir, newIndex(), map[string]map[string][]byte{
				"one": {"o.bin": bytesOf("one", 100)},
				"two": {"t.bin": bytesOf("two", 10)},
			})
			s := openWith(t, dir, newIndex(), store.Options{Transfers: 1})
			f := newFetcher(files)
			f.failAt("z.bin", 100, errors.New("connection reset"))
			if _, _, err := s.Ensure(context.Background(), "k", manifestOf(files), f); err == nil {
				t.Fatal("Ensure succeeded; want the download to fail")
			}
			s.Close()
			tt.before(t, dir)
			s = openWith(t, dir, newIndex(), store.Options{})
			if _, err := os.Stat(filepath.Join(dir, "counts.json")); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the saved counts are still there after Open (%v)", err)
			}
			if got, want := usageCounts(t, s), diskCounts(t, dir); got != want {
				t.Errorf("Usage counts %+v, the disk holds %+v", got, want)
			}
			// The failed download's blob is loose across the restart.
			if _, err := s.RemoveTree(trees["two"].Digest); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(blobPath(s, a)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("the failed download's blob outlived the first removal after the restart (%v)", err)
			}
			if got, want := usageCounts(t, s), diskCounts(t, dir); got != want {
				t.Errorf("after a removal, Usage counts %+v, the disk holds %+v", got, want)
			}
		})
	}
}

func sortedLines(hexes ...string) string {
	if hexes[0] > hexes[1] {
		hexes[0], hexes[1] = hexes[1], hexes[0]
	}
	return strings.Join(hexes, "\n") + "\n"
}

// HasBlob answers from blobs/ alone, for names that are blob names; after
// Close it answers false.
func TestHasBlob(t *testing.T) {
	a := bytesOf("a", 100)
	dir := t.TempDir()
	seedStore(t, dir, newIndex(), map[string]map[string][]byte{"one": {"a.bin": a}})
	if err := os.Mkdir(filepath.Join(dir, store.BlobsDir, strings.Repeat("d", 64)), 0o700); err != nil {
		t.Fatal(err)
	}
	s := openWith(t, dir, newIndex(), store.Options{})
	tests := []struct {
		name string
		sum  string
		want bool
	}{
		{"committed blob", sha256Hex(a), true},
		{"unknown blob", sha256Hex([]byte("nothing")), false},
		{"a directory", strings.Repeat("d", 64), false},
		{"upper case", strings.ToUpper(sha256Hex(a)), false},
		{"a path", "../sha256/" + sha256Hex(a), false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		if got := s.HasBlob(tt.sum); got != tt.want {
			t.Errorf("%s: HasBlob(%q) = %v, want %v", tt.name, tt.sum, got, tt.want)
		}
	}
	s.Close()
	if s.HasBlob(sha256Hex(a)) {
		t.Error("HasBlob after Close = true")
	}
}
