package source

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/modelcache/modelcache/pkg/egress"
)

const (
	// hfRetries is how often a request the Hub throttles (429) is
	// retried, each after the wait its Retry-After asks for.
	hfRetries = 3
	// hfMaxRetryAfter is the longest such wait: a longer one fails the
	// request at once (kubelet retries the publish).
	hfMaxRetryAfter = 30 * time.Second
	// hfDefaultRetryAfter is the wait of a 429 without Retry-After.
	hfDefaultRetryAfter = time.Second
	// hfMaxRedirects bounds one request's redirects, as Go's default.
	hfMaxRedirects = 10
)

// errHFDowngrade stops a redirect from https to http: it would carry a
// signed URL and the model's bytes in clear.
var errHFDowngrade = errors.New("the Hub redirected from https to plain http, which is refused")

// initClients builds the remote's HTTP clients. Every connection,
// redirects' included, is dialled through the egress Guard; no proxy from
// the node's environment is used.
func (r *hfRemote) initClients(g *egress.Guard) {
	t := &http.Transport{
		DialContext:           g.DialContext,
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   30 * time.Second,
		ResponseHeaderTimeout: time.Minute,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   16,
	}
	r.conns = &activity{close: t.CloseIdleConnections}
	r.client = &http.Client{Transport: t, CheckRedirect: r.checkRedirect}
	r.headClient = &http.Client{Transport: t, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
}

// checkRedirect keeps the token for the endpoint's own origin. Go's
// client drops Authorization only on a redirect to another domain that is
// not a subdomain, ignoring the port: a Hub redirecting to
// cdn.<its domain>, or to another port of its host, would get the token.
func (r *hfRemote) checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= hfMaxRedirects {
		return fmt.Errorf("stopped after %d redirects", hfMaxRedirects)
	}
	if !sameOrigin(req.URL, r.endpoint) {
		req.Header.Del("Authorization")
	}
	if strings.EqualFold(via[0].URL.Scheme, "https") && !strings.EqualFold(req.URL.Scheme, "https") {
		return errHFDowngrade
	}
	return nil
}

// hfStatusError is an answer the Hub or its CDN refused a request with.
type hfStatusError struct {
	kindError
	status    int
	offOrigin bool // answered by the host a redirect led to, not the endpoint
}

// do sends one request with the token, retrying a 429 after the wait it
// asks for, and returns the response when its status is one of ok;
// otherwise an error of the kind the status and the Hub's X-Error-Code
// say.
func (r *hfRemote) do(ctx context.Context, c *http.Client, method, op, u string, hdr http.Header, ok ...int) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, method, u, nil)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, op, err)
		}
		for k, v := range hdr {
			req.Header[k] = v
		}
		req.Header.Set("User-Agent", "modelcache")
		if r.token != "" {
			req.Header.Set("Authorization", "Bearer "+r.token)
		}
		resp, err := c.Do(req)
		if err != nil {
			return nil, r.netError(op, err)
		}
		for _, s := range ok {
			if resp.StatusCode == s {
				return resp, nil
			}
		}
		if resp.StatusCode != http.StatusTooManyRequests {
			err := r.statusError(op, resp)
			drainClose(resp.Body)
			return nil, err
		}
		wait := retryAfter(resp.Header.Get("Retry-After"), time.Now())
		drainClose(resp.Body)
		if err := r.waitRetry(ctx, op, attempt, wait); err != nil {
			return nil, err
		}
	}
}

// waitRetry waits before retry attempt+1 of a throttled request, or says
// why it will not.
func (r *hfRemote) waitRetry(ctx context.Context, op string, attempt int, wait time.Duration) error {
	throttled := func(why string) error {
		return fmt.Errorf("%w: %s: the Hub limits this client's requests (429 Too Many Requests) and asks to retry after %s; %s. Retry later, or give an HF_TOKEN: the Hub allows an account more requests than an anonymous client", ErrUnavailable, op, wait, why)
	}
	if attempt == hfRetries {
		return throttled(fmt.Sprintf("still throttled after %d retries", hfRetries))
	}
	if wait > hfMaxRetryAfter {
		return throttled(fmt.Sprintf("longer than the %s a request waits", hfMaxRetryAfter))
	}
	if d, ok := ctx.Deadline(); ok && time.Until(d) < wait {
		return throttled("longer than the request has left")
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return r.netError(op, ctx.Err())
	case <-t.C:
		return nil
	}
}

