// Package bench measures publishes of the real modelcache-csi binary against
// a loopback MinIO with real bind mounts. Run with `make bench` (root); the
// numbers are reported, never asserted.
package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/test/testenv"
)

const modelBytes = 64 << 20

var (
	driverBin string
	minio     *testenv.MinIO
)

func TestMain(m *testing.M) {
	os.Exit(testenv.RunSuite(m, "benchmarks", func(s *testenv.Suite) error {
		driverBin, minio = s.DriverBin, s.MinIO
		w := make([]byte, modelBytes)
		_, _ = rand.NewChaCha8([32]byte{1}).Read(w)
		return testenv.PutModel(context.Background(), testenv.Client(minio.Endpoint), "bench", "m", map[string][]byte{"w.bin": w, "config.json": []byte("{}")})
	}))
}

func startDriver(b *testing.B, dir string, args ...string) *testenv.Driver {
	d, err := testenv.StartDriver(driverBin, dir, filepath.Join(dir, "cache"), append([]string{"-v=0"}, args...)...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(d.Stop)
	return d
}

func publish(b *testing.B, d *testenv.Driver, vol, target string) {
	publishFrom(b, d, vol, target, "mys3:bench/m", minio.Endpoint)
}

// publishFrom publishes uri with the remote's endpoint at endpoint (MinIO,
// or a proxy in front of it).
func publishFrom(b *testing.B, d *testenv.Driver, vol, target, uri, endpoint string) {
	req := testenv.PublishRequest(vol, target, map[string]string{"modelUri": uri}, testenv.RcloneSecret("mys3", endpoint))
	if _, err := d.Node.NodePublishVolume(context.Background(), req); err != nil {
		b.Fatal(err)
	}
}

// coldPublishes times publishes of uri into an empty cache, a new driver
// (started with args) each time.
func coldPublishes(b *testing.B, uri, endpoint string, args ...string) {
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		dir := b.TempDir()
		d := startDriver(b, dir, args...)
		target := filepath.Join(dir, "pods", fmt.Sprint(i), "mount")
		b.StartTimer()
		publishFrom(b, d, "vol", target, uri, endpoint)
		b.StopTimer()
		unpublish(b, d, "vol", target)
		d.Stop()
		b.StartTimer()
	}
}

func unpublish(b *testing.B, d *testenv.Driver, vol, target string) {
	if _, err := d.Node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: vol, TargetPath: target}); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkPublishCold downloads the model into an empty cache each time.
func BenchmarkPublishCold(b *testing.B) {
	b.SetBytes(modelBytes)
	coldPublishes(b, "mys3:bench/m", minio.Endpoint)
}

// BenchmarkPublishWarm publishes a model the node already holds; it
// reports the p50 and p99 of one publish besides the mean.
func BenchmarkPublishWarm(b *testing.B) {
	dir := b.TempDir()
	d := startDriver(b, dir)
	publish(b, d, "warmup", filepath.Join(dir, "pods", "warmup", "mount"))
	var took []time.Duration
	for i := 0; b.Loop(); i++ {
		target := filepath.Join(dir, "pods", fmt.Sprint(i), "mount")
		start := time.Now()
		publish(b, d, fmt.Sprint("vol-", i), target)
		took = append(took, time.Since(start))
		b.StopTimer()
		unpublish(b, d, fmt.Sprint("vol-", i), target)
		b.StartTimer()
	}
	reportPercentiles(b, took)
	unpublish(b, d, "warmup", filepath.Join(dir, "pods", "warmup", "mount"))
}

// BenchmarkUnpublish unpublishes one of two pods of a cached model, as
// kubelet does when a replica goes; it reports p50 and p99 too.
func BenchmarkUnpublish(b *testing.B) {
	dir := b.TempDir()
	d := startDriver(b, dir)
	publish(b, d, "keep", filepath.Join(dir, "pods", "keep", "mount"))
	var took []time.Duration
	for i := 0; b.Loop(); i++ {
		target := filepath.Join(dir, "pods", fmt.Sprint(i), "mount")
		b.StopTimer()
		publish(b, d, fmt.Sprint("vol-", i), target)
		b.StartTimer()
		start := time.Now()
		unpublish(b, d, fmt.Sprint("vol-", i), target)
		took = append(took, time.Since(start))
	}
	reportPercentiles(b, took)
	unpublish(b, d, "keep", filepath.Join(dir, "pods", "keep", "mount"))
}

