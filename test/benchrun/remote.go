package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
	"golang.org/x/sync/errgroup"
	"k8s.io/apimachinery/pkg/api/resource"
)

// remoteOptions size section 7: the side-by-side through a proxy that plays
// a remote object store.
type remoteOptions struct {
	Runs      int
	Rate      int64         // bytes per second, per response stream
	FirstByte time.Duration // before each object response's first byte
	Size      int64         // the large file; the shards, the incremental and the resumed models derive from it
	Files     int           // files of the small-files model
	FileSize  int           // bytes per small file
	PartSize  int64         // parts of the models uploaded in parts, as minio-go uploads them
}

func remoteDefaults() remoteOptions {
	// 16 MiB: minio-go's part size for anything up to 156 GiB.
	return remoteOptions{Runs: 3, Rate: 64e6, FirstByte: 20 * time.Millisecond, Size: 1 << 30, Files: 1000, FileSize: 16 << 10, PartSize: 16 << 20}
}

// remoteSmoke is small: just large enough that the incremental model (a
// quarter) is uploaded in two parts of S3's least size. Its lower rate
// keeps a 24 MiB download long enough (three quarters of a second) for the
// resume run to catch it half way.
func remoteSmoke() remoteOptions {
	o := remoteDefaults()
	o.Runs, o.Rate, o.Size, o.Files, o.PartSize = 1, 32e6, 24<<20, 20, 5<<20
	return o
}

// set applies the --remote-* flags; zero values (empty strings, and a
// negative delay) keep the defaults.
func (r *remoteOptions) set(runs int, rate string, firstByte time.Duration, size string, files int) error {
	if runs > 0 {
		r.Runs = runs
	}
	if rate != "" {
		q, err := resource.ParseQuantity(strings.TrimSuffix(strings.TrimSuffix(rate, "/s"), "B"))
		if err != nil || q.Value() < 0 {
			return fmt.Errorf("--remote-stream-rate: %q is not a rate such as 64MB (64×10⁶ bytes/s), 64MiB or 0 for none", rate)
		}
		r.Rate = q.Value()
	}
	if firstByte >= 0 {
		r.FirstByte = firstByte
	}
	if size != "" {
		q, err := resource.ParseQuantity(size)
		if err != nil || q.Value() < 8 {
			return fmt.Errorf("--remote-size: %q is not a size such as 1Gi", size)
		}
		r.Size = q.Value()
	}
	if files > 0 {
		r.Files = files
	}
	return nil
}

// Goal limits of section 7.
const (
	goalRemoteFile   = 0.8     // cold publish / rclone copy, one large file
	goalRemoteParts  = 0.6     // the same, uploaded in parts
	goalRemoteShards = 1.0     // the same, 8 shards
	goalRemoteMany   = 0.8     // the same, many small files
	goalIncremental  = 1 << 20 // bytes fetched again after a config change
	goalResume       = 55.0    // % of the file fetched after a kill half way
	configBytes      = 4 << 10 // the config.json of section 7's models
)

// pullPolicy is pkg/csi's AttrPullPolicy, written as a pod spec writes it.
const (
	attrPullPolicy = "pullPolicy"
	pullAlways     = "Always"
)

// RemoteRow is one model of section 7's side-by-side with its goal.
type RemoteRow struct {
	ColdRow
	Goal float64 // most b/a of the medians
}

// IncrResult is section 7's incremental update: the model published cold,
// then again with pullPolicy=Always after its config.json changed.
type IncrResult struct {
	Model model
	Cold  durations // the first publish
	Again durations // the second publish
	Bytes numbers   // object bytes the remote served for the second publish
	Gets  numbers   // object GETs for it
}

// ResumeResult is section 7's resume: a cold publish killed half way, a new
// driver on the same cache, the publish again.
type ResumeResult struct {
	Model  model
	Killed numbers   // % of the file the remote had served at the kill
	After  numbers   // % of the file the remote served after the restart
	Took   durations // the publish after the restart
}

// RemoteResult is section 7.
type RemoteResult struct {
	Options remoteOptions
	Rows    []RemoteRow
	Incr    IncrResult
	Resume  ResumeResult
	// The same with the models uploaded in parts (minio-go, PartSize):
	// objects whose ETag is no MD5.
	IncrParts   IncrResult
	ResumeParts ResumeResult
}

