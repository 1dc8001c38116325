package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/cache"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Unit tests: no root, every server listens on 127.0.0.1 and is stopped by
// the test that started it.

// httpClient makes one connection per request, so a request after the
// server stopped cannot ride on a kept-alive connection.
var httpClient = &http.Client{
	Timeout:   10 * time.Second,
	Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
}

// startServer serves h through serve on a free loopback port and returns its
// base URL; the server is stopped, and must have returned nil, at cleanup.
func startServer(t *testing.T, h http.Handler) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- serve(ctx, l, h) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("serve returned %v after cancel, want nil", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("serve did not return after cancel")
		}
	})
	return "http://" + l.Addr().String()
}

// get fetches url and returns the status code and body.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := httpClient.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading %s: %v", url, err)
	}
	return resp.StatusCode, string(body)
}

// scrape fetches baseURL/metrics over HTTP and parses the text format.
func scrape(t *testing.T, baseURL string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := get(t, baseURL+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: status %d, body %q", code, body)
	}
	return parse(t, body)
}

func parse(t *testing.T, text string) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("parsing metrics: %v\n%s", err, text)
	}
	return fams
}

// gather reads m's registry directly, without HTTP.
func gather(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	list, err := m.registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	fams := make(map[string]*dto.MetricFamily, len(list))
	for _, f := range list {
		fams[f.GetName()] = f
	}
	return fams
}

// labels is a metric's labels as "k=v,k=v" in name order ("" for none).
func labels(m *dto.Metric) string {
	var parts []string
	for _, l := range m.GetLabel() {
		parts = append(parts, l.GetName()+"="+l.GetValue())
	}
	return strings.Join(parts, ",")
}

// value returns the value of series name{lbls} (counter, gauge, untyped, or a
// histogram's sample count) and whether it exists.
func value(fams map[string]*dto.MetricFamily, name, lbls string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
	for _, m := range f.GetMetric() {
		if labels(m) != lbls {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		case m.Untyped != nil:
			return m.GetUntyped().GetValue(), true
		}
	}
	return 0, false
}

type series struct {
	name, labels string
	want         float64
}

func checkSeries(t *testing.T, fams map[string]*dto.MetricFamily, want []series) {
	t.Helper()
	for _, s := range want {
		got, ok := value(fams, s.name, s.labels)
		if !ok {
			t.Errorf("%s{%s} missing", s.name, s.labels)
			continue
		}
		if got != s.want {
			t.Errorf("%s{%s} = %v, want %v", s.name, s.labels, got, s.want)
		}
	}
}

var cacheMetricNames = []string{"modelcache_cache_bytes", "modelcache_cache_trees", "modelcache_cache_blobs"}

