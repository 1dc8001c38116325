package main

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
)

// WarmRow is section 2 for one model: each run is a series of publishes
// of a cached model to distinct targets.
type WarmRow struct {
	Model    model
	PerRun   int
	P50, P99 durations // one of each per run
	Max      durations // slowest publish of each run
}

// MemRow is section 5's warm half for one model: a new driver over a cache
// that holds the model, then concurrent publishes of it.
type MemRow struct {
	Model      model
	Concurrent int
	AtStart    numbers // VmHWM bytes once Probe answers
	Peak       numbers // VmHWM bytes after the concurrent publishes
}

// warm measures warm publishes with one driver, then the memory of
// concurrent warm publishes with a new driver per run over the same cache.
func (b *bench) warm(ctx context.Context, rep *Report) error {
	models := append(append([]model{}, b.sized...), b.many)
	// The cache outlives this driver: the memory runs start new drivers on it.
	cacheDir := filepath.Join(b.work, "warm-cache")
	d, err := b.startDriver("warm", cacheDir)
	if err != nil {
		return err
	}
	defer func() {
		if d != nil {
			d.stop()
		}
	}()
	sec := secret(b.minio.Endpoint)
	for _, m := range models {
		// The first publish downloads the model; it stays mounted, as the
		// first pod would.
		holder := d.target("holder-" + m.Prefix)
		took, err := d.publish(ctx, "csi-holder-"+m.Prefix, holder, m, sec)
		if err != nil {
			return err
		}
		b.logf("%s: first (cold) publish %s", m.Name, fmtDur(took))
		row := WarmRow{Model: m, PerRun: b.o.WarmPublishes}
		for r := range b.o.Runs {
			var samples durations
			for i := range b.o.WarmPublishes {
				vol := fmt.Sprintf("csi-warm-%s-%d-%d", m.Prefix, r, i)
				target := d.target(vol)
				took, err := d.publish(ctx, vol, target, m, sec)
				if err != nil {
					return err
				}
				samples = append(samples, took)
				if err := d.unpublish(ctx, vol, target); err != nil {
					return err
				}
			}
			row.P50 = append(row.P50, samples.Percentile(50))
			row.P99 = append(row.P99, samples.Percentile(99))
			row.Max = append(row.Max, samples.Max())
			b.logf("%s run %d: warm publish p50 %s p99 %s max %s over %d", m.Name, r+1,
				fmtDur(row.P50[r]), fmtDur(row.P99[r]), fmtDur(row.Max[r]), len(samples))
		}
		rep.Warm = append(rep.Warm, row)
		if err := d.unpublish(ctx, "csi-holder-"+m.Prefix, holder); err != nil {
			return err
		}
	}
	d.stop()
	d = nil

	for _, m := range models {
		row := MemRow{Model: m, Concurrent: b.o.MemPublishes}
		for r := range b.o.Runs {
			atStart, peak, err := b.concurrentWarm(ctx, cacheDir, m, r)
			if err != nil {
				return err
			}
			row.AtStart = append(row.AtStart, float64(atStart))
			row.Peak = append(row.Peak, float64(peak))
			b.logf("%s run %d: VmHWM %.1f MiB at start, %.1f MiB after %d concurrent warm publishes",
				m.Name, r+1, mib(atStart), mib(peak), b.o.MemPublishes)
		}
		rep.Memory = append(rep.Memory, row)
	}
	return nil
}

// concurrentWarm starts a driver over cacheDir, which holds m and the
// source record of these credentials, and publishes m to MemPublishes
// targets at once.
func (b *bench) concurrentWarm(ctx context.Context, cacheDir string, m model, r int) (atStart, peak int64, err error) {
	d, err := b.startDriver(fmt.Sprintf("mem-%s-%d", m.Prefix, r), cacheDir)
	if err != nil {
		return 0, 0, err
	}
	defer d.stop()
	if atStart, err = peakRSS(d.pid); err != nil {
		return 0, 0, err
	}
	sec := secret(b.minio.Endpoint)
	n := b.o.MemPublishes
	failed := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			vol := fmt.Sprintf("csi-mem-%d", i)
			_, failed[i] = d.publish(ctx, vol, d.target(vol), m, sec)
		})
	}
	close(start)
	wg.Wait()
	if err := errs(failed); err != nil {
		return 0, 0, err
	}
	if peak, err = peakRSS(d.pid); err != nil {
		return 0, 0, err
	}
	for i := range n {
		vol := fmt.Sprintf("csi-mem-%d", i)
		if err := d.unpublish(ctx, vol, d.target(vol)); err != nil {
			return 0, 0, err
		}
	}
	return atStart, peak, nil
}
