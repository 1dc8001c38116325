package source

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/modelcache/modelcache/pkg/source/remotespec"
	"github.com/rclone/rclone/fs"
	"github.com/rclone/rclone/fs/config/configmap"
	"github.com/rclone/rclone/lib/encoder"
	"golang.org/x/sync/errgroup"
	"google.golang.org/api/storage/v1"
	"k8s.io/klog/v2"
)

// Checksum is a checksum the remote keeps for an object besides the MD5 a
// listing gives: one of S3's additional checksums (x-amz-checksum-*), the
// ETag of a multipart upload (the MD5 of its parts' MD5s), or GCS's
// crc32c. Objects uploaded in parts by the AWS CLI and SDKs, the usual way
// large model files reach S3, and GCS composite objects have no MD5 at
// all, so without these nothing would check their bytes.
type Checksum struct {
	// Algorithm is one of "crc64nvme", "crc32c", "crc32", "sha1", "sha256",
	// or "md5" for a multipart ETag.
	Algorithm string
	// Value as the remote states it: base64 of the big-endian checksum for
	// x-amz-checksum-* and GCS, hex for an ETag. A value over parts keeps
	// its "-N".
	Value string
	// Parts are the sizes of the parts a composite value is computed over,
	// in order; nil for a checksum of the whole object.
	Parts []int64
	// Layout, when not nil, says Parts were inferred from the first and the
	// last part (all parts but the last of one size, as every common
	// uploader makes them) and returns every part's real size. A mismatch
	// against an inferred layout is only corruption if the real sizes are
	// the inferred ones.
	Layout func(ctx context.Context) ([]int64, error)
	// Name says where the value came from, for logs and errors.
	Name string
}

// IsZero reports that the remote gave no checksum.
func (c Checksum) IsZero() bool { return c.Algorithm == "" }

// Checksummer is a Remote that can fetch a checksum the remote keeps for
// an object besides the listing's MD5: for an object that has none (S3
// uploads in parts, GCS composite objects), or one cheaper to compute than
// an MD5.
type Checksummer interface {
	// Checksum returns the zero Checksum when the remote keeps none it can
	// give. An object that no longer matches e is ErrChanged.
	Checksum(ctx context.Context, e Entry) (Checksum, error)
}

// Checksum asks the remote for the checksums it keeps of an object: S3
// with a HEAD in checksum mode (an additional checksum, else, for an
// object listed without an MD5, its multipart ETag); GCS with a metadata
// GET (its crc32c, which composite objects have instead of an MD5). Other
// backends keep nothing more than the listing gives. An object the
// request cannot find is left to its GET to report.
func (r *rcloneRemote) Checksum(ctx context.Context, e Entry) (Checksum, error) {
	if r.cfg.Type != remotespec.BackendS3 && r.cfg.Type != remotespec.BackendGCS || r.cfg.Options["sse_customer_algorithm"] != "" {
		// SSE-C: a HEAD needs the customer key, and neither the ETag nor
		// the checksum of such an object says anything checkable.
		return Checksum{}, nil
	}
	defer r.conns.begin()()
	ctx = r.requestConfig(ctx)
	f, _, err := r.backend(ctx)
	if err != nil {
		return Checksum{}, err
	}
	bucket, key := r.objectName(f, e)
	op := fmt.Sprintf("reading the checksum of %s/%s", r.uri, e.Path)
	var ck Checksum
	if r.cfg.Type == remotespec.BackendGCS {
		ck, err = r.gcsChecksum(ctx, f, bucket, key, e)
	} else {
		ck, err = r.s3Checksum(ctx, f, bucket, key, e)
	}
	if err == nil || errors.Is(err, ErrChanged) {
		return ck, err
	}
	if err = r.classify(op, err); errors.Is(err, ErrUnavailable) || errors.Is(err, ErrChanged) || errors.Is(err, ErrRefused) {
		return Checksum{}, err
	}
	// Not found (left to the GET to report), refused, or not understood
	// (a store without checksum mode or part numbers): the object is
	// checked as if the remote kept nothing more, never failed for it.
	klog.InfoS("the remote did not give the object's checksum; it is checked against what the listing gave, if anything", "err", err)
	return Checksum{}, nil
}

// hiddenClient says once that a client could not be found (see clientOf).
var hiddenClient sync.Once

