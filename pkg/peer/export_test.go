package peer

import "github.com/prometheus/client_golang/prometheus"

// Accessors of the collectors for the tests of package peer_test.

func (m *Metrics) RequestsFor(code string) prometheus.Collector {
	return m.requests.WithLabelValues(code)
}

func (m *Metrics) RefusalsFor(reason string) prometheus.Collector {
	return m.refusals.WithLabelValues(reason)
}

func (m *Metrics) ServedBytes() prometheus.Collector { return m.servedBytes }

func (m *Metrics) Streams() prometheus.Collector { return m.active }

func (m *Metrics) Queued() prometheus.Collector { return m.queued }
