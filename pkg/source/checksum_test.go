package source

import (
	"context"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/rclone/rclone/fs"
	"github.com/rclone/rclone/fs/config/configmap"
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

// The client the HEAD goes through is the one rclone built for the
// request. This fails when a new rclone changes its s3 Fs so that the
// client can no longer be found: objects uploaded in parts would then go
// unchecked.
func TestS3ClientOf_FindsRclonesClient(t *testing.T) {
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
	if s3ClientOf(f) == nil {
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
	if c := s3ClientOf(hf); c != nil {
		t.Fatalf("found an s3 client in an http Fs: %v", c)
	}
	if c := s3ClientOf(nil); c != nil {
		t.Fatal("found an s3 client in nil")
	}
}
