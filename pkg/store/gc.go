package store

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path"
	"slices"
	"syscall"

	"github.com/modelcache/modelcache/pkg/units"
	"k8s.io/klog/v2"
)

// QuarantineDir holds blobs that failed verification; nothing in it is
// ever linked into a tree again.
const QuarantineDir = "quarantine"

// Budget limits what the cache may hold. Zero fields are no limit.
type Budget struct {
	MaxBytes        int64   // bytes of blobs the cache may hold
	MaxFraction     float64 // of the cache filesystem's size
	MinFreeBytes    int64   // bytes the filesystem keeps free
	MinFreeFraction float64 // of the filesystem's size kept free
	// MinFreeInodes is the fraction of the filesystem's inodes kept free:
	// a model of many small files can run out of inodes long before bytes.
	MinFreeInodes float64
}

// Candidate is a tree that may be evicted.
type Candidate struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// Held is what trees that may not be evicted hold, for the message of a
// cache that cannot make room.
type Held struct {
	InUseTrees, PinnedTrees int
	InUseBytes, PinnedBytes int64
}

// Evictor knows which trees are in use or pinned, which pkg/store does not.
// pkg/state implements it.
type Evictor interface {
	// Candidates returns the evictable trees, least recently used first.
	Candidates() ([]Candidate, Held, error)
	// Protected reports whether a tree is in use or pinned now. It is asked
	// again under the store's tree lock, just before removal.
	Protected(digest string) (bool, error)
	// Forget drops the records of a removed tree.
	Forget(digest string) error
}

// NoRoomError says the budget cannot be met without touching trees that are
// in use or pinned.
type NoRoomError struct {
	Need, Limit, Used int64
	Free, MinFree     int64
	Held              Held
	// Inodes: set when inodes, not bytes, are short.
	NeedInodes, FreeInodes, MinFreeInodes int64
}

func (e *NoRoomError) Error() string {
	if e.NeedInodes > 0 {
		return fmt.Sprintf("%s: the download needs %d inodes (a file or directory each); the filesystem has %d free and keeps %d free (--min-free-inodes); %d in-use trees hold %s and %d pinned trees hold %s, and nothing else can be evicted",
			ErrNoSpace, e.NeedInodes, e.FreeInodes, e.MinFreeInodes,
			e.Held.InUseTrees, units.Bytes(e.Held.InUseBytes), e.Held.PinnedTrees, units.Bytes(e.Held.PinnedBytes))
	}
	return fmt.Sprintf("%s: the download needs %s; the cache holds %s of its %s budget and the filesystem has %s free (keeping %s free); %d in-use trees hold %s and %d pinned trees hold %s, and nothing else can be evicted",
		ErrNoSpace, units.Bytes(e.Need), units.Bytes(e.Used), budgetText(e.Limit), units.Bytes(e.Free), units.Bytes(e.MinFree),
		e.Held.InUseTrees, units.Bytes(e.Held.InUseBytes), e.Held.PinnedTrees, units.Bytes(e.Held.PinnedBytes))
}

func (e *NoRoomError) Unwrap() error { return ErrNoSpace }

func budgetText(limit int64) string {
	if limit <= 0 {
		return "unlimited"
	}
	return units.Bytes(limit)
}

// RemoveTree deletes a tree and every blob no other tree links, and
// returns the bytes freed. The caller has checked the tree is not in use.
func (s *Store) RemoveTree(digest string) (int64, error) {
	if !ValidDigest(digest) {
		return 0, fmt.Errorf("invalid tree digest %q", digest)
	}
	s.treesMu.Lock()
	defer s.treesMu.Unlock()
	return s.removeTreeLocked(digest)
}

// removeTreeLocked removes a tree, then the blobs its list names and the
// loose ones that nothing links any more: it reads its own list and
// states those blobs, never all of blobs/.
func (s *Store) removeTreeLocked(digest string) (int64, error) {
	hex := digest[len("sha256:"):]
	s.tally.changing.RLock()
	defer s.tally.changing.RUnlock()
	present := s.HasTree(digest)
	l, listed, err := s.readTreeBlobs(hex)
	if err != nil {
		return 0, err
	}
	if present && !listed {
		// Its list was lost: made again at the cost of a read of blobs/.
		blobs, err := s.scanBlobs(true)
		if err != nil {
			return 0, err
		}
		if l, err = s.listTree(hex, blobs.byIno); err != nil {
			return 0, err
		}
	}
	if err := removeAll(s.root, path.Join(TreesDir, hex)); err != nil {
		return 0, fmt.Errorf("removing tree %s: %w", digest, err)
	}
	if err := s.syncDir(TreesDir); err != nil {
		return 0, err
	}
	if present {
		s.tally.add(func(c *Counts) { c.Trees--; c.TreeBytes -= l.bytes })
	}
	// The list goes after the tree: a crash between leaves a list Open drops.
	if err := s.root.Remove(path.Join(TreeBlobsDir, hex)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("removing the list of tree %s: %w", digest, err)
	}
	return s.sweepBlobs(l.blobs)
}

