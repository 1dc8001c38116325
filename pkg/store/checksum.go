package store

import (
	"context"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"hash"
	"hash/crc32"
	"hash/crc64"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	md5simd "github.com/minio/md5-simd"
	"github.com/modelcache/modelcache/pkg/source"
)

// checkedBy says how the bytes of one downloaded object were checked
// against the remote.
type checkedBy int

const (
	notChecked     checkedBy = iota // the remote keeps no checksum we can get
	byListedMD5                     // the MD5 the listing gave (ETag or rclone's metadata)
	byRemoteDigest                  // a checksum asked for (S3 additional checksum, multipart ETag, GCS crc32c)
)

// AskChecksumAbove is the size from which an object listed with an MD5 is
// still asked for another checksum: S3 keeps a CRC for most objects (it
// adds a CRC64NVME to every new one since 2025; SDKs send a CRC32), GCS a
// crc32c of every object, and computing one costs a half (CRC64NVME) to a
// fiftieth (CRC32, CRC32C) of an MD5's CPU time, which on a small node
// bounds a download. Below it the MD5 costs less than the request's round
// trip.
const AskChecksumAbove = 64 << 20

// expectedChecksum is what a download of e is checked against: the
// checksum the remote gives on request, for an object listed without an
// MD5 or a large one; else the listing's MD5; else nothing. Each request
// holds one of the node's connections (source.WithSlots).
func (s *Store) expectedChecksum(ctx context.Context, f Fetcher, e source.Entry) (source.Checksum, error) {
	if isHex64(e.SHA256) {
		// The source named the file's sha256 (a Hub LFS oid, an OCI
		// layer digest): the store's own digest checks it, at no cost.
		return source.Checksum{Algorithm: "sha256", Value: e.SHA256, Name: "sha256 the source names"}, nil
	}
	listed := source.Checksum{}
	if source.IsMD5Hex(e.Hash) {
		listed = source.Checksum{Algorithm: "md5", Value: strings.ToLower(e.Hash), Name: "MD5"}
	}
	cs, ok := f.(source.Checksummer)
	if !ok || !listed.IsZero() && e.Size < AskChecksumAbove {
		return listed, nil
	}
	asked, err := cs.Checksum(s.withConns(ctx), e)
	if err != nil || asked.IsZero() {
		return listed, err
	}
	return asked, nil
}

// remoteSum computes the remote's checksum of an object as it streams in:
// of the whole object, or of each part and then of the parts' checksums
// (a multipart ETag, a composite S3 checksum). Parts are independent of
// each other, so they hash on several goroutines at once, each part in
// order on one of them: a multipart ETag (MD5, a third of sha256's speed
// with SHA extensions) would otherwise bound a download to what one core
// hashes. The MD5s of parts share one SIMD server's lanes (md5simd: up to
// 8 or 16 MD5s in one core's vector registers), so hashing several parts
// at once also costs less CPU than one after the other.
type remoteSum struct {
	want   source.Checksum
	shared bool // a whole-object sha256: the store's own, written by its owner
	inline bool // as cheap as handing it to another goroutine (CRC32, CRC32C)
	lanes  bool // MD5 parts, hashed in md5Lanes

	ends   []int64     // where each part ends in the object (the last: never, so extra bytes change its sum)
	hashes []hash.Hash // each part's running hash, from its first byte to its last
	sums   [][]byte    // each finished part's checksum
	made   int         // parts whose hash was made
	off    int64       // bytes handed in so far
	cur    int         // the part at off

	workers []chan partWrite // started on the first write handed off
	pending sync.WaitGroup   // writes handed off and not yet hashed
}

// md5Lanes hashes the MD5s of parts, shared by every download: its lanes
// fill when several parts hash at once.
var md5Lanes = sync.OnceValue(md5simd.NewServer)

// maxLaneWorkers is how many parts of one object may hash in md5Lanes at
// once: what fills the 16 lanes of AVX-512 (8 of AVX2 on each of two cores).
const maxLaneWorkers = 16

// partWrite is bytes of one part for a worker to hash, and what to call
// once it has.
type partWrite struct {
	part int
	b    []byte
	last bool // b ends the part: its checksum is taken and its hash freed
	done func()
}

