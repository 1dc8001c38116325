package store

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// TreeBlobsDir holds one list per tree of the blobs it links, written before
// the tree is renamed into place, so that removing a tree checks the link
// counts of its own blobs and no others. A list names blobs, it counts
// nothing: the link count stays the only reference count.
const TreeBlobsDir = "trees/blobs"

// tally is what the store holds, counted as it changes, so that a metrics
// scrape, `usage` and the budget read memory instead of walking the cache.
// Open counts once; verify recounts and corrects.
type tally struct {
	// changing is held for reading by each change on disk together with
	// its count, and for writing by a recount, which so sees no change
	// half done.
	changing sync.RWMutex

	mu sync.Mutex
	Counts
	// loose are blobs that may be linked by no tree (left by a download
	// that failed, or found so at start-up): the next tree removal checks
	// their link counts with its own blobs', as a sweep of all of blobs/
	// used to.
	loose map[string]bool

	// blobsDir is blobs/, open for the store's life, so that looking up one
	// blob is one fstatat instead of a walk from the root.
	blobsDir *os.File
}

// Counts are the running counts of the store.
type Counts struct {
	BlobBytes   int64 `json:"blobBytes"`
	Blobs       int   `json:"blobs"`
	TreeBytes   int64 `json:"treeBytes"` // bytes the trees present, a shared blob counted per link
	Trees       int   `json:"trees"`
	Quarantined int   `json:"quarantined"`
}

func (t *tally) counts() Counts {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.Counts
}

func (t *tally) add(fn func(c *Counts)) {
	t.mu.Lock()
	fn(&t.Counts)
	t.mu.Unlock()
}

// markLoose notes blobs to check at the next removal.
func (t *tally) markLoose(names ...string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.loose == nil {
		t.loose = map[string]bool{}
	}
	for _, n := range names {
		t.loose[n] = true
	}
}

// takeLoose returns the blobs to check and forgets them: one still linked
// is linked by a tree (whose list names it) or by a running download
// (which marks it again if it fails).
func (t *tally) takeLoose() map[string]bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	l := t.loose
	t.loose = nil
	return l
}

// linkNewBlob links an ingest file into blobs/ as the blob sum and counts
// it; an existing blob is os.ErrExist, as from Link, and counts nothing.
func (s *Store) linkNewBlob(from, sum string) error {
	s.tally.changing.RLock()
	defer s.tally.changing.RUnlock()
	blob := path.Join(BlobsDir, sum)
	if err := s.root.Link(from, blob); err != nil {
		return err
	}
	fi, err := s.root.Lstat(blob)
	if err != nil {
		return fmt.Errorf("measuring blob %s: %w", sum, err)
	}
	s.tally.add(func(c *Counts) { c.Blobs++; c.BlobBytes += fi.Size() })
	return nil
}

// commitTree renames a built tree (tmp) into trees/ and counts it, having
// first put the list of the blobs it links (sums) in TreeBlobsDir. The
// rename's error is returned as it is.
func (s *Store) commitTree(tmp string, t Tree, sums []string) error {
	hex := t.Digest[len("sha256:"):]
	list := path.Join(path.Dir(tmp), "blobs")
	if err := s.writeTreeBlobs(list, treeBlobs{files: t.Files, bytes: t.Size, blobs: sums}); err != nil {
		return err
	}
	if err := s.root.Rename(list, path.Join(TreeBlobsDir, hex)); err != nil {
		return noSpace(fmt.Errorf("recording the blobs of tree %s: %w", t.Digest, err))
	}
	s.tally.changing.RLock()
	defer s.tally.changing.RUnlock()
	if err := s.root.Rename(tmp, path.Join(TreesDir, hex)); err != nil {
		return err // the list stays: the tree is there already, or a retry writes it again
	}
	s.tally.add(func(c *Counts) { c.Trees++; c.TreeBytes += t.Size })
	return nil
}

// settleBlobs is called once a download's ingest directory is gone: the
// blobs it committed or linked that no tree links now (it failed, or the
// trees it reused them from were removed meanwhile) are marked loose, so
// the next removal frees them. They are kept until then for a retry to
// link (resume).
func (s *Store) settleBlobs(sums []string) {
	var loose []string
	for _, sum := range sums {
		if sum == "" || slices.Contains(loose, sum) {
			continue
		}
		if fi, err := s.root.Lstat(path.Join(BlobsDir, sum)); err == nil && nlink(fi) == 1 {
			loose = append(loose, sum)
		}
	}
	if len(loose) > 0 {
		s.tally.markLoose(loose...)
	}
}