// CheckClients builds an s3 and a gcs Fs in memory, contacting nothing,
// and fails when clientOf does not find the API client rclone keeps in
// either: a new rclone moved it, and the checksums S3 and GCS keep (the
// only check of objects uploaded in parts, of GCS composite objects) would
// silently go unchecked. The node plugin calls it at start.
func CheckClients() error {
	return checkClients([]clientProbe{
		{remotespec.BackendS3, configmap.Simple{"provider": "Other", "endpoint": "http://127.0.0.1:9", "access_key_id": "AKIDEXAMPLE", "secret_access_key": "secret-example", "region": "us-east-1"},
			func(f fs.Fs) bool { return clientOf[*s3.Client](f, "c") != nil }},
		{remotespec.BackendGCS, configmap.Simple{"anonymous": "true", "endpoint": "http://127.0.0.1:9/storage/v1/"},
			func(f fs.Fs) bool { return clientOf[*storage.Service](f, "svc") != nil }},
	})
}

// clientProbe builds one backend's Fs and looks for its client.
type clientProbe struct {
	backend string
	opts    configmap.Simple
	found   func(fs.Fs) bool
}

func checkClients(probes []clientProbe) error {
	for _, p := range probes {
		info, err := fs.Find(p.backend)
		if err != nil {
			return fmt.Errorf("rclone's %s backend is not built in: %w", p.backend, err)
		}
		// A bucket without a key: rclone asks the remote nothing.
		f, err := info.NewFs(context.Background(), "check", "bucket", configMap(info, p.opts))
		if err != nil {
			return fmt.Errorf("building an rclone %s backend to find its API client: %w", p.backend, err)
		}
		if !p.found(f) {
			return fmt.Errorf("this build's rclone keeps its %s API client where modelcache does not look (clientOf, pkg/source/checksum.go): the remote checksums of %s objects would go unchecked; update clientOf for this rclone", p.backend, p.backend)
		}
	}
	return nil
}

// Slots bounds the requests a caller has open at the remotes: the store's
// connection bound, handed down in the context (WithSlots) so that the
// requests made here with rclone's API clients (checksum HEADs, part
// HEADs, GCS metadata GETs), which rclone's own accounting never sees, take
// a connection each as GETs do.
type Slots interface {
	Acquire(ctx context.Context) error
	Release(ctx context.Context)
}

type slotsKey struct{}

// WithSlots returns ctx whose checksum requests each take one of s.
func WithSlots(ctx context.Context, s Slots) context.Context {
	return context.WithValue(ctx, slotsKey{}, s)
}

// withSlot runs one request holding one of ctx's slots, if it has any.
func withSlot[T any](ctx context.Context, req func() (T, error)) (T, error) {
	s, ok := ctx.Value(slotsKey{}).(Slots)
	if !ok {
		return req()
	}
	if err := s.Acquire(ctx); err != nil {
		var zero T
		return zero, err
	}
	defer s.Release(ctx)
	return req()
}

// objectName is the bucket and key of e as rclone names them at the
// remote: its encoding (the backend's default; tenants cannot set it)
// maps a few characters of listed names back.
func (r *rcloneRemote) objectName(f fs.Fs, e Entry) (string, string) {
	bucket, key, _ := strings.Cut(path.Join(f.Root(), e.Path), "/")
	if o := r.info.Options.Get("encoding"); o != nil {
		if enc, ok := o.Default.(encoder.MultiEncoder); ok {
			return enc.FromStandardName(bucket), enc.FromStandardPath(key)
		}
	}
	return bucket, key
}

func (r *rcloneRemote) s3Checksum(ctx context.Context, f fs.Fs, bucket, key string, e Entry) (Checksum, error) {
	c := clientOf[*s3.Client](f, "c")
	if c == nil {
		hiddenClient.Do(func() {
			klog.InfoS("this rclone's s3 backend hides its client: S3 additional checksums and multipart ETags are not checked")
		})
		return Checksum{}, nil
	}
	h := &s3Head{c: c, bucket: bucket, key: key, payer: r.cfg.Options["requester_pays"] == "true"}
	head, err := h.head(ctx, 0)
	if err != nil {
		return Checksum{}, err
	}
	if err := r.sameHead(head, e); err != nil {
		return Checksum{}, err
	}
	ck := checksumOf(head)
	if ck.IsZero() || ck.Algorithm == "md5" && IsMD5Hex(e.Hash) {
		// The listing's MD5 is the object's; its multipart ETag would
		// cost as much and a HEAD per part more.
		return Checksum{}, nil
	}
	n, composite := partsSuffix(ck.Value)
	if !composite {
		return ck, nil
	}
	if ck.Parts, ck.Layout, err = h.layout(ctx, e.Size, n); err != nil {
		return Checksum{}, err
	}
	if ck.Parts == nil {
		// The parts do not add up to the object: an upload this check
		// cannot follow.
		return Checksum{}, nil
	}
	return ck, nil
}

