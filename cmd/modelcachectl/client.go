package main

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
	"syscall"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
)

// baseURL is the admin API's URL; the host is a placeholder, every
// connection goes to the unix socket.
const baseURL = "http://modelcache"

// client calls the admin API over its unix socket.
type client struct {
	socket string
	http   *http.Client
}

func newClient(socket string) *client {
	d := net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			conn, err := d.DialContext(ctx, "unix", socket)
			if err != nil {
				return nil, &dialError{socket: socket, err: err}
			}
			return conn, nil
		},
		MaxIdleConns:    1,
		IdleConnTimeout: 30 * time.Second,
	}
	// No overall timeout: verify re-hashes the whole cache and prefetch
	// streams for as long as the download runs. Ctrl-C cancels.
	return &client{socket: socket, http: &http.Client{Transport: tr}}
}

// dialError says the socket could not be reached, and what to do about it.
type dialError struct {
	socket string
	err    error
}

func (e *dialError) Error() string {
	const asRoot = "run modelcachectl as root on the node (sudo, or kubectl exec into the modelcache node plugin's pod)"
	switch {
	case errors.Is(e.err, syscall.ENOENT):
		return fmt.Sprintf("cannot reach the admin API: no socket at %s. Is the modelcache node plugin running on this node? If so, %s, or point --socket (or MODELCACHE_ADMIN_SOCKET) at its admin socket", e.socket, asRoot)
	case errors.Is(e.err, syscall.EACCES), errors.Is(e.err, syscall.EPERM):
		return fmt.Sprintf("cannot reach the admin API: permission denied on %s, which only root may open; %s", e.socket, asRoot)
	case errors.Is(e.err, syscall.ECONNREFUSED):
		return fmt.Sprintf("cannot reach the admin API: nothing listens on %s; the modelcache node plugin is not running (or restarting) on this node; %s once it is up", e.socket, asRoot)
	default:
		return fmt.Sprintf("cannot reach the admin API on %s: %v; %s", e.socket, e.err, asRoot)
	}
}

func (e *dialError) Unwrap() error { return e.err }

// apiError is a reply with an error status.
type apiError struct {
	Status  int
	Message string
}

func (e *apiError) Error() string { return e.Message }

// getJSON GETs path and decodes the reply into v (unless v is nil); it
// returns the raw body too, for --output json.
func (c *client) getJSON(ctx context.Context, path string, query url.Values, v any) ([]byte, error) {
	if len(query) > 0 {
		path += "?" + query.Encode()
	}
	return c.call(ctx, http.MethodGet, path, nil, v)
}

// postJSON POSTs body as JSON and decodes the reply into v.
func (c *client) postJSON(ctx context.Context, path string, body, v any) ([]byte, error) {
	return c.call(ctx, http.MethodPost, path, body, v)
}

func (c *client) call(ctx context.Context, method, path string, body, v any) ([]byte, error) {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("reading the reply to %s %s: %w", method, path, err)
	}
	if v != nil {
		if err := json.Unmarshal(raw, v); err != nil {
			return nil, fmt.Errorf("decoding the reply to %s %s: %w (is the node plugin a different version than modelcachectl?)", method, path, err)
		}
	}
	return raw, nil
}

// do sends a request and returns the response if its status is 2xx; any
// other status becomes an *apiError carrying the server's message. The
// caller closes the body.
func (c *client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encoding the request: %w", err)
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
		var de *dialError
		switch {
		case errors.As(err, &de):
			return nil, de
		case ctx.Err() != nil:
			return nil, fmt.Errorf("interrupted: %w", ctx.Err())
		default:
			return nil, fmt.Errorf("calling the admin API on %s: %w", c.socket, err)
		}
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var e adminapi.Error
	if json.Unmarshal(raw, &e) == nil && e.Error != "" {
		return nil, &apiError{Status: resp.StatusCode, Message: e.Error}
	}
	// Not the API's error shape: most likely a node plugin that predates
	// this route.
	msg := strings.TrimSpace(string(raw))
	if len(msg) > 200 {
		msg = msg[:200] + "..."
	}
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
	}
	hint := ""
	if resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusMethodNotAllowed {
		hint = " (is the node plugin older than modelcachectl?)"
	}
	return nil, &apiError{Status: resp.StatusCode, Message: fmt.Sprintf("%s %s: HTTP %d: %s%s", method, path, resp.StatusCode, msg, hint)}
}
