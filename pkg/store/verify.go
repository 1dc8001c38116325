package store

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// VerifyResult is what Verify found.
type VerifyResult struct {
	Blobs       int      `json:"blobs"`
	Bytes       int64    `json:"bytes"`
	Corrupt     []string `json:"corrupt"` // blob hexes moved to quarantine/
	Damaged     []string `json:"damaged"` // trees that linked a corrupt blob
	Took        string   `json:"took"`
	Quarantined []string `json:"quarantined"` // quarantine file names
	// Recounted: the store's running counts had drifted from the disk and
	// were corrected (nil when they agreed).
	Recounted *Recount `json:"recounted,omitempty"`
}

// Verify re-hashes every blob. A blob whose content no longer matches its
// name is moved to quarantine/ and the trees linking it are reported as
// damaged: the caller stops serving them, and the next download of the
// model repairs them in place (ingest relinks files whose inode is not the
// committed blob's). Last, the store's running counts are checked against
// a walk of the cache and corrected if they drifted.
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
		if err := s.quarantine(name, q, fi.Size()); err != nil {
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
	if r.Recounted, err = s.recount(); err != nil {
		return r, err
	}
	r.Took = time.Since(start).Round(time.Millisecond).String()
	return r, nil
}

// quarantine moves a blob to quarantine/ as q and counts it.
func (s *Store) quarantine(blob, q string, size int64) error {
	s.tally.changing.RLock()
	defer s.tally.changing.RUnlock()
	if err := s.root.Rename(blob, path.Join(QuarantineDir, q)); err != nil {
		return err
	}
	s.tally.add(func(c *Counts) { c.Blobs--; c.BlobBytes -= size; c.Quarantined++ })
	return nil
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
