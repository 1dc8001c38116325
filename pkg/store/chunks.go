package store

import (
	"context"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// chunkPool holds the node's ranged-chunk buffers: a fixed number, shared
// fairly by the downloads fetching ranged files (fairSlots), each mapped
// when first needed and reused. They are anonymous mappings outside the Go
// heap: 64 MiB of live buffers on the heap would double the garbage
// collector's target, and the plugin's peak RSS with it (161 MiB for a 4 GiB
// download, measured). When the last ranged download ends they are
// unmapped, and an idle node keeps none.
type chunkPool struct {
	slots *fairSlots
	bufs  chan []byte // one entry per buffer not taken; nil until first used
	mu    sync.Mutex  // orders joins after the unmapping of the last leave
}

func newChunkPool(buffers int) *chunkPool {
	p := &chunkPool{slots: newFairSlots(buffers), bufs: make(chan []byte, buffers)}
	for range buffers {
		p.bufs <- nil
	}
	return p
}

// size is how many buffers the node may hold.
func (p *chunkPool) size() int { return cap(p.bufs) }

// use and unuse bracket one ranged file of download d.
func (p *chunkPool) use(d *download) {
	p.mu.Lock()
	p.slots.join(d)
	p.mu.Unlock()
}

func (p *chunkPool) unuse(d *download) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.slots.leave(d) {
		return
	}
	// Nobody uses the pool: every buffer is back.
	for range cap(p.bufs) {
		if buf := <-p.bufs; buf != nil {
			_ = unix.Munmap(buf[:cap(buf)])
		}
		p.bufs <- nil
	}
}

// get takes a buffer of n bytes (at most chunk) for d, waiting for one that
// is free and within d's share.
func (p *chunkPool) get(ctx context.Context, d *download, n, chunk int64) ([]byte, error) {
	if err := p.slots.acquire(ctx, d); err != nil {
		return nil, err
	}
	buf := <-p.bufs // a slot taken is a buffer in bufs
	if int64(cap(buf)) < n {
		if buf != nil {
			_ = unix.Munmap(buf[:cap(buf)])
		}
		var err error
		if buf, err = unix.Mmap(-1, 0, int(chunk), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
			p.bufs <- nil
			p.slots.release(d)
			return nil, fmt.Errorf("mapping a %d-byte chunk buffer: %w", chunk, err)
		}
	}
	return buf[:n], nil
}

// put returns a buffer d took.
func (p *chunkPool) put(d *download, buf []byte) {
	p.bufs <- buf[:0]
	p.slots.release(d)
}
