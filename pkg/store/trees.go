package store

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"syscall"

	"golang.org/x/sys/unix"
)

// IsNoTree reports whether err says a tree is not in the store.
func IsNoTree(err error) bool { return errors.Is(err, ErrNoTree) }

// UseTree runs fn while no eviction can remove the tree, and fails with
// ErrNoTree if the tree is gone. Publishing mounts a tree inside fn so
// an eviction never removes a tree between the lookup and the mount.
func (s *Store) UseTree(digest string, fn func() error) error {
	s.treesMu.RLock()
	defer s.treesMu.RUnlock()
	if !s.HasTree(digest) {
		return fmt.Errorf("%w: tree %s was removed", ErrNoTree, digest)
	}
	return fn()
}

// TreeFile is one file of a tree.
type TreeFile struct {
	Path   string
	Size   int64
	Sha256 string // the name of the blob it links, "" if it links none
}

// TreeFiles lists a tree's files with the blob each one links, matched by
// inode so nothing is re-hashed; only the blobs the tree's list names are
// looked at.
func (s *Store) TreeFiles(digest string) ([]TreeFile, error) {
	if !s.HasTree(digest) {
		return nil, fmt.Errorf("%w: tree %s", ErrNoTree, digest)
	}
	blobs, err := s.treeBlobInodes(digest[len("sha256:"):])
	if err != nil {
		return nil, err
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

// treeBlobInodes maps the inodes of the blobs a tree's list names to their
// names; without a list, those of every blob.
func (s *Store) treeBlobInodes(hex string) (map[uint64]string, error) {
	l, ok, err := s.readTreeBlobs(hex)
	if err != nil {
		return nil, err
	}
	if !ok {
		b, err := s.scanBlobs(true)
		return b.byIno, err
	}
	out := make(map[uint64]string, len(l.blobs))
	for _, sum := range l.blobs {
		if fi, err := s.root.Lstat(path.Join(BlobsDir, sum)); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				out[st.Ino] = sum
			}
		}
	}
	return out, nil
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

// HasBlob reports whether a blob (its sha256 in hex) is committed. It is
// one fstatat in blobs/, cheap enough to ask of every object at start-up.
func (s *Store) HasBlob(sum string) bool {
	st, err := s.statBlob(sum)
	return err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG
}
