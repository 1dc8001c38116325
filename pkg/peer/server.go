// Package peer is the node plugins' endpoint for each other (issue 23): a
// node serves the blobs it committed, by sha256 and in byte ranges, and
// says which blob holds a remote object, to callers that prove with a
// projected service-account token (audience modelcache-peer, checked by
// TokenReview) that they are the node plugin. It holds the client for that
// endpoint and the TLS material the nodes share (a CA in a Secret).
//
// This gate is the transport's: it keeps everything but node plugins out.
// Tenants are gated where they always were: a node asks peers only for the
// objects of a listing it made with the tenant's own credentials, and
// checks every byte against that listing.
package peer

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// Audience is the audience of the projected tokens peers present; a token
// of the node plugin's account for any other audience (the API server's)
// is refused, so a token stolen from a peer call cannot reach the API
// server and the API server's cannot reach a peer.
const Audience = "modelcache-peer"

// Paths of the endpoint.
const (
	BlobsPath   = "/peer/v1/blobs/"   // + sha256 hex: a committed blob, ranges allowed
	ObjectsPath = "/peer/v1/objects/" // + "sha256:<hex>" (source.ObjectKey): which blob holds it
)

// Blobs opens committed blobs. pkg/store implements it.
type Blobs interface {
	// OpenBlob opens blobs/<sum> read-only, never through a link. A blob
	// that is not there is an error that wraps fs.ErrNotExist.
	OpenBlob(sum string) (*os.File, error)
}

// Objects says which blob a remote object's bytes became on this node.
// pkg/state implements it.
type Objects interface {
	// LookupObject returns the blob recorded for an object key; ok is
	// false when none is.
	LookupObject(key string) (blob string, ok bool, err error)
}

// ObjectReply is the answer to an object lookup.
type ObjectReply struct {
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
}

// Config configures a Server.
type Config struct {
	Blobs    Blobs
	Objects  Objects
	Reviewer Reviewer
	// Namespace and ServiceAccount name the node plugin's own account: the
	// only one whose tokens are served.
	Namespace, ServiceAccount string
	// MaxStreams bounds the bodies served at once (default
	// DefaultMaxStreams).
	MaxStreams int
	// QueueWait is how long a body asked while MaxStreams are served
	// waits for one, in the order they were asked (default
	// DefaultQueueWait; negative: none waits). MaxQueued bounds how many
	// wait (default DefaultMaxQueued). One that waits in vain, or finds
	// the queue full, gets 503 and asks again later or elsewhere.
	QueueWait time.Duration
	MaxQueued int
	// WriteTimeout is how long one write of a body may wait for the
	// reader (default DefaultWriteTimeout).
	WriteTimeout time.Duration
	// CacheTTL bounds how long an accepted token is trusted without
	// another TokenReview (default DefaultCacheTTL); CacheSize bounds how
	// many are (default DefaultCacheSize).
	CacheTTL  time.Duration
	CacheSize int
	// Metrics, when set, counts what the server does.
	Metrics *Metrics
	// Now is the clock of the token cache (default time.Now).
	Now func() time.Time
}

// Defaults of Config.
const (
	// DefaultMaxStreams keeps a GPU node's CPU for its workload: a TLS
	// stream costs about a quarter of a core at full speed.
	DefaultMaxStreams = 4
	// DefaultQueueWait: every node reading a model from the one node that
	// fetched it asks for several ranges at once, many more than
	// MaxStreams. Waiting in order serves each range in turn; refused
	// at once, they would ask again at random and some would lose every
	// time, until they gave up and read from the origin. It stays well
	// inside a requester's stall window (30 s, first byte included).
	DefaultQueueWait = 10 * time.Second
	// DefaultMaxQueued bounds what a waiting body holds (a connection
	// and a goroutine each): eight nodes' ranged streams.
	DefaultMaxQueued    = 64
	DefaultWriteTimeout = 30 * time.Second
	DefaultCacheTTL     = time.Minute
	DefaultCacheSize    = 1024
)

// Server is the peer endpoint, an http.Handler the caller serves over TLS
// (ServingConfig, NewHTTPServer).
type Server struct {
	blobs        Blobs
	objects      Objects
	gate         *gate
	streams      chan struct{}
	queueWait    time.Duration
	maxQueued    int64
	queued       atomic.Int64
	writeTimeout time.Duration
	metrics      *Metrics
	mux          *http.ServeMux
}

