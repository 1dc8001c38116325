package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"math"
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
	done, err := s.fetchObjects(ctx, dir, m, f, p, objects, reuse, sums)
	if err != nil {
		return Tree{}, ingested{}, err
	}
	if err := s.syncDir(BlobsDir); err != nil {
		return Tree{}, ingested{}, err
	}
	t, err := s.placeTree(dir, m, sums)
	return t, done, err
}

// fetchObjects puts every object of m into dir as blob-<i>: linked from
// blobs/ when reuse names its blob, downloaded otherwise, s.transfers at a
// time. sums[i] is set to object i's blob as soon as it is known.
func (s *Store) fetchObjects(ctx context.Context, dir string, m source.Manifest, f Fetcher, p *Progress, objects []string, reuse map[string]string, sums []string) (ingested, error) {
	var reused, md5Checked, remoteChecked, unchecked atomic.Int64
	held, err := s.heldBySHA256(ctx, m, f)
	if err != nil {
		return ingested{}, err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(s.transfers)
	for i, e := range m {
		name := path.Join(dir, fmt.Sprintf("blob-%d", i))
		if held[i] {
			if err := s.root.Link(path.Join(BlobsDir, e.SHA256), name); err == nil {
				// Not counted as reused: Verify just showed these
				// credentials read it, so the cache need not ask again.
				sums[i] = e.SHA256
				p.done.Add(e.Size)
				p.files.Add(1)
				continue
			}
		}
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
			switch {
			case how == byListedMD5:
				md5Checked.Add(1)
			case how == byRemoteDigest, checksWhileStreaming(f, e):
				remoteChecked.Add(1)
			default:
				unchecked.Add(1)
			}
			s.recordObject(objects[i], e, sum)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return ingested{}, err
	}
	return ingested{sums: sums, reused: int(reused.Load()),
		checks: Checks{MD5: int(md5Checked.Load()), Remote: int(remoteChecked.Load()), Unchecked: int(unchecked.Load())}}, nil
}

// canRange reports whether f can read e in ranges: a source.RangeChecker
// says per entry (an OCI tar layer's file cannot be), others always can.
func canRange(f Fetcher, e source.Entry) bool {
	c, ok := f.(source.RangeChecker)
	return !ok || c.CanRange(e)
}

// StreamChecker is a Fetcher that checks some objects' bytes itself while
// they stream and fails the read before its end when they are wrong (a Hub
// file against its git blob id, an OCI tar layer against its digest): the
// store counts them as checked against the remote.
type StreamChecker interface {
	ChecksWhileStreaming(e source.Entry) bool
}

func checksWhileStreaming(f Fetcher, e source.Entry) bool {
	c, ok := f.(StreamChecker)
	return ok && c.ChecksWhileStreaming(e)
}

// Verifier is a Fetcher that can show that its credentials read entries,
// with metadata requests only (source.Remote's Verify).
type Verifier interface {
	Verify(ctx context.Context, m source.Manifest) error
}

// heldBySHA256 marks the entries whose sha256 the source named and whose
// blob the node already holds, whatever model brought it: they are linked,
// not downloaded. Only once f shows that this request's credentials read
// them (the "authorized cache hits" invariant, per file): a blob another
// tenant fetched is no proof this one may read it. A fetcher that cannot
// show it downloads them.
func (s *Store) heldBySHA256(ctx context.Context, m source.Manifest, f Fetcher) (map[int]bool, error) {
	v, ok := f.(Verifier)
	if !ok {
		return nil, nil
	}
	held := map[int]bool{}
	var check source.Manifest
	for i, e := range m {
		if isHex64(e.SHA256) && s.HasBlob(e.SHA256) {
			held[i] = true
			check = append(check, e)
		}
	}
	if len(check) == 0 {
		return nil, nil
	}
	if err := v.Verify(s.withConns(ctx), check); err != nil {
		return nil, fmt.Errorf("checking the credentials read the %d files already on the node: %w", len(check), err)
	}
	return held, nil
}

// recordObject records a large downloaded object in the object index now,
// not with the tree: a download killed later keeps it and the next one
// links it (resume). Small objects are not worth a transaction each.
func (s *Store) recordObject(objectKey string, e source.Entry, sum string) {
	if objectKey == "" || e.Size < resumeAbove {
		return
	}
	if oi, ok := s.index.(ObjectIndex); ok {
		if err := oi.RecordObject(objectKey, sum); err != nil {
			klog.ErrorS(err, "recording a downloaded object; a retry downloads it again", "object", e.Path)
		}
	}
}

// placeTree builds the tree of m's blobs in dir and renames it into
// trees/: the only step that makes the model visible.
func (s *Store) placeTree(dir string, m source.Manifest, sums []string) (Tree, error) {
	t := Tree{Digest: TreeDigest(m, sums), Size: m.Size(), Files: len(m)}
	tmp := path.Join(dir, "tree")
	if err := s.buildTree(tmp, dir, m, sums); err != nil {
		return Tree{}, err
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
			return t, s.repairTree(final, m, sums)
		}
		return Tree{}, noSpace(fmt.Errorf("committing tree %s: %w", t.Digest, err))
	}
	if err := s.root.Chmod(final, dirMode); err != nil {
		return Tree{}, fmt.Errorf("sealing tree %s: %w", t.Digest, err)
	}
	if err := s.syncDir(TreesDir); err != nil {
		return Tree{}, err
	}
	return t, nil
}

