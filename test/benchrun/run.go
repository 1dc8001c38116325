package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/test/testenv"
	"golang.org/x/sync/errgroup"
)

// bucket holds every generated model.
const bucket = "bench"

// model is one generated model in MinIO.
type model struct {
	Name    string // as the tables name it
	Prefix  string // under bucket
	Size    int64  // the size it was generated for (weights, or per small file)
	Bytes   int64  // all files
	Files   int
	Weights string // key of the largest object, for the raw read
	Source  string // the modelUri of a model not in MinIO (section 9)
}

// URI is the modelUri a pod would declare, and the rclone source path.
func (m model) URI() string {
	if m.Source != "" {
		return m.Source
	}
	return "mys3:" + bucket + "/" + m.Prefix
}

// bench is the state one run shares across its sections.
type bench struct {
	o       options
	work    string
	minio   *testenv.MinIO
	s3      *s3.Client
	sized   []model // one per --sizes, smallest first as given
	many    model   // many small files
	conf    string  // an rclone config path that does not exist
	drivers int     // drivers started, for unique directories
	dropped bool    // whether the page cache could be dropped
}

// run sets up MinIO and the models, runs every section and returns the
// report. It removes everything it created, mounts included.
func run(ctx context.Context, o options) (rep *Report, err error) {
	if o.Log == nil {
		o.Log = io.Discard
	}
	for _, p := range []string{o.Driver, o.Rclone} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("%s: %w (make bench builds bin/modelcache-csi and bin/rclone)", p, err)
		}
	}
	if o.runs(secSources) && o.Oras != "" {
		if _, err := os.Stat(o.Oras); err != nil {
			return nil, fmt.Errorf("%s: %w (make bench builds bin/oras)", o.Oras, err)
		}
	}
	started := time.Now()
	b := &bench{o: o}
	if b.work, err = os.MkdirTemp(o.Work, "modelcache-bench-"); err != nil {
		return nil, err
	}
	defer func() {
		unmountUnder(b.work)
		if rerr := os.RemoveAll(b.work); rerr != nil && err == nil {
			err = fmt.Errorf("removing %s: %w", b.work, rerr)
		}
	}()
	b.conf = filepath.Join(b.work, "no-rclone.conf")
	rep = &Report{Options: o}
	if rep.Machine, err = describeMachine(&o, b.work); err != nil {
		return nil, err
	}
	b.logf("starting MinIO on loopback")
	if b.minio, err = testenv.StartMinIO(filepath.Join(b.work, "minio")); err != nil {
		return nil, err
	}
	defer b.minio.Stop()
	b.s3 = testenv.Client(b.minio.Endpoint)
	if _, err := b.s3.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(bucket)}); err != nil {
		return nil, fmt.Errorf("creating bucket: %w", err)
	}
	// Sections 1 to 5 share the --sizes models and the many-files model;
	// restart builds its own state and section 7 uploads its own models.
	if o.runs(secCold) || o.runs(secThroughput) || o.runs(secWarm) || o.runs(secPods) {
		if err := b.upload(ctx); err != nil {
			return nil, err
		}
	}
	switch {
	case !o.DropCaches:
		rep.Machine.NoDropReason = "not asked to: smoke mode runs beside other tests"
	case !dropCaches():
		rep.Machine.NoDropReason = "the kernel refused writing /proc/sys/vm/drop_caches"
	default:
		rep.Machine.DropCaches = true
	}
	b.dropped = rep.Machine.DropCaches

	steps := []struct {
		section, name string
		fn            func(context.Context, *Report) error
	}{
		{secCold, "cold publish vs rclone copy", b.cold},
		{secThroughput, "throughput limits", b.throughput},
		{secWarm, "warm publish", b.warm},
		{secPods, "the second pod", b.pods},
		{secRestart, "restart", b.restart},
		{secRemote, "through a realistic remote", b.remote},
		{secScale, "scale", b.scale},
		{secSources, "the hf:// and oci:// sources", b.sources},
		{secFleet, "a fleet of nodes", b.fleet},
	}
	for _, s := range steps {
		if !o.runs(s.section) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		b.logf("== %s", s.name)
		if err := s.fn(ctx, rep); err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
	}
	rep.Took = time.Since(started)
	rep.Machine.LoadEnd = loadAverage()
	return rep, nil
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.o.Log, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// drop empties the page cache before a measurement when allowed.
func (b *bench) drop() {
	if b.dropped {
		dropCaches()
	}
}

