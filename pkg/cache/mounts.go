package cache

import (
	"context"
	"fmt"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"k8s.io/klog/v2"
)

// PublishRequest is a volume to publish at a target.
type PublishRequest struct {
	Target   string // absolute and clean
	VolumeID string
	// ArgsHash identifies the request's arguments: the same volume at the
	// same target with other arguments is ErrConflict.
	ArgsHash string
	URI      string
	// Resolve returns the model's remote with the request's credentials;
	// it is called only when the target is not published already.
	Resolve func(ctx context.Context) (source.Remote, error)
	// Policy and Digest are as in FetchRequest.
	Policy, Digest string
	// The pod the volume is for, when kubelet says.
	PodName, PodNamespace, PodUID string
	// Observer may be nil.
	Observer Observer
}

// Publication is what PublishVolume did.
type Publication struct {
	Tree ModelTree
	// Fetched: the cache was looked up, with Hit and Joined as in
	// Fetched; false when the target was published already.
	Fetched     bool
	Hit, Joined bool
}

// PublishVolume publishes a model read-only at a target: under the
// target's lock (kubelet may publish and unpublish one target
// concurrently on retries), the CSI idempotency rules, the fetch, the mount
// and the reference record. A target published already with the same
// volume and arguments is done; with others it is ErrConflict.
func (c *Cache) PublishVolume(ctx context.Context, req PublishRequest) (Publication, error) {
	unlock := c.targets.Lock(req.Target)
	defer unlock()
	if done, err := c.published(req.Target, req.VolumeID, req.ArgsHash); done || err != nil {
		return Publication{}, err
	}
	remote, err := req.Resolve(ctx)
	if err != nil {
		return Publication{}, err
	}
	f, err := c.Fetch(ctx, FetchRequest{URI: req.URI, Remote: remote, Policy: req.Policy, Digest: req.Digest, Observer: req.Observer})
	if err != nil {
		return Publication{}, err
	}
	pub := Publication{Tree: f.Tree, Fetched: true, Hit: f.Hit, Joined: f.Joined}
	ref := state.Ref{
		VolumeID: req.VolumeID, TargetPath: req.Target, ArgsHash: req.ArgsHash, URI: req.URI,
		PodName: req.PodName, PodNS: req.PodNamespace, PodUID: req.PodUID, Published: time.Now(),
	}
	return pub, c.acquire(f, ref)
}