// sweepBlobs removes those of the named blobs, and of the loose ones, that
// no tree and no ingest file links: a blob's link count is one plus its
// users, so no index is needed and none can drift. An ingest racing this
// sweep re-commits its own copy (buildTree). The caller holds
// tally.changing for reading.
func (s *Store) sweepBlobs(names []string) (int64, error) {
	check := s.tally.takeLoose()
	if check == nil {
		check = map[string]bool{}
	}
	for _, n := range names {
		check[n] = true
	}
	var freed int64
	removed := 0
	for sum := range check {
		delete(check, sum)
		name := path.Join(BlobsDir, sum)
		fi, err := s.root.Lstat(name)
		if err != nil || nlink(fi) != 1 {
			continue
		}
		if err := s.root.Remove(name); err != nil {
			check[sum] = true
			s.tally.markLoose(slices.Collect(maps.Keys(check))...)
			return freed, fmt.Errorf("removing unused blob %s: %w", sum, err)
		}
		s.tally.add(func(c *Counts) { c.Blobs--; c.BlobBytes -= fi.Size() })
		freed += fi.Size()
		removed++
	}
	if removed == 0 {
		return 0, nil
	}
	return freed, s.syncDir(BlobsDir)
}

// EvictReason says why a tree left the cache; the values are also the
// reason label of the eviction metrics.
type EvictReason string

// Eviction reasons.
const (
	EvictBudget   EvictReason = "budget"   // the cache was over its size budget
	EvictOperator EvictReason = "operator" // modelcachectl evict
	EvictDrain    EvictReason = "drain"    // modelcachectl drain
	EvictCorrupt  EvictReason = "corrupt"  // modelcachectl verify found it damaged
)

// EvictReasons lists every EvictReason.
var EvictReasons = []EvictReason{EvictBudget, EvictOperator, EvictDrain, EvictCorrupt}

// Evict removes one tree unless it became protected, under the tree lock.
func (s *Store) Evict(digest string, reason EvictReason) (freed int64, removed bool, err error) {
	s.treesMu.Lock()
	defer s.treesMu.Unlock()
	if s.evictor != nil {
		if p, err := s.evictor.Protected(digest); err != nil || p {
			return 0, false, err
		}
	}
	if freed, err = s.removeTreeLocked(digest); err != nil {
		return freed, false, err
	}
	if s.evictor != nil {
		if err := s.evictor.Forget(digest); err != nil {
			return freed, true, fmt.Errorf("forgetting evicted tree %s: %w", digest, err)
		}
	}
	if s.onEvict != nil {
		s.onEvict(reason, freed)
	}
	klog.InfoS("tree evicted", "tree", digest, "reason", reason, "freed", units.Bytes(freed))
	return freed, true, nil
}

// Plan is what enforcing the budget removes, or would remove.
type Plan struct {
	Evicted []Candidate `json:"evicted"`
	Freed   int64       `json:"freed"`
	Over    int64       `json:"over"` // bytes still over budget afterwards
	// OverInodes: inodes still short of the free inodes kept afterwards.
	OverInodes int64 `json:"overInodes,omitempty"`
}

