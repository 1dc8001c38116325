package store_test

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// One stream, so the chunks before a failure are all on disk when it
// comes: the checkpoint a failed download leaves is exact.
const resumeCheckpoint = 2000

func openResumable(t *testing.T, dir string) *store.Store {
	t.Helper()
	s, err := store.Open(dir, newIndex(), store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeStreams: 1, RangeCheckpoint: resumeCheckpoint})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// partialRecord is what the partial directory says is durable: the
// checkpoint of its one partial file, or -1 when there is none.
func partialRecord(t *testing.T, dir string) int64 {
	t.Helper()
	names := entries(t, dir, store.PartialDir)
	var at int64 = -1
	for _, n := range names {
		if strings.HasSuffix(n, ".at") {
			b, err := os.ReadFile(filepath.Join(dir, store.PartialDir, n))
			if err != nil {
				t.Fatal(err)
			}
			first, _, _ := strings.Cut(string(b), "\n")
			if at, err = strconv.ParseInt(first, 10, 64); err != nil {
				t.Fatalf("checkpoint %q: %v", b, err)
			}
		}
	}
	return at
}

func rangeBytes(res *sourcetest.Resolver) int64 {
	var n int64
	res.Set(func(r *sourcetest.Resolver) { n, r.RangeBytes = r.RangeBytes, 0 })
	return n
}

// A ranged download that stops part way keeps the chunks it wrote; the
// next download of the object, by the same store or after a restart,
// fetches only the rest and commits the right bytes.
func TestRanged_StoppedPartWay_NextDownloadResumes(t *testing.T) {
	for _, restart := range []bool{false, true} {
		t.Run(map[bool]string{false: "same process", true: "after a restart"}[restart], func(t *testing.T) {
			dir := t.TempDir()
			t.Cleanup(func() { storetest.MakeWritable(dir) })
			s := openResumable(t, dir)
			t.Cleanup(func() { s.Close() })
			res := sourcetest.NewResolver()
			files := map[string][]byte{"w.bin": sourcetest.Bytes("w", 9000), "config.json": []byte("{}")}
			res.SetModel("mys3:models/w", files)
			res.Set(func(r *sourcetest.Resolver) { r.FailRangesFrom = 6000 })

			if _, err := rangedEnsure(t, s, res, "mys3:models/w"); !errors.Is(err, source.ErrUnavailable) {
				t.Fatalf("Ensure = %v, want ErrUnavailable", err)
			}
			checkNoTrees(t, dir)
			if at := partialRecord(t, dir); at != 6000 {
				t.Fatalf("checkpoint after the failure = %d, want 6000 (every chunk before the failing one)", at)
			}
			if restart {
				s.Close()
				s = openResumable(t, dir)
			}
			res.Set(func(r *sourcetest.Resolver) { r.FailRangesFrom = 0 })
			ensureFetching(t, s, res, files, 3000, "resumed download fetched %d bytes, want the 3000 after the checkpoint")
			if left := entries(t, dir, store.PartialDir); len(left) != 0 {
				t.Errorf("partial/ holds %v after the download finished", left)
			}
			checkIngestEmpty(t, dir)
		})
	}
}

// The resumed prefix is hashed from disk, not trusted: a partial file
// damaged between two downloads fails the remote's MD5, nothing is
// committed, the partial file is gone, and the next download is whole.
func TestRanged_DamagedPartialFile_RefusedThenDownloadedWhole(t *testing.T) {
	dir := t.TempDir()
	t.Cleanup(func() { storetest.MakeWritable(dir) })
	s := openResumable(t, dir)
	t.Cleanup(func() { s.Close() })
	res := sourcetest.NewResolver()
	files := map[string][]byte{"w.bin": sourcetest.Bytes("w", 9000)}
	res.SetModel("mys3:models/w", files)
	res.Set(func(r *sourcetest.Resolver) { r.FailRangesFrom = 6000 })
	if _, err := rangedEnsure(t, s, res, "mys3:models/w"); err == nil {
		t.Fatal("Ensure succeeded through failing ranges")
	}
	var data string
	for _, n := range entries(t, dir, store.PartialDir) {
		if !strings.Contains(n, ".") {
			data = filepath.Join(dir, store.PartialDir, n)
		}
	}
	b, err := os.ReadFile(data)
	if err != nil {
		t.Fatal(err)
	}
	b[100] ^= 0xff
	if err := os.WriteFile(data, b, 0o600); err != nil {
		t.Fatal(err)
	}

	res.Set(func(r *sourcetest.Resolver) { r.FailRangesFrom = 0 })
	if _, err := rangedEnsure(t, s, res, "mys3:models/w"); !errors.Is(err, source.ErrCorrupt) {
		t.Fatalf("Ensure over a damaged partial file = %v, want ErrCorrupt", err)
	}
	checkNoTrees(t, dir)
	checkBlobs(t, dir)
	if left := entries(t, dir, store.PartialDir); len(left) != 0 {
		t.Errorf("partial/ holds %v after its bytes failed the check", left)
	}
	ensureFetching(t, s, res, files, 9000, "download after the refusal fetched %d bytes, want all 9000")
}

