package integration

// The "bytes checked against the remote" invariant against a remote, or a
// network, that misbehaves: corrupted, swapped and cut responses, for every
// kind of checksum the driver checks against (a single-part object's ETag,
// the md5chksum metadata rclone stores on multipart uploads, S3's
// additional checksums, full-object and composite, and multipart ETags)
// and for both download paths (one stream, parallel ranged chunks);
// objects without a checksum, and uploads whose parts cannot be followed;
// and the bounds and consistency of ranged downloads.

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/test/testenv"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Ranged downloads fetch chunks of store.DefaultRangeChunk bytes.
const rangeChunk = store.DefaultRangeChunk

// multipartPart is the size of each part but the last of multipart
// uploads: S3's minimum.
const multipartPart = 5 << 20

// multipartChecksum is the additional checksum a multipart upload asks S3
// to keep.
type multipartChecksum int

const (
	noChecksum          multipartChecksum = iota // none: only the multipart ETag (MD5 of the parts' MD5s)
	compositeCRC32                               // a CRC32 of each part, and of those (SDKs before 2025)
	fullObjectCRC64NVME                          // a CRC64NVME of the whole object (AWS CLI and SDKs since 2025)
)

// uploadMultipart uploads data at key in e's bucket as a multipart upload
// of 5 MiB parts (at least two), with user metadata meta and checksum ck,
// and checks what S3 then keeps: an ETag that is not an MD5, and the
// additional checksum asked for, or none.
func (e *env) uploadMultipart(key string, data []byte, meta map[string]string, ck multipartChecksum) {
	e.t.Helper()
	if len(data) <= multipartPart {
		e.t.Fatalf("%s: %d bytes make a single part; a multipart object needs more than %d", key, len(data), multipartPart)
	}
	var sizes []int
	for off := 0; off < len(data); off += multipartPart {
		sizes = append(sizes, min(multipartPart, len(data)-off))
	}
	e.uploadParts(key, data, sizes, meta, ck)
}

