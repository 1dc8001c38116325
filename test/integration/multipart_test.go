package integration

// Objects uploaded in parts, as every large object reaches S3 (the AWS CLI
// above 8 MiB, the SDKs, minio-go above its part size, rclone above its
// cutoff), have an ETag that is no MD5 (<hex>-<parts>) and no MD5 in the
// listing. They are named by that ETag instead, so a new version of a model
// reuses its unchanged objects and a killed download resumes, exactly as
// for objects uploaded in one piece.

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/test/testenv"
)

// multipartUploads are the shapes the tests upload in parts: minio-go's
// plain upload (only the multipart ETag names the bytes), and with each
// kind of additional checksum S3 keeps for parts.
var multipartUploads = []testenv.Upload{
	testenv.UploadParts, testenv.UploadPartsCRC32C, testenv.UploadPartsSHA256, testenv.UploadPartsCRC64NV,
}

// uploadAs uploads files under prefix as u says, and checks that each
// object larger than a part is what the test needs: an ETag of the form
// <hex>-<parts>, which rclone does not list as an MD5.
func (e *env) uploadAs(u testenv.Upload, prefix string, files map[string][]byte) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := testenv.Client(minio.Endpoint)
	if err := testenv.PutModel(ctx, c, e.bucket, "", nil); err != nil {
		e.t.Fatal(err)
	}
	for name, data := range files {
		key := prefix + "/" + name
		if err := u.Put(ctx, minio.Endpoint, e.bucket, key, data); err != nil {
			e.t.Fatal(err)
		}
		if u.PartSize == 0 || uint64(len(data)) <= u.PartSize {
			continue
		}
		head, err := c.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(e.bucket), Key: aws.String(key), ChecksumMode: types.ChecksumModeEnabled})
		if err != nil {
			e.t.Fatal(err)
		}
		parts := (uint64(len(data)) + u.PartSize - 1) / u.PartSize
		if etag := strings.Trim(aws.ToString(head.ETag), `"`); !strings.HasSuffix(etag, fmt.Sprintf("-%d", parts)) {
			e.t.Fatalf("%s uploaded as %s has ETag %q, want <hex>-%d: the test proves nothing", key, u.Name, etag, parts)
		}
		if u.Checksum.IsSet() && aws.ToString(head.ChecksumCRC32C)+aws.ToString(head.ChecksumSHA256)+aws.ToString(head.ChecksumCRC64NVME) == "" {
			e.t.Fatalf("%s uploaded as %s has no additional checksum at the remote: the test proves nothing", key, u.Name)
		}
	}
}

// A new version of a model whose shards were uploaded in parts, changing
// only its config.json, fetches the config.json and not the shards.
func TestMultipart_NewVersionChangingConfig_FetchesOnlyConfig_RealMinIO(t *testing.T) {
	for i, u := range multipartUploads {
		t.Run(u.Name, func(t *testing.T) {
			e := newEnv(t)
			shards := randomModel(byte(100+i), map[string]int{"model-00001-of-00002.safetensors": 12<<20 + 7, "model-00002-of-00002.safetensors": 11<<20 + 3})
			e.uploadAs(u, "m", shards)
			v1 := map[string][]byte{"config.json": configVersion(1)}
			e.upload("m", v1)
			attrs := e.model("m")
			attrs["pullPolicy"] = "Always"
			e.mustPublish("vol-a", e.target("pod-a"), attrs)

			v2 := map[string][]byte{"config.json": configVersion(2)}
			e.upload("m", v2)
			e.proxy.Reset()
			e.mustPublish("vol-b", e.target("pod-b"), attrs)
			want := map[string][]byte{"config.json": v2["config.json"]}
			for k, v := range shards {
				want[k] = v
			}
			sameFiles(t, e.target("pod-b"), want)
			if got, n := e.proxy.ObjectBytes(), int64(len(v2["config.json"])); got != n {
				t.Errorf("the new version fetched %d bytes, want %d (config.json only; the shards are %d bytes)", got, n, total(shards))
			}
			e.mustUnpublish("vol-a", e.target("pod-a"))
			e.mustUnpublish("vol-b", e.target("pod-b"))
		})
	}
}

// configVersion is a 4 KiB config.json, different for each version.
func configVersion(v int) []byte {
	b := []byte(fmt.Sprintf(`{"version":%d,"pad":"%s"}`, v, strings.Repeat("x", 4<<10)))
	return b[:4<<10]
}

// A ranged download of an object uploaded in parts, killed with SIGKILL
// half way, goes on after the restart from its last checkpoint: the remote
// serves only the bytes after it, and the parts' checksums still check the
// whole object.
func TestMultipart_Kill9DuringRangedDownload_ResumesFromCheckpoint_RealMinIO(t *testing.T) {
	const size = 48<<20 + 5
	flags := []string{"--multi-thread-cutoff=4Mi", "--multi-thread-span=4Mi", "--multi-thread-streams=2", "--resume-every=8Mi"}
	for i, u := range []testenv.Upload{testenv.UploadParts, testenv.UploadPartsCRC32C.WithPartSize(16 << 20)} {
		t.Run(u.Name, func(t *testing.T) {
			e := newEnv(t)
			e.driver.Stop()
			e.start(flags...)
			files := randomModel(byte(110+i), map[string]int{"w.bin": size})
			e.uploadAs(u, "m", files)
			e.proxy.RateBytesPerSec.Store(12 << 20)
			e.proxy.Reset()
			killedAt := int64(size / 2)
			e.killMidPublish("vol", e.target("pod"), e.model("m"), fmt.Sprintf("%d bytes served", killedAt), func() bool {
				return e.proxy.ObjectBytes() >= killedAt
			})
			if trees := entries(t, filepath.Join(e.cacheDir(), store.TreesDir)); len(trees) != 0 {
				t.Fatalf("a tree %v is visible after a kill mid-download", trees)
			}
			durable := checkpointOf(t, e.cacheDir(), size)
			if durable == 0 {
				t.Errorf("no checkpoint after %d of %d bytes were served: the partial download was not kept", killedAt, size)
			}

			e.proxy.RateBytesPerSec.Store(0)
			e.start(flags...)
			e.proxy.Reset()
			e.mustPublish("vol", e.target("pod"), e.model("m"))
			sameFiles(t, e.target("pod"), files)
			if got, want := e.proxy.ObjectBytes(), int64(size)-durable; got != want {
				t.Errorf("after the restart the remote served %d bytes, want %d (w.bin less its %d durable bytes)", got, want, durable)
			}
			t.Logf("killed at %d of %d bytes served; %d durable; %d bytes after the restart", killedAt, size, durable, e.proxy.ObjectBytes())
			e.mustUnpublish("vol", e.target("pod"))
		})
	}
}
