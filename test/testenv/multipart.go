package testenv

import (
	"bytes"
	"context"
	"fmt"
	"net/url"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Upload is how an object reaches the remote: in one PUT, or in parts as
// minio-go uploads every object above its part size (the AWS CLI and SDKs
// do the same above theirs), with or without an additional checksum.
type Upload struct {
	Name string
	// PartSize is the size of every part but the last; 0 uploads in one
	// PUT.
	PartSize uint64
	// Checksum is the additional checksum S3 is asked to keep (composite
	// for SHA256, CRC32 and CRC32C in parts, full-object for CRC64NVME);
	// ChecksumNone asks for none.
	Checksum minio.ChecksumType
}

// Uploads are the shapes tests and benchmarks upload models in.
var (
	UploadOnePut       = Upload{Name: "one PUT"}
	UploadParts        = Upload{Name: "minio-go parts", PartSize: 5 << 20}
	UploadPartsCRC32C  = Upload{Name: "minio-go parts, composite CRC32C", PartSize: 5 << 20, Checksum: minio.ChecksumCRC32C}
	UploadPartsSHA256  = Upload{Name: "minio-go parts, composite SHA256", PartSize: 5 << 20, Checksum: minio.ChecksumSHA256}
	UploadPartsCRC64NV = Upload{Name: "minio-go parts, full-object CRC64NVME", PartSize: 5 << 20, Checksum: minio.ChecksumCRC64NVME}
)

// WithPartSize is u with parts of n bytes.
func (u Upload) WithPartSize(n uint64) Upload {
	u.PartSize = n
	return u
}

// Put uploads data at bucket/key of the MinIO at endpoint (an http:// URL)
// as u says, with minio-go. The bucket must exist.
func (u Upload) Put(ctx context.Context, endpoint, bucket, key string, data []byte) error {
	ep, err := url.Parse(endpoint)
	if err != nil {
		return err
	}
	c, err := minio.New(ep.Host, &minio.Options{
		Creds: credentials.NewStaticV4(AccessKey, SecretKey, ""), Secure: false,
		// The trailing checksum header is how minio-go sends an additional
		// checksum with each part.
		TrailingHeaders: u.Checksum.IsSet(),
	})
	if err != nil {
		return err
	}
	opts := minio.PutObjectOptions{PartSize: u.PartSize, DisableMultipart: u.PartSize == 0, Checksum: u.Checksum}
	if _, err := c.PutObject(ctx, bucket, key, bytes.NewReader(data), int64(len(data)), opts); err != nil {
		return fmt.Errorf("uploading %s (%s): %w", key, u.Name, err)
	}
	return nil
}
