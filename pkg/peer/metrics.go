package peer

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the peer endpoint's collectors (pkg/metrics conventions: the
// modelcache namespace, labels from small fixed sets, never a token, an
// object key, a blob name or a peer's address). The caller registers them
// (Metrics is a prometheus.Collector). A nil *Metrics counts nothing.
type Metrics struct {
	servedBytes prometheus.Counter
	requests    *prometheus.CounterVec
	refusals    *prometheus.CounterVec
	active      prometheus.Gauge
	queued      prometheus.Gauge
}

// statusCodes are the statuses the requests metric names; any other is
// counted as "other".
var statusCodes = []int{200, 206, 304, 400, 401, 403, 404, 405, 412, 416, 500, 503}

// NewMetrics returns the peer endpoint's collectors, with the series of
// every known label value created at 0.
func NewMetrics() *Metrics {
	m := &Metrics{
		servedBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "modelcache", Subsystem: "peer", Name: "served_bytes_total",
			Help: "Bytes of blobs this node served to other nodes.",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "modelcache", Subsystem: "peer", Name: "requests_total",
			Help: "Requests to this node's peer endpoint, by HTTP status code (\"other\" for codes not listed).",
		}, []string{"code"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "modelcache", Subsystem: "peer", Name: "refusals_total",
			Help: "Peer requests refused, by reason: no_token and invalid_token (401), other_account (403), " +
				"review_failed (503, TokenReview failed), busy (503, as many streams as allowed already and none came free in time, or the queue full).",
		}, []string{"reason"}),
		active: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "modelcache", Subsystem: "peer", Name: "streams",
			Help: "Blob bodies this node is serving to other nodes right now.",
		}),
		queued: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "modelcache", Subsystem: "peer", Name: "queued",
			Help: "Blob bodies asked of this node that wait for one of its streams right now.",
		}),
	}
	for _, c := range statusCodes {
		m.requests.WithLabelValues(strconv.Itoa(c))
	}
	m.requests.WithLabelValues("other")
	for _, r := range refusalReasons {
		m.refusals.WithLabelValues(r)
	}
	return m
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	m.servedBytes.Describe(ch)
	m.requests.Describe(ch)
	m.refusals.Describe(ch)
	m.active.Describe(ch)
	m.queued.Describe(ch)
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	m.servedBytes.Collect(ch)
	m.requests.Collect(ch)
	m.refusals.Collect(ch)
	m.active.Collect(ch)
	m.queued.Collect(ch)
}

func (m *Metrics) served(n int) {
	if m != nil && n > 0 {
		m.servedBytes.Add(float64(n))
	}
}

func (m *Metrics) request(code int) {
	if m == nil {
		return
	}
	label := "other"
	for _, c := range statusCodes {
		if c == code {
			label = strconv.Itoa(code)
		}
	}
	m.requests.WithLabelValues(label).Inc()
}

func (m *Metrics) refused(reason string) {
	if m != nil {
		m.refusals.WithLabelValues(reason).Inc()
	}
}

func (m *Metrics) streams(delta float64) {
	if m != nil {
		m.active.Add(delta)
	}
}

func (m *Metrics) waiting(delta float64) {
	if m != nil {
		m.queued.Add(delta)
	}
}
