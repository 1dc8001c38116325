package store

import (
	"context"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// chunkPool holds the node's ranged-chunk buffers: a fixed number, shared
// by every download, each mapped when first needed and reused. They are
// anonymous mappings outside the Go heap: 64 MiB of live buffers on the
// heap would double the garbage collector's target, and the plugin's peak
// RSS with it (161 MiB for a 4 GiB download, measured). When the last
// ranged download ends they are unmapped, and an idle node keeps none.
type chunkPool struct {
	slots chan []byte // one entry per buffer; nil until first used
	mu    sync.Mutex
	users int
}

func newChunkPool(buffers int) *chunkPool {
	p := &chunkPool{slots: make(chan []byte, buffers)}
	for range buffers {
		p.slots <- nil
	}
	return p
}

// size is how many buffers the node may hold.
func (p *chunkPool) size() int { return cap(p.slots) }

// use and unuse bracket one ranged download.
func (p *chunkPool) use() {
	p.mu.Lock()
	p.users++
	p.mu.Unlock()
}

func (p *chunkPool) unuse() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.users--; p.users > 0 {
		return
	}
	// Every buffer is back: nobody uses the pool.
	for range cap(p.slots) {
		if buf := <-p.slots; buf != nil {
			_ = unix.Munmap(buf[:cap(buf)])
		}
		p.slots <- nil
	}
}

// get takes a buffer of n bytes (at most chunk), waiting for one to be free.
func (p *chunkPool) get(ctx context.Context, n, chunk int64) ([]byte, error) {
	select {
	case buf := <-p.slots:
		if int64(cap(buf)) < n {
			if buf != nil {
				_ = unix.Munmap(buf[:cap(buf)])
			}
			var err error
			if buf, err = unix.Mmap(-1, 0, int(chunk), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS); err != nil {
				p.slots <- nil
				return nil, fmt.Errorf("mapping a %d-byte chunk buffer: %w", chunk, err)
			}
		}
		return buf[:n], nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// put returns a buffer.
func (p *chunkPool) put(buf []byte) { p.slots <- buf[:0] }
