package adminapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// baseURL is the API's URL; the host is a placeholder, every connection
// goes to the unix socket.
const baseURL = "http://modelcache"

// Client is the typed client of the operator API on its unix socket:
// modelcachectl and the tests both call the node plugin through it.
type Client struct {
	// Socket is the unix socket the API listens on.
	Socket string
	// Strict refuses replies this version does not fully know: unknown
	// fields and unknown prefetch events. Tests set it, so that the client
	// and the server cannot drift apart unnoticed; modelcachectl leaves it
	// off, so that it can still talk to a newer node plugin.
	Strict bool
	// Timeout bounds each call, the reading of its reply included; zero
	// means none (verify re-hashes the whole cache and a prefetch streams
	// for as long as its download runs: cancel the context instead).
	Timeout time.Duration

	http *http.Client
}

// NewClient returns a client of the API listening on socket.
func NewClient(socket string) *Client {
	d := net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			conn, err := d.DialContext(ctx, "unix", socket)
			if err != nil {
				return nil, &DialError{Socket: socket, Err: err}
			}
			return conn, nil
		},
		// A connection kept open would outlive a node plugin restarted
		// under it, and a POST on it is not retried.
		DisableKeepAlives: true,
	}
	return &Client{Socket: socket, http: &http.Client{Transport: tr}}
}

// DialError says the socket could not be reached: no socket (ENOENT),
// not allowed to open it (EACCES, EPERM), or nothing listening
// (ECONNREFUSED), which Err tells apart.
type DialError struct {
	Socket string
	Err    error
}

func (e *DialError) Error() string {
	return fmt.Sprintf("cannot reach the admin API on %s: %v", e.Socket, e.Err)
}

func (e *DialError) Unwrap() error { return e.Err }

// StatusError is a reply with a status other than 2xx.
type StatusError struct {
	Method, Path string
	Status       int
	// Message is the server's error message or, when the reply is not the
	// API's error shape (Foreign: a node plugin older than the route, say),
	// the start of the reply.
	Message string
	Foreign bool
}

func (e *StatusError) Error() string {
	if e.Foreign {
		return fmt.Sprintf("%s %s: HTTP %d: %s", e.Method, e.Path, e.Status, e.Message)
	}
	return e.Message
}

// StatusCode is the HTTP status of a *StatusError in err's chain, or 0.
func StatusCode(err error) int {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Status
	}
	return 0
}

// ErrIncomplete is a prefetch stream that ended before its done or error
// event: the connection closed, the node plugin restarted. The download
// may go on; the same prefetch again follows it.
var ErrIncomplete = errors.New("the prefetch stream ended before a done or error event")

// Trees lists the cached trees, least recently used first.
func (c *Client) Trees(ctx context.Context) ([]Tree, error) {
	var out []Tree
	return out, c.call(ctx, http.MethodGet, "/v1/trees", nil, &out)
}

// Tree inspects one tree named by digest, digest prefix or model URI.
func (c *Client) Tree(ctx context.Context, ref string) (Inspection, error) {
	var out Inspection
	return out, c.call(ctx, http.MethodGet, "/v1/tree?"+url.Values{"ref": {ref}}.Encode(), nil, &out)
}

// DU reports the cache's disk usage.
func (c *Client) DU(ctx context.Context) (DiskUsage, error) {
	var out DiskUsage
	return out, c.call(ctx, http.MethodGet, "/v1/du", nil, &out)
}

// Raw GETs path (a route of the API) and returns the reply as the server
// sent it, for printing it unchanged (modelcachectl --output json).
func (c *Client) Raw(ctx context.Context, path string, query url.Values) ([]byte, error) {
	if len(query) > 0 {
		path += "?" + query.Encode()
	}
	var raw json.RawMessage
	return raw, c.call(ctx, http.MethodGet, path, nil, &raw)
}

// Pin protects a tree from budget eviction.
func (c *Client) Pin(ctx context.Context, ref string) (Tree, error) {
	var out Tree
	return out, c.call(ctx, http.MethodPost, "/v1/pin", RefRequest{Ref: ref}, &out)
}

// Unpin drops a pin.
func (c *Client) Unpin(ctx context.Context, ref string) (Tree, error) {
	var out Tree
	return out, c.call(ctx, http.MethodPost, "/v1/unpin", RefRequest{Ref: ref}, &out)
}

