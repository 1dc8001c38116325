package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"
)

const (
	// scrapeTimeout bounds one scrape, including reading the cache stats.
	scrapeTimeout = 30 * time.Second
	// maxScrapesInFlight bounds concurrent scrapes; more get 503.
	maxScrapesInFlight = 4
	// shutdownTimeout is how long Serve lets running scrapes finish once its
	// context ends before it closes their connections.
	shutdownTimeout = 5 * time.Second
)

// Handler serves the registry in the Prometheus text format. A collector that
// fails is logged and left out; the rest of the scrape is still served. On a
// nil *Metrics (metrics disabled) it answers 404 Not Found.
func (m *Metrics) Handler() http.Handler {
	if m == nil {
		return http.NotFoundHandler()
	}
	return m.handler
}

// newHandler returns the scrape handler of reg; promhttp's own error counter
// (promhttp_metric_handler_errors_total) is registered on reg too.
func newHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            klogLogger{},
		ErrorHandling:       promhttp.ContinueOnError,
		Registry:            reg,
		MaxRequestsInFlight: maxScrapesInFlight,
		Timeout:             scrapeTimeout,
	})
}

// klogLogger passes promhttp's errors to klog.
type klogLogger struct{}

func (klogLogger) Println(v ...any) {
	klog.ErrorS(nil, "Serving metrics", "detail", fmt.Sprint(v...))
}

// Serve listens on addr (host:port) and serves h at /metrics and a 200 "ok"
// at /healthz until ctx ends, then shuts down gracefully and returns nil. It
// returns the listener error immediately if addr cannot be bound, and the
// server's error if it stops for any other reason.
func Serve(ctx context.Context, addr string, h http.Handler) error {
	if addr == "" {
		return errors.New("metrics address is empty: give host:port, for example 127.0.0.1:9808")
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening for metrics on %q: %w", addr, err)
	}
	return serve(ctx, l, h)
}

// serve serves h at /metrics and /healthz on l until ctx ends. It closes l.
func serve(ctx context.Context, l net.Listener, h http.Handler) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", h)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok"))
	})
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      scrapeTimeout + 10*time.Second,
		IdleTimeout:       2 * time.Minute,
	}

	klog.InfoS("Serving metrics", "address", l.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()

	select {
	case err := <-errc:
		return fmt.Errorf("serving metrics on %s: %w", l.Addr(), err)
	case <-ctx.Done():
	}

	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		klog.ErrorS(err, "Metrics server did not shut down in time; closing its connections")
		_ = srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serving metrics on %s: %w", l.Addr(), err)
	}
	klog.InfoS("Stopped serving metrics", "address", l.Addr().String())
	return nil
}
