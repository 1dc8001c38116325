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
	"slices"
	"strings"

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
// (a multipart ETag, a composite S3 checksum).
type remoteSum struct {
	want   source.Checksum
	whole  hash.Hash // the whole object's, or the current part's
	shared bool      // whole is the store's own sha256, written by its owner
	inline bool      // as cheap as handing it to another goroutine (CRC32, CRC32C)
	parts  []int64   // sizes of the parts still to come, the current first
	left   int64     // bytes left in the current part
	of     []byte    // the finished parts' checksums, concatenated
}

func newRemoteSum(want source.Checksum) (*remoteSum, error) {
	h, err := newHash(want.Algorithm)
	if err != nil {
		return nil, err
	}
	r := &remoteSum{want: want, whole: h, inline: want.Algorithm == "crc32" || want.Algorithm == "crc32c"}
	if want.Parts != nil {
		r.parts = want.Parts
		r.left = r.parts[0]
	}
	return r, nil
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

func (r *remoteSum) Write(b []byte) {
	if r.want.Parts == nil {
		r.whole.Write(b)
		return
	}
	for len(b) > 0 {
		if r.left == 0 {
			if len(r.parts) <= 1 {
				// More bytes than the parts hold: the sizes no longer
				// match, and sum says so.
				r.whole.Write(b)
				return
			}
			r.of = r.whole.Sum(r.of)
			r.whole.Reset()
			r.parts = r.parts[1:]
			r.left = r.parts[0]
		}
		n := int64(len(b))
		n = min(n, r.left)
		r.whole.Write(b[:n])
		r.left -= n
		b = b[n:]
	}
}

// sum is the checksum in the remote's notation.
func (r *remoteSum) sum() string {
	if r.want.Parts == nil {
		return r.encode(r.whole.Sum(nil))
	}
	of := r.whole.Sum(slices.Clip(r.of))
	h, _ := newHash(r.want.Algorithm)
	h.Write(of)
	return fmt.Sprintf("%s-%d", r.encode(h.Sum(nil)), len(r.want.Parts))
}

// encode writes a digest as the remote does: hex for an MD5 (listings and
// ETags), base64 for S3's additional checksums.
func (r *remoteSum) encode(b []byte) string {
	if r.want.Algorithm == "md5" {
		return hex.EncodeToString(b)
	}
	return base64.StdEncoding.EncodeToString(b)
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
