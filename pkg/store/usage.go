package store

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"
	"syscall"

	"github.com/modelcache/modelcache/pkg/source"
)

// Usage is what the cache directory holds.
type Usage struct {
	BlobBytes   int64 `json:"blobBytes"`   // bytes on disk in blobs/
	Blobs       int   `json:"blobs"`       //
	TreeBytes   int64 `json:"treeBytes"`   // bytes the trees present to pods (shared blobs counted per tree)
	Trees       int   `json:"trees"`       //
	IngestBytes int64 `json:"ingestBytes"` // bytes of downloads in progress, and of large ones interrupted (kept to resume)
	Quarantined int   `json:"quarantined"` // blobs that failed verification
	FSSize      int64 `json:"fsSize"`      // the cache filesystem's size
	FSFree      int64 `json:"fsFree"`      // bytes available on it
}

// Saved is what deduplication saves: bytes the trees present minus bytes stored.
func (u Usage) Saved() int64 { return max(u.TreeBytes-u.BlobBytes, 0) }

// Usage is what the cache directory holds, from the store's running
// counts, the running downloads and partial/ (a few files at most), and
// one statfs: its cost does not grow with what the cache holds.
func (s *Store) Usage() (Usage, error) {
	c := s.tally.counts()
	u := Usage{BlobBytes: c.BlobBytes, Blobs: c.Blobs, TreeBytes: c.TreeBytes, Trees: c.Trees, Quarantined: c.Quarantined}
	var err error
	if u.IngestBytes, err = s.ingestBytes(); err != nil {
		return u, err
	}
	u.FSSize, u.FSFree, err = s.statfs()
	return u, err
}

// StoredBytes is the bytes of blobs the store holds, what the budget limits.
func (s *Store) StoredBytes() int64 { return s.tally.counts().BlobBytes }

// ingestBytes is what running downloads have written (their progress) and
// what partial downloads no download is resuming keep in partial/.
func (s *Store) ingestBytes() (int64, error) {
	var n int64
	s.mu.Lock()
	for _, p := range s.running {
		n += p.Done()
	}
	s.mu.Unlock()
	des, err := fs.ReadDir(s.root.FS(), PartialDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return n, fmt.Errorf("reading %s: %w", PartialDir, err)
	}
	for _, d := range des {
		base, _, _ := strings.Cut(d.Name(), ".")
		s.partialMu.Lock()
		busy := s.partialBusy[base] // counted in its download's progress
		s.partialMu.Unlock()
		if fi, err := d.Info(); err == nil && !busy && fi.Mode().IsRegular() {
			n += fi.Size()
		}
	}
	return n, nil
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
	st, err := s.fsStat()
	return st.size, st.free, err
}

// fsStat is what the cache filesystem has: bytes, and inodes (files 0
// where the filesystem has no fixed number, as btrfs).
type fsStat struct {
	size, free, files, freeFiles int64
}

func (s *Store) fsStat() (fsStat, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.dir, &st); err != nil {
		return fsStat{}, fmt.Errorf("statfs %s: %w", s.dir, err)
	}
	return fsStat{int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, int64(st.Files), int64(st.Ffree)}, nil
}

// inodesOf is how many inodes a model's download takes at most: one per
// file (its blob; the tree's links take none), one per directory of the
// tree, and the tree's and the ingest directory's own.
func inodesOf(m source.Manifest) int64 {
	dirs := map[string]bool{}
	for _, e := range m {
		for d := path.Dir(e.Path); d != "." && !dirs[d]; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	return int64(len(m) + len(dirs) + 2)
}
