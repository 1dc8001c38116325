package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/modelcache/modelcache/pkg/source"
	"golang.org/x/sync/errgroup"
)

// RangeFetcher is a Fetcher that can open part of an object (a ranged GET).
// Large files are then fetched in parallel chunks, as `rclone copy` does
// with --multi-thread-streams: one object store stream delivers far less
// than a node's network, and each waits for its first byte.
type RangeFetcher interface {
	Fetcher
	OpenRange(ctx context.Context, e source.Entry, offset, length int64) (io.ReadCloser, error)
}

// Defaults of ranged downloads: rclone's --multi-thread-cutoff and
// --multi-thread-streams, and a chunk small enough that the chunks held for
// in-order hashing bound memory whatever the file's size.
const (
	DefaultRangeCutoff  = 256 << 20
	DefaultRangeStreams = 4
	DefaultRangeChunk   = 8 << 20
)

// chunkAttempts is how often one chunk is fetched before the download fails.
const chunkAttempts = 3

// ingestRanged downloads one large object in chunks fetched by
// rangeStreams concurrent ranged reads, each written in place into the
// ingest file. The chunks are hashed in order as they complete, from
// memory, so there is no second pass over the file; at most twice as many
// chunks as streams are held, which bounds memory (64 MiB by default).
func (s *Store) ingestRanged(ctx context.Context, name string, e source.Entry, rf RangeFetcher, p *Progress) (string, error) {
	w, err := s.root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", noSpace(fmt.Errorf("creating ingest file: %w", err))
	}
	defer w.Close()
	if err := w.Truncate(e.Size); err != nil {
		return "", noSpace(fmt.Errorf("sizing %s: %w", e.Path, err))
	}
	chunk := s.rangeChunk
	chunks := int((e.Size + chunk - 1) / chunk)
	held := make(chan struct{}, 2*s.rangeStreams) // a slot per chunk buffer held
	done := make(chan fetchedChunk, 2*s.rangeStreams)
	var bufs sync.Pool
	var next atomic.Int64
	sums := newObjectSums(e)

	g, gctx := errgroup.WithContext(ctx)
	for range s.rangeStreams {
		g.Go(func() error {
			for {
				// The buffer comes before the chunk number: every chunk taken
				// holds a buffer, so the lowest one not yet hashed can always
				// finish and the hasher never waits on a chunk that cannot.
				select {
				case held <- struct{}{}:
				case <-gctx.Done():
					return gctx.Err()
				}
				i := int(next.Add(1) - 1)
				if i >= chunks {
					<-held
					return nil
				}
				off := int64(i) * chunk
				n := min(chunk, e.Size-off)
				buf, _ := bufs.Get().([]byte)
				if int64(cap(buf)) < n {
					buf = make([]byte, chunk)
				}
				buf = buf[:n]
				if err := fetchChunk(gctx, rf, e, off, buf); err != nil {
					return err
				}
				if _, err := w.WriteAt(buf, off); err != nil {
					return noSpace(fmt.Errorf("writing %s: %w", e.Path, err))
				}
				p.done.Add(n)
				select {
				case done <- fetchedChunk{i, buf}:
				case <-gctx.Done():
					return gctx.Err()
				}
			}
		})
	}
	g.Go(func() error {
		pending := map[int][]byte{}
		for k := 0; k < chunks; {
			buf, ok := pending[k]
			if !ok {
				select {
				case c := <-done:
					pending[c.index] = c.data
				case <-gctx.Done():
					return gctx.Err()
				}
				continue
			}
			sums.write(buf)
			delete(pending, k)
			bufs.Put(buf[:0])
			<-held
			k++
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return "", err
	}
	return s.commitBlob(w, name, e, sums)
}

type fetchedChunk struct {
	index int
	data  []byte
}

// fetchChunk fills buf from offset with ranged reads, retrying a chunk that
// fails or comes short, and refusing one that comes long (the object
// changed at the remote).
func fetchChunk(ctx context.Context, rf RangeFetcher, e source.Entry, off int64, buf []byte) error {
	var err error
	for range chunkAttempts {
		if err = ctx.Err(); err != nil {
			return err
		}
		err = readChunk(ctx, rf, e, off, buf)
		if err == nil || errors.Is(err, source.ErrChanged) || errors.Is(err, source.ErrDenied) || errors.Is(err, source.ErrNotFound) {
			return err
		}
	}
	return fmt.Errorf("downloading bytes %d-%d of %s, %d attempts: %w", off, off+int64(len(buf))-1, e.Path, chunkAttempts, err)
}

func readChunk(ctx context.Context, rf RangeFetcher, e source.Entry, off int64, buf []byte) error {
	rc, err := rf.OpenRange(ctx, e, off, int64(len(buf)))
	if err != nil {
		return err
	}
	defer rc.Close()
	if _, err := io.ReadFull(rc, buf); err != nil {
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
