package source

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// The endpoint guard keeps a tenant's endpoint from reaching the node
// itself (the "tenant configuration cannot reach the node" invariant): an endpoint whose host is, or resolves to, a
// loopback, link-local (cloud metadata), unspecified, multicast or node
// address is refused unless an operator allowed that address.
//
// The check runs at Resolve time, before anything is contacted. rclone
// resolves the host again when it connects, and follows redirects, so a
// name whose DNS answer changes between the two lookups (DNS rebinding) or
// a remote that redirects to a node address is not stopped here; that
// residual risk needs a network policy on the node plugin's egress.

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

// hostResolver is the part of net.Resolver the guard uses; tests inject a
// fake so that no test touches the network.
type hostResolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Option configures an Rclone resolver.
type Option func(*Rclone)

// WithAllowedEndpoints lets endpoints through the endpoint guard when every
// address they resolve to that would otherwise be refused lies in one of
// prefixes (an in-cluster MinIO on the node's own address, say).
func WithAllowedEndpoints(prefixes []netip.Prefix) Option {
	return func(r *Rclone) {
		r.allowed = append([]netip.Prefix(nil), prefixes...)
	}
}

// ParseAllowedEndpoints parses an operator's allow-list: CIDR prefixes
// ("127.0.0.1/32", "fd00::/8") or single addresses ("10.0.0.5", "::1").
// Empty entries are skipped.
func ParseAllowedEndpoints(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil || p.Addr().Zone() != "" {
				return nil, fmt.Errorf("%w: allowed endpoint %q is not an IP address or CIDR prefix (for example 10.0.0.5 or 127.0.0.1/32)", ErrInvalid, s)
			}
			if p.Addr().Is4In6() && p.Bits() >= 96 {
				p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return nil, fmt.Errorf("%w: allowed endpoint %q is not an IP address or CIDR prefix (for example 10.0.0.5 or 127.0.0.1/32)", ErrInvalid, s)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// metadataAddrs are cloud metadata services outside the link-local ranges.
var metadataAddrs = []netip.Addr{
	netip.MustParseAddr("fd00:ec2::254"),   // AWS instance metadata over IPv6
	netip.MustParseAddr("100.100.100.200"), // Alibaba Cloud metadata
}

var (
	thisNetwork = netip.MustParsePrefix("0.0.0.0/8") // "this host on this network": Linux connects it locally
	broadcast   = netip.MustParseAddr("255.255.255.255")
)

// forbiddenReason says why a resolved address may not be an endpoint, or ""
// when it may. The address is unmapped and without zone.
func forbiddenReason(a netip.Addr, node []netip.Addr) string {
	switch {
	case a.IsUnspecified() || thisNetwork.Contains(a):
		return "an unspecified address (%s), which reaches the node itself"
	case a.IsLoopback():
		return "a loopback address (%s), which reaches the node itself"
	case a.IsLinkLocalUnicast():
		return "a link-local address (%s), which could reach the node's metadata service"
	case a.IsMulticast() || a == broadcast:
		return "a multicast or broadcast address (%s)"
	}
	for _, m := range metadataAddrs {
		if a == m {
			return "a cloud metadata service address (%s), which could hand out the node's credentials"
		}
	}
	for _, n := range node {
		if a == n {
			return "one of the node's own addresses (%s), which reaches services on the node"
		}
	}
	return ""
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
func (r *Rclone) checkEndpoints(ctx context.Context, eps []endpoint) error {
	if len(eps) == 0 {
		return nil
	}
	ifaces := r.interfaceAddrs
	if ifaces == nil {
		ifaces = net.InterfaceAddrs
	}
	addrs, err := ifaces()
	if err != nil {
		return fmt.Errorf("%w: cannot read the node's own addresses to check the endpoint: %v", ErrUnavailable, err)
	}
	var node []netip.Addr
	for _, a := range addrs {
		var ip net.IP
		switch v := a.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		}
		if na, ok := netip.AddrFromSlice(ip); ok {
			node = append(node, na.Unmap())
		}
	}
	res := r.resolver
	if res == nil {
		res = net.DefaultResolver
	}
	ctx, cancel := context.WithTimeout(ctx, endpointLookupTimeout)
	defer cancel()
	for _, ep := range eps {
		if err := r.checkEndpoint(ctx, res, ep, node); err != nil {
			return err
		}
	}
	return nil
}

func (r *Rclone) checkEndpoint(ctx context.Context, res hostResolver, ep endpoint, node []netip.Addr) error {
	host := ep.URL.Hostname()
	verb := "resolves to"
	var addrs []netip.Addr
	name := strings.ToLower(strings.TrimSuffix(host, "."))
	switch a, err := netip.ParseAddr(host); {
	case err == nil:
		verb = "is"
		addrs = []netip.Addr{a}
	case name == "localhost" || strings.HasSuffix(name, ".localhost"):
		// RFC 6761: always the loopback interface, whatever DNS says.
		addrs = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	default:
		addrs, err = res.LookupNetIP(ctx, "ip", host)
		if err == nil && len(addrs) == 0 {
			err = errors.New("no addresses")
		}
		if err != nil {
			// Retryable: a Service created a moment later resolves.
			return fmt.Errorf("%w: cannot resolve endpoint %s (%s): %v", ErrUnavailable, ep.display(), ep.Key, lookupErrorText(err))
		}
	}
	for _, a := range addrs {
		a = a.WithZone("").Unmap()
		if r.endpointAllowed(a) {
			continue
		}
		if why := forbiddenReason(a, node); why != "" {
			return fmt.Errorf("%w: endpoint %s (%s) %s %s; an operator can allow it with --allow-endpoint",
				ErrInvalid, ep.display(), ep.Key, verb, fmt.Sprintf(why, a))
		}
	}
	return nil
}

func (r *Rclone) endpointAllowed(a netip.Addr) bool {
	for _, p := range r.allowed {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// lookupErrorText keeps a DNS error short and free of resolver internals.
func lookupErrorText(err error) string {
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		return "no such host"
	case errors.As(err, &dnsErr) && dnsErr.IsTimeout:
		return "DNS lookup timed out"
	case errors.As(err, &dnsErr):
		return "DNS lookup failed"
	}
	return err.Error()
}