// remote runs sections 1's side-by-side, an incremental update and a
// resume after kill -9, with both sides reaching MinIO through one proxy
// that caps each response stream and delays each first byte.
func (b *bench) remote(ctx context.Context, rep *Report) error {
	o := b.o.Remote
	large, shards, many, incr, resume, err := b.uploadRemote(ctx)
	if err != nil {
		return err
	}
	largeParts, incrParts, resumeParts, err := b.uploadRemoteParts(ctx)
	if err != nil {
		return err
	}
	p, err := testenv.StartProxy(b.minio.Endpoint)
	if err != nil {
		return err
	}
	defer p.Stop()
	p.RateBytesPerSec.Store(o.Rate)
	p.FirstByteDelay.Store(int64(o.FirstByte))
	res := RemoteResult{Options: o}
	for _, x := range []struct {
		m    model
		goal float64
	}{{large, goalRemoteFile}, {shards, goalRemoteShards}, {many, goalRemoteMany}, {largeParts, goalRemoteParts}} {
		row, err := b.coldRow(ctx, p.URL, x.m, o.Runs)
		if err != nil {
			return err
		}
		res.Rows = append(res.Rows, RemoteRow{ColdRow: row, Goal: x.goal})
	}
	res.Incr, res.IncrParts = IncrResult{Model: incr}, IncrResult{Model: incrParts}
	res.Resume, res.ResumeParts = ResumeResult{Model: resume}, ResumeResult{Model: resumeParts}
	for r := range o.Runs {
		for _, in := range []*IncrResult{&res.Incr, &res.IncrParts} {
			if err := b.incremental(ctx, p, in, r); err != nil {
				return err
			}
		}
	}
	for r := range o.Runs {
		for _, rs := range []*ResumeResult{&res.Resume, &res.ResumeParts} {
			if err := b.resume(ctx, p, rs, r); err != nil {
				return err
			}
		}
	}
	rep.Remote = res
	return nil
}

// uploadRemote puts section 7's models: one large file and 8 shards (each
// with a 4 KiB config.json), many small files, the incremental model (a
// quarter of the large file and a config.json, which each run rewrites)
// and the resumed model (the large file's size, alone).
func (b *bench) uploadRemote(ctx context.Context) (large, shards, many, incr, resume model, err error) {
	o := b.o.Remote
	buf := make([]byte, max(o.Size, int64(o.Files*o.FileSize)))
	defer debug.FreeOSMemory() // the generated weights are in MinIO now
	withConfig := func(m model) error { return b.put(ctx, m.Prefix+"/config.json", configJSON(m.Prefix, 0)) }

	large = model{Name: sizeName(o.Size) + " file", Prefix: "remote-file", Size: o.Size, Bytes: o.Size + configBytes, Files: 2}
	large.Weights = large.Prefix + "/model.safetensors"
	if err = b.putRandom(ctx, large.Weights, buf); err == nil {
		err = withConfig(large)
	}
	if err != nil {
		return
	}

	shard := o.Size / 8
	shards = model{Name: "8 × " + sizeName(shard) + " shards", Prefix: "remote-shards", Size: shard, Bytes: 8*shard + configBytes, Files: 9}
	for i := range 8 {
		key := fmt.Sprintf("%s/model-%05d-of-00008.safetensors", shards.Prefix, i+1)
		if i == 0 {
			shards.Weights = key
		}
		if err = b.putRandom(ctx, key, buf[:shard]); err != nil {
			return
		}
	}
	if err = withConfig(shards); err != nil {
		return
	}

	n, each := o.Files, o.FileSize
	many = model{Name: fmt.Sprintf("%s files × %s", thousands(n), sizeName(int64(each))), Prefix: "remote-many",
		Size: int64(each), Bytes: int64(n * each), Files: n}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for i := range n {
		key := fmt.Sprintf("%s/layer-%03d/part-%05d.bin", many.Prefix, i/100, i)
		if i == 0 {
			many.Weights = key
		}
		body := buf[i*each : (i+1)*each : (i+1)*each]
		fill(key, body)
		g.Go(func() error { return b.put(gctx, key, body) })
	}
	if err = g.Wait(); err != nil {
		return
	}

	quarter := o.Size / 4
	incr = model{Name: sizeName(quarter) + " + config.json", Prefix: "remote-incr", Size: quarter, Bytes: quarter + configBytes, Files: 2}
	incr.Weights = incr.Prefix + "/model.safetensors"
	if err = b.putRandom(ctx, incr.Weights, buf[:quarter]); err == nil {
		err = withConfig(incr)
	}
	if err != nil {
		return
	}

	resume = model{Name: sizeName(o.Size) + " one-file model", Prefix: "remote-resume", Size: o.Size, Bytes: o.Size, Files: 1}
	resume.Weights = resume.Prefix + "/model.safetensors"
	err = b.putRandom(ctx, resume.Weights, buf)
	return
}