func TestNilMetricsIsNoOp(t *testing.T) {
	var m *Metrics
	tests := []struct {
		name string
		call func()
	}{
		{"Publish", func() { m.Publish("OK") }},
		{"Lookup", func() { m.Lookup(true); m.Lookup(false) }},
		{"DownloadStarted", func() {
			done := m.DownloadStarted()
			if done == nil {
				t.Fatal("DownloadStarted on nil returned a nil done")
			}
			done(100, nil)
			done(100, errors.New("twice"))
		}},
		{"Evicted", func() { m.Evicted("budget", 10) }},
		{"DownloadBytes", func() { m.DownloadBytes(cache.FromPeer, 10) }},
		{"SetCacheStats", func() {
			m.SetCacheStats(func() (CacheStats, error) { return CacheStats{}, nil })
			m.SetCacheStats(nil)
		}},
		{"Handler", func() {
			rec := httptest.NewRecorder()
			m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
			if rec.Code != http.StatusNotFound {
				t.Errorf("nil Handler status = %d, want 404", rec.Code)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			defer func() {
				if r := recover(); r != nil {
					t.Fatalf("panicked: %v", r)
				}
			}()
			tt.call()
		})
	}
}

func TestScrapeAfterKnownSequence(t *testing.T) {
	m := New()
	for range 3 {
		m.Publish("OK")
	}
	m.Publish("Aborted")
	m.Publish("not a grpc code") // counted as Unknown, never as its own label
	m.Lookup(true)
	m.Lookup(true)
	m.Lookup(false)
	okDone := m.DownloadStarted()
	failDone := m.DownloadStarted()
	okDone(100, nil)
	failDone(50, errors.New("remote went away"))
	m.Evicted("budget", 10)
	m.Evicted("budget", 10)
	m.Evicted("s3://bucket/secret-model", 7) // unknown reason: counted as other
	m.DownloadBytes(cache.FromOrigin, 30)
	m.DownloadBytes(cache.FromPeer, 100)
	m.DownloadBytes(cache.FromOrigin, 20)
	m.DownloadBytes("node-7", 5) // not a source: never a label

	fams := scrape(t, startServer(t, m.Handler()))

	checkSeries(t, fams, []series{
		{"modelcache_publishes_total", "code=OK", 3},
		{"modelcache_publishes_total", "code=Aborted", 1},
		{"modelcache_publishes_total", "code=Unknown", 1},
		{"modelcache_cache_lookups_total", "result=hit", 2},
		{"modelcache_cache_lookups_total", "result=miss", 1},
		{"modelcache_downloads_in_flight", "", 0},
		{"modelcache_download_duration_seconds", "result=ok", 1},
		{"modelcache_download_duration_seconds", "result=error", 1},
		{"modelcache_downloaded_bytes_total", "", 150},
		{"modelcache_download_bytes_total", "source=origin", 50},
		{"modelcache_download_bytes_total", "source=peer", 100},
		{"modelcache_evictions_total", "reason=budget", 2},
		{"modelcache_evicted_bytes_total", "reason=budget", 20},
		{"modelcache_evictions_total", "reason=other", 1},
		{"modelcache_evicted_bytes_total", "reason=other", 7},
		// Known label values are exported as 0 before their first event.
		{"modelcache_evictions_total", "reason=drain", 0},
		{"modelcache_evicted_bytes_total", "reason=corrupt", 0},
	})

	// Label values stay within their fixed sets.
	allowed := map[string]map[string]bool{
		"modelcache_publishes_total":           {"code=OK": true, "code=Aborted": true, "code=Unknown": true},
		"modelcache_cache_lookups_total":       {"result=hit": true, "result=miss": true},
		"modelcache_download_duration_seconds": {"result=ok": true, "result=error": true},
		"modelcache_download_bytes_total":      {"source=origin": true, "source=peer": true},
	}
	for _, name := range []string{"modelcache_evictions_total", "modelcache_evicted_bytes_total"} {
		allowed[name] = map[string]bool{"reason=other": true}
		for _, r := range evictionReasons {
			allowed[name]["reason="+string(r)] = true
		}
	}
	for name, ok := range allowed {
		for _, s := range fams[name].GetMetric() {
			if !ok[labels(s)] {
				t.Errorf("%s has unexpected series {%s}", name, labels(s))
			}
		}
	}

	// The histogram's buckets cover model downloads up to about an hour.
	for _, s := range fams["modelcache_download_duration_seconds"].GetMetric() {
		b := s.GetHistogram().GetBucket()
		if first, last := b[0].GetUpperBound(), b[len(b)-1].GetUpperBound(); first != 0.1 || last < 3600 {
			t.Errorf("duration buckets span %v..%v s, want 0.1..>=3600", first, last)
		}
	}

	// The standard collectors are on the private registry too.
	for _, name := range []string{"go_goroutines", "process_start_time_seconds"} {
		if _, ok := fams[name]; !ok {
			t.Errorf("%s missing: standard Go/process collector not registered", name)
		}
	}
	// Every family has a HELP text.
	for name, f := range fams {
		if f.GetHelp() == "" {
			t.Errorf("%s has no HELP text", name)
		}
	}
}

func TestDownloadInFlightAndDoneOnce(t *testing.T) {
	m := New()
	var first, second func(int64, error)
	steps := []struct {
		name         string
		step         func()
		wantInFlight float64
		wantBytes    float64 // modelcache_downloaded_bytes_total
		wantFinished float64 // observations of the duration histogram
	}{
		{"first starts", func() { first = m.DownloadStarted() }, 1, 0, 0},
		{"second starts", func() { second = m.DownloadStarted() }, 2, 0, 0},
		{"first ends", func() { first(40, nil) }, 1, 40, 1},
		{"first ends again", func() { first(40, errors.New("late")) }, 1, 40, 1},
		{"second fails", func() { second(2, errors.New("boom")) }, 0, 42, 2},
		{"second fails again", func() { second(2, errors.New("boom")) }, 0, 42, 2},
	}
	for _, s := range steps {
		s.step()
		fams := gather(t, m)
		if got, _ := value(fams, "modelcache_downloads_in_flight", ""); got != s.wantInFlight {
			t.Errorf("%s: in flight = %v, want %v", s.name, got, s.wantInFlight)
		}
		if got, _ := value(fams, "modelcache_downloaded_bytes_total", ""); got != s.wantBytes {
			t.Errorf("%s: downloaded bytes = %v, want %v", s.name, got, s.wantBytes)
		}
		ok, _ := value(fams, "modelcache_download_duration_seconds", "result=ok")
		failed, _ := value(fams, "modelcache_download_duration_seconds", "result=error")
		if got := ok + failed; got != s.wantFinished {
			t.Errorf("%s: finished downloads = %v, want %v", s.name, got, s.wantFinished)
		}
	}
}

func TestCacheStatsAtScrape(t *testing.T) {
	stats := CacheStats{BlobBytes: 1000, TreeBytes: 1200, IngestBytes: 30, Trees: 2, Blobs: 5}
	tests := []struct {
		name      string
		set       func(m *Metrics)
		wantStats bool
	}{
		{"not set", func(*Metrics) {}, false},
		{"set", func(m *Metrics) {
			m.SetCacheStats(func() (CacheStats, error) { return stats, nil })
		}, true},
		{"error", func(m *Metrics) {
			m.SetCacheStats(func() (CacheStats, error) { return stats, errors.New("state database closed") })
		}, false},
		{"set then removed", func(m *Metrics) {
			m.SetCacheStats(func() (CacheStats, error) { return stats, nil })
			m.SetCacheStats(nil)
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := New()
			m.Publish("OK")
			tt.set(m)
			fams := scrape(t, startServer(t, m.Handler())) // fails unless 200

			if !tt.wantStats {
				for _, name := range cacheMetricNames {
					if _, ok := fams[name]; ok {
						t.Errorf("%s present, want it left out", name)
					}
				}
			} else {
				checkSeries(t, fams, []series{
					{"modelcache_cache_bytes", "kind=blobs", 1000},
					{"modelcache_cache_bytes", "kind=trees", 1200},
					{"modelcache_cache_bytes", "kind=ingest", 30},
					{"modelcache_cache_trees", "", 2},
					{"modelcache_cache_blobs", "", 5},
				})
				for _, name := range cacheMetricNames {
					if got := fams[name].GetType(); got != dto.MetricType_GAUGE {
						t.Errorf("%s type = %v, want gauge", name, got)
					}
				}
			}
			// The rest of the scrape is there either way.
			checkSeries(t, fams, []series{{"modelcache_publishes_total", "code=OK", 1}})
		})
	}
}

func TestCacheStatsReadAtEveryScrape(t *testing.T) {
	m := New()
	var mu sync.Mutex
	trees := 1
	m.SetCacheStats(func() (CacheStats, error) {
		mu.Lock()
		defer mu.Unlock()
		return CacheStats{Trees: trees}, nil
	})
	url := startServer(t, m.Handler())
	checkSeries(t, scrape(t, url), []series{{"modelcache_cache_trees", "", 1}})
	mu.Lock()
	trees = 3
	mu.Unlock()
	checkSeries(t, scrape(t, url), []series{{"modelcache_cache_trees", "", 3}})
}

func TestServeRejectsBadAddress(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	tests := []struct {
		name, addr string
	}{
		{"in use", busy.Addr().String()},
		{"empty", ""},
		{"no port", "127.0.0.1"},
		{"port out of range", "127.0.0.1:70000"},
		{"not a port", "127.0.0.1:metrics"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			errc := make(chan error, 1)
			go func() { errc <- Serve(ctx, tt.addr, New().Handler()) }()
			select {
			case err := <-errc:
				if err == nil {
					t.Fatalf("Serve(%q) = nil, want an error", tt.addr)
				}
			case <-time.After(5 * time.Second):
				cancel()
				<-errc
				t.Fatalf("Serve(%q) is serving, want an immediate error", tt.addr)
			}
		})
	}
}

