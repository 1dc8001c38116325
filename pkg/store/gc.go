package store

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path"
	"slices"
	"syscall"
)

// QuarantineDir holds blobs that failed verification; nothing in it is
// ever linked into a tree again.
const QuarantineDir = "quarantine"

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

// RemoveTreeIf removes a tree as RemoveTree does, under the tree lock that
// orders removals against publishes mounting a tree (UseTree): keep is
// asked under that lock just before removal, and a tree it keeps stays;
// forget runs under the same lock once the tree is gone, so that no publish
// finds the tree's records without the tree. The caller decides what goes
// and why; the store only removes.
func (s *Store) RemoveTreeIf(digest string, keep func() (bool, error), forget func() error) (freed int64, removed bool, err error) {
	if !ValidDigest(digest) {
		return 0, false, fmt.Errorf("invalid tree digest %q", digest)
	}
	s.treesMu.Lock()
	defer s.treesMu.Unlock()
	if k, err := keep(); err != nil || k {
		return 0, false, err
	}
	if freed, err = s.removeTreeLocked(digest); err != nil {
		return freed, false, err
	}
	if err := forget(); err != nil {
		return freed, true, fmt.Errorf("forgetting removed tree %s: %w", digest, err)
	}
	return freed, true, nil
}

// FSStat is what the cache filesystem has: bytes, and inodes (Files 0
// where the filesystem has no fixed number, as btrfs).
type FSStat struct {
	Size, Free, Files, FreeFiles int64
}

// FSStat reads the cache filesystem's numbers.
func (s *Store) FSStat() (FSStat, error) {
	st, err := s.fsStat()
	return FSStat{Size: st.size, Free: st.free, Files: st.files, FreeFiles: st.freeFiles}, err
}

// Reservations is what running downloads will still write, in bytes, and
// what they take in inodes: room a budget keeps for them.
func (s *Store) Reservations() (bytes, inodes int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.running {
		bytes += max(p.Total-p.Done(), 0)
		inodes += max(p.inodes-p.files.Load(), 0)
	}
	return bytes, inodes
}

// RemovalPlan measures removals without making them, for a dry run.
type RemovalPlan struct {
	s        *Store
	unlinked map[uint64]int64 // inode → links the planned removals drop
}

// PlanRemovals starts a RemovalPlan.
func (s *Store) PlanRemovals() *RemovalPlan {
	return &RemovalPlan{s: s, unlinked: map[uint64]int64{}}
}

// Remove is what removing a tree would free after the removals already
// planned: a blob is freed when only its blobs/ link would be left. It
// removes nothing.
func (p *RemovalPlan) Remove(digest string) (int64, error) {
	if !ValidDigest(digest) {
		return 0, fmt.Errorf("invalid tree digest %q", digest)
	}
	type file struct {
		nlink, size int64
	}
	files := map[uint64]file{}
	err := fs.WalkDir(p.s.root.FS(), path.Join(TreesDir, digest[len("sha256:"):]), func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			p.unlinked[st.Ino]++
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
		if f.nlink-p.unlinked[ino] == 1 {
			freed += f.size
		}
	}
	return freed, nil
}
