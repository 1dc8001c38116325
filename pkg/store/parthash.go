package store

import (
	"context"
	"fmt"

	"golang.org/x/sync/errgroup"
)

// The MD5s of a multipart ETag are hashed from the file, several parts at
// once, rather than by each stream as its bytes arrive. MD5 is the most
// expensive check a download makes (Go's runs at a third of sha256's speed
// with SHA extensions), and md5-simd computes 8 of them (AVX2; 16 with
// AVX-512) in one core's vector registers for the CPU of about three, but
// only for the MD5s it is handed at the same moment: with fewer than three
// at once it hashes one after the other. Streams capped at 64 MB/s hand it
// a few hundred KiB each at scattered moments, so it almost never had
// three; in-stream hashing cost a core 1.5 s per GiB. A part whose stream
// has finished is in the file (and the page cache), so the parts are
// gathered instead and hashed a batch at a time, every lane busy.
//
// Nothing waits for the batches but the download's end: the streams go on
// with the next parts meanwhile, and the last batch (the parts the streams
// finish together at the end) is all that is hashed after the last byte.

// partBatch is how many parts hash at once: the 8 lanes of one AVX2 core.
// Each holds one buffer of partPiece while it hashes.
const (
	partBatch = 8
	partPiece = 1 << 20
)

// batchesParts says whether the download hashes its parts in batches from
// the file (an MD5 per part) rather than in its streams (a CRC, whose cost
// is not worth a second read).
func (rd *rangedDownload) batchesParts() bool { return rd.parts != nil }

// partDone hands part i, whose bytes from the download's start are all in
// the file, to the batches.
func (rd *rangedDownload) partDone(ctx context.Context, i int) error {
	select {
	case rd.parts <- i:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// hashParts hashes the parts handed to it in batches of partBatch, or
// fewer once the streams are done (rd.parts closed).
func (rd *rangedDownload) hashParts(ctx context.Context) error {
	// Parts begun by rehash (a resumed download) go on from where it left
	// them, once its own hashing is done.
	rd.sums.remote.wait()
	bufs := make([][]byte, partBatch)
	batch := make([]int, 0, partBatch)
	for open := true; open; {
		batch = batch[:0]
		for open && len(batch) < partBatch {
			select {
			case i, ok := <-rd.parts:
				if ok {
					batch = append(batch, i)
				}
				open = ok
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		g, gctx := errgroup.WithContext(ctx)
		for k, i := range batch {
			if bufs[k] == nil {
				bufs[k] = make([]byte, partPiece)
			}
			g.Go(func() error { return rd.hashPartFromFile(gctx, i, bufs[k]) })
		}
		if err := g.Wait(); err != nil {
			return err
		}
	}
	return nil
}

// hashPartFromFile feeds part i's bytes not yet hashed (a resumed
// download's rehash may have fed its start) to its hash, from the file.
func (rd *rangedDownload) hashPartFromFile(ctx context.Context, i int, buf []byte) error {
	from := max(int64(i)*rd.part, int64(rd.first)*rd.chunk)
	end := min(int64(i+1)*rd.part, rd.e.Size)
	for off := from; off < end; {
		if err := ctx.Err(); err != nil {
			return err
		}
		b := buf[:min(int64(len(buf)), end-off)]
		if _, err := rd.pf.f.ReadAt(b, off); err != nil {
			return fmt.Errorf("reading back bytes %d+ of %s: %w", off, rd.e.Path, err)
		}
		off += int64(len(b))
		rd.sums.remote.hashWhole(i, b, off == end)
	}
	return nil
}
