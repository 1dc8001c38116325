package peer

import (
	"context"
	"errors"
	"net/http"
	"time"

	"k8s.io/klog/v2"
)

// takeStream takes one of the node's MaxStreams, waiting for one at most
// QueueWait behind at most MaxQueued others (a channel's waiting senders
// go in the order they came); false when none came, or the requester went
// away meanwhile.
func (s *Server) takeStream(ctx context.Context) bool {
	select {
	case s.streams <- struct{}{}:
		s.metrics.streams(1)
		return true
	default:
	}
	if s.queueWait < 0 {
		return false
	}
	if s.queued.Add(1) > s.maxQueued {
		s.queued.Add(-1)
		return false
	}
	s.metrics.waiting(1)
	defer func() { s.queued.Add(-1); s.metrics.waiting(-1) }()
	t := time.NewTimer(s.queueWait)
	defer t.Stop()
	select {
	case s.streams <- struct{}{}:
		s.metrics.streams(1)
		return true
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
}

func (s *Server) releaseStream() {
	<-s.streams
	s.metrics.streams(-1)
}

var errNoDeadline = errors.New("peer stream: cannot set a write deadline")

// deadlineWriter writes a body with a deadline on every write, so that a
// reader that stops reading loses its stream after timeout instead of
// holding one of MaxStreams for as long as it likes, however long the
// whole body takes at the pace the reader does read. The last deadline
// also bounds net/http's flush after the handler, which then lifts it
// for the connection's next request.
type deadlineWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
	metrics *Metrics
	failed  bool
}

func newDeadlineWriter(w http.ResponseWriter, timeout time.Duration, m *Metrics) *deadlineWriter {
	return &deadlineWriter{ResponseWriter: w, rc: http.NewResponseController(w), timeout: timeout, metrics: m}
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	if d.failed {
		return 0, errNoDeadline
	}
	if err := d.rc.SetWriteDeadline(time.Now().Add(d.timeout)); err != nil {
		// Without a deadline a stalled reader could pin the stream.
		d.failed = true
		klog.ErrorS(err, "Cannot bound a peer stream's writes; ending it")
		return 0, errNoDeadline
	}
	n, err := d.ResponseWriter.Write(p)
	d.metrics.served(n)
	return n, err
}

// Unwrap lets http.ResponseController reach the connection.
func (d *deadlineWriter) Unwrap() http.ResponseWriter { return d.ResponseWriter }

// statusWriter remembers the status written, for the requests metric.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (s *statusWriter) WriteHeader(code int) {
	if s.code == 0 {
		s.code = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(p []byte) (int, error) {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	return s.ResponseWriter.Write(p)
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *statusWriter) status() int {
	if s.code == 0 {
		return http.StatusOK
	}
	return s.code
}
