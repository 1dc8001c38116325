package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/modelcache/modelcache/pkg/source"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Modes of committed content (the "read-only everywhere" invariant).
const (
	blobMode = 0o444
	dirMode  = 0o555
)

// ErrNoSpace means the cache filesystem filled up during a download.
var ErrNoSpace = errors.New("cache filesystem is full")

// bufPool holds copy buffers: large enough that hashing and writing run in
// big sequential chunks, pooled so concurrent downloads do not each allocate.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// ingest downloads every file of m into a private ingest directory, commits
// each blob, builds the tree beside them and renames it into trees/. The
// rename is the only step that makes the model visible (the "no partial model" invariant).
//
// objects[i] is entry i's source.ObjectKey ("" for none); an entry whose key
// reuse maps to a blob still in blobs/ is linked from it, not downloaded.
// The link into the ingest directory also keeps a concurrent sweep from
// removing that blob before the tree links it.
func (s *Store) ingest(ctx context.Context, m source.Manifest, f Fetcher, p *Progress, objects []string, reuse map[string]string) (Tree, ingested, error) {
	// Joined onto the tree below, a key with ".." or empty segments would
	// link outside the tree (the "no remote input becomes a path unchecked" invariant); check here, not only at listing.
	for _, e := range m {
		if err := source.ValidateKey(e.Path); err != nil {
			return Tree{}, ingested{}, err
		}
	}
	dir := path.Join(IngestDir, randomName())
	if err := s.root.Mkdir(dir, 0o700); err != nil {
		return Tree{}, ingested{}, fmt.Errorf("creating ingest directory: %w", err)
	}
	sums := make([]string, len(m))
	defer func() {
		if err := removeAll(s.root, dir); err != nil {
			klog.ErrorS(err, "removing ingest directory", "dir", dir)
		}
		s.settleBlobs(sums)
	}()

	var reused, md5Checked, remoteChecked, unchecked atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(s.transfers)
	for i, e := range m {
		name := path.Join(dir, fmt.Sprintf("blob-%d", i))
		if k := objects[i]; k != "" && ValidDigest("sha256:"+reuse[k]) {
			if err := s.root.Link(path.Join(BlobsDir, reuse[k]), name); err == nil {
				sums[i] = reuse[k]
				p.done.Add(e.Size)
				p.files.Add(1)
				reused.Add(1)
				continue
			}
			// Gone since (gc, verify's quarantine): download it again.
		}
		g.Go(func() error {
			sum, how, err := s.ingestBlob(gctx, name, e, f, p, objects[i])
			sums[i] = sum
			if err != nil {
				return err
			}
			p.files.Add(1)
			switch how {
			case byListedMD5:
				md5Checked.Add(1)
			case byRemoteDigest:
				remoteChecked.Add(1)
			default:
				unchecked.Add(1)
			}
			if objects[i] != "" && e.Size >= resumeAbove {
				// Recorded now, not with the tree: a download killed later
				// keeps this object and the next one links it (resume).
				// Small objects are not worth a transaction each.
				if oi, ok := s.index.(ObjectIndex); ok {
					if rerr := oi.RecordObject(objects[i], sum); rerr != nil {
						klog.ErrorS(rerr, "recording a downloaded object; a retry downloads it again", "object", e.Path)
					}
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return Tree{}, ingested{}, err
	}
	if err := s.syncDir(BlobsDir); err != nil {
		return Tree{}, ingested{}, err
	}

	t := Tree{Digest: TreeDigest(m, sums), Size: m.Size(), Files: len(m)}
	done := ingested{sums: sums, reused: int(reused.Load()),
		checks: Checks{MD5: int(md5Checked.Load()), Remote: int(remoteChecked.Load()), Unchecked: int(unchecked.Load())}}
	tmp := path.Join(dir, "tree")
	if err := s.buildTree(tmp, dir, m, sums); err != nil {
		return Tree{}, ingested{}, err
	}
	final := path.Join(TreesDir, t.Digest[len("sha256:"):])
	// Under the tree lock so an eviction cannot remove the tree between the
	// rename (or repair) and the caller recording it.
	s.treesMu.RLock()
	defer s.treesMu.RUnlock()
	if err := s.commitTree(tmp, t, sums); err != nil {
		if s.HasTree(t.Digest) {
			// Committed before: by another content key with identical
			// files, or it is a damaged tree this download repairs.
			return t, done, s.repairTree(final, m, sums)
		}
		return Tree{}, ingested{}, noSpace(fmt.Errorf("committing tree %s: %w", t.Digest, err))
	}
	if err := s.root.Chmod(final, dirMode); err != nil {
		return Tree{}, ingested{}, fmt.Errorf("sealing tree %s: %w", t.Digest, err)
	}
	if err := s.syncDir(TreesDir); err != nil {
		return Tree{}, ingested{}, err
	}
	return t, done, nil
}

// ingestBlob streams one entry into name, hashing as it writes, fsyncs it and
// links it into blobs/; its one stream holds one of the node's connections. A blob that is already committed is a normal,
// cheap outcome: the new copy is dropped.
func (s *Store) ingestBlob(ctx context.Context, name string, e source.Entry, f Fetcher, p *Progress, objectKey string) (string, checkedBy, error) {
	want, err := s.expectedChecksum(ctx, f, e)
	if err != nil {
		return "", notChecked, err
	}
	if rf, ok := f.(RangeFetcher); ok && s.rangeCutoff > 0 && e.Size >= s.rangeCutoff {
		return s.ingestRanged(ctx, name, e, rf, p, objectKey, want)
	}
	sums, err := newObjectSums(want)
	if err != nil {
		return "", notChecked, err
	}
	defer sums.close()
	if err := s.acquireConn(ctx); err != nil {
		return "", notChecked, err
	}
	conn := true
	defer func() {
		if conn {
			s.releaseConn(ctx)
		}
	}()
	// Each request (the first and every resume) runs under its own guard
	// of the minimum rate.
	sctx, guard := s.guardStream(ctx)
	rc, err := f.Open(sctx, e)
	if err != nil {
		guard.stop()
		if cut := guard.err(err); cut != err {
			return "", notChecked, fmt.Errorf("opening %s: %w", e.Path, cut)
		}
		return "", notChecked, err
	}
	defer func() {
		if rc != nil {
			rc.Close()
		}
		guard.stop()
	}()
	w, err := s.root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", notChecked, noSpace(fmt.Errorf("creating ingest file: %w", err))
	}
	defer w.Close()

	hp := newHashPipe(sums)
	defer hp.stop()
	var n, flushed int64
	resumes := 0
	// Read one byte past the listed size so a grown object is caught.
	var r io.Reader = guardedReader{io.LimitReader(rc, e.Size+1), guard}
	for {
		buf := hp.next()
		k, rerr := r.Read(buf)
		if k > 0 {
			if _, err := w.Write(buf[:k]); err != nil {
				hp.drop(buf)
				return "", notChecked, noSpace(fmt.Errorf("writing %s: %w", e.Path, err))
			}
			hp.hash(buf[:k])
			n += int64(k)
			p.done.Add(int64(k))
			if n-flushed >= writebackEvery {
				startWriteback(w, flushed, n-flushed)
				flushed = n
			}
		} else {
			hp.drop(buf)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			// A stream cut mid-object (a remote or a middlebox closing a
			// connection, or the guard a trickling one) goes on from where
			// it stopped with a ranged read, as rclone's low-level retries
			// do, instead of starting over.
			rerr = guard.err(rerr)
			rf, ok := f.(RangeFetcher)
			if !ok || resumes == chunkAttempts || n >= e.Size || ctx.Err() != nil || !errors.Is(rerr, source.ErrUnavailable) && !errors.Is(rerr, io.ErrUnexpectedEOF) {
				return "", notChecked, fmt.Errorf("downloading %s: %w", e.Path, rerr)
			}
			resumes++
			rc.Close()
			guard.stop()
			// The resume queues for a connection again: a stream cut for
			// being slow must not keep its slot from other downloads.
			s.releaseConn(ctx)
			if conn = s.acquireConn(ctx) == nil; !conn {
				rc = nil
				return "", notChecked, fmt.Errorf("resuming %s: %w", e.Path, ctx.Err())
			}
			sctx, guard = s.guardStream(ctx)
			if rc, err = rf.OpenRange(sctx, e, n, e.Size-n); err != nil {
				rc = nil
				return "", notChecked, fmt.Errorf("resuming %s at byte %d after %v: %w", e.Path, n, rerr, guard.err(err))
			}
			r = guardedReader{io.LimitReader(rc, e.Size-n), guard}
		}
	}
	if n != e.Size {
		return "", notChecked, fmt.Errorf("%w: %s was listed with %d bytes but %d arrived; publish again to re-list it", source.ErrChanged, e.Path, e.Size, n)
	}
	// The stream is done: its connection goes back before the commit,
	// whose checksum check may need connections of its own (part HEADs).
	s.releaseConn(ctx)
	conn = false
	hp.wait()
	return s.commitBlob(ctx, w, name, e, sums)
}

// writebackEvery is how much of a download is handed to the disk at a time.
const writebackEvery = 8 << 20

// startWriteback asks the kernel to start writing a range of f to disk
// without waiting for it, so that the fsync before the blob's commit finds
// little left to write instead of the whole file (the storage
// initializer's copy never fsyncs at all). Best effort: a filesystem that
// cannot only makes that fsync longer.
func startWriteback(f *os.File, off, n int64) {
	_ = unix.SyncFileRange(int(f.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE)
}

// hashPipe hashes one stream's buffers on another goroutine, in order,
// while the next buffer is read and written: network, disk and hashing
// overlap as they do in rclone's buffered copy, instead of taking turns.
type hashPipe struct {
	sums  *objectSums
	bufs  []*[]byte     // from bufPool, returned by stop
	free  chan []byte   // buffers not being read into or hashed
	queue chan []byte   // written buffers, to hash in order
	idle  chan struct{} // the hasher has hashed everything queued so far
}

// hashPipeBuffers: one being read into, one being hashed, one waiting.
const hashPipeBuffers = 3

func newHashPipe(sums *objectSums) *hashPipe {
	hp := &hashPipe{sums: sums, free: make(chan []byte, hashPipeBuffers), queue: make(chan []byte, hashPipeBuffers), idle: make(chan struct{})}
	for range hashPipeBuffers {
		bp := bufPool.Get().(*[]byte)
		hp.bufs = append(hp.bufs, bp)
		hp.free <- *bp
	}
	queue := hp.queue // wait clears the field
	go func() {
		defer close(hp.idle)
		for b := range queue {
			hp.sums.write(b)
			hp.free <- b[:cap(b)]
		}
	}()
	return hp
}

func (hp *hashPipe) next() []byte    { return <-hp.free }
func (hp *hashPipe) drop(buf []byte) { hp.free <- buf[:cap(buf)] }
func (hp *hashPipe) hash(buf []byte) { hp.queue <- buf }

// wait returns once everything queued is hashed; the pipe takes no more.
func (hp *hashPipe) wait() {
	if hp.queue != nil {
		close(hp.queue)
		hp.queue = nil
		<-hp.idle
	}
}

// stop waits for the hasher and returns the buffers.
func (hp *hashPipe) stop() {
	hp.wait()
	for _, bp := range hp.bufs {
		bufPool.Put(bp)
	}
}

// objectSums are the digests computed while an object streams in: the
// store's sha256, and the remote's own checksum when it keeps one, so the
// bytes are checked against the remote before their blob is committed (the
// "bytes checked against the remote" invariant). The two run side by side
// on two cores for large writes: MD5 is the slower (about half sha256's
// speed with SHA extensions), and one after the other they would bound a
// download below either alone.
type objectSums struct {
	sha    hash.Hash
	remote *remoteSum // nil: the remote keeps no checksum we can get

	work chan []byte   // to the goroutine hashing remote, started on demand
	done chan struct{} // it finished a write
}

// parallelHashMin is the write size from which the remote's checksum is
// computed on another goroutine.
const parallelHashMin = 16 << 10

func newObjectSums(want source.Checksum) (*objectSums, error) {
	o := &objectSums{sha: sha256.New()}
	if want.Algorithm == "sha256" && want.Parts == nil {
		// The remote's sha256 of the whole object is the store's own.
		o.remote = &remoteSum{want: want, whole: o.sha, shared: true}
		return o, nil
	}
	if !want.IsZero() {
		r, err := newRemoteSum(want)
		if err != nil {
			return nil, err
		}
		o.remote = r
	}
	return o, nil
}

// write hashes b with both digests and returns when both are done, so the
// caller may reuse b.
func (o *objectSums) write(b []byte) {
	if o.remote == nil || o.remote.shared || o.remote.inline || len(b) < parallelHashMin {
		o.sha.Write(b)
		if o.remote != nil && !o.remote.shared {
			o.remote.Write(b)
		}
		return
	}
	if o.work == nil {
		o.work, o.done = make(chan []byte), make(chan struct{})
		go func() {
			for b := range o.work {
				o.remote.Write(b)
				o.done <- struct{}{}
			}
		}()
	}
	o.work <- b
	o.sha.Write(b)
	<-o.done
}

// close stops the goroutine write started, if any.
func (o *objectSums) close() {
	if o.work != nil {
		close(o.work)
		o.work = nil
	}
}

// commitBlob checks the remote's checksum, fsyncs and seals the ingest
// file and links it into blobs/, returning its sha256 and how it was
// checked.
func (s *Store) commitBlob(ctx context.Context, w *os.File, name string, e source.Entry, sums *objectSums) (string, checkedBy, error) {
	how := notChecked
	if sums.remote != nil {
		var err error
		if how, err = sums.remote.check(ctx, e); err != nil {
			return "", how, err
		}
	}
	if err := w.Sync(); err != nil {
		return "", how, noSpace(fmt.Errorf("syncing %s: %w", e.Path, err))
	}
	if err := w.Chmod(blobMode); err != nil {
		return "", how, fmt.Errorf("sealing %s: %w", e.Path, err)
	}
	sum := hex.EncodeToString(sums.sha.Sum(nil))
	// link, not rename: it never replaces a committed blob, so trees already
	// linking it keep sharing one inode.
	if err := s.linkNewBlob(name, sum); err != nil && !errors.Is(err, os.ErrExist) {
		return "", how, noSpace(fmt.Errorf("committing blob for %s: %w", e.Path, err))
	}
	return sum, how, nil
}

// ingested is what ingest did besides committing the tree.
type ingested struct {
	sums   []string // sha256 hex of each entry, in manifest order
	reused int      // entries linked from blobs/, not downloaded
	checks Checks   // how the downloaded entries were checked
}

// resumeAbove is the size from which a downloaded object is recorded in the
// object index as soon as its blob is committed, so that an interrupted
// download resumes without fetching it again.
const resumeAbove = 1 << 20

// buildTree creates dir as a tree of hardlinks into blobs/, then drops the
// write bits of every directory below it, deepest first.
func (s *Store) buildTree(dir, ingestDir string, m source.Manifest, sums []string) error {
	dirs := []string{dir}
	seen := map[string]bool{dir: true}
	if err := s.root.Mkdir(dir, 0o700); err != nil {
		return noSpace(fmt.Errorf("creating tree: %w", err))
	}
	for i, e := range m {
		parent := path.Join(dir, path.Dir(e.Path))
		if !seen[parent] {
			if err := s.root.MkdirAll(parent, 0o700); err != nil {
				return noSpace(fmt.Errorf("creating directory for %s: %w", e.Path, err))
			}
			for d := parent; !seen[d]; d = path.Dir(d) {
				seen[d] = true
				dirs = append(dirs, d)
			}
		}
		if err := s.linkBlob(sums[i], path.Join(ingestDir, fmt.Sprintf("blob-%d", i)), path.Join(dir, e.Path)); err != nil {
			return noSpace(fmt.Errorf("linking %s: %w", e.Path, err))
		}
	}
	// Deepest first so a parent is sealed after its children; the tree root
	// stays writable until it has been renamed into place.
	slices.SortFunc(dirs, func(a, b string) int { return len(b) - len(a) })
	for _, d := range dirs {
		if err := s.syncDir(d); err != nil {
			return err
		}
		if d != dir {
			if err := s.root.Chmod(d, dirMode); err != nil {
				return fmt.Errorf("sealing %s: %w", d, err)
			}
		}
	}
	return nil
}

// linkBlob links the committed blob sum at name. A blob this download found
// already committed may have been swept by an eviction since; then the
// download's own copy (ingestFile) is committed again.
func (s *Store) linkBlob(sum, ingestFile, name string) error {
	blob := path.Join(BlobsDir, sum)
	err := s.root.Link(blob, name)
	if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := s.linkNewBlob(ingestFile, sum); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return s.root.Link(blob, name)
}

// repairTree makes every file of an existing tree a link to its committed
// blob. Files linking a quarantined (corrupt) inode are replaced by an
// atomic rename, which pods that have the tree mounted see at once.
func (s *Store) repairTree(tree string, m source.Manifest, sums []string) error {
	for i, e := range m {
		name := path.Join(tree, e.Path)
		blob := path.Join(BlobsDir, sums[i])
		fi, err1 := s.root.Lstat(name)
		bi, err2 := s.root.Lstat(blob)
		if err1 == nil && err2 == nil && sameFile(fi, bi) {
			continue
		}
		parent := path.Dir(name)
		if err := s.root.Chmod(parent, 0o700); err != nil {
			return fmt.Errorf("repairing %s: %w", name, err)
		}
		tmp := path.Join(parent, ".repair-"+randomName())
		err := s.root.Link(blob, tmp)
		if err == nil {
			err = s.root.Rename(tmp, name)
		}
		if cerr := s.root.Chmod(parent, dirMode); err == nil {
			err = cerr
		}
		if err != nil {
			return noSpace(fmt.Errorf("repairing %s: %w", name, err))
		}
		klog.InfoS("tree file repaired", "tree", path.Base(tree), "file", e.Path)
	}
	return nil
}

// syncDir fsyncs a directory so the entries created in it survive a crash.
func (s *Store) syncDir(name string) error {
	d, err := s.root.Open(name)
	if err != nil {
		return fmt.Errorf("opening %s: %w", name, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", name, err)
	}
	return nil
}

// noSpace marks ENOSPC and EDQUOT errors so callers can report a full cache.
func noSpace(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	return err
}

// TreeDigest is the digest of a model's content: every path with its mode
// and file digest, in path order. Where the files came from is not part of
// it, so identical models from different URIs share one tree.
func TreeDigest(m source.Manifest, sums []string) string {
	h := sha256.New()
	io.WriteString(h, "modelcache tree v1\x00")
	for i, e := range m {
		fmt.Fprintf(h, "%o %s %s\x00", blobMode, sums[i], e.Path)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}
