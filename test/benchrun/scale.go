package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/modelcache/modelcache/pkg/adminapi"
	"github.com/modelcache/modelcache/test/testenv"
	"golang.org/x/sync/errgroup"
)

// scaleSize is one cache size of section 8: Trees models of Files files each.
type scaleSize struct{ Trees, Files int }

// scaleOptions size section 8: what the node plugin's per-request costs
// are with a small cache and with a large one, measured in the same run.
type scaleOptions struct {
	Sizes     []scaleSize // smallest first; the goals read the last one
	FileBytes int         // bytes per file
	Seeders   int         // first publishes at once while seeding
	Scrapes   int         // /metrics scrapes per size
	Publishes int         // warm publish and unpublish pairs per size
	Evictions int         // single unused trees evicted per size
	// Budget ends the scrapes, and the evictions, early once at least
	// minScrapes (minEvictions) ran: where each walks the cache, one can
	// take seconds at the large size.
	Budget time.Duration
}

// The fewest scrapes and evictions a size gets however slow they are.
const (
	minScrapes   = 20
	minEvictions = 5
)

func scaleDefaults() scaleOptions {
	return scaleOptions{
		Sizes:     []scaleSize{{Trees: 10, Files: 100}, {Trees: 1000, Files: 100}},
		FileBytes: 256, Seeders: 8, Scrapes: 200, Publishes: 200, Evictions: 20,
		Budget: time.Minute,
	}
}

// scaleSmoke is tiny: 20 files in 2 trees and 40 in 4.
func scaleSmoke() scaleOptions {
	o := scaleDefaults()
	o.Sizes = []scaleSize{{Trees: 2, Files: 10}, {Trees: 4, Files: 10}}
	o.Scrapes, o.Publishes, o.Evictions = 5, 5, 1
	return o
}

// parseScaleSizes reads --scale-sizes, "10x100,1000x100": trees × files
// per tree, smallest first.
func parseScaleSizes(s string) ([]scaleSize, error) {
	var out []scaleSize
	for f := range strings.SplitSeq(s, ",") {
		t, n, ok := strings.Cut(strings.TrimSpace(f), "x")
		trees, err1 := strconv.Atoi(t)
		files, err2 := strconv.Atoi(n)
		if !ok || err1 != nil || err2 != nil || trees < 2 || files < 1 {
			return nil, fmt.Errorf("--scale-sizes: %q is not TREESxFILES with at least 2 trees, such as 1000x100", f)
		}
		if len(out) > 0 && trees*files < out[len(out)-1].Trees*out[len(out)-1].Files {
			return nil, fmt.Errorf("--scale-sizes: list the sizes smallest first")
		}
		out = append(out, scaleSize{Trees: trees, Files: files})
	}
	return out, nil
}

// mounts is how many trees stay mounted through a size's measurements and
// its restarts: a fifth of them, as section 6 has.
func (s scaleSize) mounts() int { return max(1, s.Trees/5) }

// ScaleRow is section 8 for one cache size.
type ScaleRow struct {
	Size      scaleSize
	Mounts    int           // trees left mounted: the restarts' live mounts
	Upload    time.Duration // putting the models into MinIO
	Seed      time.Duration // the first publish of every tree
	Scrape    durations     // each /metrics scrape
	Publish   durations     // each warm publish
	Unpublish durations     // each unpublish after it
	Start     durations     // each restart, start to Probe ready
	Evict     durations     // each eviction of one unused tree
}

// ScaleResult is section 8.
type ScaleResult struct {
	Options scaleOptions
	Rows    []ScaleRow
}

// scaleCache is one size's cache while section 8 measures it.
type scaleCache struct {
	row     ScaleRow
	models  []model
	d       *driver
	metrics string // the scrape URL
}