// retryAfter reads a Retry-After header: seconds or an HTTP date.
func retryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if s, err := strconv.ParseInt(v, 10, 64); err == nil {
		if s < 0 {
			return 0
		}
		return time.Duration(min(s, 1<<20)) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0)
	}
	return hfDefaultRetryAfter
}

// drainClose reads a little of an unwanted body, so its connection can
// be reused, and closes it.
func drainClose(b io.ReadCloser) {
	io.Copy(io.Discard, io.LimitReader(b, 64<<10))
	b.Close()
}

// hfDeniedHint is what to do about a refusal.
func (r *hfRemote) hfDeniedHint() string {
	return fmt.Sprintf("accept the model's terms on its Hub page (%s/%s) with the account whose token is in %s, or give an %s of an account that has (a private model needs a token that can read it)", r.endpoint, r.uri.Path, hfTokenKey, hfTokenKey)
}

// statusError maps a refused request onto an error kind: the Hub's
// X-Error-Code first (it tells a missing repository, revision or file
// from a gated one), then the status.
func (r *hfRemote) statusError(op string, resp *http.Response) error {
	code, status := resp.Header.Get("X-Error-Code"), resp.StatusCode
	off := resp.Request != nil && !sameOrigin(resp.Request.URL, r.endpoint)
	var kind error
	var what string
	switch {
	case code == "RepoNotFound":
		kind, what = ErrNotFound, fmt.Sprintf("repository %s not found at %s; if it is private, give an %s that can read it", r.uri.Path, r.endpoint, hfTokenKey)
	case code == "RevisionNotFound":
		kind, what = ErrNotFound, fmt.Sprintf("revision %q not found in %s", r.uri.Ref, r.uri.Path)
	case code == "EntryNotFound":
		kind, what = ErrNotFound, "the file is not in this commit"
	case code == "GatedRepo":
		kind, what = ErrDenied, "the model is gated: "+r.hfDeniedHint()
	case off && (status == http.StatusForbidden || status == http.StatusUnauthorized):
		kind, what = ErrUnavailable, fmt.Sprintf("the download host the Hub redirected to refused the signed URL (%d); it may have expired", status)
	case status == http.StatusUnauthorized && resp.Header.Get("X-Error-Message") == "Invalid credentials in Authorization header":
		kind, what = ErrDenied, fmt.Sprintf("the Hub does not accept %s as a token (expired or revoked?); give a valid one, or none for a public model", hfTokenKey)
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		kind, what = ErrDenied, fmt.Sprintf("the Hub refused access (%d): %s", status, r.hfDeniedHint())
	case status == http.StatusNotFound:
		kind, what = ErrNotFound, "not found (404)"
	case status == http.StatusRequestedRangeNotSatisfiable:
		kind, what = ErrChanged, "the range is past the file's end (416): the file is not the size listed"
	case status == http.StatusTooManyRequests || status == http.StatusRequestTimeout || status >= 500:
		kind, what = ErrUnavailable, fmt.Sprintf("the Hub answered %s; retry later", http.StatusText(status))
	case status >= 300 && status < 400:
		kind, what = ErrUnavailable, fmt.Sprintf("unexpected redirect (%d)", status)
	default:
		kind, what = ErrInvalid, fmt.Sprintf("the Hub answered %d %s", status, http.StatusText(status))
	}
	if m := resp.Header.Get("X-Error-Message"); m != "" {
		what += fmt.Sprintf(" (the Hub says %q)", clip(m))
	}
	return &hfStatusError{kindError: kindError{kind: kind, msg: op + ": " + r.scrub(what)}, status: status, offOrigin: off}
}

// netError classifies a failed request or read. The URL is dropped from
// the text: a redirect's signed URL grants access to the file.
func (r *hfRemote) netError(op string, err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	kind := ErrUnavailable
	switch {
	case errors.Is(err, egress.ErrRefused):
		kind = ErrRefused
	case errors.Is(err, errHFDowngrade):
		kind = ErrRefused
	}
	return &kindError{kind: kind, msg: op + ": " + r.scrub(err.Error())}
}

func (r *hfRemote) scrub(s string) string {
	if r.token == "" {
		return s
	}
	return Scrub(strings.ReplaceAll(s, r.token, "[redacted]"), r.secrets)
}

// get GETs a Hub API URL for a JSON answer.
func (r *hfRemote) get(ctx context.Context, op, u string) (*http.Response, error) {
	return r.do(ctx, r.client, http.MethodGet, op, u, http.Header{"Accept": {"application/json"}}, http.StatusOK)
}
