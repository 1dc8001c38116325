package csi

import (
	"context"
	"fmt"
	"time"

	"github.com/modelcache/modelcache/pkg/state"
	"k8s.io/klog/v2"
)

// Reconcile makes the state database and the tree directory agree after a
// start: records of trees that are gone from disk are dropped, and trees on
// disk that no record leads to (a crash between commit and record) are
// removed, since nothing can ever serve them. Each repair is logged.
func (n *Node) Reconcile() (forgotten, removed int, err error) {
	trees, err := n.State.CachedTrees()
	if err != nil {
		return 0, 0, fmt.Errorf("reading tree records: %w", err)
	}
	recorded := map[string]bool{}
	for _, t := range trees {
		recorded[t.Digest] = true
		if n.Store.HasTree(t.Digest) {
			continue
		}
		if err := n.State.ForgetTree(t.Digest); err != nil {
			return forgotten, removed, err
		}
		forgotten++
		klog.InfoS("repaired state: tree record without a tree on disk dropped", "tree", t.Digest, "uris", t.URIs)
	}
	onDisk, err := n.Store.TreeDigests()
	if err != nil {
		return forgotten, removed, err
	}
	for _, d := range onDisk {
		if recorded[d] {
			continue
		}
		if used, err := n.State.Referenced(d); err != nil || used {
			continue
		}
		if _, err := n.Store.RemoveTree(d); err != nil {
			return forgotten, removed, err
		}
		removed++
		klog.InfoS("repaired store: tree without a record removed", "tree", d)
	}
	return forgotten, removed, nil
}

// ReleaseStale waits grace, then releases references whose mount is still
// gone: kubelet never called unpublish for them (the node rebooted, or the
// pod was force-deleted while the driver was down), so nothing else would.
// The wait lets kubelet unpublish or republish them itself first.
func (n *Node) ReleaseStale(ctx context.Context, grace time.Duration, refs []state.Ref) {
	if len(refs) == 0 {
		return
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(grace):
	}
	for _, r := range refs {
		unlock := n.targets.Lock(r.TargetPath)
		cur, ok, err := n.State.Ref(r.TargetPath)
		if err == nil && ok && cur.Tree == r.Tree {
			live, err := n.Mounter.MountedFrom(r.TargetPath, n.Store.TreePath(r.Tree))
			if err == nil && !live {
				if err := n.State.DeleteRef(r.TargetPath); err == nil {
					klog.InfoS("released a reference whose mount was gone", "volume", r.VolumeID, "target", r.TargetPath, "tree", r.Tree, "grace", grace)
					n.releaseTree(r.Tree)
				}
			}
		}
		unlock()
	}
}
