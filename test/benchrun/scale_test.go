package main

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseScaleSizes(t *testing.T) {
	tests := []struct {
		in      string
		want    []scaleSize
		wantErr bool
	}{
		{in: "10x100,1000x100", want: []scaleSize{{10, 100}, {1000, 100}}},
		{in: " 2x10 , 4x10 ", want: []scaleSize{{2, 10}, {4, 10}}},
		{in: "1000x100", want: []scaleSize{{1000, 100}}},
		{in: "1000x100,10x100", wantErr: true}, // largest first
		{in: "1x100", wantErr: true},           // one tree leaves none to evict beside a mount
		{in: "10x0", wantErr: true},
		{in: "10*100", wantErr: true},
		{in: "", wantErr: true},
	}
	for _, tt := range tests {
		got, err := parseScaleSizes(tt.in)
		if (err != nil) != tt.wantErr || !slices.Equal(got, tt.want) {
			t.Errorf("parseScaleSizes(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestGauge(t *testing.T) {
	body := []byte("# HELP modelcache_cache_trees Models.\n# TYPE modelcache_cache_trees gauge\nmodelcache_cache_trees 1000\n" +
		"modelcache_cache_trees_total{kind=\"x\"} 3\nmodelcache_cache_bytes{kind=\"blobs\"} 25600\n")
	tests := []struct {
		name   string
		want   float64
		wantOK bool
	}{
		{"modelcache_cache_trees", 1000, true},
		{"modelcache_cache_bytes", 0, false}, // labelled: not an unlabelled sample
		{"modelcache_cache_blobs", 0, false},
	}
	for _, tt := range tests {
		got, ok := gauge(body, tt.name)
		if got != tt.want || ok != tt.wantOK {
			t.Errorf("gauge(%s) = %v, %v; want %v, %v", tt.name, got, ok, tt.want, tt.wantOK)
		}
	}
}

// series is n samples of d, with the last one slow.
func series(n int, d, slowest time.Duration) durations {
	out := make(durations, n)
	for i := range out {
		out[i] = d
	}
	out[n-1] = slowest
	return out
}

func TestScaleGoals(t *testing.T) {
	ms := time.Millisecond
	small := ScaleRow{Size: scaleSize{10, 100}, Mounts: 2, Scrape: series(200, 2*ms, 3*ms), Publish: series(200, 2*ms, 4*ms),
		Start: durations{60 * ms}, Evict: series(20, 5*ms, 6*ms)}
	good := ScaleRow{Size: scaleSize{1000, 100}, Mounts: 200, Scrape: series(200, 2*ms, 4*ms), Publish: series(200, 2*ms, 4*ms),
		Start: durations{300 * ms, 400 * ms}, Evict: series(20, 5*ms, 40*ms)}
	tests := []struct {
		name    string
		large   func(*ScaleRow)
		wantMet []bool // scrape, publish, eviction, start
	}{
		{"all met", func(*ScaleRow) {}, []bool{true, true, true, true}},
		// p99 of 100 samples is the 99th: one slow scrape in a hundred is
		// allowed, two are not.
		{"slow scrapes", func(r *ScaleRow) { r.Scrape = series(100, 2*ms, 9*ms); r.Scrape[98] = 9 * ms }, []bool{false, true, true, true}},
		{"one slow scrape in 100", func(r *ScaleRow) { r.Scrape = series(100, 2*ms, 200*ms) }, []bool{true, true, true, true}},
		{"publish grew 25%", func(r *ScaleRow) { r.Publish = series(100, 2*ms, 3*ms); r.Publish[98] = 2500 * time.Microsecond }, []bool{true, false, true, true}},
		{"publish grew 20%", func(r *ScaleRow) { r.Publish = series(100, 2*ms, 3*ms); r.Publish[98] = 2400 * time.Microsecond }, []bool{true, true, true, true}},
		{"publish got faster", func(r *ScaleRow) { r.Publish = series(200, ms, 2*ms) }, []bool{true, true, true, true}},
		{"one slow eviction", func(r *ScaleRow) { r.Evict = series(20, 5*ms, 50*ms) }, []bool{true, true, false, true}},
		{"one slow start", func(r *ScaleRow) { r.Start = durations{300 * ms, time.Second} }, []bool{true, true, true, false}},
		{"nothing measured", func(r *ScaleRow) { *r = ScaleRow{Size: r.Size} }, []bool{false, false, false, false}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			large := good
			tt.large(&large)
			r := &Report{Scale: ScaleResult{Rows: []ScaleRow{small, large}}}
			gs := r.scaleGoals()
			if len(gs) != len(tt.wantMet) {
				t.Fatalf("%d goals, want %d: %+v", len(gs), len(tt.wantMet), gs)
			}
			for i, g := range gs {
				if (g.Met == "met") != tt.wantMet[i] {
					t.Errorf("goal %q measured %q is %q; want met %v", g.Goal, g.Measured, g.Met, tt.wantMet[i])
				}
			}
		})
	}
}

// checkScale checks that section 8 produced every figure at every size.
// Not a timing: the counts say each step ran.
func checkScale(t *testing.T, x ScaleResult, o scaleOptions, runs int) {
	t.Helper()
	if len(x.Rows) != len(o.Sizes) {
		t.Fatalf("section 8 has %d sizes, want %d", len(x.Rows), len(o.Sizes))
	}
	for _, row := range x.Rows {
		wantEvict := min(o.Evictions, row.Size.Trees-row.Mounts)
		if row.Upload <= 0 || row.Seed <= 0 || len(row.Scrape) != o.Scrapes || len(row.Publish) != o.Publishes ||
			len(row.Unpublish) != o.Publishes || len(row.Start) != runs || len(row.Evict) != wantEvict || row.Evict.Min() <= 0 {
			t.Errorf("section 8 at %s lacks figures (want %d scrapes, %d publishes, %d restarts, %d evictions): %+v",
				row.Size.name(), o.Scrapes, o.Publishes, runs, wantEvict, row)
		}
	}
	var md strings.Builder
	(&Report{Options: options{Runs: runs}, Scale: x}).scaleSection(func(f string, a ...any) { fmt.Fprintf(&md, f, a...) })
	for _, s := range o.Sizes {
		if !strings.Contains(md.String(), "| "+s.name()+" |") {
			t.Errorf("section 8's table has no column for %s:\n%s", s.name(), md.String())
		}
	}
}