// uploadParts is uploadMultipart with parts of the given sizes.
func (e *env) uploadParts(key string, data []byte, sizes []int, meta map[string]string, ck multipartChecksum) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := testenv.Client(minio.Endpoint)
	// Creates the bucket.
	if err := testenv.PutModel(ctx, c, e.bucket, "", nil); err != nil {
		e.t.Fatal(err)
	}
	// The SDK adds a CRC32 to every part unless told not to.
	onlyAsked := func(o *s3.Options) { o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired }
	create := &s3.CreateMultipartUploadInput{Bucket: aws.String(e.bucket), Key: aws.String(key), Metadata: meta}
	var alg types.ChecksumAlgorithm
	switch ck {
	case compositeCRC32:
		alg = types.ChecksumAlgorithmCrc32
		create.ChecksumType = types.ChecksumTypeComposite
	case fullObjectCRC64NVME:
		alg = types.ChecksumAlgorithmCrc64nvme
		create.ChecksumType = types.ChecksumTypeFullObject
	}
	create.ChecksumAlgorithm = alg
	up, err := c.CreateMultipartUpload(ctx, create, onlyAsked)
	if err != nil {
		e.t.Fatalf("starting the multipart upload of %s: %v", key, err)
	}
	var parts []types.CompletedPart
	off := 0
	for i, size := range sizes {
		n := int32(i + 1)
		part := data[off : off+size]
		off += size
		out, err := c.UploadPart(ctx, &s3.UploadPartInput{Bucket: aws.String(e.bucket), Key: aws.String(key),
			UploadId: up.UploadId, PartNumber: aws.Int32(n), Body: bytes.NewReader(part), ChecksumAlgorithm: alg}, onlyAsked)
		if err != nil {
			e.t.Fatalf("uploading part %d of %s: %v", n, key, err)
		}
		parts = append(parts, types.CompletedPart{ETag: out.ETag, PartNumber: aws.Int32(n),
			ChecksumCRC32: out.ChecksumCRC32, ChecksumCRC64NVME: out.ChecksumCRC64NVME})
	}
	if off != len(data) {
		e.t.Fatalf("%s: parts of %v bytes for %d bytes of data", key, sizes, len(data))
	}
	complete := &s3.CompleteMultipartUploadInput{Bucket: aws.String(e.bucket), Key: aws.String(key),
		UploadId: up.UploadId, MultipartUpload: &types.CompletedMultipartUpload{Parts: parts}, ChecksumType: create.ChecksumType}
	if _, err = c.CompleteMultipartUpload(ctx, complete, onlyAsked); err != nil {
		e.t.Fatalf("completing the multipart upload of %s: %v", key, err)
	}
	head, err := c.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(e.bucket), Key: aws.String(key), ChecksumMode: types.ChecksumModeEnabled})
	if err != nil {
		e.t.Fatal(err)
	}
	if etag := strings.Trim(aws.ToString(head.ETag), `"`); isMD5Hex(etag) || !strings.HasSuffix(etag, fmt.Sprintf("-%d", len(parts))) {
		e.t.Fatalf("multipart object %s has ETag %q, want the non-MD5 form <hex>-%d", key, etag, len(parts))
	}
	for k, v := range meta {
		if got := head.Metadata[k]; got != v {
			e.t.Fatalf("multipart object %s has metadata %s=%q, want %q", key, k, got, v)
		}
	}
	got := map[string]string{"crc32": aws.ToString(head.ChecksumCRC32), "crc32c": aws.ToString(head.ChecksumCRC32C),
		"crc64nvme": aws.ToString(head.ChecksumCRC64NVME), "sha1": aws.ToString(head.ChecksumSHA1), "sha256": aws.ToString(head.ChecksumSHA256)}
	want := map[multipartChecksum]string{compositeCRC32: "crc32", fullObjectCRC64NVME: "crc64nvme"}[ck]
	for alg, v := range got {
		switch {
		case alg == want && v == "":
			e.t.Fatalf("multipart object %s has no %s checksum at the remote: the test proves nothing", key, alg)
		case alg != want && v != "":
			e.t.Fatalf("multipart object %s has a %s checksum %q at the remote, want only %q", key, alg, v, want)
		}
	}
	if suffix := fmt.Sprintf("-%d", len(parts)); ck == compositeCRC32 && !strings.HasSuffix(got["crc32"], suffix) ||
		ck == fullObjectCRC64NVME && head.ChecksumType != types.ChecksumTypeFullObject {
		e.t.Fatalf("multipart object %s has checksum type %q (%v), not the kind asked for", key, head.ChecksumType, got)
	}
}

var md5Hex = regexp.MustCompile(`^[0-9a-f]{32}$`)

func isMD5Hex(s string) bool { return md5Hex.MatchString(s) }

// rcloneMD5Meta is the metadata rclone's s3 backend stores on a multipart
// upload it makes (X-Amz-Meta-Md5chksum: the base64 MD5 of the whole
// object), which its Object.Hash returns when the ETag is not an MD5.
func rcloneMD5Meta(data []byte) map[string]string {
	sum := md5.Sum(data)
	return map[string]string{"md5chksum": base64.StdEncoding.EncodeToString(sum[:])}
}

// nothingKept checks what a refused download may leave: no tree, no
// ingest leftovers, no mount at target, and only blobs that are named by
// their own sha256 and hold one of the good contents.
func nothingKept(t *testing.T, e *env, target string, good ...[]byte) {
	t.Helper()
	if trees := entries(t, filepath.Join(e.cacheDir(), store.TreesDir)); len(trees) != 0 {
		t.Errorf("trees/ holds %v from a download that must be refused", trees)
	}
	if left := entries(t, filepath.Join(e.cacheDir(), store.IngestDir)); len(left) != 0 {
		t.Errorf("ingest/ holds %v after a download that must be refused", left)
	}
	if opts := mountInfo(t, target); opts != "" {
		t.Errorf("target mounted (%s) from a download that must be refused", opts)
	}
	allowed := map[string]bool{}
	for _, b := range good {
		allowed[sha256Hex(b)] = true
	}
	blobs := filepath.Join(e.cacheDir(), store.BlobsDir)
	for _, name := range entries(t, blobs) {
		b, err := os.ReadFile(filepath.Join(blobs, name))
		if err != nil {
			t.Fatal(err)
		}
		switch sum := sha256Hex(b); {
		case sum != name:
			t.Errorf("blob %s holds bytes with sha256 %s", name, sum)
		case !allowed[sum]:
			t.Errorf("blob %s (%d bytes) is none of the model's good files: bytes from a download that must be refused were committed", name, len(b))
		}
	}
}

