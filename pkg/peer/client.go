package peer

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Errors of the client. A requester moves on to another peer (or the
// origin) after any of them; after ErrBadReply it also demotes the peer.
var (
	ErrNotHeld  = errors.New("the peer does not hold it")                   // 404
	ErrBusy     = errors.New("the peer is busy")                            // 503
	ErrRefused  = errors.New("the peer refused this node's token")          // 401, 403
	ErrBadReply = errors.New("the peer answered outside the peer protocol") // wrong range, length or body
)

// StatusError is a peer's answer other than success; it wraps the client
// error its status maps to (errors.Is(err, ErrNotHeld), ...).
type StatusError struct {
	Addr   string
	Status int
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("peer %s answered %d %s", e.Addr, e.Status, http.StatusText(e.Status))
}

// Unwrap maps the status to the client's errors.
func (e *StatusError) Unwrap() error {
	switch e.Status {
	case http.StatusNotFound:
		return ErrNotHeld
	case http.StatusServiceUnavailable, http.StatusTooManyRequests:
		return ErrBusy
	case http.StatusUnauthorized, http.StatusForbidden:
		return ErrRefused
	}
	return ErrBadReply
}

// TokenSource gives the token this node presents to peers.
type TokenSource interface {
	Token() (string, error)
}

// Client asks other nodes' peer endpoints. Its zero value is not usable:
// TLS (ClientConfig) and Tokens are required. It never follows a redirect
// and never uses a proxy: a peer is a pod address from the cluster.
type Client struct {
	TLS    *tls.Config
	Tokens TokenSource
	// LookupTimeout bounds a Lookup (default 10s); a range is bounded by
	// its context only, since its size is the caller's.
	LookupTimeout time.Duration

	once sync.Once
	hc   *http.Client
}

// maxReplyBytes bounds an object lookup's JSON.
const maxReplyBytes = 4 << 10

func (c *Client) httpClient() *http.Client {
	c.once.Do(func() {
		c.hc = &http.Client{
			Transport: &http.Transport{
				Proxy:                 nil,
				DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
				TLSClientConfig:       c.TLS,
				TLSHandshakeTimeout:   5 * time.Second,
				ResponseHeaderTimeout: 30 * time.Second,
				MaxIdleConnsPerHost:   16,
				IdleConnTimeout:       90 * time.Second,
				// Ranges gain nothing from compression, and a gzip'd
				// body would hide its length.
				DisableCompression: true,
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	})
	return c.hc
}

// get sends an authenticated GET to a peer.
func (c *Client) get(ctx context.Context, addr, path string, header http.Header) (*http.Response, error) {
	if c.TLS == nil || c.Tokens == nil {
		return nil, errors.New("peer client: TLS config and token source are required")
	}
	token, err := c.Tokens.Token()
	if err != nil {
		return nil, fmt.Errorf("reading this node's peer token: %w", err)
	}
	u := url.URL{Scheme: "https", Host: addr, Path: path}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("asking peer %s: %w", addr, err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := c.httpClient().Do(req)
	if err != nil {
		// url.Error names the URL, which holds no secret.
		return nil, fmt.Errorf("asking peer %s: %w", addr, err)
	}
	return resp, nil
}

// Lookup asks a peer which blob holds an object (its source.ObjectKey from
// this node's own listing) and how large it is.
func (c *Client) Lookup(ctx context.Context, addr, objectKey string) (sum string, size int64, err error) {
	if !strings.HasPrefix(objectKey, "sha256:") || !isHex64(objectKey[len("sha256:"):]) {
		return "", 0, fmt.Errorf("object key %q is not sha256:<hex>", objectKey)
	}
	timeout := c.LookupTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp, err := c.get(ctx, addr, ObjectsPath+objectKey, nil)
	if err != nil {
		return "", 0, err
	}
	defer drainClose(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", 0, &StatusError{Addr: addr, Status: resp.StatusCode}
	}
	var r ObjectReply
	dec := json.NewDecoder(io.LimitReader(resp.Body, maxReplyBytes))
	if err := dec.Decode(&r); err != nil {
		return "", 0, fmt.Errorf("%w: peer %s: object lookup: %v", ErrBadReply, addr, err)
	}
	if !isHex64(r.SHA256) || r.Size < 0 {
		return "", 0, fmt.Errorf("%w: peer %s named blob %q of %d bytes", ErrBadReply, addr, r.SHA256, r.Size)
	}
	return r.SHA256, r.Size, nil
}

// OpenRange opens bytes [off, off+n) of a peer's blob. The body gives
// exactly n bytes: fewer is io.ErrUnexpectedEOF, more is ErrBadReply. The
// bytes themselves are the caller's to check against the sha256 and its
// own listing.
func (c *Client) OpenRange(ctx context.Context, addr, sum string, off, n int64) (io.ReadCloser, error) {
	if !isHex64(sum) {
		return nil, fmt.Errorf("blob name %q is not 64 lower-case hex digits", sum)
	}
	if off < 0 || n <= 0 {
		return nil, fmt.Errorf("range of %d bytes at %d: nothing to ask for", n, off)
	}
	last := off + n - 1
	h := http.Header{"Range": {fmt.Sprintf("bytes=%d-%d", off, last)}}
	resp, err := c.get(ctx, addr, BlobsPath+sum, h)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusPartialContent {
		drainClose(resp.Body)
		return nil, &StatusError{Addr: addr, Status: resp.StatusCode}
	}
	start, end, ok := contentRange(resp.Header.Get("Content-Range"))
	if !ok || start != off || end != last || (resp.ContentLength >= 0 && resp.ContentLength != n) {
		drainClose(resp.Body)
		return nil, fmt.Errorf("%w: peer %s sent %q (%d bytes) for bytes %d-%d of blob %s",
			ErrBadReply, addr, resp.Header.Get("Content-Range"), resp.ContentLength, off, last, sum)
	}
	return &exactBody{rc: resp.Body, left: n, what: fmt.Sprintf("peer %s, bytes %d-%d of blob %s", addr, off, last, sum)}, nil
}

// contentRange parses "bytes first-last/size".
func contentRange(h string) (first, last int64, ok bool) {
	rest, found := strings.CutPrefix(h, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, _, found := strings.Cut(rest, "/")
	a, b, found2 := strings.Cut(rng, "-")
	if !found || !found2 {
		return 0, 0, false
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	return first, last, err1 == nil && err2 == nil && first <= last
}

// exactBody gives exactly left bytes of a body, and an error for any more.
type exactBody struct {
	rc   io.ReadCloser
	left int64
	what string
}

func (b *exactBody) Read(p []byte) (int, error) {
	if b.left == 0 {
		// One byte past the range tells a longer body from a complete one.
		var extra [1]byte
		if k, _ := io.ReadFull(b.rc, extra[:]); k > 0 {
			return 0, fmt.Errorf("%w: %s: the body is longer than the range", ErrBadReply, b.what)
		}
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	if err == io.EOF {
		if b.left > 0 {
			return n, fmt.Errorf("%s: %w", b.what, io.ErrUnexpectedEOF)
		}
		err = nil // the extra-byte check on the next Read says EOF
	}
	return n, err
}

func (b *exactBody) Close() error { return b.rc.Close() }

// drainClose reads a little of a body before closing it, so that a small
// answer's connection can be reused.
func drainClose(rc io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(rc, maxReplyBytes))
	_ = rc.Close()
}
