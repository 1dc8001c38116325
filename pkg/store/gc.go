package store

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/modelcache/modelcache/pkg/units"
	"io"
	"io/fs"
	"path"
	"syscall"
	"time"

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
}

func (e *NoRoomError) Error() string {
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

// Usage is what the cache directory holds.
type Usage struct {
	BlobBytes   int64 `json:"blobBytes"`   // bytes on disk in blobs/
	Blobs       int   `json:"blobs"`       //
	TreeBytes   int64 `json:"treeBytes"`   // bytes the trees present to pods (shared blobs counted per tree)
	Trees       int   `json:"trees"`       //
	IngestBytes int64 `json:"ingestBytes"` // bytes of downloads in progress
	Quarantined int   `json:"quarantined"` // blobs that failed verification
	FSSize      int64 `json:"fsSize"`      // the cache filesystem's size
	FSFree      int64 `json:"fsFree"`      // bytes available on it
}

// Saved is what deduplication saves: bytes the trees present minus bytes stored.
func (u Usage) Saved() int64 { return max(u.TreeBytes-u.BlobBytes, 0) }

// Usage walks the cache directory.
func (s *Store) Usage() (Usage, error) {
	var u Usage
	var err error
	if u.BlobBytes, u.Blobs, err = s.walkBytes(BlobsDir); err != nil {
		return u, err
	}
	if u.IngestBytes, _, err = s.walkBytes(IngestDir); err != nil {
		return u, err
	}
	trees, err := fs.ReadDir(s.root.FS(), TreesDir)
	if err != nil {
		return u, fmt.Errorf("reading %s: %w", TreesDir, err)
	}
	for _, t := range trees {
		n, _, err := s.walkBytes(path.Join(TreesDir, t.Name()))
		if err != nil {
			return u, err
		}
		u.TreeBytes += n
		u.Trees++
	}
	if q, err := fs.ReadDir(s.root.FS(), QuarantineDir); err == nil {
		u.Quarantined = len(q)
	}
	u.FSSize, u.FSFree, err = s.statfs()
	return u, err
}

// walkBytes sums the sizes of the regular files under name.
func (s *Store) walkBytes(name string) (int64, int, error) {
	var total int64
	var files int
	err := fs.WalkDir(s.root.FS(), name, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while walking
			}
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		total += fi.Size()
		files++
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("measuring %s: %w", name, err)
	}
	return total, files, nil
}

