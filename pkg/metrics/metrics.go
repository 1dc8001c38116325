// Package metrics holds the driver's Prometheus collectors and serves them over
// HTTP for --metrics-address.
//
// A nil *Metrics is valid: every method is then a no-op, so callers record
// events without checking whether metrics are enabled. Label values are
// always drawn from small fixed sets (gRPC code names, hit/miss, ok/error,
// eviction reasons); model URIs, pod names, volume IDs and anything derived
// from secrets never become labels.
package metrics

import (
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc/codes"
)

const namespace = "modelcache"

// downloadBuckets are the upper bounds, in seconds, of the download duration
// histogram. A model download ranges from a sub-second HEAD-sized config
// repository to a multi-hour pull of a large LLM, so the buckets grow by 2.5x
// from 0.1s: 0.1, 0.25, 0.63, 1.6, 3.9, 9.8, 24, 61, 153, 381, 954, 2384 and
// 5960s (~1h40m). Thirteen buckets keep the series count small while still
// separating "seconds", "a minute or two" (kubelet's publish timeout) and
// "tens of minutes"; anything longer lands in +Inf.
var downloadBuckets = prometheus.ExponentialBuckets(0.1, 2.5, 13)

// evictionReasons are the reasons Evicted accepts as label values; any other
// reason is counted as "other".
var evictionReasons = cache.EvictReasons

// otherReason is the label value for an eviction reason not in evictionReasons.
const otherReason = "other"

// grpcCodeNames is the set of gRPC code names Publish accepts as label values.
var grpcCodeNames = func() map[string]bool {
	names := make(map[string]bool)
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		names[c.String()] = true
	}
	return names
}()

// Metrics is the driver's set of Prometheus collectors, registered on a
// private registry. It is safe for concurrent use; a nil *Metrics does nothing.
type Metrics struct {
	registry *prometheus.Registry

	publishes         *prometheus.CounterVec
	lookups           *prometheus.CounterVec
	downloadsInFlight prometheus.Gauge
	downloadDuration  *prometheus.HistogramVec
	downloadedBytes   prometheus.Counter
	downloadBytes     map[string]prometheus.Counter // by cache.ByteSources, resolved once: counted on every read
	uncheckedObjects  prometheus.Counter
	evictions         *prometheus.CounterVec
	evictedBytes      *prometheus.CounterVec
	cache             *cacheCollector
	handler           http.Handler
}

// New returns Metrics with every collector, plus the standard Go runtime and
// process collectors, registered on a fresh private registry.
func New() *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		publishes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "publishes_total",
			Help: "NodePublishVolume calls that finished, by gRPC status code name. " +
				"Aborted means a download was still running and kubelet will retry.",
		}, []string{"code"}),
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "cache_lookups_total",
			Help: "Cache lookups made by publishes: result=\"hit\" was served from the node's cache, " +
				"result=\"miss\" needed a download (its own, or another publish's it waited for).",
		}, []string{"result"}),
		downloadsInFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace,
			Name:      "downloads_in_flight",
			Help:      "Model downloads running on this node right now.",
		}),
		downloadDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace,
			Name:      "download_duration_seconds",
			Help:      "How long model downloads took from start to end, by result (ok or error).",
			Buckets:   downloadBuckets,
		}, []string{"result"}),
		downloadedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "downloaded_bytes_total",
			Help:      "Bytes transferred from remotes by model downloads, including downloads that failed.",
		}),
		uncheckedObjects: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "unchecked_objects_total",
			Help:      "Downloaded objects the remote listed without any checksum, so that their bytes could not be checked against it.",
		}),
		evictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "evictions_total",
			Help: "Models (trees) removed from the node's cache, by reason: budget (cache over its size budget), " +
				"operator (evicted by hand), drain (node cache drained), corrupt (failed verification).",
		}, []string{"reason"}),
		evictedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace,
			Name:      "evicted_bytes_total",
			Help:      "Bytes of models (trees) removed from the node's cache, by reason (see modelcache_evictions_total).",
		}, []string{"reason"}),
		cache: newCacheCollector(),
	}

	// Create the series of known label values up front, so that they are
	// exported as 0 before the first event and rate() sees their first increase.
	for _, r := range []string{"hit", "miss"} {
		m.lookups.WithLabelValues(r)
	}
	for _, r := range []string{"ok", "error"} {
		m.downloadDuration.WithLabelValues(r)
	}
	// Origin or peer, and no label naming the peer node: a cluster's nodes
	// are unbounded, and a series per peer on every node would grow with
	// the square of the cluster. Which nodes sent a tree's bytes is in the
	// state database (modelcachectl inspect) and in the pod event; what a
	// node sent its peers is its own modelcache_peer_served_bytes_total.
	downloadBytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace,
		Name:      "download_bytes_total",
		Help: "Bytes model downloads read, as they arrive, by where they came from: source=\"origin\" the model's remote, " +
			"source=\"peer\" another node's peer endpoint (--peers). Failed downloads and bytes read again after a cut count too.",
	}, []string{"source"})
	m.downloadBytes = map[string]prometheus.Counter{}
	for _, s := range cache.ByteSources {
		m.downloadBytes[s] = downloadBytes.WithLabelValues(s)
	}
	for _, r := range evictionReasons {
		m.evictions.WithLabelValues(string(r))
		m.evictedBytes.WithLabelValues(string(r))
	}

	m.registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.publishes,
		m.lookups,
		m.downloadsInFlight,
		m.downloadDuration,
		m.downloadedBytes,
		downloadBytes,
		m.uncheckedObjects,
		m.evictions,
		m.evictedBytes,
		m.cache,
	)
	m.handler = newHandler(m.registry)
	return m
}