// flipped is data with the byte at off inverted.
func flipped(data []byte, off int64) []byte {
	b := bytes.Clone(data)
	b[off] ^= 0xff
	return b
}

// integrityObject is one way a model file reaches the driver.
type integrityObject struct {
	name      string
	args      []string // driver flags
	size      int
	multipart bool              // uploaded in 5 MiB parts, else one PutObject (ETag = MD5)
	md5Meta   bool              // with rclone's md5chksum metadata (multipart)
	checksum  multipartChecksum // the additional checksum S3 keeps (multipart)
	ranged    bool              // fetched in ranged chunks (args lower the cutoff below size)
	off       int64             // where faults hit: in a later part, in a middle chunk
	says      string            // the checksum a refusal names
}

// rangedArgs make files of 4 MiB and more download in ranged chunks.
// One request per chunk (--multi-thread-span=4Mi): the faults below land
// in chosen chunks, and the counts are per chunk.
var rangedArgs = []string{"--multi-thread-cutoff=4Mi", "--multi-thread-span=4Mi", "--multi-thread-streams=3"}

var integrityObjects = []integrityObject{
	{name: "single-part ETag MD5", size: 8<<20 + 123, off: 5<<20 + 17, says: "MD5"},
	{name: "multipart md5chksum", size: 12<<20 + 321, multipart: true, md5Meta: true, off: 7<<20 + 17, says: "MD5"},
	{name: "multipart ETag", size: 12<<20 + 321, multipart: true, off: 7<<20 + 17, says: "multipart ETag"},
	{name: "multipart composite CRC32", size: 12<<20 + 321, multipart: true, checksum: compositeCRC32, off: 11<<20 + 17, says: "x-amz-checksum-crc32"},
	{name: "multipart full-object CRC64NVME", size: 12<<20 + 321, multipart: true, checksum: fullObjectCRC64NVME, off: 3<<20 + 17, says: "x-amz-checksum-crc64nvme"},
	// Large enough that the remote's CRC32 (the SDK's default on upload),
	// cheaper than the listed MD5, is asked for and checked instead.
	{name: "large single-part, CRC32", size: store.AskChecksumAbove + 5, off: 40<<20 + 17, says: "x-amz-checksum-crc32"},
	{name: "ranged chunks", args: rangedArgs, size: 2*rangeChunk + 4<<20 + 7, ranged: true, off: rangeChunk + 4<<20 + 17, says: "MD5"},
	// Parts of 5 MiB hashed from chunks of 4 MiB: part boundaries fall
	// inside chunks.
	{name: "ranged chunks, multipart ETag", args: rangedArgs, size: 3*multipartPart + 1<<20 + 3, multipart: true, ranged: true,
		off: 2*multipartPart + 17, says: "multipart ETag"},
}

