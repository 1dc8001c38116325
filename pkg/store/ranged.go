package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/units"
	"golang.org/x/sync/errgroup"
	"k8s.io/klog/v2"
)

// RangeFetcher is a Fetcher that can open part of an object (a ranged GET).
// Large files are then fetched in parallel chunks, as `rclone copy` does
// with --multi-thread-streams: one object store stream delivers far less
// than a node's network, and each waits for its first byte.
type RangeFetcher interface {
	Fetcher
	OpenRange(ctx context.Context, e source.Entry, offset, length int64) (io.ReadCloser, error)
}

// Defaults of ranged downloads: rclone's --multi-thread-cutoff; twice its
// --multi-thread-streams, because an object store caps each stream (through
// a proxy capping streams at 64 MB/s, 1 GiB took 5.7 s with 4 streams of
// 8 MiB chunks and 4.5 s with 8 of 4 MiB, docs/benchmarks.md); and a chunk
// small enough that the chunks held for in-order hashing (two per stream)
// bound memory whatever the file's size, to 64 MiB.
const (
	DefaultRangeCutoff  = 256 << 20
	DefaultRangeStreams = 8
	DefaultRangeChunk   = 4 << 20
)

// DefaultRangeCheckpoint is how much of a ranged download is made durable
// at a time, so that a restart loses at most that much of a large file.
const DefaultRangeCheckpoint = 16 << 20

// chunkAttempts is how often one chunk is fetched before the download fails.
const chunkAttempts = 3

// ingestRanged downloads one large object in chunks fetched by
// rangeStreams concurrent ranged reads, each written in place into the
// ingest file. The chunks are hashed in order as they complete, from
// memory, so there is no second pass over the file. Chunk buffers come
// from one node-wide pool of 2×rangeStreams, which bounds memory (64 MiB
// by default) whatever the size and number of files.
//
// An object with a key (objectKey) downloads into a partial file that
// outlives the download: every rangeCheckpoint bytes, beside the download,
// the file is fsynced and its hashed prefix and the chunks written past it
// are recorded. A later download of the same object (after a failure, a
// restart or kill -9) re-hashes the prefix from disk, reads the recorded
// chunks back, and fetches the rest.
func (s *Store) ingestRanged(ctx context.Context, name string, e source.Entry, rf RangeFetcher, p *Progress, objectKey string, want source.Checksum) (string, checkedBy, error) {
	rd := &rangedDownload{s: s, e: e, rf: rf, p: p, chunk: s.rangeChunk, d: downloadOf(ctx)}
	rd.chunks = int((e.Size + rd.chunk - 1) / rd.chunk)
	if err := rd.open(name, objectKey, want); err != nil {
		return "", notChecked, err
	}
	defer func() { rd.sums.close() }()
	defer rd.pf.close()
	s.chunks.use(rd.d)
	defer s.chunks.unuse(rd.d)
	rd.done = make(chan fetchedChunk, s.chunks.size())
	rd.next.Store(int64(rd.first))
	rd.hashed, rd.pending = rd.first, map[int][]byte{}

	g, gctx := errgroup.WithContext(ctx)
	for range s.rangeStreams {
		g.Go(func() error { return rd.fetchChunks(gctx) })
	}
	// Checkpoints run beside the hasher: an fsync takes a while, and the
	// chunks should keep flowing meanwhile. One waits at most; a request
	// while one waits is dropped, and a later one covers its bytes.
	rd.ckpt = make(chan int64, 1)
	ckptDone := make(chan struct{})
	go func() {
		defer close(ckptDone)
		for n := range rd.ckpt {
			if err := rd.pf.checkpoint(n); err != nil {
				klog.ErrorS(err, "recording a partial download; a restart goes on from an earlier point", "object", e.Path)
			}
		}
	}()
	g.Go(func() error { return rd.hashInOrder(gctx) })
	err := g.Wait()
	close(rd.ckpt)
	<-ckptDone
	rd.giveBack()
	if err != nil {
		if errors.Is(err, source.ErrChanged) || errors.Is(err, source.ErrNotFound) || errors.Is(err, source.ErrNoRanges) {
			rd.pf.drop()
			if errors.Is(err, source.ErrNoRanges) {
				// Read again in one stream: what this attempt counted
				// will be counted again.
				rd.p.done.Add(-rd.counted.Load())
			}
			return "", notChecked, err
		}
		// What was written is recorded, chunks past the prefix too.
		if cerr := rd.pf.checkpoint(int64(rd.hashed) * rd.chunk); cerr != nil {
			klog.ErrorS(cerr, "recording a partial download; the next one starts earlier", "object", e.Path)
		}
		return "", notChecked, err
	}
	if err := rd.pf.finish(); err != nil {
		return "", notChecked, err
	}
	return s.commitBlob(ctx, rd.pf.f, name, e, rd.sums)
}