// statBlob lstats one blob by its hex name, relative to blobs/.
func (s *Store) statBlob(sum string) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := s.atBlob(sum, func(fd int) error { return unix.Fstatat(fd, sum, &st, unix.AT_SYMLINK_NOFOLLOW) })
	return st, err
}

// unlinkBlob removes blobs/<sum>: one unlinkat on the held blobs/
// descriptor, where os.Root would open and close blobs/ around it.
func (s *Store) unlinkBlob(sum string) error {
	return s.atBlob(sum, func(fd int) error { return unix.Unlinkat(fd, sum, 0) })
}

// atBlob runs fn on the held blobs/ descriptor for a valid blob name.
func (s *Store) atBlob(sum string, fn func(dirfd int) error) error {
	if !isHex64(sum) {
		return fmt.Errorf("invalid blob name %q", sum)
	}
	rc, err := s.tally.blobsDir.SyscallConn()
	if err != nil {
		return err
	}
	// Control keeps the descriptor open while it runs (Close waits).
	cerr := rc.Control(func(fd uintptr) { err = fn(int(fd)) })
	if cerr != nil {
		return cerr
	}
	return err
}

// isHex64 is ValidDigest's test of the hex, without a regexp.
func isHex64(h string) bool {
	if len(h) != 64 {
		return false
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func nlink(fi fs.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Nlink)
	}
	return 0
}

// treeBlobs is a tree's list: its files and bytes, and the blobs it links.
type treeBlobs struct {
	files int
	bytes int64
	blobs []string
}

// writeTreeBlobs writes a list, synced: "<files> <bytes>", then one blob
// hex a line, sorted, each once.
func (s *Store) writeTreeBlobs(name string, l treeBlobs) error {
	blobs := slices.Clone(l.blobs)
	slices.Sort(blobs)
	blobs = slices.Compact(blobs)
	var b strings.Builder
	fmt.Fprintf(&b, "%d %d\n", l.files, l.bytes)
	for _, h := range blobs {
		if h != "" {
			b.WriteString(h)
			b.WriteByte('\n')
		}
	}
	f, err := s.root.OpenFile(name, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return noSpace(fmt.Errorf("writing the blobs of a tree: %w", err))
	}
	defer f.Close()
	if _, err := f.WriteString(b.String()); err != nil {
		return noSpace(fmt.Errorf("writing the blobs of a tree: %w", err))
	}
	if err := f.Sync(); err != nil {
		return noSpace(fmt.Errorf("syncing the blobs of a tree: %w", err))
	}
	return nil
}

// readTreeBlobs reads a tree's list; ok is false when it has none.
func (s *Store) readTreeBlobs(hex string) (l treeBlobs, ok bool, err error) {
	f, err := s.root.Open(path.Join(TreeBlobsDir, hex))
	if errors.Is(err, fs.ErrNotExist) {
		return l, false, nil
	}
	if err != nil {
		return l, false, fmt.Errorf("reading the blobs of tree %s: %w", hex, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return l, false, nil // cut short by a crash: as if there were none
	}
	files, bytes, _ := strings.Cut(sc.Text(), " ")
	if l.files, err = strconv.Atoi(files); err != nil {
		return l, false, nil
	}
	if l.bytes, err = strconv.ParseInt(bytes, 10, 64); err != nil {
		return l, false, nil
	}
	for sc.Scan() {
		if h := sc.Text(); ValidDigest("sha256:" + h) {
			l.blobs = append(l.blobs, h)
		}
	}
	if err := sc.Err(); err != nil {
		return l, false, fmt.Errorf("reading the blobs of tree %s: %w", hex, err)
	}
	return l, true, nil
}

// listTree builds a tree's list from the tree itself, matching its files
// to blobs by inode (byIno, from a walk of blobs/). For trees committed
// before lists existed.
func (s *Store) listTree(hex string, byIno map[uint64]string) (treeBlobs, error) {
	var l treeBlobs
	err := fs.WalkDir(s.root.FS(), path.Join(TreesDir, hex), func(_ string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		l.files++
		l.bytes += fi.Size()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && byIno[st.Ino] != "" {
			l.blobs = append(l.blobs, byIno[st.Ino])
		}
		return nil
	})
	if err != nil {
		return l, fmt.Errorf("listing the blobs of tree %s: %w", hex, err)
	}
	return l, nil
}

// scanDir calls fn with each entry of a directory under the root and its
// lstat, reading the directory once and stating each name relative to it.
func (s *Store) scanDir(dir string, fn func(name string, st *unix.Stat_t)) error {
	f, err := s.root.Open(dir)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dir, err)
	}
	defer f.Close()
	fd := int(f.Fd())
	for {
		names, rerr := f.Readdirnames(4096)
		for _, n := range names {
			var st unix.Stat_t
			if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				if errors.Is(err, unix.ENOENT) {
					continue // removed meanwhile
				}
				return fmt.Errorf("measuring %s/%s: %w", dir, n, err)
			}
			fn(n, &st)
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return fmt.Errorf("reading %s: %w", dir, rerr)
		}
	}
}