// published applies the CSI idempotency rules to a target, under its lock:
// the same volume with the same arguments at a live mount is published
// (true); anything else live there is ErrConflict. A recorded target whose
// mount is gone is not published and may be published again.
func (c *Cache) published(target, volumeID, argsHash string) (bool, error) {
	ref, ok, err := c.state.Ref(target)
	if err != nil || !ok {
		return false, err
	}
	live, err := c.mounter.MountedFrom(target, c.store.TreePath(ref.Tree))
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

// acquire mounts a fetched tree read-only at ref.TargetPath and records the
// reference (with the fetch's source, in the same transaction), under the
// store's tree lock: no eviction can remove the tree between the lookup and
// the reference that protects it. The caller holds the target's lock.
func (c *Cache) acquire(f Fetched, ref state.Ref) error {
	ref.Tree, ref.Revision = f.Tree.Digest, f.Revision
	err := c.store.UseTree(ref.Tree, func() error {
		if err := c.mounter.BindReadOnly(c.store.TreePath(ref.Tree), ref.TargetPath); err != nil {
			return fmt.Errorf("mounting tree %s at %s: %w", ref.Tree, ref.TargetPath, err)
		}
		if err := c.state.AddRef(ref, f.sourceKey); err != nil {
			// Without a record the mount could not be found again after a restart.
			if uerr := c.mounter.Unpublish(ref.TargetPath); uerr != nil {
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

// ReleaseTarget unmounts a target, removes its directory and forgets its
// reference, under the target's lock; an unknown or unmounted target is
// not an error (the "idempotent publish" invariant). A tree whose last
// mount this was counts as just used, and goes now if an operator or a
// drain doomed it.
func (c *Cache) ReleaseTarget(target string) error {
	unlock := c.targets.Lock(target)
	defer unlock()
	if err := c.mounter.Unpublish(target); err != nil {
		return fmt.Errorf("unpublishing %s: %w", target, err)
	}
	// A tree a pod used until now is recently used, however long ago it
	// was published, when evictions are ordered.
	rel, err := c.state.ReleaseRef(target, time.Now())
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
	reason := EvictReason(rel.Doomed)
	if rel.Drained {
		reason = EvictDrain
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
	refs, err := c.state.Refs()
	if err != nil {
		return 0, nil, fmt.Errorf("reading references: %w", err)
	}
	for _, r := range refs {
		ok, err := c.mounter.MountedFrom(r.TargetPath, c.store.TreePath(r.Tree))
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
		unlock := c.targets.Lock(r.TargetPath)
		cur, ok, err := c.state.Ref(r.TargetPath)
		if err == nil && ok && cur.Tree == r.Tree {
			live, err := c.mounter.MountedFrom(r.TargetPath, c.store.TreePath(r.Tree))
			if err == nil && !live {
				// Not a use: nothing has used the tree since the restart.
				if rel, err := c.state.ReleaseRef(r.TargetPath, time.Time{}); err == nil {
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
	trees, err := c.state.CachedTrees()
	if err != nil {
		return 0, 0, fmt.Errorf("reading tree records: %w", err)
	}
	recorded := map[string]bool{}
	for _, t := range trees {
		recorded[t.Digest] = true
		if c.store.HasTree(t.Digest) {
			continue
		}
		if err := c.state.ForgetTree(t.Digest); err != nil {
			return forgotten, removed, err
		}
		forgotten++
		klog.InfoS("repaired state: tree record without a tree on disk dropped", "tree", t.Digest, "uris", t.URIs)
	}
	onDisk, err := c.store.TreeDigests()
	if err != nil {
		return forgotten, removed, err
	}
	for _, d := range onDisk {
		if recorded[d] {
			continue
		}
		if used, err := c.state.Referenced(d); err != nil || used {
			continue
		}
		if _, err := c.store.RemoveTree(d); err != nil {
			return forgotten, removed, err
		}
		removed++
		klog.InfoS("repaired store: tree without a record removed", "tree", d)
	}
	return forgotten, removed, nil
}

// PruneObjects forgets the object index entries whose blob went with an
// evicted tree: each would only cost a failed link, but the index would
// grow forever. It looks up one blob per entry, so it grows with every
// object the node ever downloaded; the node plugin runs it after it
// serves, not before (start-up to serving stays independent of the cache's
// size). It reads without blocking writers, and a blob recorded meanwhile
// by a download is kept.
func (c *Cache) PruneObjects() (int, error) {
	pruned, err := c.state.PruneObjects(c.store.HasBlob)
	if err != nil {
		return pruned, fmt.Errorf("pruning the object index: %w", err)
	}
	if pruned > 0 {
		klog.InfoS("object index pruned: blobs no longer in the store", "objects", pruned)
	}
	return pruned, nil
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
	ref, ok, err := c.state.Ref(target)
	if err != nil || !ok {
		return Volume{}, false, err
	}
	rec, _, err := c.state.Tree(ref.Tree)
	if err != nil {
		return Volume{}, false, fmt.Errorf("reading tree %s: %w", ref.Tree, err)
	}
	v := Volume{Ref: ref, Size: rec.Size, Files: rec.Files, TreePresent: c.store.HasTree(ref.Tree)}
	live, err := c.mounter.MountedFrom(ref.TargetPath, c.store.TreePath(ref.Tree))
	v.Mounted = err == nil && live
	return v, true, nil
}