// ingestBlob streams one entry into name, hashing as it writes, fsyncs it and
// links it into blobs/; its one stream holds one of the node's connections. A blob that is already committed is a normal,
// cheap outcome: the new copy is dropped.
func (s *Store) ingestBlob(ctx context.Context, name string, e source.Entry, f Fetcher, p *Progress, objectKey string) (string, checkedBy, error) {
	want, err := s.expectedChecksum(ctx, f, e)
	if err != nil {
		return "", notChecked, err
	}
	f, named := route(ctx, f, e, !want.IsZero())
	if named != "" {
		// Bytes from elsewhere than the remote are not kept for a resume:
		// a peer's wrong bytes, cut before the check, would poison the
		// download that resumes them from the remote.
		objectKey = ""
	}
	if rf, ok := f.(RangeFetcher); ok && s.rangeCutoff > 0 && e.Size >= s.rangeCutoff && canRange(f, e) {
		sum, how, err := s.ingestRanged(ctx, name, e, rf, p, objectKey, want, named)
		if !errors.Is(err, source.ErrNoRanges) {
			return sum, how, err
		}
		// The remote answered a range with the whole object: one stream,
		// into an ingest file of its own again.
		klog.V(2).InfoS("remote serves no byte ranges; reading the file in one stream", "object", e.Path)
		if err := s.root.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", notChecked, fmt.Errorf("removing the ranged attempt at %s: %w", e.Path, err)
		}
	}
	sums, err := newObjectSums(want)
	if err != nil {
		return "", notChecked, err
	}
	sums.named = named
	defer sums.close()
	st := &blobStream{s: s, f: f, e: e}
	defer st.close(ctx)
	if err := st.open(ctx); err != nil {
		return "", notChecked, err
	}
	w, err := s.root.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", notChecked, noSpace(fmt.Errorf("creating ingest file: %w", err))
	}
	defer w.Close()
	hp := newHashPipe(sums)
	defer hp.stop()
	if err := st.copyTo(ctx, w, hp, p); err != nil {
		return "", notChecked, err
	}
	// The stream is done: its connection goes back before the commit,
	// whose checksum check may need connections of its own (part HEADs).
	st.close(ctx)
	hp.wait()
	return s.commitBlob(ctx, w, name, e, sums)
}

// blobStream is one object's single-stream download: the response being
// read, the guard of its minimum rate, and the connection it holds.
type blobStream struct {
	s       *Store
	f       Fetcher
	e       source.Entry
	rc      io.ReadCloser
	guard   *streamGuard
	conn    bool // holds one of the node's connections
	resumes int
}

// open takes a connection and opens the object. Each request (the first
// and every resume) runs under its own guard of the minimum rate.
func (st *blobStream) open(ctx context.Context) error {
	if err := st.s.acquireConn(ctx); err != nil {
		return err
	}
	st.conn = true
	sctx, guard := st.s.guardStream(ctx)
	rc, err := st.f.Open(sctx, st.e)
	if err != nil {
		guard.stop()
		if cut := guard.err(err); cut != err {
			return fmt.Errorf("opening %s: %w", st.e.Path, cut)
		}
		return err
	}
	st.rc, st.guard = st.s.countFrom(downloadOf(ctx), rc), guard
	return nil
}

// close ends the response and gives the connection back; it may be
// called more than once.
func (st *blobStream) close(ctx context.Context) {
	if st.rc != nil {
		st.rc.Close()
		st.rc = nil
	}
	if st.guard != nil {
		st.guard.stop()
		st.guard = nil
	}
	if st.conn {
		st.s.releaseConn(ctx)
		st.conn = false
	}
}