// MakeRoom evicts least recently used, unprotected trees until need more
// bytes fit the budget, and returns a *NoRoomError when they cannot. With
// need 0 it enforces the budget as it stands (modelcachectl gc). dryRun
// reports what would go without removing anything.
func (s *Store) MakeRoom(need int64, dryRun bool) (Plan, error) {
	s.gcMu.Lock()
	defer s.gcMu.Unlock()
	var plan Plan
	unlinked := map[uint64]int64{} // dry run: inode → links the planned removals drop
	// Candidates are listed only once something must go: a download into
	// a cache with room reads no tree records.
	var cands []Candidate
	var held Held
	listed := false
	// The store's running count: what each eviction frees is known.
	used := s.StoredBytes()
	for {
		// One statfs and one look at the running downloads serve the
		// bytes and the inodes.
		st, err := s.fsStat()
		if err != nil {
			return plan, err
		}
		reserved, reservedInodes := s.reservations()
		want := need + reserved
		if dryRun {
			want -= plan.Freed // nothing was removed; count what would have been
		}
		over, noRoom := s.overBudget(st, used, want)
		noRoom.Need = need + reserved // what was asked for, not the dry run's arithmetic
		plan.Over = max(over, 0)
		// Inodes, unlike bytes, are read from the filesystem as it is
		// now, so a dry run, which removes nothing, plans for bytes only.
		overInodes := s.overInodes(st, reservedInodes, noRoom)
		plan.OverInodes = max(overInodes, 0)
		if over <= 0 && (overInodes <= 0 || dryRun) {
			return plan, nil
		}
		if !listed && s.evictor != nil {
			listed = true
			if cands, held, err = s.evictor.Candidates(); err != nil {
				return plan, fmt.Errorf("listing eviction candidates: %w", err)
			}
		}
		if len(cands) == 0 {
			noRoom.Held = held
			return plan, noRoom
		}
		c := cands[0]
		cands = cands[1:]
		if dryRun {
			freed, err := s.wouldFree(c.Digest, unlinked)
			if err != nil {
				return plan, err
			}
			plan.Evicted = append(plan.Evicted, c)
			plan.Freed += freed
			continue
		}
		freed, removed, err := s.Evict(c.Digest, EvictBudget)
		if err != nil {
			return plan, err
		}
		if removed {
			plan.Evicted = append(plan.Evicted, c)
			plan.Freed += freed
			used -= freed
		}
	}
}

// overBudget returns by how many bytes adding need to the used bytes of
// blobs would exceed the budget, on a filesystem as st says it is.
func (s *Store) overBudget(st fsStat, used, need int64) (int64, *NoRoomError) {
	size, free := st.size, st.free
	b := s.budget
	limit := b.MaxBytes
	if f := int64(b.MaxFraction * float64(size)); f > 0 && (limit == 0 || f < limit) {
		limit = f
	}
	minFree := max(b.MinFreeBytes, int64(b.MinFreeFraction*float64(size)))
	var over int64
	if limit > 0 {
		over = used + need - limit
	}
	over = max(over, minFree-(free-need))
	return over, &NoRoomError{Need: need, Limit: limit, Used: used, Free: free, MinFree: minFree}
}

// overInodes returns by how many inodes the running downloads (need) would
// take the filesystem below the free inodes the budget keeps, and records
// the numbers in noRoom when it is positive.
func (s *Store) overInodes(st fsStat, need int64, noRoom *NoRoomError) int64 {
	if s.budget.MinFreeInodes <= 0 || st.files <= 0 {
		return 0 // no fixed number of inodes: nothing to keep free
	}
	minFree := int64(s.budget.MinFreeInodes * float64(st.files))
	over := minFree - (st.freeFiles - need)
	if over > 0 {
		noRoom.NeedInodes, noRoom.FreeInodes, noRoom.MinFreeInodes = need, st.freeFiles, minFree
	}
	return over
}

// reservations is what running downloads will still write, in bytes, and
// what they take in inodes.
func (s *Store) reservations() (bytes, inodes int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.running {
		bytes += max(p.Total-p.Done(), 0)
		inodes += max(p.inodes-p.files.Load(), 0)
	}
	return bytes, inodes
}

// wouldFree is what removing a tree would free after the removals already
// counted in unlinked: a blob is freed when only its blobs/ link would be
// left. It removes nothing and records the tree's links in unlinked.
func (s *Store) wouldFree(digest string, unlinked map[uint64]int64) (int64, error) {
	type file struct {
		nlink, size int64
	}
	files := map[uint64]file{}
	err := fs.WalkDir(s.root.FS(), path.Join(TreesDir, digest[len("sha256:"):]), func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			unlinked[st.Ino]++
			files[st.Ino] = file{int64(st.Nlink), fi.Size()}
		}
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("measuring tree %s: %w", digest, err)
	}
	var freed int64
	for ino, f := range files {
		if f.nlink-unlinked[ino] == 1 {
			freed += f.size
		}
	}
	return freed, nil
}
