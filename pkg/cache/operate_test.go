package cache_test

// Unit tests of the cache's lifecycle across restarts and releases: trees
// removed at their last release, start-up reconciliation, stale
// references. Fake remote and mounter, real store and state.

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/cache/cachetest"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

const otherURI = "mys3:models/resnet"

// otherFiles is a second model, with nothing in common with files().
func otherFiles() map[string][]byte {
	return map[string][]byte{
		"config.json": []byte(`{"arch":"resnet50"}`),
		"weights.bin": []byte(strings.Repeat("resnet weights ", 500)),
	}
}

// target is a pod's target path.
func (h *harness) target(pod string) string { return filepath.Join(h.dir, "pods", pod, "mount") }

// wantMounted checks that target is mounted from the tree with digest.
func (h *harness) wantMounted(target, digest string) {
	h.t.Helper()
	got, ok := h.mnt.Mounts()[target]
	if !ok {
		h.t.Fatalf("%s is not mounted; mounts: %v", target, h.mnt.Mounts())
	}
	if want := h.TreePath(digest); got != want {
		h.t.Fatalf("%s is mounted from %s, want %s", target, got, want)
	}
}

func (h *harness) setDrained(on bool) {
	h.t.Helper()
	if err := h.state.SetDrained(on); err != nil {
		h.t.Fatal(err)
	}
}

// A tree marked to go (evict --when-unused) or on a drained node goes with
// its last mount, and not before.
func TestTreeReleasedAtLastRelease(t *testing.T) {
	tests := []struct {
		name     string
		doom     bool
		drain    bool
		pin      bool
		wantGone bool
	}{
		{name: "neither doomed nor drained"},
		{name: "doomed", doom: true, wantGone: true},
		{name: "drained", drain: true, wantGone: true},
		{name: "pinned", pin: true},
		{name: "doomed and pinned", doom: true, pin: true, wantGone: true},
		{name: "drained and pinned", drain: true, pin: true, wantGone: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := sourcetest.NewResolver()
			res.SetModel(modelURI, files())
			res.SetModel(otherURI, otherFiles())
			h := newHarness(t, t.TempDir(), res, mount.NewFake())
			digest := storetest.TreeDigestOf(files())
			other := storetest.TreeDigestOf(otherFiles())
			a, b := h.target("pod-a"), h.target("pod-b")
			h.fetchAndMount(modelURI, a)
			h.fetchAndMount(modelURI, b)
			h.fetchAndMount(otherURI, h.target("pod-o"))
			if tt.pin {
				if err := h.state.SetPinned(digest, true); err != nil {
					t.Fatal(err)
				}
			}
			if tt.doom {
				if err := h.state.Doom(digest, "operator"); err != nil {
					t.Fatal(err)
				}
			}
			if tt.drain {
				h.setDrained(true)
			}

			h.release(a)
			if !h.store.HasTree(digest) {
				t.Fatal("the tree was removed while another pod still mounts it")
			}
			h.wantMounted(b, digest)
			h.release(b)
			if gone := !h.store.HasTree(digest); gone != tt.wantGone {
				t.Fatalf("tree removed at its last release = %v, want %v", gone, tt.wantGone)
			}
			_, recorded, err := h.state.CachedTree(digest)
			if err != nil || recorded == tt.wantGone {
				t.Errorf("tree still recorded = %v (%v), want %v", recorded, err, !tt.wantGone)
			}
			if !h.store.HasTree(other) {
				t.Error("a tree still mounted elsewhere was removed")
			}
			// A release of an unknown target releases nothing.
			h.release(h.target("pod-x"))
			if !h.store.HasTree(other) {
				t.Error("releasing an unknown target removed a tree")
			}
		})
	}
}