// scale seeds a cache of each size, each with its own driver, then takes
// every measurement in turns across the sizes (a scrape of one, a scrape
// of the other, ...), so that what else the machine does meanwhile
// weighs on both alike: /metrics scrapes, warm publishes, restarts with
// live mounts and evictions of single unused trees.
func (b *bench) scale(ctx context.Context, rep *Report) error {
	o := b.o.Scale
	var caches []*scaleCache
	defer func() {
		for _, c := range caches {
			c.d.stop()
		}
	}()
	for _, size := range o.Sizes {
		c, err := b.seedScaleCache(ctx, size)
		if c != nil {
			caches = append(caches, c)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", size.name(), err)
		}
	}
	steps := []struct {
		name string
		fn   func(context.Context, []*scaleCache) error
	}{
		{"/metrics scrapes", b.scrapeScale},
		{"warm publishes", b.warmScale},
		{"restarts", b.restartScale},
		{"evictions", b.evictScale},
	}
	for _, s := range steps {
		if err := s.fn(ctx, caches); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	res := ScaleResult{Options: o}
	for _, c := range caches {
		res.Rows = append(res.Rows, c.row)
	}
	rep.Scale = res
	return nil
}

// seedScaleCache uploads size's models and publishes each once through a
// new driver with an empty cache, leaving the first size.mounts() mounted.
func (b *bench) seedScaleCache(ctx context.Context, size scaleSize) (*scaleCache, error) {
	o := b.o.Scale
	c := &scaleCache{row: ScaleRow{Size: size, Mounts: size.mounts()}}
	prefix := fmt.Sprintf("scale-%d", size.Trees)
	b.logf("scale: uploading %s", size.name())
	start := time.Now()
	var err error
	if c.models, err = b.uploadScale(ctx, prefix, size); err != nil {
		return nil, err
	}
	c.row.Upload = time.Since(start)
	if c.d, c.metrics, err = b.startScaleDriver(filepath.Join(b.work, "scale", prefix)); err != nil {
		return nil, err
	}
	b.logf("scale: publishing each of the %s models once, %d at once", thousands(size.Trees), o.Seeders)
	start = time.Now()
	if err := seedScale(ctx, c.d, c.models, c.row.Mounts, o.Seeders, secret(b.minio.Endpoint)); err != nil {
		return c, err
	}
	c.row.Seed = time.Since(start)
	b.logf("scale: %s uploaded in %s, published in %s", size.name(), fmtDur(c.row.Upload), fmtDur(c.row.Seed))
	return c, nil
}

// scrapeScale scrapes each cache's /metrics in turns, Scrapes times or
// fewer (at least minScrapes) once the budget has passed, after one
// untimed scrape of each. That one is checked to report the cache's trees:
// a scrape that left the cache gauges out would be timed without the work
// it is measured for.
func (b *bench) scrapeScale(ctx context.Context, caches []*scaleCache) error {
	o := b.o.Scale
	for _, c := range caches {
		body, err := scrape(ctx, c.metrics)
		if err != nil {
			return err
		}
		if got, ok := gauge(body, "modelcache_cache_trees"); !ok || got != float64(c.row.Size.Trees) {
			return fmt.Errorf("the scrape reports %v trees (found: %v); the cache holds %d", got, ok, c.row.Size.Trees)
		}
	}
	begun := time.Now()
	for i := 0; i < o.Scrapes && (i < minScrapes || time.Since(begun) < o.Budget); i++ {
		for _, c := range caches {
			start := time.Now()
			if _, err := scrape(ctx, c.metrics); err != nil {
				return err
			}
			c.row.Scrape = append(c.row.Scrape, time.Since(start))
		}
	}
	for _, c := range caches {
		b.logf("scale: %s: %d scrapes, p50 %s p99 %s", c.row.Size.name(), len(c.row.Scrape),
			fmtDur(c.row.Scrape.Percentile(50)), fmtDur(c.row.Scrape.Percentile(99)))
	}
	return nil
}

// warmScale publishes cached models to new targets in turns across the
// caches, Publishes of each, and unpublishes each; it times both calls.
func (b *bench) warmScale(ctx context.Context, caches []*scaleCache) error {
	sec := secret(b.minio.Endpoint)
	for i := range b.o.Scale.Publishes {
		for _, c := range caches {
			// A stride prime to any cache size here visits the trees in an
			// order unrelated to how they were published.
			m := c.models[(i*7919)%len(c.models)]
			vol := fmt.Sprintf("csi-warm-%d", i)
			target := c.d.target(vol)
			took, err := c.d.publish(ctx, vol, target, m, sec)
			if err != nil {
				return err
			}
			if i == 0 {
				if err := checkModel(target, m); err != nil {
					return err
				}
			}
			start := time.Now()
			if err := c.d.unpublish(ctx, vol, target); err != nil {
				return err
			}
			c.row.Publish, c.row.Unpublish = append(c.row.Publish, took), append(c.row.Unpublish, time.Since(start))
		}
	}
	for _, c := range caches {
		r := c.row
		b.logf("scale: %s: warm publish p50 %s p99 %s; unpublish p50 %s p99 %s", r.Size.name(), fmtDur(r.Publish.Percentile(50)),
			fmtDur(r.Publish.Percentile(99)), fmtDur(r.Unpublish.Percentile(50)), fmtDur(r.Unpublish.Percentile(99)))
	}
	return nil
}

// restartScale stops every driver, leaving its mounts in place as on a
// rolling update, and times starts on each cache in turns until Probe
// answers ready; then it starts each driver again for the evictions.
func (b *bench) restartScale(ctx context.Context, caches []*scaleCache) error {
	for _, c := range caches {
		c.d.Stop()
	}
	for r := range b.o.Runs {
		for _, c := range caches {
			took, live, err := timeStart(ctx, b.o.Driver, c.d.runDir, c.d.CacheDir)
			if err != nil {
				return err
			}
			if live != c.row.Mounts {
				return fmt.Errorf("the driver recovered %d live mounts; %d were left mounted", live, c.row.Mounts)
			}
			c.row.Start = append(c.row.Start, took)
			b.logf("scale: %s: restart %d ready in %s with %d live mounts", c.row.Size.name(), r+1, fmtDur(took), live)
		}
	}
	for _, c := range caches {
		td, err := testenv.StartDriver(b.o.Driver, c.d.runDir, c.d.CacheDir, "-v=0")
		if err != nil {
			return err
		}
		c.d = &driver{Driver: td, runDir: c.d.runDir}
	}
	return nil
}

// evictScale evicts trees no target uses, one at a time through the admin
// API in turns across the caches, Evictions of each or fewer (at least
// minEvictions) once the budget has passed, and times each call. The
// models past the mounted ones are unused; each is looked up by its URI
// first, untimed.
func (b *bench) evictScale(ctx context.Context, caches []*scaleCache) error {
	o := b.o.Scale
	admins := make([]*adminapi.Client, len(caches))
	for i, c := range caches {
		admins[i] = testenv.NewAdmin(filepath.Join(c.d.CacheDir, "admin.sock"))
		if err := testenv.WaitAdmin(admins[i].Socket, 30*time.Second); err != nil {
			return err
		}
	}
	begun := time.Now()
	for i := 0; i < o.Evictions && (i < minEvictions || time.Since(begun) < o.Budget); i++ {
		for k, c := range caches {
			at := len(c.models) - 1 - i
			if at < c.row.Mounts {
				continue
			}
			took, err := evictOne(ctx, admins[k], c.models[at])
			if err != nil {
				return err
			}
			c.row.Evict = append(c.row.Evict, took)
		}
	}
	for _, c := range caches {
		b.logf("scale: %s: %d evictions, p50 %s slowest %s", c.row.Size.name(), len(c.row.Evict),
			fmtDur(c.row.Evict.Percentile(50)), fmtDur(c.row.Evict.Max()))
	}
	return nil
}

// evictOne evicts m's tree, which no target uses, by digest and times the
// call.
func evictOne(ctx context.Context, admin *adminapi.Client, m model) (time.Duration, error) {
	t, err := admin.Tree(ctx, m.URI())
	if err != nil {
		return 0, fmt.Errorf("finding the tree of %s: %w", m.URI(), err)
	}
	start := time.Now()
	res, err := admin.Evict(ctx, t.Digest, false)
	took := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("evicting %s: %w", t.Digest, err)
	}
	if !res.Removed || res.Freed <= 0 {
		return 0, fmt.Errorf("evicting the unused tree of %s removed nothing: %+v", m.URI(), res)
	}
	return took, nil
}