// rangedDownload is one large object's download in chunks: rangeStreams
// fetchers taking chunk numbers in turn, and one hasher taking the chunks
// in order.
type rangedDownload struct {
	s      *Store
	e      source.Entry
	rf     RangeFetcher
	p      *Progress
	d      *download
	pf     *partialFile
	sums   *objectSums
	chunk  int64
	chunks int
	first  int // the first chunk not on disk from an earlier download

	next    atomic.Int64      // the next chunk a fetcher takes
	counted atomic.Int64      // bytes added to p
	done    chan fetchedChunk // fetched chunks, to the hasher
	ckpt    chan int64        // hashed bytes to checkpoint

	// The hasher's: the first chunk not yet hashed, and the chunks fetched
	// before their turn. Read after the download, to checkpoint a failed
	// one and give the buffers back.
	hashed  int
	pending map[int][]byte
}

// open opens the partial file and, when it resumes an earlier download,
// re-hashes the recorded prefix from disk.
func (rd *rangedDownload) open(name, objectKey string, want source.Checksum) error {
	sums, err := newObjectSums(want)
	if err != nil {
		return err
	}
	rd.sums = sums
	if rd.pf, err = rd.s.openPartial(name, rd.e, objectKey, rd.chunk); err != nil {
		sums.close()
		return err
	}
	rd.first = int(rd.pf.resumeAt(rd.chunk) / rd.chunk)
	if rd.first > 0 {
		if err := rehash(rd.pf.f, int64(rd.first)*rd.chunk, rd.sums); err != nil {
			klog.InfoS("partial download unreadable, starting over", "object", rd.e.Path, "err", err)
			rd.sums.close()
			rd.sums, _ = newObjectSums(want) // the algorithm was accepted above
			rd.first = 0
		} else {
			klog.InfoS("resuming download", "object", rd.e.Path, "from", units.Bytes(int64(rd.first)*rd.chunk), "of", units.Bytes(rd.e.Size))
		}
	}
	rd.count(int64(rd.first) * rd.chunk)
	return nil
}

// count adds n bytes to the download's progress, and to what this file
// added, which a fall back to one stream takes off again.
func (rd *rangedDownload) count(n int64) {
	rd.p.done.Add(n)
	rd.counted.Add(n)
}

// fetchChunks is one stream: it takes chunk numbers in turn and fetches
// each into a buffer and the file, or reads it back from an earlier
// download's file, and hands it to the hasher.
func (rd *rangedDownload) fetchChunks(ctx context.Context) error {
	w := rd.pf.f
	for {
		// The buffer comes before the chunk number: every chunk taken
		// holds a buffer, so the lowest one not yet hashed of every
		// file can always finish and no hasher waits on a chunk that
		// cannot, even with the pool shared between files.
		buf, err := rd.s.chunks.get(ctx, rd.d, rd.chunk, rd.chunk)
		if err != nil {
			return err
		}
		i := int(rd.next.Add(1) - 1)
		if i >= rd.chunks {
			rd.s.chunks.put(rd.d, buf)
			return nil
		}
		off := int64(i) * rd.chunk
		n := min(rd.chunk, rd.e.Size-off)
		buf = buf[:n]
		// A chunk an earlier download left on disk is read back (and
		// hashed with the rest) instead of fetched.
		onDisk := rd.pf.onDiskChunk(i)
		if onDisk {
			_, rerr := w.ReadAt(buf, off)
			onDisk = rerr == nil
		}
		if !onDisk {
			if err := rd.s.fetchChunk(ctx, rd.rf, rd.e, off, buf); err != nil {
				rd.s.chunks.put(rd.d, buf)
				return err
			}
			if _, err := w.WriteAt(buf, off); err != nil {
				rd.s.chunks.put(rd.d, buf)
				return noSpace(fmt.Errorf("writing %s: %w", rd.e.Path, err))
			}
			rd.pf.markWritten(i)
		}
		rd.count(n)
		// done holds as many chunks as there are buffers: never blocks.
		rd.done <- fetchedChunk{i, buf}
	}
}