// gcsChecksum reads an object's crc32c from its metadata.
func (r *rcloneRemote) gcsChecksum(ctx context.Context, f fs.Fs, bucket, key string, e Entry) (Checksum, error) {
	svc := clientOf[*storage.Service](f, "svc")
	if svc == nil {
		hiddenClient.Do(func() { klog.InfoS("this rclone's gcs backend hides its client: GCS crc32c is not checked") })
		return Checksum{}, nil
	}
	call := svc.Objects.Get(bucket, key).Fields("size", "updated", "md5Hash", "crc32c").Context(ctx)
	obj, err := withSlot(ctx, func() (*storage.Object, error) { return call.Do() })
	if err != nil {
		return Checksum{}, err
	}
	md5 := ""
	if sum, err := base64.StdEncoding.DecodeString(obj.Md5Hash); err == nil && len(sum) == 16 {
		md5 = hex.EncodeToString(sum)
	}
	if err := r.sameAs(e, int64(obj.Size), time.Time{}, md5); err != nil {
		return Checksum{}, err
	}
	if obj.Crc32c == "" {
		return Checksum{}, nil
	}
	return Checksum{Algorithm: "crc32c", Value: obj.Crc32c, Name: "crc32c"}, nil
}

// sameHead compares a HEAD with the listing, as sameAsListed does for a GET:
// an MD5 ETag with the listed MD5, any other with the listed Version.
func (r *rcloneRemote) sameHead(head *s3.HeadObjectOutput, e Entry) error {
	size, etag := int64(-1), strings.Trim(aws.ToString(head.ETag), `"`)
	if head.ContentLength != nil {
		size = *head.ContentLength
	}
	if listed, ok := strings.CutPrefix(e.Version, "etag:"); ok && etag != "" && !strings.EqualFold(etag, listed) {
		return fmt.Errorf("%w: %s/%s now has ETag %s, listed %s; the next publish lists the new version", ErrChanged, r.uri, e.Path, etag, listed)
	}
	if !IsMD5Hex(etag) {
		etag = ""
	}
	return r.sameAs(e, size, aws.ToTime(head.LastModified), etag)
}

// checksumOf picks the checksum a HEAD gave: an additional checksum first
// (it holds whatever the encryption; S3 keeps one at most, listed here
// cheapest first for a store that computes sha256 anyway), then a
// multipart ETag, which is an MD5 of MD5s only without KMS encryption.
func checksumOf(h *s3.HeadObjectOutput) Checksum {
	for _, c := range []struct {
		alg string
		v   *string
	}{
		{"sha256", h.ChecksumSHA256}, {"crc32", h.ChecksumCRC32}, {"crc32c", h.ChecksumCRC32C},
		{"crc64nvme", h.ChecksumCRC64NVME}, {"sha1", h.ChecksumSHA1},
	} {
		if v := aws.ToString(c.v); v != "" {
			if _, composite := partsSuffix(v); h.ChecksumType == types.ChecksumTypeComposite && !composite {
				// A composite type without the part count: nothing to follow.
				continue
			}
			return Checksum{Algorithm: c.alg, Value: v, Name: "x-amz-checksum-" + c.alg}
		}
	}
	etag := strings.Trim(aws.ToString(h.ETag), `"`)
	if _, composite := partsSuffix(etag); composite && IsMD5Hex(strings.Split(etag, "-")[0]) &&
		h.ServerSideEncryption != types.ServerSideEncryptionAwsKms && h.ServerSideEncryption != types.ServerSideEncryptionAwsKmsDsse {
		return Checksum{Algorithm: "md5", Value: strings.ToLower(etag), Name: "multipart ETag"}
	}
	return Checksum{}
}