// upload generates the models with a fast PRNG and puts each once.
func (b *bench) upload(ctx context.Context) error {
	config := []byte(`{"architectures":["BenchForCausalLM"],"hidden_size":4096}`)
	for i, size := range b.o.Sizes {
		m := model{Name: sizeName(size), Prefix: fmt.Sprintf("sized-%d", size), Files: 2,
			Size: size, Bytes: size + int64(len(config))}
		m.Weights = m.Prefix + "/model.safetensors"
		b.logf("generating and uploading a %s model", m.Name)
		w := make([]byte, size)
		_, _ = rand.NewChaCha8([32]byte{'w', byte(i), byte(size >> 20)}).Read(w)
		if err := b.put(ctx, m.Weights, w); err != nil {
			return err
		}
		if err := b.put(ctx, m.Prefix+"/config.json", config); err != nil {
			return err
		}
		b.sized = append(b.sized, m)
		if size == 1<<30 {
			// The same bytes with no checksum but the ETag's MD5, as rclone
			// uploads them to MinIO: the driver then computes an MD5, as
			// the init container does.
			md5Only := m
			md5Only.Name, md5Only.Prefix = m.Name+", MD5 only", fmt.Sprintf("sized-md5-%d", size)
			md5Only.Weights = md5Only.Prefix + "/model.safetensors"
			b.logf("uploading the %s model again without a CRC", m.Name)
			if err := b.putMD5Only(ctx, md5Only.Weights, w); err != nil {
				return err
			}
			if err := b.putMD5Only(ctx, md5Only.Prefix+"/config.json", config); err != nil {
				return err
			}
			b.sized = append(b.sized, md5Only)
		}
	}
	// The generated weights are in MinIO now; hand their memory back.
	debug.FreeOSMemory()

	n, each := b.o.ManyFiles, b.o.SmallFile
	b.many = model{Name: fmt.Sprintf("%s files × %s", thousands(n), sizeName(int64(each))), Prefix: "many-files",
		Files: n, Size: int64(each), Bytes: int64(n * each)}
	b.logf("generating and uploading a model of %s", b.many.Name)
	r := rand.NewChaCha8([32]byte{'m', 'a', 'n', 'y'})
	data := make([]byte, n*each)
	_, _ = r.Read(data)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for i := range n {
		key := fmt.Sprintf("%s/layer-%03d/part-%05d.bin", b.many.Prefix, i/100, i)
		if i == 0 {
			b.many.Weights = key
		}
		body := data[i*each : (i+1)*each]
		g.Go(func() error { return b.put(gctx, key, body) })
	}
	return g.Wait()
}

// putMD5Only uploads one object with no checksum but its ETag.
func (b *bench) putMD5Only(ctx context.Context, key string, body []byte) error {
	_, err := b.s3.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key), Body: bytes.NewReader(body)})
	if err != nil {
		return fmt.Errorf("uploading %s: %w", key, err)
	}
	return nil
}

// put uploads one object with a CRC64NVME, the checksum S3 keeps for every
// object uploaded since 2025 (MinIO keeps one only when asked).
func (b *bench) put(ctx context.Context, key string, body []byte) error {
	_, err := b.s3.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key), Body: bytes.NewReader(body),
		ChecksumAlgorithm: types.ChecksumAlgorithmCrc64nvme})
	if err != nil {
		return fmt.Errorf("uploading %s: %w", key, err)
	}
	return nil
}

// driver is a running node plugin with its own kubelet directory.
type driver struct {
	*testenv.Driver
	runDir string
	pid    int
}

// startDriver starts a node plugin whose kubelet directory is new; cacheDir
// "" gives it a new, empty cache too. args are more flags for it.
func (b *bench) startDriver(name, cacheDir string, args ...string) (*driver, error) {
	b.drivers++
	runDir := filepath.Join(b.work, "drivers", fmt.Sprintf("%d-%s", b.drivers, name))
	if cacheDir == "" {
		cacheDir = filepath.Join(runDir, "cache")
	}
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return nil, err
	}
	d, err := testenv.StartDriver(b.o.Driver, runDir, cacheDir, append([]string{"-v=0"}, args...)...)
	if err != nil {
		return nil, err
	}
	pid, err := pidServing(d.Socket)
	if err != nil {
		d.Stop()
		return nil, err
	}
	return &driver{Driver: d, runDir: runDir, pid: pid}, nil
}

// stop stops the driver, detaches what it left mounted and removes its
// kubelet directory (and its cache, unless that lives elsewhere).
func (d *driver) stop() {
	d.Stop()
	unmountUnder(d.runDir)
	_ = os.RemoveAll(d.runDir)
}

// target is a kubelet-style target path for a pod.
func (d *driver) target(pod string) string {
	return filepath.Join(d.runDir, "pods", pod, "volumes", "kubernetes.io~csi", "model", "mount")
}

// publish sends one NodePublishVolume and times exactly that call.
func (d *driver) publish(ctx context.Context, vol, target string, m model, secret map[string]string) (time.Duration, error) {
	return d.publishWith(ctx, vol, target, m, nil, secret)
}

// publishWith is publish with more volume attributes (pullPolicy).
func (d *driver) publishWith(ctx context.Context, vol, target string, m model, attrs, secret map[string]string) (time.Duration, error) {
	ctxAttrs := map[string]string{"modelUri": m.URI()}
	maps.Copy(ctxAttrs, attrs)
	req := testenv.PublishRequest(vol, target, ctxAttrs, secret)
	start := time.Now()
	_, err := d.Node.NodePublishVolume(ctx, req)
	took := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("publishing %s at %s: %w", m.URI(), target, err)
	}
	return took, nil
}

func (d *driver) unpublish(ctx context.Context, vol, target string) error {
	_, err := d.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target})
	if err != nil {
		return fmt.Errorf("unpublishing %s: %w", target, err)
	}
	return nil
}

// checkModel checks that dir holds the whole model, outside any timing.
func checkModel(dir string, m model) error {
	n, files, err := dirBytes(dir)
	if err != nil {
		return err
	}
	if n != m.Bytes || files != m.Files {
		return fmt.Errorf("%s holds %d files, %d bytes; the model has %d files, %d bytes", dir, files, n, m.Files, m.Bytes)
	}
	return nil
}

// secret is the node-publish secret (and the init container's environment)
// for MinIO, or for a proxy in front of it.
func secret(endpoint string) map[string]string { return testenv.RcloneSecret("mys3", endpoint) }

func sizeName(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	default:
		return fmt.Sprintf("%d B", n)
	}
}

func thousands(n int) string {
	s := fmt.Sprint(n)
	var out []string
	for len(s) > 3 {
		out = append([]string{s[len(s)-3:]}, out...)
		s = s[:len(s)-3]
	}
	return strings.Join(append([]string{s}, out...), ",")
}

// errs joins the errors of concurrent work.
func errs(list []error) error { return errors.Join(list...) }
