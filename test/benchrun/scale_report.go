package main

import (
	"fmt"
	"strings"
	"time"
)

// Goal limits of section 8 (issue 21), read at the largest size.
const (
	goalScrapeP99    = 5 * time.Millisecond
	goalPublishGrowP = 1.20 // warm publish p99, largest size over smallest
	goalEvictOne     = 50 * time.Millisecond
	goalStartLive    = time.Second
)

// name is how the tables name a size.
func (s scaleSize) name() string {
	return fmt.Sprintf("%s files in %s trees", thousands(s.Trees*s.Files), thousands(s.Trees))
}

func (r *Report) scaleSection(w writer) {
	x := r.Scale
	o := x.Options
	w("\n## 8. Scale\n\n")
	w("What one request costs with a small cache and with a large one, in this same run. For each size a driver of its own, started with an empty cache, publishes each model once (%d at once; real downloads from MinIO, every file %s and distinct) and keeps a fifth of them mounted. Then, in this order and each in turns across the sizes (one of the small cache, one of the large, ...), so that whatever else the machine does weighs on both alike: `/metrics` scrapes (after an untimed one), warm publishes of the models in turn, each to a new target, and their unpublishes; restarts of each driver on its cache with those mounts live, from process start to the first Probe that answers ready; evictions of single trees no target uses through the admin API (`POST /v1/evict` of a digest, as `modelcachectl evict` sends it). ",
		o.Seeders, sizeName(int64(o.FileBytes)))
	w("Each figure is one series per size, not a median over runs: p50 and p99 of the series, or its slowest, with the count; the restarts are median (min–max) of %s. Scrapes and evictions stop early, at no fewer than %d and %d, once they have taken %s. The models go into MinIO as one tar each that MinIO extracts into plain objects with MD5 ETags (S3's Snowball auto-extract); that upload is not the plugin's work.\n\n",
		plural(r.Options.Runs, "restart"), minScrapes, minEvictions, fmtDur(o.Budget))
	w("| |")
	for _, row := range x.Rows {
		w(" %s |", row.Size.name())
	}
	w("\n|---|%s\n", strings.Repeat("---|", len(x.Rows)))
	line := func(what string, cell func(ScaleRow) string) {
		w("| %s |", what)
		for _, row := range x.Rows {
			w(" %s |", cell(row))
		}
		w("\n")
	}
	line("seeding: upload to MinIO", func(s ScaleRow) string { return fmtDur(s.Upload) })
	line(fmt.Sprintf("seeding: first publish of every model, %d at once", o.Seeders), func(s ScaleRow) string { return fmtDur(s.Seed) })
	line("`/metrics` scrape, p50 / p99", func(s ScaleRow) string { return p50p99(s.Scrape) })
	line("warm publish, p50 / p99", func(s ScaleRow) string { return p50p99(s.Publish) })
	line("its unpublish, p50 / p99", func(s ScaleRow) string { return p50p99(s.Unpublish) })
	line("start to ready (Probe) with live mounts", func(s ScaleRow) string {
		return fmt.Sprintf("%s with %s", fmtDurs(s.Start), plural(s.Mounts, "mount"))
	})
	line("eviction of one unused tree, p50 / slowest", func(s ScaleRow) string {
		return fmt.Sprintf("%s / %s (%d)", fmtDur(s.Evict.Percentile(50)), fmtDur(s.Evict.Max()), len(s.Evict))
	})
}

// p50p99 is "p50 / p99 (count)" of one series.
func p50p99(d durations) string {
	if len(d) == 0 {
		return "—"
	}
	return fmt.Sprintf("%s / %s (%d)", fmtDur(d.Percentile(50)), fmtDur(d.Percentile(99)), len(d))
}

// scaleGoals are section 8's goals: the largest size against its limits,
// and its warm publish against the smallest size's.
func (r *Report) scaleGoals() []Goal {
	rows := r.Scale.Rows
	if len(rows) == 0 {
		return []Goal{{"8", "scale figures", "—", metStr(false)}}
	}
	small, large := rows[0], rows[len(rows)-1]
	at := large.Size.name()
	scrape := large.Scrape.Percentile(99)
	grow := 0.0
	if p := small.Publish.Percentile(99); p > 0 {
		grow = float64(large.Publish.Percentile(99)) / float64(p)
	}
	evict, start := large.Evict.Max(), large.Start.Max()
	return []Goal{
		{"8", fmt.Sprintf("`/metrics` scrape p99 < %s at %s", fmtDur(goalScrapeP99), at),
			fmtDur(scrape), metStr(len(large.Scrape) > 0 && scrape < goalScrapeP99)},
		{"8", fmt.Sprintf("warm publish p99 within %.0f%% from %s to %s", 100*(goalPublishGrowP-1), small.Size.name(), at),
			fmt.Sprintf("%s → %s: %.2f×", fmtDur(small.Publish.Percentile(99)), fmtDur(large.Publish.Percentile(99)), grow),
			metStr(grow > 0 && grow <= goalPublishGrowP)},
		{"8", fmt.Sprintf("an eviction that frees one tree < %s at %s trees (slowest of %d)", fmtDur(goalEvictOne), thousands(large.Size.Trees), len(large.Evict)),
			fmtDur(evict), metStr(len(large.Evict) > 0 && evict < goalEvictOne)},
		{"8", fmt.Sprintf("start to serving with %s live < %s at %s trees (slowest of %d)", plural(large.Mounts, "mount"), fmtDur(goalStartLive), thousands(large.Size.Trees), len(large.Start)),
			fmtDur(start), metStr(len(large.Start) > 0 && start < goalStartLive)},
	}
}