func newRemoteSum(want source.Checksum) (*remoteSum, error) {
	if _, err := newHash(want.Algorithm); err != nil {
		return nil, err
	}
	r := &remoteSum{want: want, inline: want.Algorithm == "crc32" || want.Algorithm == "crc32c",
		lanes: want.Algorithm == "md5" && len(want.Parts) > 1}
	sizes := want.Parts
	if sizes == nil {
		sizes = []int64{math.MaxInt64}
	}
	var end int64
	for _, n := range sizes {
		end += n
		r.ends = append(r.ends, end)
	}
	r.ends[len(r.ends)-1] = math.MaxInt64
	r.hashes = make([]hash.Hash, len(sizes))
	r.sums = make([][]byte, len(sizes))
	return r, nil
}

// partHash is a new hash for one part.
func (r *remoteSum) partHash() hash.Hash {
	if r.lanes {
		return md5Lanes().NewHash()
	}
	h, _ := newHash(r.want.Algorithm) // accepted by newRemoteSum
	return h
}

// hashPart hashes b of part i, and takes the part's checksum when b is its
// last bytes.
func (r *remoteSum) hashPart(i int, b []byte, last bool) {
	h := r.hashes[i]
	h.Write(b)
	if last {
		r.sums[i] = h.Sum(nil)
		freeHash(h)
		r.hashes[i] = nil
	}
}

// partLayout is the part size of a remote checksum whose parts are all of
// one size but the last (as every S3 client uploads them), 0 when they are
// not, or when the parts do not add up to size.
func (r *remoteSum) partLayout(size int64) int64 {
	parts := r.want.Parts
	if len(parts) < 2 {
		return 0
	}
	var sum int64
	for i, n := range parts {
		if n <= 0 || i < len(parts)-1 && n != parts[0] || n > parts[0] {
			return 0
		}
		sum += n
	}
	if sum != size {
		return 0
	}
	return parts[0]
}

// hashWhole hashes b, the next bytes of part i, on the caller's goroutine:
// for a caller that brings each part's bytes in order itself (a ranged
// stream reading whole parts), so that as many parts hash at once as
// there are streams. It must not be mixed with start for one part once
// start has handed that part's bytes out and not yet waited for them.
func (r *remoteSum) hashWhole(i int, b []byte, last bool) {
	if r.hashes[i] == nil && r.sums[i] == nil {
		r.hashes[i] = r.partHash()
	}
	r.hashPart(i, b, last)
}

// freeHash gives an md5Lanes hash's lane back.
func freeHash(h hash.Hash) {
	if c, ok := h.(interface{ Close() }); ok {
		c.Close()
	}
}

// crc64NVME is the table of the CRC-64/NVME polynomial S3 uses, in the
// bit-reversed form hash/crc64 expects.
var crc64NVME = crc64.MakeTable(0x9a6c9329ac4bc9b5)

func newHash(alg string) (hash.Hash, error) {
	switch alg {
	case "md5":
		return md5.New(), nil
	case "sha1":
		return sha1.New(), nil
	case "sha256":
		return sha256.New(), nil
	case "crc32":
		return crc32.NewIEEE(), nil
	case "crc32c":
		return crc32.New(crc32.MakeTable(crc32.Castagnoli)), nil
	case "crc64nvme":
		return crc64.New(crc64NVME), nil
	}
	return nil, fmt.Errorf("checksum algorithm %q is not supported", alg)
}

// Write hashes b and returns once it is hashed.
func (r *remoteSum) Write(b []byte) {
	done := make(chan struct{})
	r.start(b, func() { close(done) })()
	<-done
}

