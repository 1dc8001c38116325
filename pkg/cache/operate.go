package cache

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/units"
	"k8s.io/klog/v2"
)

// Tree is a cached model as an operator sees it.
type Tree struct {
	state.CachedTree
	Present bool // the tree directory exists
}

// Trees lists the cached trees, least recently used first.
func (c *Cache) Trees() ([]Tree, error) {
	all, err := c.state.CachedTrees()
	if err != nil {
		return nil, err
	}
	out := make([]Tree, 0, len(all))
	for _, t := range all {
		out = append(out, Tree{CachedTree: t, Present: c.store.HasTree(t.Digest)})
	}
	return out, nil
}

// Find resolves an operator's reference to one tree: a digest, a digest
// prefix of at least 12 hex digits, or a model URI the tree was fetched as.
// A whole digest is one lookup, whatever the number of trees; the others
// read every tree record.
func (c *Cache) Find(ref string) (Tree, error) {
	if ref == "" {
		return Tree{}, fmt.Errorf("%w: name a tree by digest (sha256:...) or by model URI", ErrNoTree)
	}
	if digest := "sha256:" + strings.TrimPrefix(ref, "sha256:"); store.ValidDigest(digest) {
		t, ok, err := c.state.CachedTree(digest)
		if err != nil || ok {
			return Tree{CachedTree: t, Present: c.store.HasTree(digest)}, err
		}
	}
	trees, err := c.Trees()
	if err != nil {
		return Tree{}, err
	}
	hex := strings.TrimPrefix(ref, "sha256:")
	var hits []Tree
	for _, t := range trees {
		byDigest := len(hex) >= 12 && strings.HasPrefix(strings.TrimPrefix(t.Digest, "sha256:"), hex)
		if byDigest || slices.Contains(t.URIs, ref) {
			hits = append(hits, t)
		}
	}
	switch len(hits) {
	case 0:
		return Tree{}, fmt.Errorf("%w %q (see modelcachectl ls)", ErrNoTree, ref)
	case 1:
		return hits[0], nil
	default:
		var ds []string
		for _, h := range hits {
			ds = append(ds, h.Digest)
		}
		return Tree{}, fmt.Errorf("%w %q: %s; name one by digest", ErrAmbiguous, ref, strings.Join(ds, ", "))
	}
}

// Files lists a tree's files with their sizes and sha256s.
func (c *Cache) Files(digest string) ([]TreeFile, error) { return c.store.TreeFiles(digest) }

// Pin protects a tree from eviction to make room (on) or lifts that.
func (c *Cache) Pin(ref string, on bool) (Tree, error) {
	t, err := c.Find(ref)
	if err != nil {
		return t, err
	}
	if err := c.state.SetPinned(t.Digest, on); err != nil {
		return t, err
	}
	klog.InfoS("pin changed", "tree", t.Digest, "pinned", on)
	t.Pinned = on
	return t, nil
}

// Evicted is what Evict did.
type Evicted struct {
	Tree    string
	Removed bool
	Freed   int64
	// Pending: in use, and doomed to go when its last mount goes.
	Pending bool
}

// Evict removes a tree an operator names, pinned or not. A tree pods
// mount is ErrInUse, unless whenUnused dooms it to go with its last mount.
func (c *Cache) Evict(ref string, whenUnused bool) (Evicted, error) {
	t, err := c.Find(ref)
	if err != nil {
		return Evicted{}, err
	}
	switch {
	case len(t.Refs) == 0:
		freed, removed, err := c.remove(t.Digest, EvictOperator)
		if err != nil || removed {
			return Evicted{Tree: t.Digest, Removed: removed, Freed: freed}, err
		}
		if !whenUnused {
			return Evicted{}, fmt.Errorf("%w: tree %s was mounted again meanwhile; pass --when-unused to remove it when its last mount goes", ErrInUse, t.Digest)
		}
	case !whenUnused:
		return Evicted{}, fmt.Errorf("%w: tree %s is mounted by %s; it cannot be removed under running pods: pass --when-unused to remove it when its last mount goes", ErrInUse, t.Digest, Users(t.Refs))
	}
	if err := c.doom(t.Digest, EvictOperator); err != nil {
		return Evicted{}, err
	}
	return Evicted{Tree: t.Digest, Pending: true}, nil
}