// copyTo writes the object into w and hands every byte to hp, resuming a
// stream cut mid-object, and checks that exactly the listed size arrived.
func (st *blobStream) copyTo(ctx context.Context, w *os.File, hp *hashPipe, p *Progress) error {
	e := st.e
	var n, flushed int64
	// Read one byte past the listed size so a grown object is caught.
	var r io.Reader = guardedReader{io.LimitReader(st.rc, e.Size+1), st.guard}
	for {
		buf := hp.next()
		k, rerr := r.Read(buf)
		if k > 0 {
			if _, err := w.Write(buf[:k]); err != nil {
				hp.drop(buf)
				return noSpace(fmt.Errorf("writing %s: %w", e.Path, err))
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
			if err := st.resume(ctx, n, rerr); err != nil {
				return err
			}
			r = guardedReader{io.LimitReader(st.rc, e.Size-n), st.guard}
		}
	}
	if n != e.Size {
		return fmt.Errorf("%w: %s was listed with %d bytes but %d arrived; publish again to re-list it", source.ErrChanged, e.Path, e.Size, n)
	}
	return nil
}

// resume goes on from byte n of a stream cut by rerr (a remote or a
// middlebox closing a connection, or the guard a trickling one) with a
// ranged read, as rclone's low-level retries do, instead of starting over.
// The resume queues for a connection again: a stream cut for being slow
// must not keep its slot from other downloads.
func (st *blobStream) resume(ctx context.Context, n int64, rerr error) error {
	e := st.e
	rerr = st.guard.err(rerr)
	rf, ok := st.f.(RangeFetcher)
	if !ok || st.resumes == chunkAttempts || n >= e.Size || ctx.Err() != nil || !errors.Is(rerr, source.ErrUnavailable) && !errors.Is(rerr, io.ErrUnexpectedEOF) {
		return fmt.Errorf("downloading %s: %w", e.Path, rerr)
	}
	st.resumes++
	st.close(ctx)
	if err := st.s.acquireConn(ctx); err != nil {
		return fmt.Errorf("resuming %s: %w", e.Path, ctx.Err())
	}
	st.conn = true
	sctx, guard := st.s.guardStream(ctx)
	st.guard = guard
	rc, err := rf.OpenRange(sctx, e, n, e.Size-n)
	if err != nil {
		return fmt.Errorf("resuming %s at byte %d after %v: %w", e.Path, n, rerr, guard.err(err))
	}
	st.rc = st.s.countFrom(downloadOf(ctx), rc)
	return nil
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
			hp.sums.writeThen(b, func() { hp.free <- b[:cap(b)] })
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
		hp.sums.wait()
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
// "bytes checked against the remote" invariant). The remote's runs on
// other goroutines (remoteSum), beside the sha256: MD5 is the slower
// (about a third of sha256's speed with SHA extensions), and one after the
// other they would bound a download below either alone.
type objectSums struct {
	sha    hash.Hash
	remote *remoteSum // nil: the remote keeps no checksum we can get
	named  string     // the sha256 the bytes' sender named, when not the remote (Router)
}

func newObjectSums(want source.Checksum) (*objectSums, error) {
	o := &objectSums{sha: sha256.New()}
	if want.Algorithm == "sha256" && want.Parts == nil {
		// The remote's sha256 of the whole object is the store's own.
		o.remote = &remoteSum{want: want, shared: true, ends: []int64{math.MaxInt64}, hashes: []hash.Hash{o.sha}, sums: make([][]byte, 1), made: 1}
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
	done := make(chan struct{})
	o.writeThen(b, func() { close(done) })
	<-done
}

// writeThen hashes b with the store's sha256 before it returns, and hands
// it to the remote's checksum; release runs (perhaps on another goroutine)
// once both are done with b. The next chunk's sha256 need not wait for
// this one's MD5.
func (o *objectSums) writeThen(b []byte, release func()) {
	if o.remote == nil || o.remote.shared {
		o.sha.Write(b)
		release()
		return
	}
	done := o.remote.start(b, release)
	o.sha.Write(b)
	done()
}

// shaOnly is a writer of o's sha256 alone, for bytes whose remote
// checksum their reader computes (remoteSum.hashWhole).
func (o *objectSums) shaOnly() *objectSums { return &objectSums{sha: o.sha} }

// wait returns once every byte written is hashed and released.
func (o *objectSums) wait() {
	if o.remote != nil {
		o.remote.wait()
	}
}

// close stops the remote checksum's workers, once they are done.
func (o *objectSums) close() {
	if o.remote != nil {
		o.remote.close()
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
	if sums.named != "" && sum != sums.named {
		return "", how, fmt.Errorf("%w: %s came with sha256 %s named by its sender, and its bytes have sha256 %s", source.ErrCorrupt, e.Path, sums.named, sum)
	}
	// link, not rename: it never replaces a committed blob, so trees already
	// linking it keep sharing one inode.
	if err := s.linkNewBlob(name, sum); err != nil && !errors.Is(err, os.ErrExist) {
		return "", how, noSpace(fmt.Errorf("committing blob for %s: %w", e.Path, err))
	}
	return sum, how, nil
}

// ingested is what ingest did besides committing the tree.
type ingested struct {
	sums   []string  // sha256 hex of each entry, in manifest order
	reused int       // entries linked from blobs/ by the object index, not downloaded nor verified
	checks Checks    // how the downloaded entries were checked
	from   BytesFrom // where the downloaded bytes came from
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
