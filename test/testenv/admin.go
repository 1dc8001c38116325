package testenv

import (
	"bufio"
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

	"github.com/modelcache/modelcache/pkg/adminapi"
)

// Admin is a typed client of the node plugin's operator API on its unix
// socket. Replies decode into the server's own types (pkg/admin, pkg/state,
// pkg/store) with unknown fields refused, so the client and the server
// cannot drift apart unnoticed.
type Admin struct {
	Socket string
	http   *http.Client
}

// AdminError is a reply with a non-2xx status: the status and the server's
// {"error": ...} message.
type AdminError struct {
	Status  int
	Message string
}

func (e *AdminError) Error() string { return fmt.Sprintf("HTTP %d: %s", e.Status, e.Message) }

// AdminStatus returns the HTTP status of an *AdminError in err's chain, or 0.
func AdminStatus(err error) int {
	var ae *AdminError
	if errors.As(err, &ae) {
		return ae.Status
	}
	return 0
}

// adminTimeout bounds one call; the models tests use are small.
const adminTimeout = 2 * time.Minute

// NewAdmin returns a client for the admin API listening on socket.
func NewAdmin(socket string) *Admin {
	var d net.Dialer
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}
	return &Admin{Socket: socket, http: &http.Client{Transport: tr, Timeout: adminTimeout}}
}

// Wait polls until the API answers, for a driver that has just started:
// the socket is served beside the CSI endpoint, not before it.
func (a *Admin) Wait(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := a.DU()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("admin API on %s did not answer within %s: %w", a.Socket, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Trees lists the cached trees, least recently used first.
func (a *Admin) Trees() ([]adminapi.Tree, error) {
	var out []adminapi.Tree
	return out, a.call(http.MethodGet, "/v1/trees", nil, &out)
}

// Tree inspects one tree named by digest, digest prefix or model URI.
func (a *Admin) Tree(ref string) (adminapi.Inspection, error) {
	var out adminapi.Inspection
	return out, a.call(http.MethodGet, "/v1/tree?ref="+url.QueryEscape(ref), nil, &out)
}

// DU reports the cache's disk usage.
func (a *Admin) DU() (adminapi.DiskUsage, error) {
	var out adminapi.DiskUsage
	return out, a.call(http.MethodGet, "/v1/du", nil, &out)
}

// Pin protects a tree from budget eviction.
func (a *Admin) Pin(ref string) (adminapi.Tree, error) {
	var out adminapi.Tree
	return out, a.call(http.MethodPost, "/v1/pin", adminapi.RefRequest{Ref: ref}, &out)
}

// Unpin drops a pin.
func (a *Admin) Unpin(ref string) (adminapi.Tree, error) {
	var out adminapi.Tree
	return out, a.call(http.MethodPost, "/v1/unpin", adminapi.RefRequest{Ref: ref}, &out)
}

// Evict removes a tree now, or with whenUnused when its last mount goes.
func (a *Admin) Evict(ref string, whenUnused bool) (adminapi.EvictResult, error) {
	var out adminapi.EvictResult
	return out, a.call(http.MethodPost, "/v1/evict", adminapi.RefRequest{Ref: ref, WhenUnused: whenUnused}, &out)
}

// GC enforces the budget, or with dryRun reports what enforcing it would remove.
func (a *Admin) GC(dryRun bool) (adminapi.GCResult, error) {
	var out adminapi.GCResult
	return out, a.call(http.MethodPost, "/v1/gc", adminapi.RefRequest{DryRun: dryRun}, &out)
}

// Drain stops new downloads and removes every tree no pod uses.
func (a *Admin) Drain() (adminapi.DrainResult, error) {
	var out adminapi.DrainResult
	return out, a.call(http.MethodPost, "/v1/drain", nil, &out)
}

// Undrain lets downloads start again.
func (a *Admin) Undrain() (adminapi.DrainResult, error) {
	var out adminapi.DrainResult
	return out, a.call(http.MethodPost, "/v1/undrain", nil, &out)
}

// Verify re-hashes every blob.
func (a *Admin) Verify() (adminapi.VerifyReport, error) {
	var out adminapi.VerifyReport
	return out, a.call(http.MethodPost, "/v1/verify", nil, &out)
}

// Prefetch downloads a model into the cache with the given node-publish
// secret, reads the NDJSON stream to its final event and returns it. A
// refused request is an *AdminError; an "error" event is returned with an
// error carrying its message.
func (a *Admin) Prefetch(uri string, secrets map[string]string) (adminapi.PrefetchEvent, error) {
	resp, err := a.do(http.MethodPost, "/v1/prefetch", adminapi.PrefetchRequest{URI: uri, Secrets: secrets})
	if err != nil {
		return adminapi.PrefetchEvent{}, err
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/x-ndjson") {
		return adminapi.PrefetchEvent{}, fmt.Errorf("prefetch replied with Content-Type %q, want application/x-ndjson", ct)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var ev adminapi.PrefetchEvent
		if err := strictDecode(sc.Bytes(), &ev); err != nil {
			return ev, fmt.Errorf("decoding prefetch event %q: %w", sc.Text(), err)
		}
		switch ev.Event {
		case "progress":
			continue
		case "done":
			return ev, nil
		case "error":
			return ev, fmt.Errorf("prefetch of %s failed: %s", uri, ev.Error)
		default:
			return ev, fmt.Errorf("prefetch sent an unknown event %q", ev.Event)
		}
	}
	if err := sc.Err(); err != nil {
		return adminapi.PrefetchEvent{}, fmt.Errorf("reading prefetch stream: %w", err)
	}
	return adminapi.PrefetchEvent{}, errors.New("prefetch stream ended without a done or error event")
}

func (a *Admin) call(method, path string, body, v any) error {
	resp, err := a.do(method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("reading reply to %s %s: %w", method, path, err)
	}
	if err := strictDecode(raw, v); err != nil {
		return fmt.Errorf("decoding reply to %s %s (%s): %w", method, path, bytes.TrimSpace(raw), err)
	}
	return nil
}

// do sends a request and returns a 2xx response; other statuses become an
// *AdminError.
func (a *Admin) do(method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://modelcache"+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s on %s: %w", method, path, a.Socket, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var e adminapi.Error
	if err := strictDecode(raw, &e); err != nil || e.Error == "" {
		return nil, &AdminError{Status: resp.StatusCode, Message: fmt.Sprintf("(not the API's error shape) %s", bytes.TrimSpace(raw))}
	}
	return nil, &AdminError{Status: resp.StatusCode, Message: e.Error}
}

// strictDecode decodes one JSON value, refusing fields v does not have.
func strictDecode(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}