// uploadRemoteParts puts the one file, the incremental model and the
// resumed model again, their weights uploaded in parts of PartSize as
// minio-go uploads them (the AWS CLI and SDKs do the same with parts of
// their own size): an ETag <hex>-<parts> and no MD5 in the listing.
func (b *bench) uploadRemoteParts(ctx context.Context) (large, incr, resume model, err error) {
	o := b.o.Remote
	buf := make([]byte, o.Size)
	defer debug.FreeOSMemory()
	up := testenv.Upload{Name: "minio-go parts", PartSize: uint64(o.PartSize)}
	put := func(m model, n int64) error {
		b.logf("generating and uploading %s (%s) in parts of %s", m.Weights, sizeName(n), sizeName(o.PartSize))
		fill(m.Weights, buf[:n])
		if err := up.Put(ctx, b.minio.Endpoint, bucket, m.Weights, buf[:n]); err != nil {
			return err
		}
		if m.Files == 1 {
			return nil
		}
		return b.put(ctx, m.Prefix+"/config.json", configJSON(m.Prefix, 0))
	}
	large = model{Name: sizeName(o.Size) + " file in parts", Prefix: "remote-file-parts", Size: o.Size, Bytes: o.Size + configBytes, Files: 2}
	quarter := o.Size / 4
	incr = model{Name: sizeName(quarter) + " in parts + config.json", Prefix: "remote-incr-parts", Size: quarter, Bytes: quarter + configBytes, Files: 2}
	resume = model{Name: sizeName(o.Size) + " one-file model in parts", Prefix: "remote-resume-parts", Size: o.Size, Bytes: o.Size, Files: 1}
	for _, m := range []*model{&large, &incr, &resume} {
		m.Weights = m.Prefix + "/model.safetensors"
		if err = put(*m, m.Size); err != nil {
			return
		}
	}
	return
}

// fill writes bytes into buf that depend only on key, so no two objects
// share content (the cache must not find one model's blobs in another's).
func fill(key string, buf []byte) {
	_, _ = rand.NewChaCha8(sha256.Sum256([]byte(key))).Read(buf)
}

// putRandom uploads len(buf) bytes generated for key.
func (b *bench) putRandom(ctx context.Context, key string, buf []byte) error {
	b.logf("generating and uploading %s (%s)", key, sizeName(int64(len(buf))))
	fill(key, buf)
	return b.put(ctx, key, buf)
}

// configJSON is a 4 KiB config.json whose content (and so ETag) differs
// for each version of each model.
func configJSON(prefix string, version int) []byte {
	head := fmt.Sprintf(`{"architectures":["BenchForCausalLM"],"model":%q,"version":%d,"pad":"`, prefix, version)
	tail := `"}` + "\n"
	return []byte(head + strings.Repeat("x", configBytes-len(head)-len(tail)) + tail)
}

// incremental is one run of the incremental update: a new driver with an
// empty cache publishes the model (its config.json at a version of its
// own), the config.json is replaced by another of the same size, and the
// model is published again to a new target with pullPolicy=Always. The
// bytes are what the remote served for that second publish.
func (b *bench) incremental(ctx context.Context, p *testenv.Proxy, res *IncrResult, r int) error {
	m := res.Model
	conf := m.Prefix + "/config.json"
	if err := b.put(ctx, conf, configJSON(m.Prefix, 2*r+1)); err != nil {
		return err
	}
	d, err := b.startDriver(fmt.Sprintf("incr-%s-%d", m.Prefix, r), "")
	if err != nil {
		return err
	}
	defer d.stop()
	sec := secret(p.URL)
	first, second := d.target("pod-a"), d.target("pod-b")
	b.drop()
	cold, err := d.publish(ctx, "csi-incr-a", first, m, sec)
	if err != nil {
		return err
	}
	if err := checkModel(first, m); err != nil {
		return err
	}
	changed := configJSON(m.Prefix, 2*r+2)
	if err := b.put(ctx, conf, changed); err != nil {
		return err
	}
	p.Reset()
	b.drop()
	again, err := d.publishWith(ctx, "csi-incr-b", second, m, map[string]string{attrPullPolicy: pullAlways}, sec)
	if err != nil {
		return err
	}
	served, gets := p.ObjectBytes(), p.ObjectGets()
	if err := checkModel(second, m); err != nil {
		return err
	}
	// Not a timing: without the new config.json the publish served the
	// old model, and the bytes would say nothing about an update.
	if got, err := os.ReadFile(filepath.Join(second, "config.json")); err != nil || !bytes.Equal(got, changed) {
		return fmt.Errorf("the publish with pullPolicy=Always does not show the changed config.json (%v)", err)
	}
	res.Cold = append(res.Cold, cold)
	res.Again = append(res.Again, again)
	res.Bytes = append(res.Bytes, float64(served))
	res.Gets = append(res.Gets, float64(gets))
	b.logf("incremental run %d: cold publish %s; after the config.json change, publish %s, %d bytes in %d GETs from the remote",
		r+1, fmtDur(cold), fmtDur(again), served, gets)
	if err := d.unpublish(ctx, "csi-incr-a", first); err != nil {
		return err
	}
	return d.unpublish(ctx, "csi-incr-b", second)
}

