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
	sums, err := newObjectSums(want)
	if err != nil {
		return "", notChecked, err
	}
	defer func() { sums.close() }()
	pf, err := s.openPartial(name, e, objectKey, s.rangeChunk)
	if err != nil {
		return "", notChecked, err
	}
	defer pf.close()
	w := pf.f
	chunk := s.rangeChunk
	chunks := int((e.Size + chunk - 1) / chunk)
	first := int(pf.resumeAt(chunk) / chunk)
	if first > 0 {
		if err := rehash(w, int64(first)*chunk, sums); err != nil {
			klog.InfoS("partial download unreadable, starting over", "object", e.Path, "err", err)
			sums.close()
			sums, _ = newObjectSums(want) // the algorithm was accepted above
			first = 0
		} else {
			klog.InfoS("resuming download", "object", e.Path, "from", units.Bytes(int64(first)*chunk), "of", units.Bytes(e.Size))
		}
	}
	p.done.Add(int64(first) * chunk)
	d := downloadOf(ctx)
	s.chunks.use(d)
	defer s.chunks.unuse(d)
	done := make(chan fetchedChunk, s.chunks.size())
	var next atomic.Int64
	next.Store(int64(first))

	g, gctx := errgroup.WithContext(ctx)
	for range s.rangeStreams {
		g.Go(func() error {
			for {
				// The buffer comes before the chunk number: every chunk taken
				// holds a buffer, so the lowest one not yet hashed of every
				// file can always finish and no hasher waits on a chunk that
				// cannot, even with the pool shared between files.
				buf, err := s.chunks.get(gctx, d, chunk, chunk)
				if err != nil {
					return err
				}
				i := int(next.Add(1) - 1)
				if i >= chunks {
					s.chunks.put(d, buf)
					return nil
				}
				off := int64(i) * chunk
				n := min(chunk, e.Size-off)
				buf = buf[:n]
				// A chunk an earlier download left on disk is read back
				// (and hashed with the rest) instead of fetched.
				onDisk := pf.onDiskChunk(i)
				if onDisk {
					_, rerr := w.ReadAt(buf, off)
					onDisk = rerr == nil
				}
				if !onDisk {
					if err := s.fetchChunk(gctx, rf, e, off, buf); err != nil {
						s.chunks.put(d, buf)
						return err
					}
					if _, err := w.WriteAt(buf, off); err != nil {
						s.chunks.put(d, buf)
						return noSpace(fmt.Errorf("writing %s: %w", e.Path, err))
					}
					pf.markWritten(i)
				}
				p.done.Add(n)
				// done holds as many chunks as there are buffers: never blocks.
				done <- fetchedChunk{i, buf}
			}
		})
	}
	// Checkpoints run beside the hasher: an fsync takes a while, and the
	// chunks should keep flowing meanwhile. One waits at most; a request
	// while one waits is dropped, and a later one covers its bytes.
	ckpt, ckptDone := make(chan int64, 1), make(chan struct{})
	go func() {
		defer close(ckptDone)
		for n := range ckpt {
			if err := pf.checkpoint(n); err != nil {
				klog.ErrorS(err, "recording a partial download; a restart goes on from an earlier point", "object", e.Path)
			}
		}
	}()
	// The hasher's state: k is read after Wait to checkpoint a failed
	// download, pending to give its buffers back.
	pending := map[int][]byte{}
	k := first
	g.Go(func() error {
		saved := int64(first) * chunk
		// Chunks written but given back before their turn, to be hashed
		// from the file.
		spilled := map[int]bool{}
		for k < chunks {
			buf, ok := pending[k]
			switch {
			case ok:
				sums.write(buf)
				delete(pending, k)
				s.chunks.put(d, buf)
			case spilled[k]:
				off := int64(k) * chunk
				if err := hashAt(w, off, min(chunk, e.Size-off), sums); err != nil {
					return fmt.Errorf("reading back bytes %d+ of %s: %w", off, e.Path, err)
				}
				delete(spilled, k)
			default:
				// A finished chunk waiting for an earlier, slower one would
				// pin its buffer for as long as that one takes: when another
				// download waits for a buffer, the finished chunks give
				// theirs back; they are in the file. This download's own
				// streams wait instead (a stream too slow is cut).
				changed := s.chunks.slots.changes()
				if len(pending) > 0 && s.chunks.slots.pressed(d) {
					for i, b := range pending {
						spilled[i] = true
						delete(pending, i)
						s.chunks.put(d, b)
					}
					continue
				}
				if len(pending) == 0 {
					changed = nil
				}
				select {
				case c := <-done:
					pending[c.index] = c.data
				case <-changed:
				case <-gctx.Done():
					return gctx.Err()
				}
				continue
			}
			k++
			if hashed := int64(k) * chunk; hashed-saved >= s.rangeCheckpoint && hashed < e.Size {
				select {
				case ckpt <- hashed:
					saved = hashed
				default:
				}
			}
		}
		return nil
	})
	err = g.Wait()
	close(ckpt)
	<-ckptDone
	// Chunks fetched but never hashed give their buffers back; they are
	// on disk, and a failed download's checkpoint records them.
	for len(done) > 0 {
		c := <-done
		pending[c.index] = c.data
	}
	for _, buf := range pending {
		s.chunks.put(d, buf)
	}
	if err != nil {
		if errors.Is(err, source.ErrChanged) || errors.Is(err, source.ErrNotFound) {
			pf.drop()
			return "", notChecked, err
		}
		// What was written is recorded, chunks past the prefix too.
		if cerr := pf.checkpoint(int64(k) * chunk); cerr != nil {
			klog.ErrorS(cerr, "recording a partial download; the next one starts earlier", "object", e.Path)
		}
		return "", notChecked, err
	}
	if err := pf.finish(); err != nil {
		return "", notChecked, err
	}
	return s.commitBlob(ctx, w, name, e, sums)
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
