package store_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

const (
	rangeCutoff  = 4096
	rangeChunk   = 1000
	rangeStreams = 3
)

func openRanged(t *testing.T) *store.Store {
	t.Helper()
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeStreams: rangeStreams})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(); storetest.MakeWritable(dir) })
	return s
}

func rangedEnsure(t *testing.T, s *store.Store, res *sourcetest.Resolver, uri string) (store.Tree, error) {
	t.Helper()
	r, err := res.Resolve(context.Background(), uri, nil)
	if err != nil {
		t.Fatal(err)
	}
	tr, _, err := s.Ensure(context.Background(), "key-"+uri, res.Manifest(uri), r)
	return tr, err
}

// Files at and above the cutoff arrive in ranged chunks, byte for byte,
// whatever their size against the chunk: the boundaries and odd tails.
func TestRanged_BytesExactAroundBoundaries(t *testing.T) {
	for _, size := range []int{0, 1, rangeCutoff - 1, rangeCutoff, 4999, 5000, 5001, 7777, 3*rangeChunk*rangeStreams + 1} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			s := openRanged(t)
			res := sourcetest.NewResolver()
			files := map[string][]byte{"w.bin": sourcetest.Bytes(fmt.Sprint("w", size), size), "config.json": []byte("{}")}
			uri := fmt.Sprintf("mys3:models/ranged-%d", size)
			res.SetModel(uri, files)
			tr, err := rangedEnsure(t, s, res, uri)
			if err != nil {
				t.Fatal(err)
			}
			checkTree(t, s, tr, files)
			var ranges, maxReaders int
			res.Set(func(r *sourcetest.Resolver) { ranges, maxReaders = r.RangeOpens, r.MaxReaders })
			wantRanges := 0
			if size >= rangeCutoff {
				wantRanges = (size + rangeChunk - 1) / rangeChunk
			}
			if ranges != wantRanges {
				t.Errorf("%d ranged reads, want %d", ranges, wantRanges)
			}
			// One stream per chunk of w.bin, and config.json beside it.
			if maxReaders > rangeStreams+1 {
				t.Errorf("%d readers open at once, bound %d", maxReaders, rangeStreams+1)
			}
		})
	}
}

// A chunk whose read fails is fetched again; one that keeps failing fails
// the download cleanly: no blob, no tree, nothing left in ingest/.
func TestRanged_FailedChunk(t *testing.T) {
	for _, tt := range []struct {
		name   string
		fails  int
		wantOK bool
	}{
		{"two failures are retried", 2, true},
		{"a chunk that keeps failing fails the download", 1000, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := openRanged(t)
			res := sourcetest.NewResolver()
			files := map[string][]byte{"w.bin": sourcetest.Bytes("w", 9000)}
			res.SetModel("mys3:models/w", files)
			res.Set(func(r *sourcetest.Resolver) { r.FailRanges = tt.fails })
			tr, err := rangedEnsure(t, s, res, "mys3:models/w")
			if tt.wantOK {
				if err != nil {
					t.Fatal(err)
				}
				checkTree(t, s, tr, files)
				return
			}
			if !errors.Is(err, source.ErrUnavailable) {
				t.Fatalf("Ensure = %v, want a retryable ErrUnavailable", err)
			}
			checkNoTrees(t, s.Dir())
			checkIngestEmpty(t, s.Dir())
			checkBlobs(t, s.Dir())
		})
	}
}

// A single-stream download whose connection is cut mid-object goes on from
// where it stopped with a ranged read: the bytes are right, and what
// arrived before the cut is not fetched again.
func TestSingleStream_CutConnectionResumes(t *testing.T) {
	s := openRanged(t)
	res := sourcetest.NewResolver()
	files := map[string][]byte{"w.bin": sourcetest.Bytes("w", 3000)} // below the cutoff: one stream
	res.SetModel("mys3:models/w", files)
	res.Set(func(r *sourcetest.Resolver) { r.CutOpens, r.CutAfter = 1, 1234 })
	tr, err := rangedEnsure(t, s, res, "mys3:models/w")
	if err != nil {
		t.Fatal(err)
	}
	checkTree(t, s, tr, files)
	var ranges int
	res.Set(func(r *sourcetest.Resolver) { ranges = r.RangeOpens })
	if ranges != 1 || res.OpenCount("mys3:models/w", "w.bin") != 2 {
		t.Fatalf("%d ranged reads and %d opens in all, want the one Open and one ranged read from the cut", ranges, res.OpenCount("mys3:models/w", "w.bin"))
	}
}

// noRanges is a remote that answers every range with ErrNoRanges, as the
// oci:// source does for a registry that ignores Range, or that refuses
// ranges of some files (CanRange), as it does for a tar layer's file.
type noRanges struct {
	*sourcetest.Remote
	refuse    bool // CanRange says no
	rangeAsks atomic.Int64
}

func (n *noRanges) CanRange(source.Entry) bool { return !n.refuse }

func (n *noRanges) OpenRange(context.Context, source.Entry, int64, int64) (io.ReadCloser, error) {
	n.rangeAsks.Add(1)
	return nil, fmt.Errorf("%w: %w: the registry does not serve byte ranges", source.ErrUnavailable, source.ErrNoRanges)
}

// A large file the remote cannot serve in ranges arrives in one stream,
// byte for byte, with its progress counted once: when the source says so
// before (CanRange) and when the first ranged read finds out.
func TestRanged_NoRangesFallsBackToOneStream(t *testing.T) {
	for _, refuse := range []bool{true, false} {
		t.Run(fmt.Sprintf("CanRange %v", !refuse), func(t *testing.T) {
			s := openRanged(t)
			files := map[string][]byte{"w.bin": sourcetest.Bytes("w", 3*rangeCutoff), "config.json": []byte("{}")}
			f := &noRanges{Remote: sourcetest.NewFetcher(files), refuse: refuse}
			m := sourcetest.ManifestOf(files, time.Unix(1700000000, 0))
			var progress *store.Progress
			ens, err := s.EnsureGated(context.Background(), "key", m, f, func() error { progress, _ = s.Downloading("key"); return nil })
			if err != nil {
				t.Fatal(err)
			}
			checkTree(t, s, ens.Tree, files)
			if refuse && f.rangeAsks.Load() != 0 {
				t.Errorf("%d ranged reads of a file the source said cannot be read in ranges", f.rangeAsks.Load())
			}
			if !refuse && f.rangeAsks.Load() == 0 {
				t.Error("no ranged read was tried")
			}
			if progress != nil && progress.Done() != m.Size() {
				t.Errorf("progress says %d bytes done of %d", progress.Done(), m.Size())
			}
			checkIngestEmpty(t, s.Dir())
		})
	}
}