// GC enforces the cache budget as it stands, evicting least recently used
// trees no pod mounts and no pin protects; dryRun only says what would go.
// A budget that cannot be met is not an error: warning says why.
func (c *Cache) GC(dryRun bool) (plan Plan, warning string, err error) {
	plan, err = c.budget.makeRoom(0, dryRun)
	var noRoom *NoRoomError
	if errors.As(err, &noRoom) {
		return plan, noRoom.Error(), nil
	}
	return plan, "", err
}

// Drained is what Drain did.
type Drained struct {
	Removed []string
	Freed   int64
	// Pending are in use: doomed, they go when their last mount goes, even
	// if the node is undrained before that.
	Pending []string
}

// Drain empties the node's cache, pinned trees included, and stops new
// downloads until Undrain. Cached models are still served, and running
// downloads may still be joined.
func (c *Cache) Drain() (Drained, error) {
	res := Drained{Removed: []string{}, Pending: []string{}}
	if err := c.state.SetDrained(true); err != nil {
		return res, err
	}
	trees, err := c.state.CachedTrees()
	if err != nil {
		return res, err
	}
	for _, t := range trees {
		if len(t.Refs) == 0 {
			freed, removed, err := c.remove(t.Digest, EvictDrain)
			if err != nil {
				return res, err
			}
			if removed {
				res.Removed = append(res.Removed, t.Digest)
				res.Freed += freed
				continue
			}
		}
		if err := c.doom(t.Digest, EvictDrain); err != nil {
			return res, err
		}
		res.Pending = append(res.Pending, t.Digest)
	}
	// Interrupted downloads kept for resuming go too: a drained node holds
	// no model bytes it is not serving.
	freed, err := c.store.DropPartials(0)
	if err != nil {
		return res, err
	}
	res.Freed += freed
	klog.InfoS("node drained", "removed", len(res.Removed), "pending", len(res.Pending), "freed", units.Bytes(res.Freed))
	return res, nil
}

// Undrain lets downloads start again. Trees a drain doomed still go when
// their last mount goes, as the drain said.
func (c *Cache) Undrain() error {
	if err := c.state.SetDrained(false); err != nil {
		return err
	}
	klog.InfoS("node undrained")
	return nil
}

// IsDrained reports whether the node is drained.
func (c *Cache) IsDrained() (bool, error) { return c.state.Drained() }

// Verified is what Verify found and did.
type Verified struct {
	VerifyResult
	Removed     []string // damaged trees no pod used: removed
	Invalidated []string // damaged trees in use: no longer served, repaired by the next download
}

// Verify re-hashes every blob: corrupt blobs are quarantined, damaged trees
// no pod uses are removed, and damaged trees in use stop being served.
func (c *Cache) Verify() (Verified, error) {
	res, err := c.store.Verify()
	if err != nil {
		return Verified{}, err
	}
	out := Verified{VerifyResult: res, Removed: []string{}, Invalidated: []string{}}
	for _, d := range res.Damaged {
		used, err := c.state.Referenced(d)
		if err != nil {
			return out, err
		}
		if !used {
			if _, removed, err := c.remove(d, EvictCorrupt); err == nil && removed {
				out.Removed = append(out.Removed, d)
				continue
			}
		}
		if err := c.state.Invalidate(d); err != nil {
			return out, err
		}
		out.Invalidated = append(out.Invalidated, d)
	}
	return out, nil
}

// Usage is what the cache holds on disk.
func (c *Cache) Usage() (Usage, error) { return c.store.Usage() }

// remove unpins a tree (whoever names it, an operator or a drain, overrides
// a pin) and evicts it unless it is mounted by now.
func (c *Cache) remove(digest string, reason EvictReason) (freed int64, removed bool, err error) {
	if err := c.state.SetPinned(digest, false); err != nil && !errors.Is(err, state.ErrUnknownTree) {
		return 0, false, err
	}
	return c.budget.evict(digest, reason)
}

// doom marks a tree to go when its last mount goes, and unpins it.
func (c *Cache) doom(digest string, reason EvictReason) error {
	if err := c.state.SetPinned(digest, false); err != nil && !errors.Is(err, state.ErrUnknownTree) {
		return err
	}
	return c.state.Doom(digest, string(reason))
}

// Users names the pods (or volumes) of references, for messages.
func Users(refs []state.Ref) string {
	var out []string
	for _, r := range refs {
		who := r.VolumeID
		if r.PodName != "" {
			who = r.PodNS + "/" + r.PodName
		}
		out = append(out, who)
	}
	slices.Sort(out)
	return strings.Join(slices.Compact(out), ", ")
}
