package source

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/modelcache/modelcache/pkg/source/remotespec"
	"github.com/rclone/rclone/fs"
	"github.com/rclone/rclone/fs/config/configmap"
	"google.golang.org/api/storage/v1"
)

// What a HEAD in checksum mode gives is turned into the checksum the
// download is checked against: an additional checksum before a multipart
// ETag, and nothing that is not what it seems (a KMS-encrypted object's
// ETag, a composite value without its part count).
func TestChecksumOf(t *testing.T) {
	const etag = `"0123456789abcdef0123456789abcdef-3"`
	tests := []struct {
		name string
		head s3.HeadObjectOutput
		want Checksum
	}{
		{"nothing", s3.HeadObjectOutput{}, Checksum{}},
		{"single-part ETag: the listing had it", s3.HeadObjectOutput{ETag: aws.String(`"0123456789abcdef0123456789abcdef"`)}, Checksum{}},
		{"opaque ETag", s3.HeadObjectOutput{ETag: aws.String(`"opaque-etag"`)}, Checksum{}},
		{"multipart ETag", s3.HeadObjectOutput{ETag: aws.String(etag)},
			Checksum{Algorithm: "md5", Value: "0123456789abcdef0123456789abcdef-3", Name: "multipart ETag"}},
		{"multipart ETag, upper case", s3.HeadObjectOutput{ETag: aws.String(`"0123456789ABCDEF0123456789ABCDEF-3"`)},
			Checksum{Algorithm: "md5", Value: "0123456789abcdef0123456789abcdef-3", Name: "multipart ETag"}},
		{"multipart ETag, SSE-S3", s3.HeadObjectOutput{ETag: aws.String(etag), ServerSideEncryption: types.ServerSideEncryptionAes256},
			Checksum{Algorithm: "md5", Value: "0123456789abcdef0123456789abcdef-3", Name: "multipart ETag"}},
		{"multipart ETag, SSE-KMS: not an MD5 of MD5s", s3.HeadObjectOutput{ETag: aws.String(etag), ServerSideEncryption: types.ServerSideEncryptionAwsKms}, Checksum{}},
		{"multipart ETag, DSSE-KMS", s3.HeadObjectOutput{ETag: aws.String(etag), ServerSideEncryption: types.ServerSideEncryptionAwsKmsDsse}, Checksum{}},
		{"multipart ETag, too many parts", s3.HeadObjectOutput{ETag: aws.String(`"0123456789abcdef0123456789abcdef-10001"`)}, Checksum{}},
		{"full-object CRC64NVME before the ETag", s3.HeadObjectOutput{ETag: aws.String(etag), ChecksumCRC64NVME: aws.String("Fr9MjSyV9n4="), ChecksumType: types.ChecksumTypeFullObject},
			Checksum{Algorithm: "crc64nvme", Value: "Fr9MjSyV9n4=", Name: "x-amz-checksum-crc64nvme"}},
		{"composite CRC32C", s3.HeadObjectOutput{ETag: aws.String(etag), ChecksumCRC32C: aws.String("fiXu9A==-3"), ChecksumType: types.ChecksumTypeComposite},
			Checksum{Algorithm: "crc32c", Value: "fiXu9A==-3", Name: "x-amz-checksum-crc32c"}},
		{"composite without a part count: the ETag", s3.HeadObjectOutput{ETag: aws.String(etag), ChecksumCRC32: aws.String("fiXu9A=="), ChecksumType: types.ChecksumTypeComposite},
			Checksum{Algorithm: "md5", Value: "0123456789abcdef0123456789abcdef-3", Name: "multipart ETag"}},
		{"SHA256 first", s3.HeadObjectOutput{ChecksumSHA256: aws.String("c2hh"), ChecksumCRC32: aws.String("Y3Jj")},
			Checksum{Algorithm: "sha256", Value: "c2hh", Name: "x-amz-checksum-sha256"}},
		{"SHA1", s3.HeadObjectOutput{ChecksumSHA1: aws.String("c2hhMQ==")},
			Checksum{Algorithm: "sha1", Value: "c2hhMQ==", Name: "x-amz-checksum-sha1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := checksumOf(&tt.head)
			if got.Algorithm != tt.want.Algorithm || got.Value != tt.want.Value || got.Name != tt.want.Name {
				t.Fatalf("checksumOf = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestPartsSuffix(t *testing.T) {
	for _, tt := range []struct {
		v  string
		n  int
		ok bool
	}{
		{"abc-3", 3, true}, {"abc-10000", 10000, true}, {"abc-10001", 0, false}, {"abc-0", 0, false},
		{"abc", 0, false}, {"abc-x", 0, false}, {"a-b-2", 2, true},
	} {
		if n, ok := partsSuffix(tt.v); ok != tt.ok || ok && n != tt.n {
			t.Errorf("partsSuffix(%q) = %d, %v; want %d, %v", tt.v, n, ok, tt.n, tt.ok)
		}
	}
}

// The clients the checksum requests go through are the ones rclone built
// for the request. This fails when a new rclone changes its s3 or gcs Fs
// so that they can no longer be found: objects uploaded in parts, and GCS
// composite objects, would then go unchecked.
func TestClientOf_FindsRclonesClients(t *testing.T) {
	ctx := context.Background()
	info, err := fs.Find("s3")
	if err != nil {
		t.Fatal(err)
	}
	opts := configmap.Simple{"provider": "Other", "endpoint": "http://127.0.0.1:9", "access_key_id": "AKIDEXAMPLE", "secret_access_key": "secret-example"}
	f, err := info.NewFs(ctx, "model", "bucket", configMap(info, opts))
	if err != nil {
		t.Fatal(err)
	}
	if clientOf[*s3.Client](f, "c") == nil {
		t.Fatal("no *s3.Client found in rclone's s3 Fs")
	}
	hinfo, err := fs.Find("http")
	if err != nil {
		t.Fatal(err)
	}
	hf, err := hinfo.NewFs(ctx, "model", "", configMap(hinfo, configmap.Simple{"url": "http://127.0.0.1:9/"}))
	if err != nil {
		t.Fatal(err)
	}
	if c := clientOf[*s3.Client](hf, "c"); c != nil {
		t.Fatalf("found an s3 client in an http Fs: %v", c)
	}
	if c := clientOf[*s3.Client](nil, "c"); c != nil {
		t.Fatal("found an s3 client in nil")
	}
	ginfo, err := fs.Find("google cloud storage")
	if err != nil {
		t.Fatal(err)
	}
	gf, err := ginfo.NewFs(ctx, "model", "bucket", configMap(ginfo, configmap.Simple{"anonymous": "true", "endpoint": "http://127.0.0.1:9/storage/v1/"}))
	if err != nil {
		t.Fatal(err)
	}
	if clientOf[*storage.Service](gf, "svc") == nil {
		t.Fatal("no *storage.Service found in rclone's gcs Fs")
	}
}

// fakeGCS answers the JSON API's object metadata GETs for one bucket from
// objs (object name → resource), and 404 for anything else.
func fakeGCS(t *testing.T, bucket string, objs map[string]map[string]any) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name, ok := strings.CutPrefix(r.URL.Path, "/storage/v1/b/"+bucket+"/o/")
		if !ok || r.Method != http.MethodGet {
			http.NotFound(w, r)
			return
		}
		obj, ok := objs[name]
		if code, isStatus := obj["status"].(int); isStatus {
			w.WriteHeader(code)
			_, _ = fmt.Fprintf(w, `{"error":{"code":%d,"message":"refused"}}`, code)
			return
		}
		if !ok {
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"error":{"code":404,"message":"No such object"}}`))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(obj)
	}))
	t.Cleanup(srv.Close)
	return srv.URL + "/storage/v1/"
}

// GCS keeps a crc32c for every object, composite ones too, which have no
// MD5: it is read from the object's metadata, under rclone's name for the
// object, and a size or MD5 other than the listing's is a changed object.
func TestChecksum_GCSReadsCrc32c(t *testing.T) {
	const md5hex = "0123456789abcdef0123456789abcdef"
	md5b64 := base64.StdEncoding.EncodeToString(must(hex.DecodeString(md5hex)))
	endpoint := fakeGCS(t, "bucket", map[string]map[string]any{
		"m/composite.bin": {"name": "m/composite.bin", "size": "1048576", "crc32c": "AAAAAA=="},
		"m/w.bin":         {"name": "m/w.bin", "size": "100", "crc32c": "4waSgw==", "md5Hash": md5b64},
		"m/denied.bin":    {"status": http.StatusForbidden},
		"m/broken.bin":    {"status": http.StatusServiceUnavailable},
		"m/no-crc.bin":    {"name": "m/no-crc.bin", "size": "10"},
		"m/grown.bin":     {"name": "m/grown.bin", "size": "11", "crc32c": "4waSgw=="},
		"m/other-md5.bin": {"name": "m/other-md5.bin", "size": "100", "crc32c": "4waSgw==", "md5Hash": md5b64},
		"m/a\u240db.bin":  {"name": "m/a\u240db.bin", "size": "5", "crc32c": "BBBBBB=="},
	})
	r, _ := newTestRclone(t, nil, WithAllowedEndpoints(loopback))
	remote, err := r.Resolve(context.Background(), "mygcs:bucket/m", map[string]string{
		"RCLONE_CONFIG_MYGCS_TYPE": "google cloud storage", "RCLONE_CONFIG_MYGCS_ENDPOINT": endpoint,
	})
	if err != nil {
		t.Fatal(err)
	}
	cs, ok := remote.(Checksummer)
	if !ok {
		t.Fatal("the rclone remote is no Checksummer")
	}
	tests := []struct {
		name    string
		e       Entry
		want    Checksum
		wantErr error
	}{
		{"composite object", Entry{Path: "composite.bin", Size: 1 << 20}, Checksum{Algorithm: "crc32c", Value: "AAAAAA==", Name: "crc32c"}, nil},
		{"object with an MD5 too", Entry{Path: "w.bin", Size: 100, Hash: md5hex}, Checksum{Algorithm: "crc32c", Value: "4waSgw==", Name: "crc32c"}, nil},
		{"no crc32c", Entry{Path: "no-crc.bin", Size: 10}, Checksum{}, nil},
		{"gone since the listing: left to the GET", Entry{Path: "gone.bin", Size: 10}, Checksum{}, nil},
		{"refused: left to the GET", Entry{Path: "denied.bin", Size: 10}, Checksum{}, nil},
		{"unavailable: retried", Entry{Path: "broken.bin", Size: 10}, Checksum{}, ErrUnavailable},
		{"grown since the listing", Entry{Path: "grown.bin", Size: 10}, Checksum{}, ErrChanged},
		{"another MD5 than listed", Entry{Path: "other-md5.bin", Size: 100, Hash: "ffffffffffffffffffffffffffffffff"}, Checksum{}, ErrChanged},
		// rclone's encoding for GCS names a carriage return "␍" at the
		// remote.
		{"name rclone encodes", Entry{Path: "a\rb.bin", Size: 5}, Checksum{Algorithm: "crc32c", Value: "BBBBBB==", Name: "crc32c"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := cs.Checksum(context.Background(), tt.e)
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) {
				t.Fatalf("Checksum = %+v, %v; want error %v", got, err, tt.wantErr)
			}
			if got.Algorithm != tt.want.Algorithm || got.Value != tt.want.Value || got.Name != tt.want.Name {
				t.Fatalf("Checksum = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// CheckClients finds the API clients of this build's rclone, contacting
// nothing; a backend whose client is not where clientOf looks fails the
// check, naming the backend and what would go unchecked.
func TestCheckClients(t *testing.T) {
	if err := CheckClients(); err != nil {
		t.Fatalf("CheckClients: %v", err)
	}
	err := checkClients([]clientProbe{{remotespec.BackendS3, configmap.Simple{"provider": "Other", "endpoint": "http://127.0.0.1:9", "access_key_id": "AKIDEXAMPLE", "secret_access_key": "secret-example"},
		func(f fs.Fs) bool { return clientOf[*s3.Client](f, "client") != nil }}})
	if err == nil || !strings.Contains(err.Error(), "s3") || !strings.Contains(err.Error(), "unchecked") {
		t.Fatalf("a client moved elsewhere: err %v, want one naming s3 and what goes unchecked", err)
	}
}

// Every request made with rclone's client takes one of the caller's slots
// for as long as it runs, and none is left taken, also when it fails.
func TestWithSlot_HoldsOneSlotPerRequest(t *testing.T) {
	s := &countingSlots{}
	ctx := WithSlots(context.Background(), s)
	for _, fail := range []bool{false, true} {
		_, err := withSlot(ctx, func() (int, error) {
			if s.held != 1 {
				t.Errorf("%d slots held during the request, want 1", s.held)
			}
			if fail {
				return 0, errors.New("boom")
			}
			return 1, nil
		})
		if (err != nil) != fail || s.held != 0 || s.max != 1 {
			t.Errorf("err %v; %d slots held after, at most %d during; want none and 1", err, s.held, s.max)
		}
	}
}

type countingSlots struct{ held, max int }

func (c *countingSlots) Acquire(context.Context) error {
	c.held++
	c.max = max(c.max, c.held)
	return nil
}
func (c *countingSlots) Release(context.Context) { c.held-- }
