package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// ColdRow is section 1 for one model size, with the node plugin's peak RSS
// during each cold download (section 5).
type ColdRow struct {
	Model     model
	Rclone    durations // (a) rclone copy into an empty directory
	Cache     durations // (b) NodePublishVolume against an empty cache
	Ratios    numbers   // b/a of each run
	RcloneRSS numbers   // bytes, the rclone process's peak
	CacheRSS  numbers   // bytes, the node plugin's VmHWM after the publish
}

// cold times, per size and run, rclone copy against a cold publish by a
// new driver with a new cache, both straight from MinIO.
func (b *bench) cold(ctx context.Context, rep *Report) error {
	for _, m := range b.sized {
		row, err := b.coldRow(ctx, b.minio.Endpoint, m, b.o.Runs)
		if err != nil {
			return err
		}
		rep.Cold = append(rep.Cold, row)
	}
	return nil
}

// coldRow times runs pairs of rclone copy and cold publish of m from
// endpoint. The order alternates between runs, so neither side always goes
// first.
func (b *bench) coldRow(ctx context.Context, endpoint string, m model, runs int) (ColdRow, error) {
	row := ColdRow{Model: m}
	for r := range runs {
		var a rcloneRun
		var cache coldPublish
		var err error
		if r%2 == 0 {
			if a, err = b.coldRclone(ctx, endpoint, m, r); err == nil {
				cache, err = b.coldCache(ctx, endpoint, m, r)
			}
		} else {
			if cache, err = b.coldCache(ctx, endpoint, m, r); err == nil {
				a, err = b.coldRclone(ctx, endpoint, m, r)
			}
		}
		if err != nil {
			return row, err
		}
		row.Rclone = append(row.Rclone, a.took)
		row.Cache = append(row.Cache, cache.took)
		row.Ratios = append(row.Ratios, float64(cache.took)/float64(a.took))
		row.RcloneRSS = append(row.RcloneRSS, float64(a.peakRSS))
		row.CacheRSS = append(row.CacheRSS, float64(cache.peakRSS))
		b.logf("%s run %d: rclone copy %s, cold publish %s (b/a %.3f), driver VmHWM %.0f MiB",
			m.Name, r+1, fmtDur(a.took), fmtDur(cache.took), row.Ratios[r], mib(cache.peakRSS))
	}
	return row, nil
}

// coldRclone is one init container: rclone copy into an empty directory.
func (b *bench) coldRclone(ctx context.Context, endpoint string, m model, r int) (rcloneRun, error) {
	dst := filepath.Join(b.work, "emptydir", fmt.Sprintf("cold-%s-%d", m.Prefix, r))
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return rcloneRun{}, err
	}
	defer os.RemoveAll(dst)
	b.drop()
	warmRclone(b.o.Rclone)
	res, err := rcloneCopy(ctx, b.o.Rclone, b.conf, secret(endpoint), m.URI(), dst)
	if err != nil {
		return res, err
	}
	return res, checkModel(dst, m)
}

type coldPublish struct {
	took    time.Duration
	peakRSS int64
}

// coldCache is one publish by a new driver with an empty cache.
func (b *bench) coldCache(ctx context.Context, endpoint string, m model, r int) (coldPublish, error) {
	return b.coldWith(ctx, m, secret(endpoint), nil, r)
}

// coldWith is coldCache with the node-publish secret sec and more flags
// for the driver.
func (b *bench) coldWith(ctx context.Context, m model, sec map[string]string, args []string, r int) (coldPublish, error) {
	d, err := b.startDriver(fmt.Sprintf("cold-%s-%d", m.Prefix, r), "", args...)
	if err != nil {
		return coldPublish{}, err
	}
	defer d.stop()
	target := d.target("pod-0")
	b.drop()
	took, err := d.publish(ctx, "csi-cold", target, m, sec)
	if err != nil {
		return coldPublish{}, err
	}
	rss, err := peakRSS(d.pid)
	if err != nil {
		return coldPublish{}, err
	}
	if err := checkModel(target, m); err != nil {
		return coldPublish{}, err
	}
	return coldPublish{took: took, peakRSS: rss}, d.unpublish(ctx, "csi-cold", target)
}