// blobScan is what one read of blobs/ finds.
type blobScan struct {
	bytes int64
	count int
	loose []string          // linked by nothing but blobs/
	byIno map[uint64]string // when asked for
}

func (s *Store) scanBlobs(withInodes bool) (blobScan, error) {
	var b blobScan
	if withInodes {
		b.byIno = map[uint64]string{}
	}
	err := s.scanDir(BlobsDir, func(name string, st *unix.Stat_t) {
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return
		}
		b.bytes += st.Size
		b.count++
		if st.Nlink == 1 {
			b.loose = append(b.loose, name)
		}
		if withInodes {
			b.byIno[st.Ino] = name
		}
	})
	return b, err
}

// count builds the running counts at start-up: from what a clean Close
// saved, or else from one read of blobs/ and the trees' lists. Lists
// missing for trees committed before lists existed are written, and lists
// whose tree is gone are dropped. Blobs found linked by nothing but
// blobs/ are loose: the first removal frees them.
func (s *Store) count() error {
	if err := s.root.MkdirAll(TreeBlobsDir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", TreeBlobsDir, err)
	}
	d, err := s.root.Open(BlobsDir)
	if err != nil {
		return fmt.Errorf("opening %s: %w", BlobsDir, err)
	}
	s.tally.blobsDir = d
	trees, err := s.TreeDigests()
	if err != nil {
		return err
	}
	unlisted, err := s.checkLists(trees)
	if err != nil {
		return err
	}
	saved, ok := s.takeSavedCounts()
	quarantined := 0
	if q, err := fs.ReadDir(s.root.FS(), QuarantineDir); err == nil {
		quarantined = len(q)
	}
	if ok && len(unlisted) == 0 && saved.Trees == len(trees) && saved.Quarantined == quarantined {
		s.tally.mu.Lock()
		s.tally.Counts = saved.Counts
		s.tally.mu.Unlock()
		s.tally.markLoose(saved.Loose...)
		return nil
	}
	c := Counts{Quarantined: quarantined}
	blobs, err := s.scanBlobs(len(unlisted) > 0)
	if err != nil {
		return err
	}
	c.BlobBytes, c.Blobs = blobs.bytes, blobs.count
	for _, d := range trees {
		hex := d[len("sha256:"):]
		l, ok, err := s.readTreeBlobs(hex)
		if err != nil {
			return err
		}
		if !ok {
			if l, err = s.listTree(hex, blobs.byIno); err != nil {
				return err
			}
			if err := s.writeTreeBlobs(path.Join(TreeBlobsDir, hex), l); err != nil {
				return err
			}
		}
		c.Trees++
		c.TreeBytes += l.bytes
	}
	if len(unlisted) > 0 {
		klog.InfoS("listed the blobs of trees committed before such lists", "trees", len(unlisted))
	}
	s.tally.mu.Lock()
	s.tally.Counts = c
	s.tally.mu.Unlock()
	s.tally.markLoose(blobs.loose...)
	return nil
}

