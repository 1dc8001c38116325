package cache

import (
	"context"
	"fmt"
	"time"

	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"k8s.io/klog/v2"
)

// LockTarget serialises the operations on one target path (kubelet may
// publish and unpublish one target concurrently on retries) while other
// targets proceed, and returns the unlock function.
func (c *Cache) LockTarget(target string) (unlock func()) { return c.targets.Lock(target) }

// Published applies the CSI idempotency rules to a target, under its lock:
// the same volume with the same arguments at a live mount is published
// (true); anything else live there is ErrConflict. A recorded target whose
// mount is gone is not published and may be published again.
func (c *Cache) Published(target, volumeID, argsHash string) (bool, error) {
	ref, ok, err := c.State.Ref(target)
	if err != nil || !ok {
		return false, err
	}
	live, err := c.Mounter.MountedFrom(target, c.Store.TreePath(ref.Tree))
	if err != nil {
		return false, fmt.Errorf("checking mount at %s: %w", target, err)
	}
	if !live {
		return false, nil
	}
	if ref.VolumeID != volumeID || ref.ArgsHash != argsHash {
		return false, fmt.Errorf("target %s already has volume %s %w", target, ref.VolumeID, ErrConflict)
	}
	return true, nil
}

// Acquire mounts a fetched tree read-only at ref.TargetPath and records the
// reference (with the fetch's source, in the same transaction), under the
// store's tree lock: no eviction can remove the tree between the lookup and
// the reference that protects it. The caller holds the target's lock.
func (c *Cache) Acquire(f Fetched, ref state.Ref) error {
	ref.Tree = f.Tree.Digest
	err := c.Store.UseTree(ref.Tree, func() error {
		if err := c.Mounter.BindReadOnly(c.Store.TreePath(ref.Tree), ref.TargetPath); err != nil {
			return fmt.Errorf("mounting tree %s at %s: %w", ref.Tree, ref.TargetPath, err)
		}
		if err := c.State.AddRef(ref, f.sourceKey); err != nil {
			// Without a record the mount could not be found again after a restart.
			if uerr := c.Mounter.Unpublish(ref.TargetPath); uerr != nil {
				klog.ErrorS(uerr, "rolling back mount after state failure", "target", ref.TargetPath)
			}
			return fmt.Errorf("recording the mount of %s: %w", ref.TargetPath, err)
		}
		return nil
	})
	if store.IsNoTree(err) {
		return fmt.Errorf("%w: %v", ErrEvictedMeanwhile, err)
	}
	return err
}

// Release unmounts a target, removes its directory and forgets its
// reference; an unknown or unmounted target is not an error (the
// "idempotent publish" invariant). A tree whose last mount this was counts
// as just used, and goes now if an operator or a drain doomed it. The
// caller holds the target's lock.
func (c *Cache) Release(target string) error {
	if err := c.Mounter.Unpublish(target); err != nil {
		return fmt.Errorf("unpublishing %s: %w", target, err)
	}
	// A tree a pod used until now is recently used, however long ago it
	// was published, when evictions are ordered.
	rel, err := c.State.ReleaseRef(target, time.Now())
	if err != nil {
		return fmt.Errorf("forgetting %s after unmount: %w", target, err)
	}
	c.afterRelease(rel)
	return nil
}

// afterRelease removes a tree whose last reference just went if it is
// doomed (evict --when-unused, or a drain, even one undone since: the
// operator was told it goes) or the node is drained now. Failing here does
// not fail the unpublish: gc or drain find the tree again.
func (c *Cache) afterRelease(rel state.Released) {
	if !rel.Known || !rel.Last {
		return
	}
	reason := store.EvictReason(rel.Doomed)
	if rel.Drained {
		reason = store.EvictDrain
	}
	if reason == "" {
		return
	}
	if _, _, err := c.remove(rel.Ref.Tree, reason); err != nil {
		klog.ErrorS(err, "removing tree after its last mount", "tree", rel.Ref.Tree, "reason", reason)
	}
}