// partsSuffix reads the "-N" a value computed over N parts ends with.
func partsSuffix(v string) (int, bool) {
	i := strings.LastIndexByte(v, '-')
	if i < 0 {
		return 0, false
	}
	n, err := strconv.Atoi(v[i+1:])
	return n, err == nil && n > 0 && n <= maxParts
}

// maxParts is S3's limit on the parts of one upload.
const maxParts = 10000

// s3Head asks S3 about one object with the client rclone built for the
// request, so endpoint, signing and provider quirks are rclone's.
type s3Head struct {
	c           *s3.Client
	bucket, key string
	payer       bool
}

// head is a HEAD with checksum mode, of one part when part > 0.
func (h *s3Head) head(ctx context.Context, part int32) (*s3.HeadObjectOutput, error) {
	in := &s3.HeadObjectInput{Bucket: &h.bucket, Key: &h.key, ChecksumMode: types.ChecksumModeEnabled}
	if part > 0 {
		in.PartNumber = &part
	}
	if h.payer {
		in.RequestPayer = types.RequestPayerRequester
	}
	return withSlot(ctx, func() (*s3.HeadObjectOutput, error) { return h.c.HeadObject(ctx, in) })
}

// partSize is the length of one part, from a HEAD of it.
func (h *s3Head) partSize(ctx context.Context, part int) (int64, error) {
	out, err := h.head(ctx, int32(part))
	if err != nil {
		return 0, fmt.Errorf("part %d: %w", part, err)
	}
	return aws.ToInt64(out.ContentLength), nil
}

// layout returns the sizes of an object's n parts: from the first and the
// last part, all the others taken to be the first's size. The sizes are
// exact for up to two parts; beyond, the returned func reads every part.
// nil sizes: the parts cannot add up to size.
func (h *s3Head) layout(ctx context.Context, size int64, n int) ([]int64, func(context.Context) ([]int64, error), error) {
	if n == 1 {
		return []int64{size}, nil, nil
	}
	first, err := h.partSize(ctx, 1)
	if err != nil {
		return nil, nil, err
	}
	last, err := h.partSize(ctx, n)
	if err != nil {
		return nil, nil, err
	}
	if first <= 0 || last <= 0 || last > first || int64(n-1)*first+last != size {
		return nil, nil, nil
	}
	parts := make([]int64, n)
	for i := range parts {
		parts[i] = first
	}
	parts[n-1] = last
	if n == 2 {
		return parts, nil, nil
	}
	exact := func(ctx context.Context) ([]int64, error) {
		sizes := make([]int64, n)
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(verifyParallelism)
		for i := range sizes {
			g.Go(func() (err error) {
				sizes[i], err = h.partSize(gctx, i+1)
				return err
			})
		}
		return sizes, g.Wait()
	}
	return parts, exact, nil
}

// clientOf returns the API client an rclone Fs keeps in its field name:
// the AWS SDK client of an s3 Fs ("c"), the JSON API service of a gcs Fs
// ("svc"). rclone neither asks S3 for additional checksums nor keeps
// GCS's crc32c or the checksum headers of a response, and does not export
// its clients; a second client built here would have to repeat rclone's
// credentials, endpoint, signing and provider rules and could reach the
// remote differently from the listing. nil when f is not of the expected
// shape (a test catches a new rclone that changes it).
func clientOf[T any](f fs.Fs, name string) T {
	var zero T
	v := reflect.ValueOf(f)
	if v.Kind() != reflect.Pointer || v.IsNil() || v.Elem().Kind() != reflect.Struct {
		return zero
	}
	c := v.Elem().FieldByName(name)
	if !c.IsValid() || c.Type() != reflect.TypeFor[T]() || c.Kind() != reflect.Pointer || c.IsNil() {
		return zero
	}
	return reflect.NewAt(c.Type(), unsafe.Pointer(c.UnsafeAddr())).Elem().Interface().(T)
}

// IsMD5Hex reports whether s is an MD5 in hex, as a listing's checksum is
// (an S3 ETag of a single-part upload, or the MD5 rclone stores on its
// multipart uploads).
func IsMD5Hex(s string) bool {
	if len(s) != 32 {
		return false
	}
	for _, r := range s {
		if !strings.ContainsRune("0123456789abcdefABCDEF", r) {
			return false
		}
	}
	return true
}

var _ Checksummer = (*rcloneRemote)(nil)