// checkLists returns the trees without a list, and removes the lists of
// trees that are gone (a crash between a removal's two steps, or between
// a list and its tree's commit).
func (s *Store) checkLists(trees []string) ([]string, error) {
	names, err := fs.ReadDir(s.root.FS(), TreeBlobsDir)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", TreeBlobsDir, err)
	}
	listed := map[string]bool{}
	for _, n := range names {
		listed["sha256:"+n.Name()] = true
	}
	var unlisted []string
	for _, d := range trees {
		if !listed[d] {
			unlisted = append(unlisted, d)
		}
		delete(listed, d)
	}
	for d := range listed {
		if err := s.root.Remove(path.Join(TreeBlobsDir, d[len("sha256:"):])); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("removing the list of a gone tree: %w", err)
		}
	}
	return unlisted, nil
}

// Recount is what verify found when the running counts had drifted from
// the disk; the counts are corrected to Now.
type Recount struct {
	Was Counts `json:"was"`
	Now Counts `json:"now"`
}

// recount walks blobs/, every tree and quarantine/ as Usage once did, while
// no counted change runs, and corrects the counts if they drifted. Blobs
// linked by nothing but blobs/ are marked loose.
func (s *Store) recount() (*Recount, error) {
	s.tally.changing.Lock()
	defer s.tally.changing.Unlock()
	blobs, err := s.scanBlobs(false)
	if err != nil {
		return nil, err
	}
	now := Counts{BlobBytes: blobs.bytes, Blobs: blobs.count}
	trees, err := s.TreeDigests()
	if err != nil {
		return nil, err
	}
	for _, d := range trees {
		n, _, err := s.walkBytes(path.Join(TreesDir, d[len("sha256:"):]))
		if err != nil {
			return nil, err
		}
		now.Trees++
		now.TreeBytes += n
	}
	if q, err := fs.ReadDir(s.root.FS(), QuarantineDir); err == nil {
		now.Quarantined = len(q)
	}
	s.tally.markLoose(blobs.loose...)
	was := s.tally.counts()
	if was == now {
		return nil, nil
	}
	s.tally.mu.Lock()
	s.tally.Counts = now
	s.tally.mu.Unlock()
	klog.InfoS("store counts had drifted from the disk; corrected", "was", was, "now", now)
	return &Recount{Was: was, Now: now}, nil
}

// countsFile holds the store's counts as a clean Close left them. Open
// reads and removes it, so a store that stops any other way is counted
// from the disk when it opens again.
const countsFile = "counts.json"

type savedCounts struct {
	Counts
	Loose []string `json:"loose"`
}

// saveCountsAndClose saves the counts, unless a download left files in
// ingest/ (whose removal at the next Open changes link counts), and closes
// the root, with counted changes held off so that none comes after.
func (s *Store) saveCountsAndClose() error {
	s.tally.changing.Lock()
	defer s.tally.changing.Unlock()
	if err := s.saveCounts(); err != nil {
		klog.ErrorS(err, "saving the store's counts; the next start counts from the disk")
	}
	if s.tally.blobsDir != nil {
		s.tally.blobsDir.Close()
	}
	return s.root.Close()
}

func (s *Store) saveCounts() error {
	if left, err := fs.ReadDir(s.root.FS(), IngestDir); err != nil || len(left) > 0 {
		return err
	}
	s.tally.mu.Lock()
	saved := savedCounts{Counts: s.tally.Counts, Loose: slices.Sorted(maps.Keys(s.tally.loose))}
	s.tally.mu.Unlock()
	b, err := json.Marshal(saved)
	if err != nil {
		return err
	}
	tmp := countsFile + ".tmp"
	f, err := s.root.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := s.root.Rename(tmp, countsFile); err != nil {
		return err
	}
	return s.syncDir(".")
}

// takeSavedCounts reads and removes the counts a clean Close saved, durably
// removed before the store changes anything.
func (s *Store) takeSavedCounts() (savedCounts, bool) {
	var saved savedCounts
	b, err := fs.ReadFile(s.root.FS(), countsFile)
	if err != nil {
		return saved, false
	}
	if err := s.root.Remove(countsFile); err != nil || s.syncDir(".") != nil {
		return saved, false
	}
	return saved, json.Unmarshal(b, &saved) == nil
}
