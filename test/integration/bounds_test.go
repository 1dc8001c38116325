package integration

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/modelcache/modelcache/test/testenv"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// uploadMany puts n one-byte objects under prefix, many at once.
func (e *env) uploadMany(prefix string, n int) {
	e.t.Helper()
	ctx := context.Background()
	c := testenv.Client(minio.Endpoint)
	if err := testenv.PutModel(ctx, c, e.bucket, prefix, map[string][]byte{"config.json": []byte("{}")}); err != nil {
		e.t.Fatal(err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(64)
	for i := range n - 1 {
		g.Go(func() error {
			key := fmt.Sprintf("%s/shard-%03d/f-%06d", prefix, i/1000, i)
			_, err := c.PutObject(gctx, &s3.PutObjectInput{Bucket: aws.String(e.bucket), Key: aws.String(key), Body: strings.NewReader("x")})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		e.t.Fatalf("uploading %d objects: %v", n, err)
	}
}

// A model of 20,000 one-byte files is refused RESOURCE_EXHAUSTED before any
// object is downloaded: with --max-files=10000 because of its count (the
// listing stops past it), and on a cache filesystem of few inodes because
// its files and directories would take it below --min-free-inodes. Each
// message names the flag to raise. Before, such a model was downloaded
// whatever its count and the budget counted bytes only.
func TestBounds_20000Files_ResourceExhaustedBeforeAnyGET_RealMinIO(t *testing.T) {
	e := newEnv(t)
	e.uploadMany("many", 20_000)
	for _, c := range []struct {
		name  string
		args  []string
		tmpfs string // mount options of a tmpfs cache; "" for none
		hints []string
	}{
		{"max-files", []string{"--max-files=10000"}, "", []string{"more than 10000 files", "--max-files"}},
		{"few inodes", nil, "size=256m,nr_inodes=4000,mode=0700", []string{"inodes", "--min-free-inodes"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			e.driver.Stop()
			if c.tmpfs != "" {
				if err := syscall.Mount("tmpfs", e.cacheDir(), "tmpfs", 0, c.tmpfs); err != nil {
					t.Fatalf("mounting a tmpfs at %s: %v", e.cacheDir(), err)
				}
				defer func() {
					e.driver.Stop()
					_ = syscall.Unmount(e.cacheDir(), 0)
				}()
			}
			e.start(c.args...)
			e.proxy.Reset()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			err := e.publish(ctx, "vol", e.target("pod"), e.model("many"), e.secret())
			wantCode(t, err, codes.ResourceExhausted)
			msg := status.Convert(err).Message()
			for _, h := range c.hints {
				if !strings.Contains(msg, h) {
					t.Errorf("message %q does not say %q", msg, h)
				}
			}
			if gets := e.proxy.ObjectGets(); gets != 0 {
				t.Errorf("the remote served %d object GETs before the refusal, want 0", gets)
			}
			if opts := mountInfo(t, e.target("pod")); opts != "" {
				t.Errorf("target mounted after a refusal")
			}
		})
	}
}
