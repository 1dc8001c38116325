package store

import (
	"context"
	"sync"
)

// fairSlots is a node-wide bound (connections to remotes, chunk buffers)
// shared fairly by the downloads using it: each may hold at most its share,
// the bound divided by the downloads using it, rounded up. A download that
// holds every slot it took on a stalled remote so never keeps a second one
// from starting, whatever its own streams do.
type fairSlots struct {
	mu      sync.Mutex
	size    int
	used    int
	held    map[*download]int // slots each download holds
	users   map[*download]int // downloads using the bound (join/leave)
	waiting map[*download]int // acquires within their share blocked by a full pool, per download
	changed chan struct{}     // closed and replaced on every change
}

func newFairSlots(size int) *fairSlots {
	return &fairSlots{size: size, held: map[*download]int{}, users: map[*download]int{}, waiting: map[*download]int{}, changed: make(chan struct{})}
}

// join counts d among the downloads sharing the bound until leave.
func (f *fairSlots) join(d *download) {
	f.mu.Lock()
	f.users[d]++
	f.notify()
	f.mu.Unlock()
}

// leave undoes one join; it reports whether no download uses the bound.
func (f *fairSlots) leave(d *download) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.users[d]--; f.users[d] <= 0 {
		delete(f.users, d)
	}
	f.notify()
	return len(f.users) == 0
}

// share is how many slots d may hold: a download that takes slots without
// joining counts as one more user.
func (f *fairSlots) share(d *download) int {
	n := len(f.users)
	if f.users[d] == 0 {
		n++
	}
	return max(1, (f.size+n-1)/n)
}

// acquire takes one slot for d, waiting until one is free and d holds
// less than its share.
func (f *fairSlots) acquire(ctx context.Context, d *download) error {
	f.mu.Lock()
	counted := false // in waiting
	defer func() {
		if counted {
			f.unwait(d)
		}
		f.mu.Unlock()
	}()
	for {
		within := f.held[d] < f.share(d)
		if within && f.used < f.size {
			break
		}
		// Only a wait a freed slot would end counts: holders then give
		// back what they can spare (pressed).
		if within != counted {
			counted = within
			if within {
				f.waiting[d]++
				f.notify()
			} else {
				f.unwait(d)
			}
		}
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
			f.mu.Lock()
		case <-ctx.Done():
			f.mu.Lock()
			return ctx.Err()
		}
	}
	f.used++
	f.held[d]++
	return nil
}

// release gives back one slot d took.
func (f *fairSlots) release(d *download) {
	f.mu.Lock()
	f.used--
	if f.held[d]--; f.held[d] <= 0 {
		delete(f.held, d)
	}
	f.notify()
	f.mu.Unlock()
}

// pressed reports whether d should give back slots it can spare: another
// download waits for a free slot within its share, or d holds more than
// its share. d's own streams waiting do not count: giving its buffers to
// itself would only trade them for reading the chunks back from the file.
func (f *fairSlots) pressed(d *download) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for w := range f.waiting {
		if w != d {
			return true
		}
	}
	return f.held[d] > f.share(d)
}

func (f *fairSlots) unwait(d *download) {
	if f.waiting[d]--; f.waiting[d] <= 0 {
		delete(f.waiting, d)
	}
}

// changes is closed at the next change of the slots (take it before
// looking at pressed, so no change is missed).
func (f *fairSlots) changes() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.changed
}

// inUse is how many slots are taken.
func (f *fairSlots) inUse() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.used
}

func (f *fairSlots) notify() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// downloadKey carries the *download a context belongs to.
type downloadKey struct{}

// withDownload returns ctx carrying d, so the node's bounds know whose
// request takes a slot.
func withDownload(ctx context.Context, d *download) context.Context {
	return context.WithValue(ctx, downloadKey{}, d)
}

// downloadOf is the download ctx belongs to; nil (one shared user) for
// requests outside any.
func downloadOf(ctx context.Context) *download {
	d, _ := ctx.Value(downloadKey{}).(*download)
	return d
}