// freeLoopbackAddr returns a 127.0.0.1 address that was free a moment ago.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

func TestServeUntilContextEnds(t *testing.T) {
	m := New()
	m.Lookup(true)
	addr := freeLoopbackAddr(t)
	base := "http://" + addr
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, addr, m.Handler()) }()

	// Wait until it answers.
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case err := <-errc:
			t.Fatalf("Serve returned early: %v", err)
		default:
		}
		resp, err := httpClient.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server never came up: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	tests := []struct {
		method, path string
		wantCode     int
		wantBody     string // substring
	}{
		{http.MethodGet, "/healthz", http.StatusOK, "ok"},
		{http.MethodGet, "/metrics", http.StatusOK, `modelcache_cache_lookups_total{result="hit"} 1`},
		{http.MethodGet, "/", http.StatusNotFound, ""},
		{http.MethodPost, "/metrics", http.StatusMethodNotAllowed, ""},
	}
	for _, tt := range tests {
		req, err := http.NewRequest(tt.method, base+tt.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := httpClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", tt.method, tt.path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.wantCode || !strings.Contains(string(body), tt.wantBody) {
			t.Errorf("%s %s = %d %q, want %d containing %q", tt.method, tt.path, resp.StatusCode, body, tt.wantCode, tt.wantBody)
		}
	}

	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("Serve after cancel = %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if resp, err := httpClient.Get(base + "/healthz"); err == nil {
		resp.Body.Close()
		t.Fatal("server still answers after Serve returned")
	}
}

