package store

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/source"
)

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// md5Of and crc32Of are the reference computations, written out
// independently of remoteSum.
func md5Of(b []byte) []byte { s := md5.Sum(b); return s[:] }

func crc32Of(b []byte) []byte { return be32(crc32.ChecksumIEEE(b)) }

// partsOf applies sum to each part of data and then to their
// concatenation, as S3 computes a multipart ETag or a composite checksum.
func partsOf(data []byte, sizes []int64, sum func([]byte) []byte) []byte {
	var of []byte
	for _, n := range sizes {
		of = append(of, sum(data[:n])...)
		data = data[n:]
	}
	return sum(of)
}

// The check values of the CRC catalogue ("123456789") and digests of
// known inputs, and multipart values as S3 computes them, whatever the
// size of the writes that feed them.
func TestRemoteSum_MatchesTheRemotesNotation(t *testing.T) {
	check := []byte("123456789")
	data := make([]byte, 1000)
	for i := range data {
		data[i] = byte(i * 7)
	}
	sha := sha256.Sum256(check)
	sha1sum := sha1.Sum(check)
	tests := []struct {
		name string
		data []byte
		want source.Checksum
	}{
		{"crc64nvme check value", check, source.Checksum{Algorithm: "crc64nvme", Value: b64(binary.BigEndian.AppendUint64(nil, 0xae8b14860a799888))}},
		{"crc32c check value", check, source.Checksum{Algorithm: "crc32c", Value: b64(be32(0xe3069283))}},
		{"crc32 check value", check, source.Checksum{Algorithm: "crc32", Value: b64(be32(0xcbf43926))}},
		{"sha256", check, source.Checksum{Algorithm: "sha256", Value: b64(sha[:])}},
		{"sha1", check, source.Checksum{Algorithm: "sha1", Value: b64(sha1sum[:])}},
		{"listed md5", data, source.Checksum{Algorithm: "md5", Value: hex.EncodeToString(md5Of(data)), Name: "MD5"}},
		{"multipart ETag, 3 parts", data, source.Checksum{Algorithm: "md5", Parts: []int64{400, 400, 200},
			Value: hex.EncodeToString(partsOf(data, []int64{400, 400, 200}, md5Of)) + "-3"}},
		{"multipart ETag, 1 part", data, source.Checksum{Algorithm: "md5", Parts: []int64{1000},
			Value: hex.EncodeToString(md5Of(md5Of(data))) + "-1"}},
		{"composite crc32, uneven parts", data, source.Checksum{Algorithm: "crc32", Parts: []int64{1, 998, 1},
			Value: b64(partsOf(data, []int64{1, 998, 1}, crc32Of)) + "-3"}},
	}
	for _, tt := range tests {
		for _, write := range []int{1, 3, 64, 399, 400, 401, 4096} {
			t.Run(fmt.Sprintf("%s/writes of %d", tt.name, write), func(t *testing.T) {
				r, err := newRemoteSum(tt.want)
				if err != nil {
					t.Fatal(err)
				}
				for b := tt.data; len(b) > 0; {
					n := min(write, len(b))
					r.Write(b[:n])
					b = b[n:]
				}
				if got := r.sum(); got != tt.want.Value {
					t.Fatalf("sum %s, want %s", got, tt.want.Value)
				}
			})
		}
	}
}

// A mismatch is corruption, retryable, naming both values; over an
// inferred part layout, only when the real layout is the inferred one: an
// upload with parts of other sizes is accepted unchecked, never refused
// for a checksum computed over the wrong parts.
func TestRemoteSum_Check(t *testing.T) {
	data := make([]byte, 300)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	inferred := []int64{100, 100, 100}
	real := []int64{100, 150, 50}
	etag := func(sizes []int64) string { return hex.EncodeToString(partsOf(data, sizes, md5Of)) + "-3" }
	layout := func(sizes []int64, err error) func(context.Context) ([]int64, error) {
		return func(context.Context) ([]int64, error) { return sizes, err }
	}
	errLayout := errors.New("HEAD failed")
	e := source.Entry{Path: "w.bin", Size: int64(len(data))}
	tests := []struct {
		name    string
		want    source.Checksum
		bytes   []byte
		how     checkedBy
		wantErr error
	}{
		{"listed MD5 matches", source.Checksum{Algorithm: "md5", Value: hex.EncodeToString(md5Of(data)), Name: "MD5"}, data, byListedMD5, nil},
		{"remote checksum matches", source.Checksum{Algorithm: "md5", Value: etag(inferred), Parts: inferred, Name: "multipart ETag"}, data, byRemoteDigest, nil},
		{"upper-case hex matches", source.Checksum{Algorithm: "md5", Value: strings.ToUpper(hex.EncodeToString(md5Of(data))), Name: "MD5"}, data, byListedMD5, nil},
		{"flipped byte", source.Checksum{Algorithm: "md5", Value: etag(inferred), Parts: inferred, Name: "multipart ETag"}, flip(data, 150), notChecked, source.ErrCorrupt},
		{"one byte more than the parts", source.Checksum{Algorithm: "md5", Value: etag(inferred), Parts: inferred, Name: "multipart ETag"}, append(append([]byte{}, data...), 0), notChecked, source.ErrCorrupt},
		{"inferred layout, real one differs", source.Checksum{Algorithm: "md5", Value: etag(real), Parts: inferred, Layout: layout(real, nil), Name: "multipart ETag"}, data, notChecked, nil},
		{"inferred layout is the real one", source.Checksum{Algorithm: "md5", Value: etag(real), Parts: real, Layout: layout(real, nil), Name: "multipart ETag"}, flip(data, 10), notChecked, source.ErrCorrupt},
		{"inferred layout unreadable", source.Checksum{Algorithm: "md5", Value: etag(real), Parts: inferred, Layout: layout(nil, errLayout), Name: "multipart ETag"}, data, notChecked, errLayout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := newRemoteSum(tt.want)
			if err != nil {
				t.Fatal(err)
			}
			r.Write(tt.bytes)
			how, err := r.check(context.Background(), e)
			if how != tt.how || !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("check = %v, %v; want %v, %v", how, err, tt.how, tt.wantErr)
			}
			if errors.Is(err, source.ErrCorrupt) {
				for _, s := range []string{"w.bin", tt.want.Name, tt.want.Value, r.sum()} {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not say %q", err, s)
					}
				}
			}
		})
	}
}