// Reconcile makes records and tree directories agree after a start.
func TestReconcile(t *testing.T) {
	res := sourcetest.NewResolver()
	h := newHarness(t, t.TempDir(), res, mount.NewFake())
	ctx := context.Background()
	// Four trees: recorded and on disk; recorded, not on disk; on disk
	// without a record; on disk without a record but mounted.
	models := map[string]map[string][]byte{
		"kept":     files(),
		"lost":     otherFiles(),
		"orphan":   {"orphan.bin": []byte(strings.Repeat("orphan ", 100))},
		"attached": {"attached.bin": []byte(strings.Repeat("attached ", 100))},
	}
	digests := map[string]string{}
	for name, fs := range models {
		uri := "mys3:models/" + name
		res.SetModel(uri, fs)
		r := h.remote(uri, secrets())
		m, err := r.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		tr, _, err := h.store.Ensure(ctx, "key-"+name, m, r)
		if err != nil {
			t.Fatal(err)
		}
		digests[name] = tr.Digest
	}
	lost := h.TreePath(digests["lost"])
	cachetest.MakeWritable(lost)
	if err := os.RemoveAll(lost); err != nil {
		t.Fatal(err)
	}
	if err := h.state.AddRef(state.Ref{VolumeID: "vol-att", TargetPath: h.target("att"), Tree: digests["attached"], URI: modelURI, Published: time.Now()}, ""); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"orphan", "attached"} {
		if err := h.state.ForgetTree(digests[name]); err != nil {
			t.Fatal(err)
		}
	}

	forgotten, removed, err := h.cache.Reconcile()
	if err != nil || forgotten != 1 || removed != 1 {
		t.Fatalf("Reconcile = %d forgotten, %d removed, %v; want 1, 1", forgotten, removed, err)
	}
	tests := []struct {
		name                 string
		onDisk, wantRecorded bool
	}{
		{"kept", true, true},
		{"lost", false, false},
		{"orphan", false, false},
		{"attached", true, false},
	}
	for _, tt := range tests {
		if got := h.store.HasTree(digests[tt.name]); got != tt.onDisk {
			t.Errorf("%s: on disk = %v, want %v", tt.name, got, tt.onDisk)
		}
		_, rec, err := h.state.CachedTree(digests[tt.name])
		if err != nil || rec != tt.wantRecorded {
			t.Errorf("%s: recorded = %v (%v), want %v", tt.name, rec, err, tt.wantRecorded)
		}
	}
	if _, ok, _ := h.state.TreeForKey("key-lost"); ok {
		t.Error("the content key of a lost tree still leads to it")
	}
	// The orphan's blob went with it.
	if _, err := os.Stat(filepath.Join(h.dir, store.BlobsDir, sourcetest.Sha256Hex(models["orphan"]["orphan.bin"]))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("orphan tree's blob still there (%v)", err)
	}
	if f, r, err := h.cache.Reconcile(); err != nil || f != 0 || r != 0 {
		t.Errorf("second Reconcile = %d, %d, %v; want nothing to do", f, r, err)
	}
}

// ReleaseStale drops references whose mount stayed gone, and only those.
func TestReleaseStale(t *testing.T) {
	tests := []struct {
		name      string
		grace     time.Duration
		cancelled bool
		drained   bool
		wantRefs  []string // pods still referenced afterwards
	}{
		{name: "grace 0", wantRefs: []string{"a", "c"}},
		{name: "context ended first", grace: time.Hour, cancelled: true, wantRefs: []string{"a", "b", "c"}},
		{name: "drained node", drained: true, wantRefs: []string{"a", "c"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := sourcetest.NewResolver()
			res.SetModel(modelURI, files())
			h := newHarness(t, t.TempDir(), res, mount.NewFake())
			for _, p := range []string{"a", "b", "c"} {
				h.fetchAndMount(modelURI, h.target(p))
			}
			// A reboot loses b's and c's mounts; kubelet publishes c again.
			h.mnt.Forget(h.target("b"))
			h.mnt.Forget(h.target("c"))
			live, gone, err := h.cache.Recover()
			if err != nil || live != 1 || len(gone) != 2 {
				t.Fatalf("Recover = %d live, %d gone, %v", live, len(gone), err)
			}
			h.fetchAndMount(modelURI, h.target("c"))
			h.setDrained(tt.drained)

			ctx, cancel := context.WithCancel(context.Background())
			if tt.cancelled {
				cancel()
			}
			defer cancel()
			returned := make(chan struct{})
			go func() {
				h.cache.ReleaseStale(ctx, tt.grace, gone)
				close(returned)
			}()
			sourcetest.Recv(t, returned, waitLimit, "ReleaseStale")

			var pods []string
			refs, err := h.state.Refs()
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range refs {
				pods = append(pods, strings.TrimPrefix(r.VolumeID, "vol-"))
			}
			slices.Sort(pods)
			if !slices.Equal(pods, tt.wantRefs) {
				t.Errorf("references after ReleaseStale: %v, want %v", pods, tt.wantRefs)
			}
			if !h.store.HasTree(storetest.TreeDigestOf(files())) {
				t.Error("a tree still mounted was removed")
			}
			h.wantMounted(h.target("a"), storetest.TreeDigestOf(files()))
			h.wantMounted(h.target("c"), storetest.TreeDigestOf(files()))
		})
	}
	t.Run("drained node, last reference", func(t *testing.T) {
		res := sourcetest.NewResolver()
		res.SetModel(modelURI, files())
		h := newHarness(t, t.TempDir(), res, mount.NewFake())
		target := h.target("a")
		h.fetchAndMount(modelURI, target)
		h.mnt.Forget(target)
		_, gone, err := h.cache.Recover()
		if err != nil || len(gone) != 1 {
			t.Fatalf("Recover = %d gone, %v", len(gone), err)
		}
		h.setDrained(true)
		h.cache.ReleaseStale(context.Background(), 0, gone)
		if _, ok, _ := h.state.Ref(target); ok {
			t.Error("stale reference kept")
		}
		if h.store.HasTree(storetest.TreeDigestOf(files())) {
			t.Error("a drained node kept a tree whose last reference was released")
		}
	})
}
