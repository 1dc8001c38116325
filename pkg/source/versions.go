package source

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/modelcache/modelcache/pkg/source/remotespec"
	"github.com/rclone/rclone/fs"
	"google.golang.org/api/storage/v1"
	"k8s.io/klog/v2"
)

// addVersions fills in the Version of every entry of m listed without an
// MD5, from a second listing with the API client rclone built for the
// remote: S3's ETag, GCS's generation. rclone keeps a listed ETag only when
// it is an MD5, so an object uploaded in parts (how the AWS CLI, the SDKs,
// minio-go and rclone upload every large file) would have nothing naming
// its bytes, and no object index entry or partial download could find it
// again. The listing costs one request per 1,000 objects, none per object,
// and runs only when some entry lacks an MD5. An object the two listings
// disagree on (changed in between) keeps no Version; so does every entry
// when the listing fails, which is logged: those objects download in full,
// as before.
func (r *rcloneRemote) addVersions(ctx context.Context, f fs.Fs, m Manifest) {
	list := map[string]func(ctx context.Context, f fs.Fs, bucket, prefix string, m Manifest, want map[string]int) error{
		remotespec.BackendS3: r.s3Versions, remotespec.BackendGCS: r.gcsVersions,
	}[r.cfg.Type]
	if list == nil {
		return
	}
	want := map[string]int{} // key at the remote → index in m
	var bucket, prefix string
	for i, e := range m {
		if e.Hash != "" {
			continue
		}
		b, key := r.objectName(f, e)
		if len(want) == 0 {
			bucket, prefix = b, key
		}
		want[key] = i
		prefix = commonPrefix(prefix, key)
	}
	if len(want) == 0 {
		return
	}
	if err := list(ctx, f, bucket, prefix, m, want); err != nil {
		klog.InfoS("listing the versions of objects without an MD5 failed; they are downloaded in full", "remote", r.uri.String(), "err", r.classify(fmt.Sprintf("listing %s", r.uri), err))
	}
}

// s3Versions lists bucket under prefix with rclone's S3 client and sets the
// ETag of the wanted keys.
func (r *rcloneRemote) s3Versions(ctx context.Context, f fs.Fs, bucket, prefix string, m Manifest, want map[string]int) error {
	c := clientOf[*s3.Client](f, "c")
	if c == nil {
		return nil
	}
	in := &s3.ListObjectsV2Input{Bucket: &bucket, Prefix: &prefix}
	if r.cfg.Options["requester_pays"] == "true" {
		in.RequestPayer = types.RequestPayerRequester
	}
	pages := s3.NewListObjectsV2Paginator(c, in)
	for len(want) > 0 && pages.HasMorePages() {
		page, err := pages.NextPage(ctx)
		if err != nil {
			return err
		}
		for _, o := range page.Contents {
			etag := strings.ToLower(strings.Trim(aws.ToString(o.ETag), `"`))
			setVersion(m, want, aws.ToString(o.Key), aws.ToInt64(o.Size), aws.ToTime(o.LastModified), etag, "etag:")
		}
	}
	return nil
}

// gcsVersions lists bucket under prefix with rclone's GCS service and sets
// the generation of the wanted keys.
func (r *rcloneRemote) gcsVersions(ctx context.Context, f fs.Fs, bucket, prefix string, m Manifest, want map[string]int) error {
	svc := clientOf[*storage.Service](f, "svc")
	if svc == nil {
		return nil
	}
	call := svc.Objects.List(bucket).Prefix(prefix).Fields("nextPageToken", "items(name,size,updated,generation)").Context(ctx)
	err := call.Pages(ctx, func(page *storage.Objects) error {
		for _, o := range page.Items {
			t, _ := time.Parse(time.RFC3339Nano, o.Updated)
			gen := ""
			if o.Generation != 0 {
				gen = fmt.Sprint(o.Generation)
			}
			setVersion(m, want, o.Name, int64(o.Size), t, gen, "generation:")
		}
		if len(want) == 0 {
			return errVersionsDone
		}
		return nil
	})
	if errors.Is(err, errVersionsDone) {
		return nil
	}
	return err
}

// errVersionsDone stops a listing once every wanted key was seen.
var errVersionsDone = errors.New("every wanted object was listed")

// setVersion records the version of key when the second listing agrees
// with the first on its size and time (to the second, the coarsest a
// remote gives).
func setVersion(m Manifest, want map[string]int, key string, size int64, t time.Time, version, kind string) {
	i, ok := want[key]
	if !ok || version == "" {
		return
	}
	delete(want, key)
	e := &m[i]
	if size != e.Size || !t.Truncate(time.Second).Equal(e.ModTime.Truncate(time.Second)) {
		return
	}
	e.Version = kind + version
}

// commonPrefix is the longest prefix a and b share.
func commonPrefix(a, b string) string {
	n := min(len(a), len(b))
	for i := range n {
		if a[i] != b[i] {
			return a[:i]
		}
	}
	return a[:n]
}