// hashInOrder hashes the chunks in order as they come, from memory, or
// from the file for those given back before their turn, and asks for a
// checkpoint every rangeCheckpoint bytes. A chunk's buffer goes back once
// both digests are done with it: the remote's per-part checksum runs on
// other goroutines, so the sha256 goes on to the next chunk meanwhile.
func (rd *rangedDownload) hashInOrder(ctx context.Context) error {
	saved := int64(rd.hashed) * rd.chunk
	// Chunks written but given back before their turn, to be hashed from
	// the file.
	spilled := map[int]bool{}
	for rd.hashed < rd.chunks {
		k := rd.hashed
		buf, ok := rd.pending[k]
		switch {
		case ok:
			delete(rd.pending, k)
			rd.sums.writeThen(buf, func() { rd.s.chunks.put(rd.d, buf) })
		case spilled[k]:
			off := int64(k) * rd.chunk
			if err := hashAt(rd.pf.f, off, min(rd.chunk, rd.e.Size-off), rd.sums); err != nil {
				return fmt.Errorf("reading back bytes %d+ of %s: %w", off, rd.e.Path, err)
			}
			delete(spilled, k)
		default:
			if err := rd.await(ctx, spilled); err != nil {
				return err
			}
			continue
		}
		rd.hashed++
		if hashed := int64(rd.hashed) * rd.chunk; hashed-saved >= rd.s.rangeCheckpoint && hashed < rd.e.Size {
			select {
			case rd.ckpt <- hashed:
				saved = hashed
			default:
			}
		}
	}
	return nil
}

// await waits for the next fetched chunk. A finished chunk waiting for an
// earlier, slower one would pin its buffer for as long as that one takes:
// when another download waits for a buffer, the finished chunks give
// theirs back (spilled); they are in the file. This download's own streams
// wait instead (a stream too slow is cut).
func (rd *rangedDownload) await(ctx context.Context, spilled map[int]bool) error {
	changed := rd.s.chunks.slots.changes()
	if len(rd.pending) > 0 && rd.s.chunks.slots.pressed(rd.d) {
		for i, b := range rd.pending {
			spilled[i] = true
			delete(rd.pending, i)
			rd.s.chunks.put(rd.d, b)
		}
		return nil
	}
	if len(rd.pending) == 0 {
		changed = nil
	}
	select {
	case c := <-rd.done:
		rd.pending[c.index] = c.data
	case <-changed:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

// giveBack returns every buffer the download still holds, once the
// fetchers and the hasher have stopped: chunks fetched but never hashed
// are on disk, and a failed download's checkpoint records them.
func (rd *rangedDownload) giveBack() {
	rd.sums.wait()
	for len(rd.done) > 0 {
		c := <-rd.done
		rd.pending[c.index] = c.data
	}
	for _, buf := range rd.pending {
		rd.s.chunks.put(rd.d, buf)
	}
}

// rehash feeds the first n bytes of f to sums: a resumed download's hash
// covers what is on disk, not what was hashed before the restart.
func rehash(f *os.File, n int64, sums *objectSums) error { return hashAt(f, 0, n, sums) }

// hashAt feeds n bytes of f from off to sums.
func hashAt(f *os.File, off, n int64, sums *objectSums) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	r := io.NewSectionReader(f, off, n)
	for {
		k, err := r.Read(*bp)
		sums.write((*bp)[:k])
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

type fetchedChunk struct {
	index int
	data  []byte
}

// fetchChunk fills buf from offset with ranged reads, retrying a chunk that
// fails or comes short, and refusing one that comes long (the object
// changed at the remote). Each read holds one of the node's connections.
func (s *Store) fetchChunk(ctx context.Context, rf RangeFetcher, e source.Entry, off int64, buf []byte) error {
	var err error
	for range chunkAttempts {
		if err = s.acquireConn(ctx); err != nil {
			return err
		}
		sctx, guard := s.guardStream(ctx)
		err = guard.err(readChunk(sctx, rf, e, off, buf, guard))
		guard.stop()
		s.releaseConn(ctx)
		if err == nil || ctx.Err() != nil || errors.Is(err, source.ErrChanged) || errors.Is(err, source.ErrDenied) || errors.Is(err, source.ErrNotFound) {
			return err
		}
	}
	return fmt.Errorf("downloading bytes %d-%d of %s, %d attempts: %w", off, off+int64(len(buf))-1, e.Path, chunkAttempts, err)
}

func readChunk(ctx context.Context, rf RangeFetcher, e source.Entry, off int64, buf []byte, guard *streamGuard) error {
	rc, err := rf.OpenRange(ctx, e, off, int64(len(buf)))
	if err != nil {
		return err
	}
	defer rc.Close()
	if _, err := io.ReadFull(guardedReader{rc, guard}, buf); err != nil {
		return err
	}
	// One byte more than asked means the remote ignored the range or the
	// object grew: either way these are not the listed bytes.
	var extra [1]byte
	if k, _ := rc.Read(extra[:]); k > 0 {
		return fmt.Errorf("%w: %s sent more than bytes %d-%d", source.ErrChanged, e.Path, off, off+int64(len(buf))-1)
	}
	return nil
}