func (s *Store) statfs() (size, free int64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.dir, &st); err != nil {
		return 0, 0, fmt.Errorf("statfs %s: %w", s.dir, err)
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, nil
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

func (s *Store) removeTreeLocked(digest string) (int64, error) {
	if err := removeAll(s.root, path.Join(TreesDir, digest[len("sha256:"):])); err != nil {
		return 0, fmt.Errorf("removing tree %s: %w", digest, err)
	}
	if err := s.syncDir(TreesDir); err != nil {
		return 0, err
	}
	return s.sweepBlobs()
}

// sweepBlobs removes blobs that no tree and no ingest file links: a blob's
// link count is one plus its users, so no index is needed and none can
// drift. An ingest racing this sweep re-commits its own copy (buildTree).
func (s *Store) sweepBlobs() (int64, error) {
	des, err := fs.ReadDir(s.root.FS(), BlobsDir)
	if err != nil {
		return 0, fmt.Errorf("reading %s: %w", BlobsDir, err)
	}
	var freed int64
	for _, d := range des {
		name := path.Join(BlobsDir, d.Name())
		fi, err := s.root.Lstat(name)
		if err != nil {
			continue
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok || st.Nlink > 1 {
			continue
		}
		if err := s.root.Remove(name); err != nil {
			return freed, fmt.Errorf("removing unused blob %s: %w", d.Name(), err)
		}
		freed += fi.Size()
	}
	return freed, s.syncDir(BlobsDir)
}

// IsNotCached reports whether err says a tree or model is not in the store.
func IsNotCached(err error) bool { return errors.Is(err, ErrNotCached) }

// UseTree runs fn while no eviction can remove the tree, and fails with
// ErrNotCached if the tree is gone. Publishing mounts a tree inside fn so
// an eviction never removes a tree between the lookup and the mount.
func (s *Store) UseTree(digest string, fn func() error) error {
	s.treesMu.RLock()
	defer s.treesMu.RUnlock()
	if !s.HasTree(digest) {
		return fmt.Errorf("%w: tree %s was removed", ErrNotCached, digest)
	}
	return fn()
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
	// One walk of blobs/ per call, not per eviction: what each eviction
	// frees is known.
	used, _, err := s.walkBytes(BlobsDir)
	if err != nil {
		return plan, err
	}
	for {
		want := need + s.reserved()
		if dryRun {
			want -= plan.Freed // nothing was removed; count what would have been
		}
		over, noRoom, err := s.overBudget(used, want)
		if err != nil {
			return plan, err
		}
		noRoom.Need = need + s.reserved() // what was asked for, not the dry run's arithmetic
		plan.Over = max(over, 0)
		if over <= 0 {
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
// blobs would exceed the budget.
func (s *Store) overBudget(used, need int64) (int64, *NoRoomError, error) {
	size, free, err := s.statfs()
	if err != nil {
		return 0, nil, err
	}
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
	return over, &NoRoomError{Need: need, Limit: limit, Used: used, Free: free, MinFree: minFree}, nil
}

// reserved is what running downloads will still write.
func (s *Store) reserved() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, p := range s.running {
		n += max(p.Total-p.Done(), 0)
	}
	return n
}

// VerifyResult is what Verify found.
type VerifyResult struct {
	Blobs       int      `json:"blobs"`
	Bytes       int64    `json:"bytes"`
	Corrupt     []string `json:"corrupt"` // blob hexes moved to quarantine/
	Damaged     []string `json:"damaged"` // trees that linked a corrupt blob
	Took        string   `json:"took"`
	Quarantined []string `json:"quarantined"` // quarantine file names
}

// Verify re-hashes every blob. A blob whose content no longer matches its
// name is moved to quarantine/ and the trees linking it are reported as
// damaged: the caller stops serving them, and the next download of the
// model repairs them in place (ingest relinks files whose inode is not the
// committed blob's).
func (s *Store) Verify() (VerifyResult, error) {
	start := time.Now()
	var r VerifyResult
	des, err := fs.ReadDir(s.root.FS(), BlobsDir)
	if err != nil {
		return r, fmt.Errorf("reading %s: %w", BlobsDir, err)
	}
	var bad []fs.FileInfo
	for _, d := range des {
		name := path.Join(BlobsDir, d.Name())
		sum, n, err := s.hashFile(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return r, err
		}
		r.Blobs++
		r.Bytes += n
		if sum == d.Name() {
			continue
		}
		fi, err := s.root.Lstat(name)
		if err != nil {
			return r, err
		}
		if err := s.root.MkdirAll(QuarantineDir, 0o700); err != nil {
			return r, fmt.Errorf("creating %s: %w", QuarantineDir, err)
		}
		q := fmt.Sprintf("%s-%d", d.Name(), time.Now().UnixNano())
		if err := s.root.Rename(name, path.Join(QuarantineDir, q)); err != nil {
			return r, fmt.Errorf("quarantining blob %s: %w", d.Name(), err)
		}
		klog.InfoS("corrupt blob quarantined", "blob", d.Name(), "actualSha256", sum, "quarantine", q)
		r.Corrupt = append(r.Corrupt, d.Name())
		r.Quarantined = append(r.Quarantined, q)
		bad = append(bad, fi)
	}
	if len(bad) > 0 {
		if r.Damaged, err = s.treesLinking(bad); err != nil {
			return r, err
		}
	}
	r.Took = time.Since(start).Round(time.Millisecond).String()
	return r, nil
}

// treesLinking returns the trees holding a link to any of files.
func (s *Store) treesLinking(files []fs.FileInfo) ([]string, error) {
	trees, err := fs.ReadDir(s.root.FS(), TreesDir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, t := range trees {
		found := false
		err := fs.WalkDir(s.root.FS(), path.Join(TreesDir, t.Name()), func(p string, d fs.DirEntry, err error) error {
			if err != nil || found || !d.Type().IsRegular() {
				return err
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			for _, f := range files {
				if sameFile(fi, f) {
					found = true
					return fs.SkipAll
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		if found {
			out = append(out, "sha256:"+t.Name())
		}
	}
	return out, nil
}

// hashFile returns the sha256 hex and size of a file under the root.
func (s *Store) hashFile(name string) (string, int64, error) {
	f, err := s.root.Open(name)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	n, err := io.CopyBuffer(h, f, *bp)
	if err != nil {
		return "", n, fmt.Errorf("reading %s: %w", name, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

func sameFile(a, b fs.FileInfo) bool {
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// TreeFile is one file of a tree.
type TreeFile struct {
	Path   string
	Size   int64
	Sha256 string // the name of the blob it links, "" if it links none
}

// TreeFiles lists a tree's files with the blob each one links, matched by
// inode so nothing is re-hashed.
func (s *Store) TreeFiles(digest string) ([]TreeFile, error) {
	if !s.HasTree(digest) {
		return nil, fmt.Errorf("%w: tree %s", ErrNotCached, digest)
	}
	blobs := map[uint64]string{}
	des, err := fs.ReadDir(s.root.FS(), BlobsDir)
	if err != nil {
		return nil, err
	}
	for _, d := range des {
		if fi, err := d.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				blobs[st.Ino] = d.Name()
			}
		}
	}
	top := path.Join(TreesDir, digest[len("sha256:"):])
	var out []TreeFile
	err = fs.WalkDir(s.root.FS(), top, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		f := TreeFile{Path: p[len(top)+1:], Size: fi.Size()}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			f.Sha256 = blobs[st.Ino]
		}
		out = append(out, f)
		return nil
	})
	return out, err
}

// TreeDigests lists the trees on disk.
func (s *Store) TreeDigests() ([]string, error) {
	des, err := fs.ReadDir(s.root.FS(), TreesDir)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", TreesDir, err)
	}
	var out []string
	for _, d := range des {
		if dg := "sha256:" + d.Name(); d.IsDir() && ValidDigest(dg) {
			out = append(out, dg)
		}
	}
	return out, nil
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