// uploadScale puts size.Trees models of size.Files distinct files each.
// Each model goes up as one tar that MinIO extracts into its objects
// (S3's Snowball auto-extract), as 100,000 single PUTs would take minutes;
// the objects are the same plain objects either way, with an MD5 ETag.
func (b *bench) uploadScale(ctx context.Context, prefix string, size scaleSize) ([]model, error) {
	each := b.o.Scale.FileBytes
	models := make([]model, size.Trees)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i := range models {
		m := model{Name: fmt.Sprintf("%s/model-%04d", prefix, i), Prefix: fmt.Sprintf("%s/model-%04d", prefix, i),
			Size: int64(each), Bytes: int64(size.Files * each), Files: size.Files}
		m.Weights = m.Prefix + "/part-000.bin"
		models[i] = m
		g.Go(func() error { return b.putExtracted(gctx, m, each) })
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return models, b.checkUploaded(ctx, prefix, size.Trees*size.Files)
}

// putExtracted uploads m's files, each of size bytes that depend on its
// key, as one tar that MinIO extracts.
func (b *bench) putExtracted(ctx context.Context, m model, size int) error {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	body := make([]byte, size)
	for f := range m.Files {
		key := fmt.Sprintf("%s/part-%03d.bin", m.Prefix, f)
		fill(key, body)
		if err := tw.WriteHeader(&tar.Header{Name: key, Mode: 0o644, Size: int64(size), ModTime: time.Now(), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if _, err := tw.Write(body); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	_, err := b.s3.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(m.Prefix + ".tar"),
		Body: bytes.NewReader(buf.Bytes()), Metadata: map[string]string{"Snowball-Auto-Extract": "true"}})
	if err != nil {
		return fmt.Errorf("uploading %s as a tar to extract: %w", m.Prefix, err)
	}
	return nil
}

// checkUploaded counts the objects under prefix: a MinIO that stored the
// tars instead of extracting them would leave the publishes nothing to
// fetch.
func (b *bench) checkUploaded(ctx context.Context, prefix string, want int) error {
	p := s3.NewListObjectsV2Paginator(b.s3, &s3.ListObjectsV2Input{Bucket: aws.String(bucket), Prefix: aws.String(prefix + "/")})
	n := 0
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return fmt.Errorf("listing %s: %w", prefix, err)
		}
		n += len(page.Contents)
	}
	if n != want {
		return fmt.Errorf("MinIO holds %d objects under %s after extracting the tars; want %d", n, prefix, want)
	}
	return nil
}

