// Package cachetest opens a real cache in a temporary directory for tests:
// the store and state database on disk, mount.Fake for mounts, and the
// handles a test uses to arrange or check what the cache's methods do not
// reach. No root is needed.
package cachetest

import (
	"sync"
	"testing"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// Harness is an open cache and what it opened.
type Harness struct {
	Dir     string
	Cache   *cache.Cache
	State   *state.DB
	Store   *store.Store
	Mounter *mount.Fake

	closeOnce sync.Once
}

// Open opens a cache over dir with opt, with a new mount.Fake unless opt
// has a Mounter of that type; it is closed at cleanup. Opening dir again
// after Close is a restart of the node plugin.
func Open(t testing.TB, dir string, opt cache.Options) *Harness {
	t.Helper()
	h := &Harness{Dir: dir}
	var ok bool
	if h.Mounter, ok = opt.Mounter.(*mount.Fake); !ok {
		h.Mounter = mount.NewFake()
		opt.Mounter = h.Mounter
	}
	opt.Inspect = func(db *state.DB, st *store.Store) { h.State, h.Store = db, st }
	c, err := cache.Open(dir, opt)
	if err != nil {
		t.Fatalf("cache.Open(%s): %v", dir, err)
	}
	h.Cache = c
	// Runs before t.TempDir's removal: stop downloads, close the database
	// and give sealed directories their write bits back for non-root runs.
	t.Cleanup(func() {
		if err := h.Close(); err != nil {
			t.Errorf("closing the cache: %v", err)
		}
		MakeWritable(dir)
	})
	return h
}

// Close closes the cache once; later calls do nothing.
func (h *Harness) Close() error {
	var err error
	h.closeOnce.Do(func() { err = h.Cache.Close() })
	return err
}

// TreePath is where the store keeps a tree, as mounts name it.
func (h *Harness) TreePath(digest string) string { return h.Store.TreePath(digest) }

// MakeWritable restores the write bits of sealed directories under dir,
// so that a test run as a user other than root can remove them.
func MakeWritable(dir string) { storetest.MakeWritable(dir) }