// setUp starts e's driver for o and uploads a model of o's file (w.bin)
// and a small config, returning the files.
func (o integrityObject) setUp(e *env, seed byte) map[string][]byte {
	e.t.Helper()
	if len(o.args) > 0 {
		e.driver.Stop()
		e.start(o.args...)
	}
	files := randomModel(seed, map[string]int{"config.json": 300, "w.bin": o.size})
	if o.multipart {
		var meta map[string]string
		if o.md5Meta {
			meta = rcloneMD5Meta(files["w.bin"])
		}
		e.upload("m", map[string][]byte{"config.json": files["config.json"]})
		e.uploadMultipart("m/w.bin", files["w.bin"], meta, o.checksum)
	} else {
		e.upload("m", files)
		if strings.HasPrefix(o.says, "x-amz-checksum-") {
			// Again, asking S3 to keep a CRC32.
			_, err := testenv.Client(minio.Endpoint).PutObject(context.Background(), &s3.PutObjectInput{Bucket: aws.String(e.bucket), Key: aws.String("m/w.bin"),
				Body: bytes.NewReader(files["w.bin"]), ChecksumAlgorithm: types.ChecksumAlgorithmCrc32})
			if err != nil {
				e.t.Fatal(err)
			}
		}
		head, err := testenv.Client(minio.Endpoint).HeadObject(context.Background(), &s3.HeadObjectInput{Bucket: aws.String(e.bucket), Key: aws.String("m/w.bin")})
		if err != nil {
			e.t.Fatal(err)
		}
		if etag, want := strings.Trim(aws.ToString(head.ETag), `"`), hexMD5(files["w.bin"]); etag != want {
			e.t.Fatalf("single-part object has ETag %q, want its MD5 %s", etag, want)
		}
		if strings.HasPrefix(o.says, "x-amz-checksum-") {
			head, err := testenv.Client(minio.Endpoint).HeadObject(context.Background(), &s3.HeadObjectInput{Bucket: aws.String(e.bucket), Key: aws.String("m/w.bin"), ChecksumMode: types.ChecksumModeEnabled})
			if err != nil {
				e.t.Fatal(err)
			}
			if aws.ToString(head.ChecksumCRC32) == "" {
				e.t.Fatalf("single-part object has no CRC32 at the remote: the test proves nothing")
			}
		}
	}
	return files
}

// A byte flipped in transfer, another object's bytes of the same size,
// and a response cut short every time are each refused before anything is
// committed, whatever checksum the object has and however it is fetched:
// the publish fails UNAVAILABLE naming the object, no tree and no blob of
// wrong bytes is left, and once the remote behaves the same publish serves
// byte-exact files.
func TestIntegrity_CorruptOrCutInTransfer_RefusedNothingKept_RealMinIO(t *testing.T) {
	faults := []struct {
		name   string
		inject func(p *testenv.Proxy, o integrityObject, good, other []byte)
		says   []string
	}{
		{"byte flipped", func(p *testenv.Proxy, o integrityObject, good, _ []byte) {
			if o.ranged {
				// FlipByte counts from each response's start, so would hit
				// every chunk: flip one byte of the middle chunk only.
				p.ServeBytesOf("w.bin", flipped(good, o.off))
			} else {
				p.FlipByte("w.bin", o.off)
			}
		}, []string{"corrupted"}},
		{"another object's bytes", func(p *testenv.Proxy, o integrityObject, _, other []byte) {
			p.ServeBytesOf("w.bin", other)
		}, []string{"corrupted"}},
		{"always truncated", func(p *testenv.Proxy, o integrityObject, _, _ []byte) {
			// 1 MiB per response: one stream gets 4 MiB in its four tries,
			// a chunk never completes.
			p.Truncate("w.bin", 1<<20, -1)
		}, nil},
	}
	for i, o := range integrityObjects {
		for j, f := range faults {
			t.Run(o.name+"/"+f.name, func(t *testing.T) {
				e := newEnv(t)
				files := o.setUp(e, byte(40+3*i+j))
				// Another object of the same size, at the remote too.
				other := randomModel(byte(80+3*i+j), map[string]int{"w.bin": o.size})
				e.upload("other", other)
				f.inject(e.proxy, o, files["w.bin"], other["w.bin"])

				target := e.target("pod")
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				err := e.publish(ctx, "vol", target, e.model("m"), e.secret())
				wantCode(t, err, codes.Unavailable)
				msg := status.Convert(err).Message()
				t.Logf("refused: %s", msg)
				says := f.says
				if len(says) > 0 {
					says = append(says, o.says)
				}
				for _, want := range append([]string{"w.bin"}, says...) {
					if !strings.Contains(msg, want) {
						t.Errorf("message %q does not say %q", msg, want)
					}
				}
				nothingKept(t, e, target, files["config.json"], files["w.bin"])

				e.proxy.FlipByte("", 0)
				e.proxy.ServeBytesOf("", nil)
				e.proxy.Truncate("", 0, 0)
				e.mustPublish("vol", target, e.model("m"))
				sameFiles(t, target, files)
				e.mustUnpublish("vol", target)
			})
		}
	}
}

