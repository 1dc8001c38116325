package metrics

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"
)

// CacheStats is what the cache holds, read at scrape time.
type CacheStats struct {
	// BlobBytes is the size of the file contents under blobs/; TreeBytes the
	// summed size of the models under trees/, whose files are hardlinks into
	// blobs/ and take no extra space; IngestBytes the size of downloads in
	// progress under ingest/.
	BlobBytes, TreeBytes, IngestBytes int64
	// Trees is the number of models (trees) in the cache.
	Trees int
	// Blobs is the number of distinct file contents (blobs) in the cache.
	Blobs int
}

// SetCacheStats installs the function a scrape calls to read the cache. f is
// called on every scrape, possibly from several scrapes at once, so it must be
// safe for concurrent use and cheap. When f returns an error, the error is
// logged and that scrape leaves the cache gauges out; the rest of the scrape
// succeeds. A nil f removes the cache gauges again.
func (m *Metrics) SetCacheStats(f func() (CacheStats, error)) {
	if m == nil {
		return
	}
	if f == nil {
		m.cache.stats.Store(nil)
		return
	}
	m.cache.stats.Store(&f)
}

// cacheCollector exports CacheStats as gauges, read at scrape time from the
// function SetCacheStats installed; without one it exports nothing.
type cacheCollector struct {
	stats atomic.Pointer[func() (CacheStats, error)]

	bytes *prometheus.Desc
	trees *prometheus.Desc
	blobs *prometheus.Desc
}

func newCacheCollector() *cacheCollector {
	return &cacheCollector{
		bytes: prometheus.NewDesc(
			prometheus.BuildFQName(namespace, "cache", "bytes"),
			"Bytes the node's model cache holds on disk, by kind: blobs (file contents), "+
				"trees (summed size of the models; their files are hardlinks into blobs and use no extra disk), "+
				"ingest (downloads in progress).",
			[]string{"kind"}, nil),
		trees: prometheus.NewDesc(
			prometheus.BuildFQName(namespace, "cache", "trees"),
			"Models (trees) in the node's cache.",
			nil, nil),
		blobs: prometheus.NewDesc(
			prometheus.BuildFQName(namespace, "cache", "blobs"),
			"Distinct file contents (blobs) in the node's cache.",
			nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.bytes
	ch <- c.trees
	ch <- c.blobs
}

// Collect implements prometheus.Collector.
func (c *cacheCollector) Collect(ch chan<- prometheus.Metric) {
	f := c.stats.Load()
	if f == nil {
		return
	}
	s, err := (*f)()
	if err != nil {
		klog.ErrorS(err, "Cannot read cache stats for metrics; leaving cache gauges out of this scrape")
		return
	}
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(s.BlobBytes), "blobs")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(s.TreeBytes), "trees")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(s.IngestBytes), "ingest")
	ch <- prometheus.MustNewConstMetric(c.trees, prometheus.GaugeValue, float64(s.Trees))
	ch <- prometheus.MustNewConstMetric(c.blobs, prometheus.GaugeValue, float64(s.Blobs))
}
