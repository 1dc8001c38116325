package store_test

import (
	"context"
	"crypto/md5"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
	rangeSpan    = 2 * rangeChunk
	rangeStreams = 3
)

func openRanged(t *testing.T) *store.Store {
	t.Helper()
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeSpan: rangeSpan, RangeStreams: rangeStreams})
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
				wantRanges = (size + rangeSpan - 1) / rangeSpan
			}
			if ranges != wantRanges {
				t.Errorf("%d ranged reads, want %d", ranges, wantRanges)
			}
			// One stream per span of w.bin, and config.json beside it.
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

// partsRemote is a remote whose w.bin was uploaded in parts: listed with
// a multipart ETag and no MD5, and checked against that ETag, which it
// gives on request (source.Checksummer), as S3 does.
type partsRemote struct {
	*sourcetest.Remote
	want source.Checksum
}

func (p *partsRemote) Checksum(context.Context, source.Entry) (source.Checksum, error) {
	return p.want, nil
}

// multipartETag is S3's ETag of data uploaded in parts of the given sizes.
func multipartETag(data []byte, parts []int64) string {
	var of []byte
	for _, n := range parts {
		s := md5.Sum(data[:n])
		of = append(of, s[:]...)
		data = data[n:]
	}
	s := md5.Sum(of)
	return fmt.Sprintf("%x-%d", s, len(parts))
}

// A file uploaded in parts of a whole number of chunks downloads a part
// per ranged read, each part's MD5 hashed from the file once its stream
// has read it, in batches: the bytes and the ETag check as before, a byte
// flipped in transit refused, and a download stopped in the middle of a
// part resumed with that part's hash carried on from the bytes on disk.
func TestRanged_PartsReadAndHashed(t *testing.T) {
	data := sourcetest.Bytes("w", 9500)
	parts := []int64{3000, 3000, 3000, 500}
	want := source.Checksum{Algorithm: "md5", Value: multipartETag(data, parts), Parts: parts, Name: "multipart ETag"}
	for _, tt := range []struct {
		name      string
		served    []byte // what the remote sends, when not data
		failFrom  int64  // the first attempt stops at this offset
		cutAfter  int    // every response fails after this many bytes
		wantErr   error
		wantReads int // ranged reads of the download that succeeds
	}{
		{name: "intact", wantReads: 4},
		{name: "a byte flipped in the third part", served: flipAt(data, 6500), wantErr: source.ErrCorrupt},
		{name: "stopped in the middle of the second part", failFrom: 4000, wantReads: 3},
		// Every response breaks after 700 bytes: each read goes on where
		// the last stopped, so no byte is fetched twice, and the parts'
		// hashes see each byte once.
		{name: "every response cut mid-chunk", cutAfter: 700, wantReads: 16},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := store.Open(dir, newIndex(), store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeSpan: rangeSpan,
				RangeStreams: rangeStreams, RangeCheckpoint: rangeChunk})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.Close(); storetest.MakeWritable(dir) })
			served := data
			if tt.served != nil {
				served = tt.served
			}
			f := &partsRemote{Remote: sourcetest.NewFetcher(map[string][]byte{"w.bin": served}), want: want}
			m := sourcetest.ManifestOf(map[string][]byte{"w.bin": data}, time.Unix(1700000000, 0))
			m[0].Hash = want.Value
			res := f.Resolver()
			if tt.cutAfter > 0 {
				res.Set(func(r *sourcetest.Resolver) {
					r.FailPath, r.FailAt, r.FailErr = "w.bin", tt.cutAfter, fmt.Errorf("connection reset: %w", source.ErrUnavailable)
				})
			}
			if tt.failFrom > 0 {
				res.Set(func(r *sourcetest.Resolver) { r.FailRangesFrom = tt.failFrom })
				if _, err := s.EnsureGated(context.Background(), "key", m, f, nil); !errors.Is(err, source.ErrUnavailable) {
					t.Fatalf("first download = %v, want ErrUnavailable", err)
				}
				res.Set(func(r *sourcetest.Resolver) { r.FailRangesFrom, r.RangeOpens, r.RangeBytes = 0, 0, 0 })
			}
			ens, err := s.EnsureGated(context.Background(), "key", m, f, nil)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Ensure = %v, want %v", err, tt.wantErr)
				}
				checkNoTrees(t, dir)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			checkTree(t, s, ens.Tree, map[string][]byte{"w.bin": data})
			if ens.Checks.Remote != 1 {
				t.Errorf("checks %+v, want w.bin checked against its multipart ETag", ens.Checks)
			}
			var reads int
			var fetched int64
			res.Set(func(r *sourcetest.Resolver) { reads, fetched = r.RangeOpens, r.RangeBytes })
			if reads != tt.wantReads {
				t.Errorf("%d ranged reads, want %d (one per part from the first not on disk)", reads, tt.wantReads)
			}
			if wantBytes := int64(len(data)) - tt.failFrom; fetched != wantBytes {
				t.Errorf("fetched %d bytes, want %d", fetched, wantBytes)
			}
		})
	}
}

func flipAt(b []byte, at int) []byte {
	c := append([]byte{}, b...)
	c[at] ^= 1
	return c
}