// A partial file is the object's own: a new version of the object (another
// size and checksum) downloads whole and never reads the old bytes.
func TestRanged_ChangedObject_DoesNotResumeOldPartial(t *testing.T) {
	dir := t.TempDir()
	t.Cleanup(func() { storetest.MakeWritable(dir) })
	s := openResumable(t, dir)
	t.Cleanup(func() { s.Close() })
	res := sourcetest.NewResolver()
	res.SetModel("mys3:models/w", map[string][]byte{"w.bin": sourcetest.Bytes("old", 9000)})
	res.Set(func(r *sourcetest.Resolver) { r.FailRangesFrom = 6000 })
	if _, err := rangedEnsure(t, s, res, "mys3:models/w"); err == nil {
		t.Fatal("Ensure succeeded through failing ranges")
	}
	files := map[string][]byte{"w.bin": sourcetest.Bytes("new", 9000)}
	res.SetModel("mys3:models/w", files)
	res.Set(func(r *sourcetest.Resolver) { r.FailRangesFrom = 0 })
	ensureFetching(t, s, res, files, 9000, "new version fetched %d bytes, want all 9000")
}

// Partial files nobody resumes go after a day, at start-up, and all of
// them on DropPartials(0) (a drain); a checkpoint without its file goes at once.
func TestDropPartials(t *testing.T) {
	dir := t.TempDir()
	t.Cleanup(func() { storetest.MakeWritable(dir) })
	s := openResumable(t, dir)
	pd := filepath.Join(dir, store.PartialDir)
	write := func(name string, age time.Duration) {
		t.Helper()
		p := filepath.Join(pd, name)
		if err := os.WriteFile(p, []byte("12345"), 0o600); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(-age)
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	write("aaaa", 25*time.Hour)
	write("aaaa.at", 25*time.Hour)
	write("bbbb", time.Hour)
	write("bbbb.at", time.Hour)
	write("cccc.at", time.Minute)     // its file is gone
	write("bbbb.at.tmp", time.Minute) // a record a crash left half-written
	s.Close()

	s = openResumable(t, dir)
	t.Cleanup(func() { s.Close() })
	if got := strings.Join(entries(t, dir, store.PartialDir), " "); got != "bbbb bbbb.at" {
		t.Errorf("after start-up partial/ holds %q, want the fresh pair only", got)
	}
	freed, err := s.DropPartials(0)
	if err != nil {
		t.Fatal(err)
	}
	if left := entries(t, dir, store.PartialDir); len(left) != 0 || freed != 10 {
		t.Errorf("DropPartials(0) left %v and freed %d bytes, want nothing left and 10 freed", left, freed)
	}
}

// ensureFetching downloads mys3:models/w, checks its tree holds files and
// that its ranged reads fetched want bytes (msg says what went wrong, %d
// the bytes fetched).
func ensureFetching(t *testing.T, s *store.Store, res *sourcetest.Resolver, files map[string][]byte, want int64, msg string) {
	t.Helper()
	rangeBytes(res)
	tr, err := rangedEnsure(t, s, res, "mys3:models/w")
	if err != nil {
		t.Fatal(err)
	}
	checkTree(t, s, tr, files)
	if n := rangeBytes(res); n != want {
		t.Errorf(msg, n)
	}
}

// Chunks an earlier download wrote past its hashed prefix (they arrived
// while an earlier one was in flight) are recorded and read back from
// disk, hashed with the rest, not fetched again; a damaged one fails the
// remote's MD5 like any other byte, and nothing is committed.
func TestRanged_ChunksPastThePrefix_ReadBackNotFetched(t *testing.T) {
	for _, damaged := range []bool{false, true} {
		t.Run(map[bool]string{false: "intact", true: "damaged"}[damaged], func(t *testing.T) {
			dir := t.TempDir()
			t.Cleanup(func() { storetest.MakeWritable(dir) })
			res := sourcetest.NewResolver()
			files := map[string][]byte{"w.bin": sourcetest.Bytes("w", 9000)}
			res.SetModel("mys3:models/w", files)
			// What a killed download leaves: chunks 0-1 hashed, 5 and 7 written.
			e := res.Manifest("mys3:models/w")[0]
			h := sha256.Sum256([]byte(source.ObjectKey(sourcetest.IdentityOf("mys3:models/w"), e)))
			name := filepath.Join(dir, store.PartialDir, hex.EncodeToString(h[:16]))
			data := make([]byte, 9000)
			for _, c := range [][2]int{{0, 2000}, {5000, 6000}, {7000, 8000}} {
				copy(data[c[0]:c[1]], files["w.bin"][c[0]:c[1]])
			}
			if damaged {
				data[7500] ^= 0xff
			}
			if err := os.MkdirAll(filepath.Dir(name), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(name, data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(name+".at", []byte("2000\n1000 5 7\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := store.Open(dir, newIndex(), store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeStreams: rangeStreams, RangeCheckpoint: resumeCheckpoint})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			if damaged {
				if _, err := rangedEnsure(t, s, res, "mys3:models/w"); !errors.Is(err, source.ErrCorrupt) {
					t.Fatalf("Ensure over a damaged chunk = %v, want ErrCorrupt", err)
				}
				checkNoTrees(t, dir)
				if left := entries(t, dir, store.PartialDir); len(left) != 0 {
					t.Errorf("partial/ holds %v after its bytes failed the check", left)
				}
				return
			}
			ensureFetching(t, s, res, files, 5000, "resumed download fetched %d bytes, want the 5000 of chunks 2-4, 6 and 8")
		})
	}
}