// resume is one run of the resume: a new driver with an empty cache
// publishes the one-file model and is killed with SIGKILL once the remote
// has served half the file; a new driver on the same cache directory
// publishes it again. The bytes are what the remote served after the kill.
func (b *bench) resume(ctx context.Context, p *testenv.Proxy, res *ResumeResult, r int) error {
	m := res.Model
	// The cache outlives both drivers' kubelet directories.
	cacheDir := filepath.Join(b.work, m.Prefix, fmt.Sprint(r))
	defer os.RemoveAll(cacheDir)
	sec := secret(p.URL)
	killed, err := b.killHalfWay(ctx, p, m, r, cacheDir, sec)
	if err != nil {
		return err
	}
	d, err := b.startDriver(fmt.Sprintf("%s-%d-after", m.Prefix, r), cacheDir)
	if err != nil {
		return err
	}
	defer d.stop()
	target := d.target("pod-0")
	p.Reset()
	b.drop()
	took, err := d.publish(ctx, "csi-resume", target, m, sec)
	if err != nil {
		return err
	}
	after := p.ObjectBytes()
	if err := checkModel(target, m); err != nil {
		return err
	}
	res.Killed = append(res.Killed, 100*float64(killed)/float64(m.Size))
	res.After = append(res.After, 100*float64(after)/float64(m.Size))
	res.Took = append(res.Took, took)
	b.logf("resume run %d: killed at %.1f%% of %s; after the restart the publish took %s and fetched %d bytes (%.1f%%)",
		r+1, res.Killed[r], m.Name, fmtDur(took), after, res.After[r])
	return d.unpublish(ctx, "csi-resume", target)
}

// killHalfWay starts a cold publish of m by a new driver on cacheDir and
// kills the driver with SIGKILL once the remote has served half of m. It
// returns the bytes the remote had served once the killed streams stopped.
func (b *bench) killHalfWay(ctx context.Context, p *testenv.Proxy, m model, r int, cacheDir string, sec map[string]string) (int64, error) {
	d, err := b.startDriver(fmt.Sprintf("%s-%d", m.Prefix, r), cacheDir)
	if err != nil {
		return 0, err
	}
	defer d.stop()
	p.Reset()
	b.drop()
	done := make(chan error, 1)
	go func() {
		_, err := d.publish(ctx, "csi-resume", d.target("pod-0"), m, sec)
		done <- err
	}()
	// Polled every 2 ms: at four 64 MB/s streams, the kill lands within
	// about half a MB of the half.
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for p.ObjectBytes() < m.Size/2 {
		select {
		case err := <-done:
			return 0, fmt.Errorf("the publish to be killed ended (error: %v) before the remote served half of %s; slow the remote down (--remote-stream-rate)", err, m.Name)
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-tick.C:
		}
	}
	d.Kill()
	if err := <-done; err == nil {
		return 0, fmt.Errorf("the publish of %s succeeded although the driver was killed half way", m.Name)
	}
	return settled(p), nil
}

// settled waits until the remote's byte count stops moving, so bytes that
// streams to the dead driver still write are counted before the restart,
// not after it.
func settled(p *testenv.Proxy) int64 {
	last := p.ObjectBytes()
	for range 50 {
		time.Sleep(100 * time.Millisecond)
		n := p.ObjectBytes()
		if n == last {
			return n
		}
		last = n
	}
	return last
}