func TestRemoteSum_UnknownAlgorithmRefused(t *testing.T) {
	if _, err := newRemoteSum(source.Checksum{Algorithm: "xxh3", Value: "x"}); err == nil {
		t.Fatal("an algorithm remoteSum cannot compute was accepted: the object would pass unchecked as if checked")
	}
}

func flip(b []byte, at int) []byte {
	c := append([]byte{}, b...)
	c[at] ^= 1
	return c
}

// A remote sha256 of the whole object is checked against the store's own
// sha256, not computed twice; a wrong one is still refused.
func TestObjectSums_RemoteSHA256IsTheStoresOwn(t *testing.T) {
	data := []byte("model bytes")
	sum := sha256.Sum256(data)
	e := source.Entry{Path: "w.bin", Size: int64(len(data))}
	for _, tt := range []struct {
		name  string
		value string
		err   error
	}{
		{"matches", b64(sum[:]), nil},
		{"differs", b64(make([]byte, 32)), source.ErrCorrupt},
	} {
		t.Run(tt.name, func(t *testing.T) {
			o, err := newObjectSums(source.Checksum{Algorithm: "sha256", Value: tt.value, Name: "x-amz-checksum-sha256"})
			if err != nil {
				t.Fatal(err)
			}
			defer o.close()
			if !o.remote.shared {
				t.Fatal("the remote's sha256 is computed a second time")
			}
			o.write(data)
			how, err := o.remote.check(context.Background(), e)
			if !errors.Is(err, tt.err) || (err == nil) != (tt.err == nil) {
				t.Fatalf("check = %v, %v; want %v", how, err, tt.err)
			}
			if err == nil && how != byRemoteDigest {
				t.Fatalf("checked by %v, want byRemoteDigest", how)
			}
			if got := hex.EncodeToString(o.sha.Sum(nil)); got != hex.EncodeToString(sum[:]) {
				t.Fatalf("store sha256 %s, want %x", got, sum)
			}
		})
	}
}

// askingFetcher is a remote that keeps a checksum besides the listing's.
type askingFetcher struct {
	Fetcher
	keeps source.Checksum
	err   error
	asked int
}

func (a *askingFetcher) Checksum(context.Context, source.Entry) (source.Checksum, error) {
	a.asked++
	return a.keeps, a.err
}

// What a download is checked against: the remote's own checksum for
// objects listed without an MD5 and for large ones, the listed MD5 for
// small ones (not worth a request) and whenever the remote keeps nothing
// more.
func TestExpectedChecksum(t *testing.T) {
	const listedMD5 = "0123456789abcdef0123456789abcdef"
	crc := source.Checksum{Algorithm: "crc64nvme", Value: "Fr9MjSyV9n4=", Name: "x-amz-checksum-crc64nvme"}
	md5 := source.Checksum{Algorithm: "md5", Value: listedMD5, Name: "MD5"}
	errHead := errors.New("HEAD refused")
	tests := []struct {
		name    string
		e       source.Entry
		keeps   source.Checksum
		err     error
		want    source.Checksum
		asked   int
		wantErr error
	}{
		{"small, listed MD5", source.Entry{Size: AskChecksumAbove - 1, Hash: listedMD5}, crc, nil, md5, 0, nil},
		{"large, listed MD5, remote CRC", source.Entry{Size: AskChecksumAbove, Hash: listedMD5}, crc, nil, crc, 1, nil},
		{"large, listed MD5, nothing more", source.Entry{Size: AskChecksumAbove, Hash: listedMD5}, source.Checksum{}, nil, md5, 1, nil},
		{"small, no MD5", source.Entry{Size: 10}, crc, nil, crc, 1, nil},
		{"no MD5, nothing at all", source.Entry{Size: 10}, source.Checksum{}, nil, source.Checksum{}, 1, nil},
		{"request failed", source.Entry{Size: 10}, source.Checksum{}, errHead, source.Checksum{}, 1, errHead},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &Store{conns: newFairSlots(1)}
			f := &askingFetcher{keeps: tt.keeps, err: tt.err}
			got, err := s.expectedChecksum(context.Background(), f, tt.e)
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) {
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
			if got.Algorithm != tt.want.Algorithm || got.Value != tt.want.Value || got.Name != tt.want.Name {
				t.Errorf("checked against %+v, want %+v", got, tt.want)
			}
			if f.asked != tt.asked {
				t.Errorf("asked the remote %d times, want %d", f.asked, tt.asked)
			}
			if s.conns.inUse() != 0 {
				t.Errorf("%d connections still held", s.conns.inUse())
			}
		})
	}
}