// reportPercentiles adds p50 and p99 of the timed calls to the results.
func reportPercentiles(b *testing.B, took []time.Duration) {
	if len(took) == 0 {
		return
	}
	slices.Sort(took)
	at := func(q float64) float64 { return float64(took[int(q*float64(len(took)-1))].Microseconds()) }
	b.ReportMetric(at(0.50), "p50-µs")
	b.ReportMetric(at(0.99), "p99-µs")
}

// BenchmarkPublishCold_PerStreamCap downloads one 64 MiB file through a
// proxy that caps every response stream at 16 MiB/s, as one S3 or GCS
// stream is capped, with the file fetched in one stream and in four ranged
// streams (rclone's default for the storage initializer).
func BenchmarkPublishCold_PerStreamCap(b *testing.B) {
	p, err := testenv.StartProxy(minio.Endpoint)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.Stop)
	p.RateBytesPerSec.Store(16 << 20)
	for _, streams := range []int{1, 4} {
		b.Run(fmt.Sprintf("streams=%d", streams), func(b *testing.B) {
			b.SetBytes(modelBytes)
			cutoff := "16Mi"
			if streams == 1 {
				cutoff = "0"
			}
			coldPublishes(b, "mys3:bench/m", p.URL, "--multi-thread-cutoff="+cutoff, fmt.Sprint("--multi-thread-streams=", streams))
		})
	}
}

// BenchmarkColdVsRcloneCopy_SlowStreams puts a cold publish side by side
// with the storage initializer's `rclone copy` (the same rclone version,
// its defaults) through a proxy that caps every response stream at
// 32 MiB/s and holds each response's first byte for 20 ms, as S3 or GCS
// do; loopback MinIO has neither. Three shapes: one large file, a few
// shards, many small files. make bench only (skipped with -short).
func BenchmarkColdVsRcloneCopy_SlowStreams(b *testing.B) {
	if testing.Short() {
		b.Skip("uploads and downloads hundreds of MiB: make bench only")
	}
	rclone, err := testenv.Binary("rclone")
	if err != nil {
		b.Fatal(err)
	}
	p, err := testenv.StartProxy(minio.Endpoint)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.Stop)
	p.RateBytesPerSec.Store(32 << 20)
	p.FirstByteDelay.Store(int64(20 * time.Millisecond))
	shapes := []struct {
		name  string
		files map[string]int
	}{
		{"1x256MiB", map[string]int{"model.bin": 256 << 20, "config.json": 4 << 10}},
		{"8x32MiB", func() map[string]int {
			m := map[string]int{}
			for i := range 8 {
				m[fmt.Sprintf("shard-%d.bin", i)] = 32 << 20
			}
			return m
		}()},
		{"500x16KiB", func() map[string]int {
			m := map[string]int{}
			for i := range 500 {
				m[fmt.Sprintf("f/%03d.json", i)] = 16 << 10
			}
			return m
		}()},
	}
	conf := filepath.Join(b.TempDir(), "rclone.conf")
	if err := os.WriteFile(conf, nil, 0o600); err != nil {
		b.Fatal(err)
	}
	for _, sh := range shapes {
		files := map[string][]byte{}
		var size int64
		r := rand.NewChaCha8([32]byte{byte(len(sh.files))})
		for name, n := range sh.files {
			buf := make([]byte, n)
			_, _ = r.Read(buf)
			files[name] = buf
			size += int64(n)
		}
		if err := testenv.PutModel(context.Background(), testenv.Client(minio.Endpoint), "bench", sh.name, files); err != nil {
			b.Fatal(err)
		}
		secret := testenv.RcloneSecret("mys3", p.URL)
		b.Run(sh.name+"/rclone-copy", func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				dst := b.TempDir()
				cmd := exec.Command(rclone, "copy", "mys3:bench/"+sh.name, dst)
				cmd.Env = append(os.Environ(), "RCLONE_CONFIG="+conf)
				for k, v := range secret {
					cmd.Env = append(cmd.Env, k+"="+v)
				}
				b.StartTimer()
				if out, err := cmd.CombinedOutput(); err != nil {
					b.Fatalf("rclone copy: %v\n%s", err, out)
				}
			}
		})
		b.Run(sh.name+"/cold-publish", func(b *testing.B) {
			b.SetBytes(size)
			coldPublishes(b, "mys3:bench/"+sh.name, p.URL)
		})
	}
}