// lateFirstSpan holds back the first span's response until the other
// spans have delivered more chunks than the download has buffers, as a
// slow first stream would.
type lateFirstSpan struct {
	*sourcetest.Remote
	others atomic.Int64
	want   int64
	ready  chan struct{}
	once   sync.Once
}

func (l *lateFirstSpan) OpenRange(ctx context.Context, e source.Entry, off, n int64) (io.ReadCloser, error) {
	if off == 0 {
		select {
		case <-l.ready:
		case <-time.After(10 * time.Second): // the others never got that far
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	rc, err := l.Remote.OpenRange(ctx, e, off, n)
	if err != nil || off == 0 {
		return rc, err
	}
	return &countedBody{ReadCloser: rc, l: l}, nil
}

type countedBody struct {
	io.ReadCloser
	l *lateFirstSpan
}

func (c *countedBody) Read(p []byte) (int, error) {
	k, err := c.ReadCloser.Read(p)
	if c.l.others.Add(int64(k)) >= c.l.want {
		c.l.once.Do(func() { close(c.l.ready) })
	}
	return k, err
}

// Spans longer than the chunk buffers a download may hold: the other
// streams read far ahead of the hasher while the first is late, and their
// chunks must not keep the buffer the first stream needs.
func TestRanged_SpansLongerThanTheBuffers(t *testing.T) {
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeSpan: 10 * rangeChunk, RangeStreams: rangeStreams})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(); storetest.MakeWritable(dir) })
	files := map[string][]byte{"w.bin": sourcetest.Bytes("w", 40*rangeChunk+7)}
	// Twice the pool (2 × streams buffers) in chunks of the other spans.
	f := &lateFirstSpan{Remote: sourcetest.NewFetcher(files), want: 4 * rangeStreams * rangeChunk, ready: make(chan struct{})}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tr, _, err := s.Ensure(ctx, "key", sourcetest.ManifestOf(files, time.Unix(1700000000, 0)), f)
	if err != nil {
		t.Fatalf("Ensure = %v (a minute is far more than 40 KB take: the streams waited for each other)", err)
	}
	checkTree(t, s, tr, files)
}

// heldFirstSpan holds the first span's response until release is closed,
// and says when the other spans have delivered want bytes.
type heldFirstSpan struct {
	*sourcetest.Remote
	others  atomic.Int64
	want    int64
	reached chan struct{}
	release chan struct{}
	once    sync.Once
}

func (h *heldFirstSpan) OpenRange(ctx context.Context, e source.Entry, off, n int64) (io.ReadCloser, error) {
	if off == 0 {
		select {
		case <-h.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return h.Remote.OpenRange(ctx, e, off, n)
	}
	rc, err := h.Remote.OpenRange(ctx, e, off, n)
	if err != nil {
		return rc, err
	}
	return &heldBody{ReadCloser: rc, h: h}, nil
}

type heldBody struct {
	io.ReadCloser
	h *heldFirstSpan
}

func (b *heldBody) Read(p []byte) (int, error) {
	k, err := b.ReadCloser.Read(p)
	if b.h.others.Add(int64(k)) >= b.h.want {
		b.h.once.Do(func() { close(b.h.reached) })
	}
	return k, err
}

// While the first span is late, the hashed prefix does not move, but the
// chunks the other streams write are recorded as they come: a kill -9 then
// loses at most a checkpoint's worth of them, not everything past the
// prefix.
func TestRanged_ChunksPastALaggingPrefixRecorded(t *testing.T) {
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeSpan: 10 * rangeChunk,
		RangeStreams: rangeStreams, RangeCheckpoint: 2 * rangeChunk})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(); storetest.MakeWritable(dir) })
	files := map[string][]byte{"w.bin": sourcetest.Bytes("w", 40*rangeChunk)}
	f := &heldFirstSpan{Remote: sourcetest.NewFetcher(files), want: 8 * rangeChunk, reached: make(chan struct{}), release: make(chan struct{})}
	m := sourcetest.ManifestOf(files, time.Unix(1700000000, 0))
	done := make(chan error, 1)
	go func() {
		_, _, err := s.Ensure(context.Background(), "key", m, f)
		done <- err
	}()
	select {
	case <-f.reached:
	case err := <-done:
		t.Fatalf("Ensure ended before the other spans delivered: %v", err)
	}
	// The checkpoint after the 8th chunk written is asked for; its record
	// appears once it has synced.
	deadline := time.Now().Add(time.Minute)
	for {
		past := recordedPast(t, dir)
		if len(past) >= 6 {
			break
		}
		if time.Now().After(deadline) {
			close(f.release)
			t.Fatalf("chunks recorded past the prefix: %v, want at least 6 of the 8 written", past)
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(f.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// recordedPast is the chunks past the prefix the one checkpoint record in
// partial/ lists.
func recordedPast(t *testing.T, dir string) []string {
	t.Helper()
	for _, n := range entries(t, dir, store.PartialDir) {
		if !strings.HasSuffix(n, ".at") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, store.PartialDir, n))
		if err != nil {
			continue // being replaced
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if len(lines) < 2 {
			return nil
		}
		return strings.Fields(lines[1])[1:]
	}
	return nil
}