// startScaleDriver starts a driver with an empty cache under runDir and
// its metrics on a loopback port, and returns the scrape URL.
func (b *bench) startScaleDriver(runDir string) (*driver, string, error) {
	port, err := testenv.FreePort()
	if err != nil {
		return nil, "", err
	}
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return nil, "", err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	d, err := testenv.StartDriver(b.o.Driver, runDir, filepath.Join(runDir, "cache"), "-v=0", "--metrics-address="+addr)
	if err != nil {
		return nil, "", err
	}
	return &driver{Driver: d, runDir: runDir}, "http://" + addr + "/metrics", nil
}

// seedScale publishes every model once, seeders at a time, checks what
// each target holds and unpublishes all but the first mounts models.
func seedScale(ctx context.Context, d *driver, models []model, mounts, seeders int, sec map[string]string) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(seeders)
	for i, m := range models {
		g.Go(func() error {
			vol := fmt.Sprintf("csi-seed-%d", i)
			target := d.target(vol)
			if _, err := d.publish(gctx, vol, target, m, sec); err != nil {
				return err
			}
			if err := checkModel(target, m); err != nil {
				return err
			}
			if i < mounts {
				return nil
			}
			return d.unpublish(gctx, vol, target)
		})
	}
	return g.Wait()
}

// scrape GETs url and reads the whole body, as Prometheus does.
func scrape(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scraping %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("reading the scrape of %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scraping %s: %s", url, resp.Status)
	}
	return body, nil
}

// gauge finds an unlabelled sample in a Prometheus text exposition.
func gauge(body []byte, name string) (float64, bool) {
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == name {
			v, err := strconv.ParseFloat(f[1], 64)
			return v, err == nil
		}
	}
	return 0, false
}
