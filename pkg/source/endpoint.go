package source

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/modelcache/modelcache/pkg/egress"
)

// The endpoint check refuses, when a model is resolved, an endpoint whose
// host is, or resolves to, an address the egress rules refuse (loopback,
// link-local and cloud metadata, the node's own addresses, the operator's
// --deny-endpoint ranges), unless an operator allowed it: bad input is
// refused before anything connects. It is the early half of the "tenant
// configuration cannot reach the node" invariant. The other half is
// pkg/egress: every connection made for the model, to this endpoint or
// wherever a redirect or a later DNS answer leads, is checked again when it
// is made.

// endpointLookupTimeout bounds the DNS lookups of one Resolve.
const endpointLookupTimeout = 10 * time.Second

// endpoint is a URL a backend will connect to, and the secret key (or
// "modelUri") it came from, for messages.
type endpoint struct {
	Key string
	URL *url.URL
}

// display shows an endpoint without user info, path or query: they may
// carry credentials (an Azure SAS URL's signature, say).
func (e endpoint) display() string {
	return (&url.URL{Scheme: e.URL.Scheme, Host: e.URL.Host}).String()
}

// Option configures a Sources resolver.
type Option func(*Sources)

// WithEgress makes every connection of the resolver's remotes go through g
// (the node plugin passes its one Guard). Without it a resolver builds its
// own from WithAllowedEndpoints.
func WithEgress(g *egress.Guard) Option {
	return func(r *Sources) { r.guard = g }
}

// WithAllowedEndpoints lets endpoints through the egress rules when every
// address they resolve to that would otherwise be refused lies in one of
// prefixes (an in-cluster MinIO on the node's own address, say). It is
// ignored when WithEgress gives a Guard.
func WithAllowedEndpoints(prefixes []netip.Prefix) Option {
	return func(r *Sources) {
		r.allowed = append([]netip.Prefix(nil), prefixes...)
	}
}

var (
	hostLabel    = regexp.MustCompile(`^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$`)
	numericLabel = regexp.MustCompile(`^([0-9]+|0[xX][0-9A-Fa-f]*)$`)
)

// checkHostname reports why host is not a usable DNS name, or "". A last
// label that is a number is refused: resolvers that follow inet_aton read
// "127.1", "2130706433" or "0x7f.1" as addresses.
func checkHostname(host string) string {
	name := strings.TrimSuffix(host, ".")
	if name == "" || len(name) > 253 {
		return "is not a valid host name"
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if !hostLabel.MatchString(l) {
			return "is not a valid host name"
		}
	}
	if numericLabel.MatchString(labels[len(labels)-1]) {
		return "looks like an IP address written in a non-standard form"
	}
	return ""
}

// checkPort reports whether port, when given, is a TCP port number.
func checkPort(port string) bool {
	if port == "" {
		return true
	}
	n, err := strconv.Atoi(port)
	return err == nil && n >= 1 && n <= 65535 && strconv.Itoa(n) == port
}

// parseEndpointURL checks that value is an http(s) (or, with httpsOnly,
// https) URL with a usable host. Its messages name key, never the value,
// which may carry credentials.
func parseEndpointURL(key, value string, httpsOnly bool) (endpoint, error) {
	want := "an http(s) URL"
	if httpsOnly {
		want = "an https:// URL"
	}
	u, err := url.Parse(value)
	if err != nil || u.Host == "" || u.Opaque != "" || (u.Scheme != "https" && (httpsOnly || u.Scheme != "http")) {
		return endpoint{}, fmt.Errorf("%w: endpoint in %s is not %s", ErrInvalid, key, want)
	}
	host := u.Hostname()
	if !checkPort(u.Port()) {
		return endpoint{}, fmt.Errorf("%w: endpoint in %s has an invalid port", ErrInvalid, key)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if strings.HasPrefix(u.Host, "[") != a.Is6() {
			return endpoint{}, fmt.Errorf("%w: endpoint in %s has an invalid host", ErrInvalid, key)
		}
		return endpoint{Key: key, URL: u}, nil
	}
	if why := checkHostname(host); why != "" {
		return endpoint{}, fmt.Errorf("%w: endpoint in %s: host %q %s", ErrInvalid, key, host, why)
	}
	return endpoint{Key: key, URL: u}, nil
}

// checkEndpoints refuses any endpoint of cfg that is, or resolves to, an
// address the node must not connect to for a tenant. It looks host names up
// in DNS but never contacts the endpoints themselves.
func (r *Sources) checkEndpoints(ctx context.Context, eps []endpoint) error {
	if len(eps) == 0 {
		return nil
	}
	g := r.egress()
	if err := g.NodeAddrsReadable(); err != nil {
		return fmt.Errorf("%w: cannot read the node's own addresses to check the endpoint: %v", ErrUnavailable, err)
	}
	ctx, cancel := context.WithTimeout(ctx, endpointLookupTimeout)
	defer cancel()
	for _, ep := range eps {
		_, err := g.Resolve(ctx, ep.URL.Hostname())
		var refused *egress.RefusedError
		var lookup *egress.LookupError
		switch {
		case errors.As(err, &refused):
			verb := "resolves to"
			if refused.Host == refused.Addr.String() {
				verb = "is"
			}
			return fmt.Errorf("%w: endpoint %s (%s) %s %s, which the rule %s refuses: %s; an operator can allow it with --allow-endpoint",
				ErrInvalid, ep.display(), ep.Key, verb, refused.Addr, refused.Rule, refused.Why)
		case errors.As(err, &lookup):
			// Retryable: a Service created a moment later resolves.
			return fmt.Errorf("%w: cannot resolve endpoint %s (%s): %s", ErrUnavailable, ep.display(), ep.Key, lookupText(lookup))
		case err != nil:
			return fmt.Errorf("%w: checking endpoint %s (%s): %v", ErrUnavailable, ep.display(), ep.Key, err)
		}
	}
	return nil
}

// lookupText is a lookup error without the host, which the caller names
// with its secret key.
func lookupText(e *egress.LookupError) string {
	return strings.TrimPrefix(e.Error(), "cannot resolve "+e.Host+": ")
}