// A response cut once mid-object does not fail the publish: one stream,
// and a ranged download's chunk, resume from the cut with a ranged read,
// fetching no byte twice. The files are byte-exact.
func TestIntegrity_TruncatedOnce_ResumedByteExact_RealMinIO(t *testing.T) {
	const at = 3<<20 + 5 // inside the first part, inside every chunk
	for i, o := range integrityObjects {
		t.Run(o.name, func(t *testing.T) {
			e := newEnv(t)
			files := o.setUp(e, byte(120+i))
			e.proxy.Reset()
			e.proxy.Truncate("w.bin", at, 1)

			target := e.target("pod")
			e.mustPublish("vol", target, e.model("m"))
			sameFiles(t, target, files)
			if n := e.proxy.Truncations(); n != 1 {
				t.Fatalf("the proxy cut %d responses, want 1: the test proves nothing", n)
			}
			// One stream: w.bin's first GET and its resume, and config.json.
			// Ranged: every chunk, the cut one's resume, and config.json.
			wantGets, wantBytes := int64(3), total(files)
			if o.ranged {
				chunks := int64((o.size + rangeChunk - 1) / rangeChunk)
				wantGets = chunks + 2
			}
			if gets, n := e.proxy.ObjectGets(), e.proxy.ObjectBytes(); gets != wantGets || n != wantBytes {
				t.Fatalf("the remote served %d GETs and %d bytes, want %d GETs and %d bytes", gets, n, wantGets, wantBytes)
			}
			e.mustUnpublish("vol", target)
		})
	}
}