// NewServer returns the endpoint for cfg.
func NewServer(cfg Config) (*Server, error) {
	if cfg.Blobs == nil || cfg.Objects == nil || cfg.Reviewer == nil {
		return nil, errors.New("peer server: blobs, objects and a token reviewer are required")
	}
	if cfg.Namespace == "" || cfg.ServiceAccount == "" {
		return nil, errors.New("peer server: the node plugin's service account (namespace and name) is required")
	}
	if cfg.MaxStreams <= 0 {
		cfg.MaxStreams = DefaultMaxStreams
	}
	if cfg.QueueWait == 0 {
		cfg.QueueWait = DefaultQueueWait
	}
	if cfg.MaxQueued <= 0 {
		cfg.MaxQueued = DefaultMaxQueued
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	s := &Server{
		blobs: cfg.Blobs, objects: cfg.Objects,
		gate:         newGate(cfg),
		streams:      make(chan struct{}, cfg.MaxStreams),
		queueWait:    cfg.QueueWait,
		maxQueued:    int64(cfg.MaxQueued),
		writeTimeout: cfg.WriteTimeout,
		metrics:      cfg.Metrics,
		mux:          http.NewServeMux(),
	}
	// A GET pattern also answers HEAD.
	s.mux.HandleFunc("GET "+BlobsPath+"{sum}", s.serveBlob)
	s.mux.HandleFunc("GET "+ObjectsPath+"{key}", s.serveObject)
	return s, nil
}

// ServeHTTP gates every request, known path or not, so that a caller
// without the plugin's token learns nothing, not even which names exist.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	sw := &statusWriter{ResponseWriter: w}
	defer func() { s.metrics.request(sw.status()) }()
	if code, reason := s.gate.admit(r); code != 0 {
		s.metrics.refused(reason)
		switch code {
		case http.StatusUnauthorized:
			sw.Header().Set("WWW-Authenticate", `Bearer realm="modelcache-peer"`)
		case http.StatusServiceUnavailable:
			sw.Header().Set("Retry-After", "1") // the review may work in a moment
		}
		http.Error(sw, http.StatusText(code), code)
		return
	}
	s.mux.ServeHTTP(sw, r)
}

// serveBlob serves a committed blob with http.ServeContent: ranges,
// HEAD, If-Range against the blob's ETag (its sha256, which never
// changes). The name is checked before it reaches the disk.
func (s *Server) serveBlob(w http.ResponseWriter, r *http.Request) {
	sum := r.PathValue("sum")
	if !isHex64(sum) {
		http.Error(w, "a blob is named by 64 lower-case hex digits", http.StatusBadRequest)
		return
	}
	// Several ranges come as a multipart body that costs more to build
	// than it saves; the client asks for one range at a time.
	if strings.Contains(r.Header.Get("Range"), ",") {
		http.Error(w, "one range at a time", http.StatusRequestedRangeNotSatisfiable)
		return
	}
	f, err := s.blobs.OpenBlob(sum)
	if err != nil {
		s.openFailed(w, sum, err)
		return
	}
	defer f.Close()
	if r.Method != http.MethodHead {
		if !s.takeStream(r.Context()) {
			s.metrics.refused(reasonBusy)
			w.Header().Set("Retry-After", "1")
			http.Error(w, "this node serves as many streams as it may; ask another", http.StatusServiceUnavailable)
			return
		}
		defer s.releaseStream()
		w = newDeadlineWriter(w, s.writeTimeout, s.metrics)
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream") // no sniffing of the first 512 bytes
	h.Set("ETag", `"`+sum+`"`)
	// A zero time: no Last-Modified, conditions on the ETag alone.
	http.ServeContent(w, r, "", time.Time{}, f)
}

// openFailed answers a blob that could not be opened: 404 when it is not
// there (a stale holder; the requester moves on), 500 otherwise.
func (s *Server) openFailed(w http.ResponseWriter, sum string, err error) {
	if errors.Is(err, fs.ErrNotExist) {
		http.Error(w, "no such blob on this node", http.StatusNotFound)
		return
	}
	klog.ErrorS(err, "Opening a blob for a peer", "blob", sum)
	http.Error(w, "cannot open the blob", http.StatusInternalServerError)
}

// serveObject says which blob holds an object, and its size, when this
// node holds it still.
func (s *Server) serveObject(w http.ResponseWriter, r *http.Request) {
	key := r.PathValue("key")
	if !strings.HasPrefix(key, "sha256:") || !isHex64(key[len("sha256:"):]) {
		http.Error(w, `an object is named "sha256:" and 64 lower-case hex digits`, http.StatusBadRequest)
		return
	}
	sum, ok, err := s.objects.LookupObject(key)
	if err != nil {
		klog.ErrorS(err, "Looking up an object for a peer", "object", key)
		http.Error(w, "cannot read the object index", http.StatusInternalServerError)
		return
	}
	if !ok || !isHex64(sum) {
		http.Error(w, "this node holds no blob for that object", http.StatusNotFound)
		return
	}
	size, err := s.blobSize(sum)
	if err != nil {
		// Recorded, but evicted or quarantined since.
		s.openFailed(w, sum, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if err := json.NewEncoder(w).Encode(ObjectReply{SHA256: sum, Size: size}); err != nil {
		klog.V(4).InfoS("Answering an object lookup", "err", err)
	}
}

// blobSize checks that a blob is still there and measures it.
func (s *Server) blobSize(sum string) (int64, error) {
	f, err := s.blobs.OpenBlob(sum)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("measuring blob %s: %w", sum, err)
	}
	return fi.Size(), nil
}

// NewHTTPServer is an http.Server for h with tlsConf (ServingConfig) and
// the timeouts a peer endpoint wants: headers and idle connections are
// bounded; bodies are bounded per write by the Server, not as a whole,
// since a large range takes as long as it takes.
func NewHTTPServer(h http.Handler, tlsConf *tls.Config) *http.Server {
	return &http.Server{
		Handler:           h,
		TLSConfig:         tlsConf,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		// Failed handshakes (probes, a peer without the CA) to klog, not
		// to the standard logger.
		ErrorLog: klog.NewStandardLogger("INFO"),
	}
}

// isHex64 reports whether h is 64 lower-case hex digits: a sha256 as the
// store names blobs.
func isHex64(h string) bool {
	if len(h) != 64 {
		return false
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
