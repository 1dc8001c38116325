package cache

import (
	"fmt"
	"sync"

	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/units"
	"k8s.io/klog/v2"
)

// ErrNoSpace: the cache filesystem filled up, or the budget cannot make
// room without touching trees in use or pinned.
var ErrNoSpace = store.ErrNoSpace

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

// Plan is what enforcing the budget removes, or would remove.
type Plan struct {
	Evicted []Candidate `json:"evicted"`
	Freed   int64       `json:"freed"`
	Over    int64       `json:"over"` // bytes still over budget afterwards
	// OverInodes: inodes still short of the free inodes kept afterwards.
	OverInodes int64 `json:"overInodes,omitempty"`
}

// holdings is what eviction asks of the state database: which trees exist,
// least recently used first, and which are in use or pinned.
type holdings interface {
	CachedTrees() ([]state.CachedTree, error)
	CachedTree(digest string) (state.CachedTree, bool, error)
	Referenced(digest string) (bool, error)
	ForgetTree(digest string) error
	ContentKeys(digest string) ([]string, error)
}

// budget is the cache's eviction policy: which trees go, in what order,
// and when. The store only measures and removes.
type budget struct {
	limits  Budget
	store   *store.Store
	records holdings
	onEvict func(reason EvictReason, freed int64)
	// onForget is told the content keys of each tree removed (peers).
	onForget func(keys []string)
	stat     func() (store.FSStat, error) // tests: a filesystem of chosen numbers
	mu       sync.Mutex                   // one enforcement at a time
}

// candidates are the trees no mount uses and no pin holds, least recently
// used first (doomed ones too: they were to go anyway), and what the
// others hold.
func (b *budget) candidates() ([]Candidate, Held, error) {
	trees, err := b.records.CachedTrees()
	if err != nil {
		return nil, Held{}, err
	}
	var out []Candidate
	var held Held
	for _, t := range trees {
		switch {
		case len(t.Refs) > 0:
			held.InUseTrees++
			held.InUseBytes += t.Size
		case t.Pinned:
			held.PinnedTrees++
			held.PinnedBytes += t.Size
		default:
			out = append(out, Candidate{Digest: t.Digest, Size: t.Size})
		}
	}
	return out, held, nil
}

// protected reports whether a tree is in use or pinned now.
func (b *budget) protected(digest string) (bool, error) {
	t, ok, err := b.records.CachedTree(digest)
	if err != nil || (ok && t.Pinned) {
		return ok && t.Pinned, err
	}
	return b.records.Referenced(digest)
}

// evict removes one tree unless it is protected when asked again under the
// store's tree lock, just before removal: a publish that mounted it since
// it was chosen keeps it. Its records go under the same lock.
func (b *budget) evict(digest string, reason EvictReason) (freed int64, removed bool, err error) {
	var keys []string
	freed, removed, err = b.store.RemoveTreeIf(digest,
		func() (bool, error) { return b.protected(digest) },
		func() error {
			var err error
			if keys, err = b.records.ContentKeys(digest); err != nil {
				return err
			}
			return b.records.ForgetTree(digest)
		})
	if err != nil || !removed {
		return freed, removed, err
	}
	if b.onForget != nil && len(keys) > 0 {
		b.onForget(keys)
	}
	if b.onEvict != nil {
		b.onEvict(reason, freed)
	}
	klog.InfoS("tree evicted", "tree", digest, "reason", reason, "freed", units.Bytes(freed))
	return freed, true, nil
}

// makeRoom evicts least recently used, unprotected trees until need more
// bytes, and the running downloads' reservations, fit the budget, and
// returns a *NoRoomError when they cannot. With need 0 it enforces the
// budget as it stands (modelcachectl gc). dryRun reports what would go
// without removing anything.
func (b *budget) makeRoom(need int64, dryRun bool) (Plan, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var plan Plan
	var dry *store.RemovalPlan
	if dryRun {
		dry = b.store.PlanRemovals()
	}
	// Candidates are listed only once something must go: a download into
	// a cache with room reads no tree records.
	var cands []Candidate
	var held Held
	listed := false
	// The store's running count, read once: what each eviction frees is
	// known.
	used := b.store.StoredBytes()
	for {
		over, overInodes, noRoom, err := b.shortfall(need, used, dryRun, &plan)
		if err != nil {
			return plan, err
		}
		if over <= 0 && (overInodes <= 0 || dryRun) {
			return plan, nil
		}
		if !listed {
			listed = true
			if cands, held, err = b.candidates(); err != nil {
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
			freed, err := dry.Remove(c.Digest)
			if err != nil {
				return plan, err
			}
			plan.Evicted = append(plan.Evicted, c)
			plan.Freed += freed
			continue
		}
		freed, removed, err := b.evict(c.Digest, EvictBudget)
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

// shortfall is by how many bytes and inodes the cache is short of its
// budget now, with need more bytes and the running downloads' reservations,
// and records it in plan. One statfs and one look at the running downloads
// serve the bytes and the inodes.
func (b *budget) shortfall(need, used int64, dryRun bool, plan *Plan) (over, overInodes int64, noRoom *NoRoomError, err error) {
	st, err := b.stat()
	if err != nil {
		return 0, 0, nil, err
	}
	reserved, reservedInodes := b.store.Reservations()
	want := need + reserved
	if dryRun {
		want -= plan.Freed // nothing was removed; count what would have been
	}
	over, noRoom = b.overBudget(st, used, want)
	noRoom.Need = need + reserved // what was asked for, not the dry run's arithmetic
	plan.Over = max(over, 0)
	// Inodes, unlike bytes, are read from the filesystem as it is now, so
	// a dry run, which removes nothing, plans for bytes only.
	overInodes = b.overInodes(st, reservedInodes, noRoom)
	plan.OverInodes = max(overInodes, 0)
	return over, overInodes, noRoom, nil
}

// overBudget returns by how many bytes adding need to the used bytes of
// blobs would exceed the budget, on a filesystem as st says it is.
func (b *budget) overBudget(st store.FSStat, used, need int64) (int64, *NoRoomError) {
	l := b.limits
	limit := l.MaxBytes
	if f := int64(l.MaxFraction * float64(st.Size)); f > 0 && (limit == 0 || f < limit) {
		limit = f
	}
	minFree := max(l.MinFreeBytes, int64(l.MinFreeFraction*float64(st.Size)))
	var over int64
	if limit > 0 {
		over = used + need - limit
	}
	over = max(over, minFree-(st.Free-need))
	return over, &NoRoomError{Need: need, Limit: limit, Used: used, Free: st.Free, MinFree: minFree}
}

// overInodes returns by how many inodes the running downloads (need) would
// take the filesystem below the free inodes the budget keeps, and records
// the numbers in noRoom when it is positive.
func (b *budget) overInodes(st store.FSStat, need int64, noRoom *NoRoomError) int64 {
	if b.limits.MinFreeInodes <= 0 || st.Files <= 0 {
		return 0 // no fixed number of inodes: nothing to keep free
	}
	minFree := int64(b.limits.MinFreeInodes * float64(st.Files))
	over := minFree - (st.FreeFiles - need)
	if over > 0 {
		noRoom.NeedInodes, noRoom.FreeInodes, noRoom.MinFreeInodes = need, st.FreeFiles, minFree
	}
	return over
}
