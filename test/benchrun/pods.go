package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
)

// PodsRow is section 3 for one way of starting N pods.
type PodsRow struct {
	Way        string // "cache" or "rclone copy"
	Concurrent bool
	Total      durations // wall time for all N
	Bytes      numbers   // object bytes the remote served
}

// PodsResult is section 3.
type PodsResult struct {
	Model model
	N     int
	Rows  []PodsRow
}

// pods starts N pods on one node, serially and all at once, with the cache
// (cold at the start of each run) and with N init containers. Each side
// reaches MinIO through its own counting proxy.
func (b *bench) pods(ctx context.Context, rep *Report) error {
	m := b.sized[0]
	for _, s := range b.sized {
		if s.Bytes < m.Bytes {
			m = s
		}
	}
	cacheProxy, err := testenv.StartProxy(b.minio.Endpoint)
	if err != nil {
		return err
	}
	defer cacheProxy.Stop()
	rcloneProxy, err := testenv.StartProxy(b.minio.Endpoint)
	if err != nil {
		return err
	}
	defer rcloneProxy.Stop()

	res := PodsResult{Model: m, N: b.o.Pods}
	rows := []PodsRow{{Way: "cache"}, {Way: "cache", Concurrent: true}, {Way: "rclone copy"}, {Way: "rclone copy", Concurrent: true}}
	for r := range b.o.Runs {
		for i := range rows {
			row := &rows[i]
			var took time.Duration
			var bytes int64
			var err error
			if row.Way == "cache" {
				took, bytes, err = b.podsCache(ctx, cacheProxy, m, row.Concurrent, r)
			} else {
				took, bytes, err = b.podsRclone(ctx, rcloneProxy, m, row.Concurrent, r)
			}
			if err != nil {
				return err
			}
			row.Total = append(row.Total, took)
			row.Bytes = append(row.Bytes, float64(bytes))
			b.logf("%d pods, %s, %s, run %d: %s, %d bytes from the remote", b.o.Pods, row.Way, mode(row.Concurrent), r+1, fmtDur(took), bytes)
		}
	}
	res.Rows = rows
	rep.Pods = res
	return nil
}

func mode(concurrent bool) string {
	if concurrent {
		return "concurrent"
	}
	return "serial"
}

// podsCache publishes m to N targets of a new driver with an empty cache.
func (b *bench) podsCache(ctx context.Context, p *testenv.Proxy, m model, concurrent bool, r int) (time.Duration, int64, error) {
	d, err := b.startDriver(fmt.Sprintf("pods-%s-%d", mode(concurrent), r), "")
	if err != nil {
		return 0, 0, err
	}
	defer d.stop()
	sec := secret(p.URL)
	vols := make([]string, b.o.Pods)
	for i := range vols {
		vols[i] = fmt.Sprintf("csi-pod-%d", i)
	}
	failed := make([]error, len(vols))
	p.Reset()
	b.drop()
	start := time.Now()
	if concurrent {
		var wg sync.WaitGroup
		for i, v := range vols {
			wg.Go(func() { _, failed[i] = d.publish(ctx, v, d.target(v), m, sec) })
		}
		wg.Wait()
	} else {
		for i, v := range vols {
			if _, failed[i] = d.publish(ctx, v, d.target(v), m, sec); failed[i] != nil {
				break
			}
		}
	}
	took := time.Since(start)
	bytes := p.ObjectBytes()
	if err := errs(failed); err != nil {
		return 0, 0, err
	}
	for _, v := range vols {
		if err := checkModel(d.target(v), m); err != nil {
			return 0, 0, err
		}
		if err := d.unpublish(ctx, v, d.target(v)); err != nil {
			return 0, 0, err
		}
	}
	return took, bytes, nil
}

// podsRclone runs N init containers' rclone copy into N empty directories.
func (b *bench) podsRclone(ctx context.Context, p *testenv.Proxy, m model, concurrent bool, r int) (time.Duration, int64, error) {
	root := filepath.Join(b.work, "emptydir", fmt.Sprintf("pods-%s-%d", mode(concurrent), r))
	defer os.RemoveAll(root)
	dsts := make([]string, b.o.Pods)
	for i := range dsts {
		dsts[i] = filepath.Join(root, fmt.Sprint(i))
		if err := os.MkdirAll(dsts[i], 0o755); err != nil {
			return 0, 0, err
		}
	}
	sec := secret(p.URL)
	failed := make([]error, len(dsts))
	p.Reset()
	b.drop()
	warmRclone(b.o.Rclone)
	start := time.Now()
	if concurrent {
		var wg sync.WaitGroup
		for i, dst := range dsts {
			wg.Go(func() { _, failed[i] = rcloneCopy(ctx, b.o.Rclone, b.conf, sec, m.URI(), dst) })
		}
		wg.Wait()
	} else {
		for i, dst := range dsts {
			if _, failed[i] = rcloneCopy(ctx, b.o.Rclone, b.conf, sec, m.URI(), dst); failed[i] != nil {
				break
			}
		}
	}
	took := time.Since(start)
	bytes := p.ObjectBytes()
	if err := errs(failed); err != nil {
		return 0, 0, err
	}
	for _, dst := range dsts {
		if err := checkModel(dst, m); err != nil {
			return 0, 0, err
		}
	}
	return took, bytes, nil
}