// start hands b's bytes of each part it spans to that part's worker
// (hashes them here for an inline algorithm) and returns the caller's own
// share of release: once it and every worker are done with b, release
// runs, and b may be reused.
func (r *remoteSum) start(b []byte, release func()) func() {
	if r.inline {
		r.split(b, r.hashPart)
		return release
	}
	if r.workers == nil {
		n := min(runtime.GOMAXPROCS(0), len(r.ends))
		if r.lanes {
			n = min(maxLaneWorkers, len(r.ends))
		}
		r.workers = make([]chan partWrite, n)
		for i := range r.workers {
			ch := make(chan partWrite, 16)
			r.workers[i] = ch
			go func() {
				for w := range ch {
					r.hashPart(w.part, w.b, w.last)
					w.done()
					r.pending.Done()
				}
			}()
		}
	}
	var refs atomic.Int32
	refs.Store(1)
	done := func() {
		if refs.Add(-1) == 0 {
			release()
		}
	}
	r.split(b, func(part int, piece []byte, last bool) {
		refs.Add(1)
		r.pending.Add(1)
		r.workers[part%len(r.workers)] <- partWrite{part: part, b: piece, last: last, done: done}
	})
	return done
}

// split calls hash with each part b spans, the bytes of it, and whether
// they are the part's last, in order, making each part's hash as its
// first bytes come.
func (r *remoteSum) split(b []byte, hash func(part int, b []byte, last bool)) {
	for len(b) > 0 {
		for r.off >= r.ends[r.cur] {
			r.cur++
		}
		if r.cur >= r.made {
			r.hashes[r.cur] = r.partHash()
			r.made = r.cur + 1
		}
		n := min(int64(len(b)), r.ends[r.cur]-r.off)
		r.off += n
		hash(r.cur, b[:n], r.off == r.ends[r.cur])
		b = b[n:]
	}
}

// wait returns once every byte handed in is hashed.
func (r *remoteSum) wait() { r.pending.Wait() }

// close stops the workers, once they have hashed what they hold, and
// frees the hashes of parts not finished.
func (r *remoteSum) close() {
	r.wait()
	for _, ch := range r.workers {
		close(ch)
	}
	r.workers = nil
	for i, h := range r.hashes {
		if h != nil && !r.shared {
			freeHash(h)
			r.hashes[i] = nil
		}
	}
}

// sum is the checksum in the remote's notation.
func (r *remoteSum) sum() string {
	r.wait()
	part := func(i int) []byte {
		if r.sums[i] == nil {
			h := r.hashes[i]
			if h == nil { // no byte of it came
				h = r.partHash()
				defer freeHash(h)
			}
			r.sums[i] = h.Sum(nil)
		}
		return r.sums[i]
	}
	if r.want.Parts == nil {
		return r.encode(part(0))
	}
	var of []byte
	for i := range r.hashes {
		of = append(of, part(i)...)
	}
	h, _ := newHash(r.want.Algorithm)
	h.Write(of)
	return fmt.Sprintf("%s-%d", r.encode(h.Sum(nil)), len(r.want.Parts))
}

// encode writes a digest as the remote does: hex for an MD5 (listings and
// ETags) and for a value the source gave in hex (a sha256 digest), base64
// for S3's additional checksums (which never look like hex: base64 of
// these sizes ends in '=' or differs in length).
func (r *remoteSum) encode(b []byte) string {
	if v := r.want.Value; r.want.Algorithm == "md5" || len(v) == hex.EncodedLen(len(b)) && isHexString(v) {
		return hex.EncodeToString(b)
	}
	return base64.StdEncoding.EncodeToString(b)
}

func isHexString(v string) bool {
	_, err := hex.DecodeString(v)
	return err == nil
}

// check compares the bytes that arrived with the remote's checksum. A
// mismatch over an inferred part layout is corruption only if the real
// layout is that one; if the parts differ, the object is accepted
// unchecked, as one without a checksum would be.
func (r *remoteSum) check(ctx context.Context, e source.Entry) (checkedBy, error) {
	got := r.sum()
	if strings.EqualFold(got, r.want.Value) {
		if r.want.Name == "MD5" {
			return byListedMD5, nil
		}
		return byRemoteDigest, nil
	}
	if r.want.Layout != nil {
		real, err := r.want.Layout(ctx)
		if err != nil {
			return notChecked, fmt.Errorf("reading the part sizes of %s to check its %s: %w", e.Path, r.want.Name, err)
		}
		if !slices.Equal(real, r.want.Parts) {
			return notChecked, nil
		}
	}
	return notChecked, fmt.Errorf("%w: %s: the remote's %s is %s but the bytes that arrived hash to %s; the download is retried", source.ErrCorrupt, e.Path, r.want.Name, r.want.Value, got)
}