func TestConcurrentUse(t *testing.T) {
	const workers, rounds = 32, 200
	m := New()
	url := startServer(t, m.Handler())
	stop := make(chan struct{})

	var scrapers sync.WaitGroup
	for range 2 {
		scrapers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				rec := httptest.NewRecorder()
				m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
				if rec.Code != http.StatusOK && rec.Code != http.StatusServiceUnavailable {
					t.Errorf("scrape status %d", rec.Code)
					return
				}
			}
		})
	}

	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range rounds {
				m.Publish("OK")
				m.Lookup(i%2 == 0)
				done := m.DownloadStarted()
				m.Evicted(cache.EvictDrain, 1)
				m.SetCacheStats(func() (CacheStats, error) {
					return CacheStats{Trees: w}, nil
				})
				done(3, nil)
				done(3, nil)
				m.DownloadBytes(cache.FromOrigin, 2)
				m.DownloadBytes(cache.FromPeer, 1)
			}
		})
	}
	wg.Wait()
	close(stop)
	scrapers.Wait()

	const n = workers * rounds
	fams := scrape(t, url)
	checkSeries(t, fams, []series{
		{"modelcache_publishes_total", "code=OK", n},
		{"modelcache_cache_lookups_total", "result=hit", n / 2},
		{"modelcache_cache_lookups_total", "result=miss", n / 2},
		{"modelcache_downloads_in_flight", "", 0},
		{"modelcache_download_duration_seconds", "result=ok", n},
		{"modelcache_downloaded_bytes_total", "", 3 * n},
		{"modelcache_download_bytes_total", "source=origin", 2 * n},
		{"modelcache_download_bytes_total", "source=peer", n},
		{"modelcache_evictions_total", "reason=drain", n},
		{"modelcache_evicted_bytes_total", "reason=drain", n},
	})
	if _, ok := fams["modelcache_cache_trees"]; !ok {
		t.Error("modelcache_cache_trees missing after concurrent SetCacheStats")
	}
}

func ExampleMetrics() {
	m := New()
	m.Publish("OK")
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	for line := range strings.Lines(rec.Body.String()) {
		if strings.HasPrefix(line, "modelcache_publishes_total") {
			fmt.Print(line)
		}
	}
	// Output: modelcache_publishes_total{code="OK"} 1
}

// Both sources are exported as 0 before the first byte, so that rate()
// sees the first increase of either.
func TestDownloadBytesSeriesStartAtZero(t *testing.T) {
	fams := gather(t, New())
	checkSeries(t, fams, []series{
		{"modelcache_download_bytes_total", "source=origin", 0},
		{"modelcache_download_bytes_total", "source=peer", 0},
	})
}
