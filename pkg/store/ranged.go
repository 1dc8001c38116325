package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

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

// DefaultRangeSpan is how much of a file one ranged read asks for: the
// chunks of a span stream through one response, so a stream waits for a
// first byte once per span rather than once per chunk (20 ms on every 4 MiB
// at 64 MB/s is a quarter of the stream's time). A file uploaded in parts
// of a multiple of the chunk (up to maxSpanChunks) is read a part per span
// instead, so that parts finish whole, to be checked beside the download
// (docs/design.md "Downloads").
const DefaultRangeSpan = 16 << 20

// maxSpanChunks bounds a part-sized span: a stream holds one connection
// for its whole span.
const maxSpanChunks = 16

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
func (s *Store) ingestRanged(ctx context.Context, name string, e source.Entry, rf RangeFetcher, p *Progress, objectKey string, want source.Checksum, named string) (string, checkedBy, error) {
	rd := &rangedDownload{s: s, e: e, rf: rf, p: p, chunk: s.rangeChunk, d: downloadOf(ctx)}
	rd.chunks = int((e.Size + rd.chunk - 1) / rd.chunk)
	if err := rd.open(name, objectKey, want); err != nil {
		return "", notChecked, err
	}
	rd.sums.named = named
	rd.planSpans()
	defer func() { rd.sums.close() }()
	defer rd.pf.close()
	s.chunks.use(rd.d)
	defer s.chunks.unuse(rd.d)
	rd.done = make(chan fetchedChunk, s.chunks.size())
	rd.next.Store(int64(rd.first / rd.span))
	rd.hashed, rd.pending = rd.first, map[int][]byte{}
	rd.prefix.Store(int64(rd.first) * rd.chunk)
	rd.ckpt = make(chan int64, 1)

	g, gctx := errgroup.WithContext(ctx)
	var streams sync.WaitGroup
	for range s.rangeStreams {
		streams.Add(1)
		g.Go(func() error {
			defer streams.Done()
			return rd.fetchSpans(gctx)
		})
	}
	if rd.batchesParts() {
		go func() {
			streams.Wait()
			close(rd.parts)
		}()
		g.Go(func() error { return rd.hashParts(gctx) })
	}
	// Checkpoints run beside the hasher: an fsync takes a while, and the
	// chunks should keep flowing meanwhile. One waits at most; a request
	// while one waits is dropped, and a later one covers its bytes.
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

	// span is how many chunks one ranged read asks for. part is the size
	// of the remote checksum's parts when each span is one part, hashed by
	// its stream (hashWhole) or, for MD5s, in batches from the file once
	// the stream hands it to parts (parthash.go); ordered is then what the
	// hasher writes to (the sha256 alone), else sums.
	span    int
	part    int64
	parts   chan int
	ordered *objectSums

	next    atomic.Int64      // the next span a fetcher takes
	written atomic.Int64      // bytes the streams wrote, for checkpoints
	prefix  atomic.Int64      // the hashed prefix, in bytes
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

// planSpans chooses the span: one part of the remote's checksum when the
// parts are a multiple of the chunk, each then hashed by its stream;
// else DefaultRangeSpan (rangeSpan) of chunks, hashed in order.
func (rd *rangedDownload) planSpans() {
	rd.span, rd.ordered = max(1, int(rd.s.rangeSpan/rd.chunk)), rd.sums
	r := rd.sums.remote
	if r == nil || r.shared {
		return
	}
	if p := r.partLayout(rd.e.Size); p > 0 && p%rd.chunk == 0 && p/rd.chunk <= maxSpanChunks {
		rd.span, rd.part, rd.ordered = int(p/rd.chunk), p, rd.sums.shaOnly()
		if r.lanes {
			rd.parts = make(chan int, partBatch)
			return
		}
		// A CRC is cheap enough to compute as the bytes come, on each
		// stream's goroutine.
	}
}

// fetchSpans is one stream: it takes spans in turn, and the chunks of each
// in order from one ranged read.
func (rd *rangedDownload) fetchSpans(ctx context.Context) error {
	for {
		k := int(rd.next.Add(1) - 1)
		lo, hi := max(k*rd.span, rd.first), min((k+1)*rd.span, rd.chunks)
		if lo >= rd.chunks {
			return nil
		}
		if err := rd.fetchSpan(ctx, lo, hi); err != nil {
			return err
		}
	}
}

// fetchSpan fetches chunks lo to hi into buffers and the file, or reads
// them back from an earlier download's file, hashes their part when the
// stream does, and hands each to the hasher.
func (rd *rangedDownload) fetchSpan(ctx context.Context, lo, hi int) error {
	sr := &spanReader{rd: rd, spanEnd: min(int64(hi)*rd.chunk, rd.e.Size)}
	defer sr.close(ctx)
	for i := lo; i < hi; i++ {
		buf, err := rd.buffer(ctx, sr)
		if err != nil {
			return err
		}
		off := int64(i) * rd.chunk
		buf = buf[:min(rd.chunk, rd.e.Size-off)]
		fromDisk, err := rd.fillChunk(ctx, sr, i, buf)
		if err != nil {
			rd.s.chunks.put(rd.d, buf)
			return err
		}
		if rd.part > 0 && fromDisk && !rd.batchesParts() {
			end := off + int64(len(buf))
			rd.sums.remote.hashWhole(int(off/rd.part), buf, end%rd.part == 0 || end == rd.e.Size)
		}
		rd.count(int64(len(buf)))
		// done holds as many chunks as there are buffers: never blocks.
		rd.done <- fetchedChunk{i, buf}
	}
	if rd.batchesParts() {
		return rd.partDone(ctx, int(int64(lo)*rd.chunk/rd.part))
	}
	return nil
}

// buffer takes a chunk buffer for a stream. A stream waits for one with
// its response open only briefly: it would hold a connection while another
// stream holds the buffer it waits for and waits for a connection. This
// download's own buffers come back at once (await); a longer wait is for
// other downloads', and the response is closed meanwhile.
func (rd *rangedDownload) buffer(ctx context.Context, sr *spanReader) ([]byte, error) {
	if sr.body != nil {
		wctx, cancel := context.WithTimeout(ctx, bufferWaitOpen)
		buf, err := rd.s.chunks.get(wctx, rd.d, rd.chunk, rd.chunk)
		cancel()
		if err == nil || ctx.Err() != nil {
			return buf, err
		}
		sr.close(ctx)
	}
	return rd.s.chunks.get(ctx, rd.d, rd.chunk, rd.chunk)
}

// bufferWaitOpen is how long a stream waits for a chunk buffer with its
// response open: far longer than a buffer on its way back from the hasher
// takes, far shorter than a remote's patience.
const bufferWaitOpen = 250 * time.Millisecond

// fillChunk puts chunk i into buf and the file: read back from the file
// when an earlier download left it there (fromDisk), else from the span's
// response, which hashes its part as it comes.
func (rd *rangedDownload) fillChunk(ctx context.Context, sr *spanReader, i int, buf []byte) (fromDisk bool, err error) {
	off := int64(i) * rd.chunk
	if rd.pf.onDiskChunk(i) {
		if _, err := rd.pf.f.ReadAt(buf, off); err == nil {
			return true, nil
		}
	}
	if err := sr.read(ctx, off, buf); err != nil {
		return false, err
	}
	if _, err := rd.pf.f.WriteAt(buf, off); err != nil {
		return false, noSpace(fmt.Errorf("writing %s: %w", rd.e.Path, err))
	}
	rd.pf.markWritten(i)
	// Chunks past the hashed prefix are recorded too: with spans, the
	// prefix may lag far behind what the streams wrote, and a kill would
	// lose all of that since the last checkpoint.
	n := int64(len(buf))
	if w := rd.written.Add(n); w/rd.s.rangeCheckpoint != (w-n)/rd.s.rangeCheckpoint {
		select {
		case rd.ckpt <- rd.prefix.Load():
		default:
		}
	}
	return false, nil
}

// spanReader is the ranged read of one span: opened at the first chunk it
// must fetch, read chunk after chunk, and opened again from the chunk a
// failure or a chunk read back from the file left it at. Each response
// holds one of the node's connections and a stream guard while open.
type spanReader struct {
	rd      *rangedDownload
	spanEnd int64 // where the span ends in the object
	end     int64 // where the open response ends
	body    io.ReadCloser
	at      int64 // the offset body reads next
	guard   *streamGuard
	sctx    context.Context
}

// read fills buf with the bytes at off, going on from where a failed or
// short response stopped with a new ranged read (chunkAttempts in all),
// and refusing a span that comes long (the object changed at the remote).
// A stream that hashes its part's CRC does so as the bytes come, piece by
// piece.
func (sr *spanReader) read(ctx context.Context, off int64, buf []byte) error {
	e := sr.rd.e
	var err error
	filled := 0
	for range chunkAttempts {
		at := off + int64(filled)
		if sr.body == nil || sr.at != at {
			sr.close(ctx)
			if err = sr.open(ctx, at); err != nil {
				if stop(ctx, err) {
					return err
				}
				continue
			}
		}
		if err = sr.fill(off, buf, &filled); err == nil {
			if sr.at < sr.end {
				return nil
			}
			// The response's last chunk: the connection goes back.
			err = sr.finish()
			sr.close(ctx)
			return err
		}
		err = sr.guard.err(err)
		sr.close(ctx)
		if stop(ctx, err) {
			return err
		}
	}
	return fmt.Errorf("downloading bytes %d-%d of %s, %d attempts: %w", off, off+int64(len(buf))-1, e.Path, chunkAttempts, err)
}

// fill reads the open response into buf from *filled on, hashing each
// piece into its part when the stream hashes parts.
func (sr *spanReader) fill(off int64, buf []byte, filled *int) error {
	r := guardedReader{sr.body, sr.guard}
	rd := sr.rd
	for *filled < len(buf) {
		k, err := r.Read(buf[*filled:])
		if k > 0 {
			if rd.part > 0 && !rd.batchesParts() {
				end := off + int64(*filled+k)
				last := *filled+k == len(buf) && (end%rd.part == 0 || end == rd.e.Size)
				rd.sums.remote.hashWhole(int(off/rd.part), buf[*filled:*filled+k], last)
			}
			*filled += k
			sr.at += int64(k)
		}
		switch {
		case *filled == len(buf):
			return nil
		case err == io.EOF:
			return io.ErrUnexpectedEOF
		case err != nil:
			return err
		}
	}
	return nil
}

// stop says whether a failed read ends the download rather than being
// tried again.
func stop(ctx context.Context, err error) bool {
	return ctx.Err() != nil || errors.Is(err, source.ErrChanged) || errors.Is(err, source.ErrDenied) || errors.Is(err, source.ErrNotFound) || errors.Is(err, source.ErrNoRanges)
}

// open asks for the span's bytes from off up to the next chunk an earlier
// download left in the file, holding a connection.
func (sr *spanReader) open(ctx context.Context, off int64) error {
	if err := sr.rd.s.acquireConn(ctx); err != nil {
		return err
	}
	chunk := sr.rd.chunk
	sr.end = min((off/chunk+1)*chunk, sr.spanEnd)
	for sr.end < sr.spanEnd && !sr.rd.pf.onDiskChunk(int(sr.end/chunk)) {
		sr.end = min(sr.end+chunk, sr.spanEnd)
	}
	sr.sctx, sr.guard = sr.rd.s.guardStream(ctx)
	rc, err := sr.rd.rf.OpenRange(sr.sctx, sr.rd.e, off, sr.end-off)
	if err != nil {
		err = sr.guard.err(err)
		sr.close(ctx)
		return err
	}
	sr.body, sr.at = sr.rd.s.countFrom(sr.rd.d, rc), off
	return nil
}

// finish checks that the response ends where the span does: one byte more
// means the remote ignored the range or the object grew, and either way
// these are not the listed bytes.
func (sr *spanReader) finish() error {
	var extra [1]byte
	if k, _ := sr.body.Read(extra[:]); k > 0 {
		return fmt.Errorf("%w: %s sent more than bytes up to %d", source.ErrChanged, sr.rd.e.Path, sr.end-1)
	}
	return nil
}

// close ends the response, if any, and gives its connection back.
func (sr *spanReader) close(ctx context.Context) {
	if sr.sctx == nil {
		return
	}
	if sr.body != nil {
		sr.body.Close()
		sr.body = nil
	}
	sr.guard.stop()
	sr.guard, sr.sctx = nil, nil
	sr.rd.s.releaseConn(ctx)
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
			rd.ordered.writeThen(buf, func() { rd.s.chunks.put(rd.d, buf) })
		case spilled[k]:
			off := int64(k) * rd.chunk
			if err := hashAt(rd.pf.f, off, min(rd.chunk, rd.e.Size-off), rd.ordered); err != nil {
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
		rd.prefix.Store(min(int64(rd.hashed)*rd.chunk, rd.e.Size))
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
// theirs back (spilled); they are in the file. Streams that read spans run
// ahead of the hash by design (eight 16 MiB parts are twice the pool):
// their chunks that come before their turn give their buffers back at
// once, so the streams never wait for the hasher.
func (rd *rangedDownload) await(ctx context.Context, spilled map[int]bool) error {
	changed := rd.s.chunks.slots.changes()
	if len(rd.pending) > 0 && rd.s.chunks.slots.pressed(rd.d) {
		for i := range rd.pending {
			rd.spill(i, spilled)
		}
		return nil
	}
	if len(rd.pending) == 0 {
		changed = nil
	}
	select {
	case c := <-rd.done:
		rd.pending[c.index] = c.data
		if rd.span > 1 && c.index != rd.hashed {
			rd.spill(c.index, spilled)
		}
	case <-changed:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

// spill gives back the buffer of pending chunk i, to be hashed from the
// file in its turn.
func (rd *rangedDownload) spill(i int, spilled map[int]bool) {
	spilled[i] = true
	rd.s.chunks.put(rd.d, rd.pending[i])
	delete(rd.pending, i)
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

// hashAt feeds n bytes of f from off to sums: chunks hashed from the file,
// which are most of a span's. Two buffers take turns, so that the
// remote's checksum of one runs beside the read and the sha256 of the
// next, as it does for chunks hashed from memory.
func hashAt(f *os.File, off, n int64, sums *objectSums) error {
	free := make(chan *[]byte, 2)
	for range cap(free) {
		free <- bufPool.Get().(*[]byte)
	}
	defer func() {
		sums.wait()
		for range cap(free) {
			bufPool.Put(<-free)
		}
	}()
	r := io.NewSectionReader(f, off, n)
	for {
		bp := <-free
		k, err := r.Read(*bp)
		if k > 0 {
			sums.writeThen((*bp)[:k], func() { free <- bp })
		} else {
			free <- bp
		}
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