// Publish counts a finished NodePublishVolume by its gRPC code name ("OK",
// "Aborted", "ResourceExhausted", ...), as codes.Code.String returns it. A
// name that is not a gRPC code is counted as "Unknown".
func (m *Metrics) Publish(code string) {
	if m == nil {
		return
	}
	if !grpcCodeNames[code] {
		code = codes.Unknown.String()
	}
	m.publishes.WithLabelValues(code).Inc()
}

// Lookup counts a cache lookup of a publish: hit=true served from the cache.
func (m *Metrics) Lookup(hit bool) {
	if m == nil {
		return
	}
	result := "miss"
	if hit {
		result = "hit"
	}
	m.lookups.WithLabelValues(result).Inc()
}

// DownloadStarted marks a download as running and returns the function to
// call when it ends, with the bytes transferred (also on error: they crossed
// the network) and the download's error. Only the first call of done counts;
// later calls do nothing. On a nil *Metrics done is a no-op, never nil.
func (m *Metrics) DownloadStarted() (done func(bytes int64, err error)) {
	if m == nil {
		return func(int64, error) {}
	}
	start := time.Now()
	m.downloadsInFlight.Inc()
	var once sync.Once
	return func(bytes int64, err error) {
		once.Do(func() {
			m.downloadsInFlight.Dec()
			result := "ok"
			if err != nil {
				result = "error"
			}
			m.downloadDuration.WithLabelValues(result).Observe(time.Since(start).Seconds())
			if bytes > 0 {
				m.downloadedBytes.Add(float64(bytes))
			}
		})
	}
}

// DownloadBytes counts n bytes a download read from source (cache.FromOrigin
// or cache.FromPeer; any other is not counted). It runs on every read of a
// download: one map lookup and one atomic add.
func (m *Metrics) DownloadBytes(source string, n int64) {
	if m == nil {
		return
	}
	if c, ok := m.downloadBytes[source]; ok {
		c.Add(float64(n))
	}
}

// UncheckedObjects counts downloaded objects that had no checksum to be
// checked against.
func (m *Metrics) UncheckedObjects(n int) {
	if m == nil {
		return
	}
	m.uncheckedObjects.Add(float64(n))
}

// Evicted counts a tree removed from the cache, its size in bytes and why
// (cache.EvictReasons); any other reason is counted as "other".
func (m *Metrics) Evicted(reason cache.EvictReason, bytes int64) {
	if m == nil {
		return
	}
	label := string(reason)
	if !slices.Contains(evictionReasons, reason) {
		label = otherReason
	}
	m.evictions.WithLabelValues(label).Inc()
	if bytes > 0 {
		m.evictedBytes.WithLabelValues(label).Add(float64(bytes))
	}
}

// Register adds collectors another package keeps (the peer endpoint's) to
// the node plugin's registry. A nil *Metrics (no --metrics-address)
// registers nothing.
func (m *Metrics) Register(c prometheus.Collector) error {
	if m == nil {
		return nil
	}
	return m.registry.Register(c)
}