// Evict removes a tree now or, with whenUnused, when its last mount goes.
func (c *Client) Evict(ctx context.Context, ref string, whenUnused bool) (EvictResult, error) {
	var out EvictResult
	return out, c.call(ctx, http.MethodPost, "/v1/evict", RefRequest{Ref: ref, WhenUnused: whenUnused}, &out)
}

// GC enforces the budget or, with dryRun, says what enforcing it would remove.
func (c *Client) GC(ctx context.Context, dryRun bool) (GCResult, error) {
	var out GCResult
	return out, c.call(ctx, http.MethodPost, "/v1/gc", RefRequest{DryRun: dryRun}, &out)
}

// Drain stops new downloads and removes every tree no pod uses.
func (c *Client) Drain(ctx context.Context) (DrainResult, error) {
	var out DrainResult
	return out, c.call(ctx, http.MethodPost, "/v1/drain", nil, &out)
}

// Undrain lets downloads start again.
func (c *Client) Undrain(ctx context.Context) (DrainResult, error) {
	var out DrainResult
	return out, c.call(ctx, http.MethodPost, "/v1/undrain", nil, &out)
}

// Verify re-hashes every blob.
func (c *Client) Verify(ctx context.Context) (VerifyReport, error) {
	var out VerifyReport
	return out, c.call(ctx, http.MethodPost, "/v1/verify", nil, &out)
}

// Prefetch asks the node to download req.URI and follows its NDJSON
// stream, handing each "progress" event to progress (which may be nil),
// to the "done" event, which it returns. An "error" event is returned
// with an error carrying its message as it is; a refusal before the
// stream is a *StatusError; a stream that ends first is ErrIncomplete.
func (c *Client) Prefetch(ctx context.Context, req PrefetchRequest, progress func(PrefetchEvent)) (PrefetchEvent, error) {
	ctx, cancel := c.bound(ctx)
	defer cancel()
	const path = "/v1/prefetch"
	resp, err := c.do(ctx, http.MethodPost, path, req)
	if err != nil {
		return PrefetchEvent{}, err
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/x-ndjson") {
		return PrefetchEvent{}, fmt.Errorf("POST %s replied with Content-Type %q, want application/x-ndjson", path, ct)
	}
	dec := json.NewDecoder(resp.Body)
	if c.Strict {
		dec.DisallowUnknownFields()
	}
	for {
		var ev PrefetchEvent
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				err = ErrIncomplete
			}
			return PrefetchEvent{}, fmt.Errorf("reading the progress of %s: %w", req.URI, err)
		}
		switch ev.Event {
		case "progress":
			if progress != nil {
				progress(ev)
			}
		case "done":
			return ev, nil
		case "error":
			return ev, errors.New(ev.Error)
		default:
			if c.Strict {
				return ev, fmt.Errorf("prefetch sent an unknown event %q", ev.Event)
			}
			// A newer node plugin's event: skipped.
		}
	}
}

// bound applies the client's Timeout to ctx.
func (c *Client) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if c.Timeout > 0 {
		return context.WithTimeout(ctx, c.Timeout)
	}
	return context.WithCancel(ctx)
}

// call sends body as JSON and decodes the reply into v.
func (c *Client) call(ctx context.Context, method, path string, body, v any) error {
	ctx, cancel := c.bound(ctx)
	defer cancel()
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("reading the reply to %s %s: %w", method, path, err)
	}
	if err := c.decode(raw, v); err != nil {
		return fmt.Errorf("decoding the reply to %s %s (%s): %w (a node plugin of another version?)", method, path, start(raw), err)
	}
	return nil
}

// do sends a request and returns the response if its status is 2xx; any
// other status becomes a *StatusError. The caller closes the body.
func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encoding the request to %s %s: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, baseURL+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if de := (*DialError)(nil); errors.As(err, &de) {
			return nil, de
		}
		return nil, fmt.Errorf("%s %s on %s: %w", method, path, c.Socket, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	se := &StatusError{Method: method, Path: path, Status: resp.StatusCode}
	var e Error
	if err := c.decode(raw, &e); err == nil && e.Error != "" {
		se.Message = e.Error
		return nil, se
	}
	se.Foreign, se.Message = true, start(raw)
	if se.Message == "" {
		se.Message = http.StatusText(resp.StatusCode)
	}
	return nil, se
}

// decode decodes one JSON value, refusing fields v lacks when c is strict.
func (c *Client) decode(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	if c.Strict {
		dec.DisallowUnknownFields()
	}
	return dec.Decode(v)
}

// start is the first 200 bytes of a reply, for a message.
func start(raw []byte) string {
	s := strings.TrimSpace(string(raw))
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}