// Chunks handed to writeThen from a pool of two buffers, each overwritten
// as soon as it is released: a buffer released before both digests were
// done with it would change the sums. Parts hash on several goroutines,
// and every chunk size against every part layout gives the remote's value.
func TestObjectSums_WriteThen_ReleasesOnlyWhenHashed(t *testing.T) {
	data := make([]byte, 1<<20+7)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	wantSHA := sha256.Sum256(data)
	layouts := map[string][]int64{
		"one part":   {int64(len(data))},
		"many parts": {300 << 10, 300 << 10, 300 << 10, int64(len(data)) - 900<<10},
		"tiny parts": {1, 2, 3, int64(len(data)) - 6},
	}
	for name, parts := range layouts {
		for _, alg := range []string{"md5", "sha256", "crc32c"} {
			sum := map[string]func([]byte) []byte{
				"md5":    md5Of,
				"sha256": func(b []byte) []byte { s := sha256.Sum256(b); return s[:] },
				"crc32c": func(b []byte) []byte { return be32(crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli))) },
			}[alg]
			value := b64(partsOf(data, parts, sum)) + fmt.Sprintf("-%d", len(parts))
			if alg == "md5" {
				value = hex.EncodeToString(partsOf(data, parts, sum)) + fmt.Sprintf("-%d", len(parts))
			}
			for _, chunk := range []int{1000, 64 << 10, 256<<10 + 1} {
				t.Run(fmt.Sprintf("%s/%s/chunks of %d", name, alg, chunk), func(t *testing.T) {
					o, err := newObjectSums(source.Checksum{Algorithm: alg, Parts: parts, Value: value, Name: alg})
					if err != nil {
						t.Fatal(err)
					}
					defer o.close()
					free := make(chan []byte, 2)
					free <- make([]byte, chunk)
					free <- make([]byte, chunk)
					for b := data; len(b) > 0; {
						buf := (<-free)[:min(chunk, len(b))]
						copy(buf, b)
						b = b[len(buf):]
						o.writeThen(buf, func() {
							clear(buf) // what the next chunk's copy would do
							free <- buf[:cap(buf)]
						})
					}
					o.wait()
					if len(free) != 2 {
						t.Fatalf("%d of 2 buffers released after wait", len(free))
					}
					if got := o.remote.sum(); got != value {
						t.Fatalf("remote sum %s, want %s", got, value)
					}
					if got := o.sha.Sum(nil); !bytes.Equal(got, wantSHA[:]) {
						t.Fatalf("sha256 %x, want %x", got, wantSHA)
					}
				})
			}
		}
	}
}

// The cost of a multipart ETag as a ranged download feeds it: 4 MiB
// chunks in order, 16 MiB parts (minio-go's), the store's sha256 beside.
// Not a timed test: `go test -bench RemoteSum -run ^$ ./pkg/store`.
func BenchmarkObjectSums_MultipartETag(b *testing.B) {
	const chunk, part, size = 4 << 20, 16 << 20, 256 << 20
	parts := make([]int64, size/part)
	for i := range parts {
		parts[i] = part
	}
	data := make([]byte, chunk)
	for _, lanes := range []bool{true, false} {
		b.Run(fmt.Sprintf("md5 lanes %v", lanes), func(b *testing.B) {
			b.SetBytes(size)
			for range b.N {
				o, err := newObjectSums(source.Checksum{Algorithm: "md5", Parts: parts, Value: "x-16"})
				if err != nil {
					b.Fatal(err)
				}
				o.remote.lanes = lanes
				free := make(chan []byte, 16)
				for range cap(free) {
					free <- make([]byte, chunk)
				}
				for range size / chunk {
					buf := <-free
					copy(buf, data)
					o.writeThen(buf, func() { free <- buf })
				}
				_ = o.remote.sum()
				o.close()
			}
		})
	}
}