// restartWithMetrics restarts e's driver with args and a metrics endpoint,
// and returns the endpoint's address once it answers.
func (e *env) restartWithMetrics(args ...string) string {
	e.t.Helper()
	port, err := testenv.FreePort()
	if err != nil {
		e.t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	e.driver.Stop()
	e.start(append([]string{"--metrics-address=" + addr}, args...)...)
	e.waitMetrics(addr)
	return addr
}

// waitMetrics waits until the driver's metrics endpoint at addr answers.
func (e *env) waitMetrics(addr string) {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("metrics endpoint %s did not answer: %v\ndriver logs:\n%s", addr, err, e.driver.Logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// An object the remote lists without any checksum (multipart, no
// md5chksum metadata) is served, and counted in
// modelcache_unchecked_objects_total; objects with an MD5 ETag or
// md5chksum metadata are not counted, and neither are cache hits.
func TestIntegrity_ObjectWithoutChecksum_ServedAndCounted_RealMinIO(t *testing.T) {
	for i, c := range []struct {
		name string
		args []string
	}{
		{"one stream", nil},
		{"ranged chunks", []string{"--multi-thread-cutoff=4Mi", "--multi-thread-span=4Mi"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			addr := e.restartWithMetrics(c.args...)

			files := randomModel(byte(140+i), map[string]int{"config.json": 300, "checked.bin": 11 << 20, "unchecked.bin": 11<<20 + 1})
			e.upload("m", map[string][]byte{"config.json": files["config.json"]})
			e.uploadMultipart("m/checked.bin", files["checked.bin"], rcloneMD5Meta(files["checked.bin"]), noChecksum)
			e.uploadMultipart("m/unchecked.bin", files["unchecked.bin"], nil, noChecksum)
			e.proxy.HideChecksums("unchecked.bin")

			for _, pod := range []string{"pod-a", "pod-b"} {
				e.mustPublish("vol-"+pod, e.target(pod), e.model("m"))
				sameFiles(t, e.target(pod), files)
				// The second publish is a cache hit: nothing new unchecked.
				wantMetrics(t, scrape(t, addr), map[string]float64{
					"modelcache_unchecked_objects_total": 1,
					"modelcache_publishes_total code OK": map[string]float64{"pod-a": 1, "pod-b": 2}[pod],
				})
			}
			if !strings.Contains(e.driver.Logs(), "accepted unchecked") {
				t.Errorf("the driver did not log that it accepted an object unchecked")
			}
			for _, pod := range []string{"pod-a", "pod-b"} {
				e.mustUnpublish("vol-"+pod, e.target(pod))
			}
		})
	}
}

// An upload whose parts are not all of one size (S3 allows it; the
// common uploaders never do it) cannot have its multipart ETag followed
// from the first and last part alone. Whether the sizes still add up
// (so the inferred layout is wrong and every part is asked for) or not,
// the object is served byte-exact and counted unchecked, never refused
// for a checksum computed over the wrong parts. The object with equal
// parts beside it is checked.
func TestIntegrity_MultipartOfUnequalParts_ServedUnchecked_RealMinIO(t *testing.T) {
	const mib = 1 << 20
	for i, c := range []struct {
		name  string
		sizes []int
	}{
		// (4-1)×6 + 4 = 22: the sizes add up as if all but the last were 6.
		{"sizes add up", []int{6 * mib, 5 * mib, 7 * mib, 4 * mib}},
		{"sizes do not add up", []int{5 * mib, 6 * mib, 3 * mib}},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			addr := e.restartWithMetrics()
			size := 0
			for _, n := range c.sizes {
				size += n
			}
			files := randomModel(byte(150+i), map[string]int{"unequal.bin": size, "equal.bin": 3*multipartPart + 9})
			e.uploadParts("m/unequal.bin", files["unequal.bin"], c.sizes, nil, noChecksum)
			e.uploadMultipart("m/equal.bin", files["equal.bin"], nil, noChecksum)

			e.mustPublish("vol", e.target("pod"), e.model("m"))
			sameFiles(t, e.target("pod"), files)
			wantMetrics(t, scrape(t, addr), map[string]float64{"modelcache_unchecked_objects_total": 1})
			e.mustUnpublish("vol", e.target("pod"))
		})
	}
}

// A large file's ranged download keeps at most --multi-thread-streams
// object GETs in flight at the remote, and with more than one stream
// really runs them in parallel. The per-stream rate cap makes every chunk
// take long enough for the streams to overlap.
func TestRanged_GetsInFlightBoundedByStreams_RealMinIO(t *testing.T) {
	const chunks = 6
	size := (chunks-1)*rangeChunk + 1<<20 + 3
	for i, c := range []struct {
		streams  int
		min, max int64
	}{
		{streams: 1, min: 1, max: 1},
		{streams: 3, min: 2, max: 3},
	} {
		t.Run(fmt.Sprintf("streams=%d", c.streams), func(t *testing.T) {
			e := newEnv(t)
			e.driver.Stop()
			e.start("--multi-thread-cutoff=4Mi", "--multi-thread-span=4Mi", fmt.Sprintf("--multi-thread-streams=%d", c.streams))
			// One file, so that every GET in flight is one of its chunks.
			files := randomModel(byte(160+i), map[string]int{"w.bin": size})
			e.upload("m", files)
			e.proxy.RateBytesPerSec.Store(16 << 20)
			e.proxy.Reset()

			target := e.target("pod")
			e.mustPublish("vol", target, e.model("m"))
			sameFiles(t, target, files)
			if got := e.proxy.MaxInFlight(); got < c.min || got > c.max {
				t.Errorf("at most %d object GETs were in flight at once, want between %d and %d", got, c.min, c.max)
			}
			if gets, n := e.proxy.ObjectGets(), e.proxy.ObjectBytes(); gets != chunks || n != int64(size) {
				t.Errorf("the remote served %d GETs and %d bytes, want %d (one per chunk) and %d", gets, n, chunks, size)
			}
			e.mustUnpublish("vol", target)
		})
	}
}

// An object replaced at the remote while its chunks are being fetched
// (the first chunks from the old version, the later ones from the new)
// fails the publish, UNAVAILABLE and naming the object, and leaves no blob
// of mixed content and no tree; the next publish lists the new version
// and serves it byte-exact.
//
// Every ranged response is checked against the listing (size, time and
// checksum as its own headers give them), and a range past a shrunk
// object's end (416) is a change too. Without a checksum the time is what
// tells versions apart, and object stores give it to the second: the new
// version is uploaded in a later second than the listed one, as any real
// replacement of a model file is (docs/design.md, "Downloads").
func TestRanged_ObjectChangedMidDownload_RefusedNoMixedBlob_RealMinIO(t *testing.T) {
	const size = 3*rangeChunk + 3<<20 + 11 // four chunks, two streams: two rounds
	for i, c := range []struct {
		name      string
		newSize   int
		multipart bool // both versions uploaded in parts, their checksums hidden: none at all
	}{
		{"same size, other bytes", size, false},
		{"grown", size + 5<<20, false},
		{"shrunk", size - 5<<20, false},
		{"same size, other bytes, no checksum", size, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			e.driver.Stop()
			e.start("--multi-thread-cutoff=4Mi", "--multi-thread-span=4Mi", "--multi-thread-streams=2")
			v1 := randomModel(byte(180+i), map[string]int{"w.bin": size, "config.json": 300})
			v2 := map[string][]byte{"w.bin": randomModel(byte(190+i), map[string]int{"w.bin": c.newSize})["w.bin"], "config.json": v1["config.json"]}
			put := func(files map[string][]byte) {
				if !c.multipart {
					e.upload("m", files)
					return
				}
				e.upload("m", map[string][]byte{"config.json": files["config.json"]})
				e.uploadMultipart("m/w.bin", files["w.bin"], nil, noChecksum)
			}
			if c.multipart {
				e.proxy.HideChecksums("w.bin")
			}
			put(v1)
			time.Sleep(1100 * time.Millisecond) // v2 in a later second than v1
			// Half a chunk per second and stream: the second round of chunks
			// starts two seconds in, long after the new version is uploaded.
			e.proxy.RateBytesPerSec.Store(rangeChunk / 2)
			e.proxy.Reset()

			target := e.target("pod")
			errc := make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				errc <- e.publish(ctx, "vol", target, e.model("m"), e.secret())
			}()
			deadline := time.Now().Add(time.Minute)
			for e.proxy.ObjectBytes() < 1<<20 {
				if time.Now().After(deadline) {
					t.Fatalf("the download did not start within a minute; driver logs:\n%s", e.driver.Logs())
				}
				time.Sleep(10 * time.Millisecond)
			}
			if n := e.proxy.ObjectBytes(); n >= rangeChunk {
				t.Fatalf("%d bytes were served before the new version was uploaded: too late to change the object mid-download", n)
			}
			put(v2)
			// Two chunks and config.json: had a third chunk been asked for,
			// it might hold the old bytes and the test prove nothing.
			if n := e.proxy.ObjectGets(); n > 3 {
				t.Fatalf("%d object GETs were sent before the new version was in place: the upload was too slow for the test", n)
			}

			err := <-errc
			// Not fatal: what the driver kept is checked whatever it answered.
			switch code := status.Code(err); {
			case err == nil:
				t.Errorf("the publish succeeded although w.bin was replaced between its chunks; want UNAVAILABLE")
			case code != codes.Unavailable && code != codes.FailedPrecondition:
				t.Errorf("got %v, want code Unavailable (or FailedPrecondition)", err)
			default:
				msg := status.Convert(err).Message()
				t.Logf("refused: %s", msg)
				if !strings.Contains(msg, "w.bin") {
					t.Errorf("message %q does not name the object", msg)
				}
			}
			nothingKept(t, e, target, v1["config.json"], v1["w.bin"], v2["w.bin"])
			if err == nil {
				// What was committed is now a cache hit: every later publish
				// (pullPolicy IfNotPresent) serves it without listing again.
				e.mustUnpublish("vol", target)
				t.FailNow()
			}

			e.proxy.RateBytesPerSec.Store(0)
			e.mustPublish("vol", target, e.model("m"))
			sameFiles(t, target, v2)
			e.mustUnpublish("vol", target)
		})
	}
}

// hexMD5 is the hex MD5 of b.
func hexMD5(b []byte) string {
	s := md5.Sum(b)
	return hex.EncodeToString(s[:])
}