// Recover checks every recorded reference against the kernel's mounts after
// a restart (the "mounts survive restarts" invariant). Live mounts are kept
// as they are; references whose mount is gone are returned: they stay
// recorded, protecting their trees, until kubelet unpublishes them or
// ReleaseStale gives up on them.
func (c *Cache) Recover() (live int, gone []state.Ref, err error) {
	refs, err := c.State.Refs()
	if err != nil {
		return 0, nil, fmt.Errorf("reading references: %w", err)
	}
	for _, r := range refs {
		ok, err := c.Mounter.MountedFrom(r.TargetPath, c.Store.TreePath(r.Tree))
		if err != nil {
			return live, gone, err
		}
		if ok {
			live++
			continue
		}
		gone = append(gone, r)
		klog.InfoS("reference without a mount; kept until kubelet unpublishes it or the grace period ends", "volume", r.VolumeID, "target", r.TargetPath, "tree", r.Tree)
	}
	return live, gone, nil
}

// ReleaseStale waits grace, then releases references whose mount is still
// gone: kubelet never called unpublish for them (the node rebooted, or the
// pod was force-deleted while the driver was down), so nothing else would.
// The wait lets kubelet unpublish or republish them itself first.
func (c *Cache) ReleaseStale(ctx context.Context, grace time.Duration, refs []state.Ref) {
	if len(refs) == 0 {
		return
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(grace):
	}
	for _, r := range refs {
		unlock := c.LockTarget(r.TargetPath)
		cur, ok, err := c.State.Ref(r.TargetPath)
		if err == nil && ok && cur.Tree == r.Tree {
			live, err := c.Mounter.MountedFrom(r.TargetPath, c.Store.TreePath(r.Tree))
			if err == nil && !live {
				// Not a use: nothing has used the tree since the restart.
				if rel, err := c.State.ReleaseRef(r.TargetPath, time.Time{}); err == nil {
					klog.InfoS("released a reference whose mount was gone", "volume", r.VolumeID, "target", r.TargetPath, "tree", r.Tree, "grace", grace)
					c.afterRelease(rel)
				}
			}
		}
		unlock()
	}
}

// Reconcile makes the state database and the tree directory agree after a
// start: records of trees that are gone from disk are dropped, and trees on
// disk that no record leads to (a crash between commit and record) are
// removed, since nothing can ever serve them. Each repair is logged.
func (c *Cache) Reconcile() (forgotten, removed int, err error) {
	trees, err := c.State.CachedTrees()
	if err != nil {
		return 0, 0, fmt.Errorf("reading tree records: %w", err)
	}
	recorded := map[string]bool{}
	for _, t := range trees {
		recorded[t.Digest] = true
		if c.Store.HasTree(t.Digest) {
			continue
		}
		if err := c.State.ForgetTree(t.Digest); err != nil {
			return forgotten, removed, err
		}
		forgotten++
		klog.InfoS("repaired state: tree record without a tree on disk dropped", "tree", t.Digest, "uris", t.URIs)
	}
	onDisk, err := c.Store.TreeDigests()
	if err != nil {
		return forgotten, removed, err
	}
	for _, d := range onDisk {
		if recorded[d] {
			continue
		}
		if used, err := c.State.Referenced(d); err != nil || used {
			continue
		}
		if _, err := c.Store.RemoveTree(d); err != nil {
			return forgotten, removed, err
		}
		removed++
		klog.InfoS("repaired store: tree without a record removed", "tree", d)
	}
	// Objects whose blob went with an evicted tree would only cost a
	// failed link each; forget them so the index does not grow forever.
	pruned, err := c.State.PruneObjects(c.Store.HasBlob)
	if err != nil {
		return forgotten, removed, fmt.Errorf("pruning the object index: %w", err)
	}
	if pruned > 0 {
		klog.InfoS("object index pruned: blobs no longer in the store", "objects", pruned)
	}
	return forgotten, removed, nil
}

// Volume is a published target as NodeGetVolumeStats reports it.
type Volume struct {
	Ref         state.Ref
	Size        int64
	Files       int
	TreePresent bool // the tree is still in the store
	Mounted     bool // the target is a live mount of the tree
}

// Volume returns what is published at a target, if anything is recorded.
func (c *Cache) Volume(target string) (Volume, bool, error) {
	ref, ok, err := c.State.Ref(target)
	if err != nil || !ok {
		return Volume{}, false, err
	}
	rec, _, err := c.State.Tree(ref.Tree)
	if err != nil {
		return Volume{}, false, fmt.Errorf("reading tree %s: %w", ref.Tree, err)
	}
	v := Volume{Ref: ref, Size: rec.Size, Files: rec.Files, TreePresent: c.Store.HasTree(ref.Tree)}
	live, err := c.Mounter.MountedFrom(ref.TargetPath, c.Store.TreePath(ref.Tree))
	v.Mounted = err == nil && live
	return v, true, nil
}
