// Package egress decides where the node plugin may connect on a tenant's
// behalf, and enforces it when each connection is made: the host is
// resolved once, every address it resolves to is checked, and only a
// checked address is dialled. A redirect, a second request or a DNS answer
// that changes between lookups (rebinding) meets the same check as the
// first request, because the check sits where the socket is opened
// (the "tenant configuration cannot reach the node" invariant).
//
// rclone builds its own HTTP transports and offers no dialer hook, so its
// connections reach the Guard through a SOCKS5 proxy on loopback (Proxy)
// that its per-request configuration points at; clients of our own dial
// through Guard.DialContext directly.
package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// ErrRefused is wrapped by every RefusedError.
var ErrRefused = errors.New("connection refused by the node's egress rules")

// RefusedError says which host and address a connection was refused to,
// and by which rule.
type RefusedError struct {
	Host string     // the name or address asked for
	Addr netip.Addr // the address the rule refused
	Rule string     // the rule's name, e.g. "loopback" or "deny-endpoint 10.96.0.0/12"
	Why  string     // what the rule protects, for people
}

func (e *RefusedError) Error() string {
	if e.Host == e.Addr.String() {
		return fmt.Sprintf("connecting to %s is refused by the rule %s: %s; an operator can allow it with --allow-endpoint", e.Host, e.Rule, e.Why)
	}
	return fmt.Sprintf("connecting to %s is refused: it resolves to %s, refused by the rule %s: %s; an operator can allow it with --allow-endpoint", e.Host, e.Addr, e.Rule, e.Why)
}

func (e *RefusedError) Unwrap() error { return ErrRefused }

// Policy is what an operator sets.
type Policy struct {
	// Allow lists addresses a tenant may reach although a rule below
	// would refuse them (an in-node MinIO, say). It wins over every rule.
	Allow []netip.Prefix
	// Deny lists further ranges to refuse: the cluster's pod and service
	// ranges, a private network the nodes sit in.
	Deny []netip.Prefix
	// HostIPs are the node's addresses as Kubernetes knows them
	// (status.hostIP). The plugin's own interfaces are read as well, but in
	// a pod network they are the pod's, not the node's.
	HostIPs []netip.Addr
}

// Resolver is the part of net.Resolver the Guard uses; tests inject a fake.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Option changes how a Guard finds things out.
type Option func(*Guard)

// WithResolver replaces net.DefaultResolver.
func WithResolver(r Resolver) Option { return func(g *Guard) { g.resolver = r } }

// WithInterfaceAddrs replaces net.InterfaceAddrs.
func WithInterfaceAddrs(f func() ([]net.Addr, error)) Option {
	return func(g *Guard) { g.interfaceAddrs = f }
}

// WithDialer replaces the dialer that opens checked connections (tests
// record what is dialled).
func WithDialer(d func(ctx context.Context, network, addr string) (net.Conn, error)) Option {
	return func(g *Guard) { g.dial = d }
}

const (
	// lookupTimeout bounds one DNS lookup of a connection's host.
	lookupTimeout = 10 * time.Second
	// connectTimeout bounds opening one TCP connection, as rclone's
	// --contimeout does.
	connectTimeout = 60 * time.Second
	// interfacesTTL is how long the node's interface addresses are reused:
	// reading them is a netlink dump, and a connection is made per request.
	interfacesTTL = 10 * time.Second
	// refusalsTTL is how long a refusal is kept for the request that
	// caused it to report.
	refusalsTTL = 10 * time.Minute
)

// Guard checks and opens connections made on a tenant's behalf.
type Guard struct {
	policy         Policy
	resolver       Resolver
	interfaceAddrs func() ([]net.Addr, error)
	dial           func(ctx context.Context, network, addr string) (net.Conn, error)

	mu       sync.Mutex
	ifaces   []netip.Addr
	ifacesAt time.Time
	refusals map[string]refusal

	proxyOnce sync.Once
	proxy     *Proxy
	proxyErr  error
}

type refusal struct {
	err *RefusedError
	at  time.Time
}

// New returns a Guard enforcing p.
func New(p Policy, opts ...Option) *Guard {
	g := &Guard{policy: p, refusals: map[string]refusal{}}
	for _, o := range opts {
		o(g)
	}
	if g.resolver == nil {
		g.resolver = net.DefaultResolver
	}
	if g.interfaceAddrs == nil {
		g.interfaceAddrs = net.InterfaceAddrs
	}
	if g.dial == nil {
		d := &net.Dialer{Timeout: connectTimeout, KeepAlive: 30 * time.Second}
		g.dial = d.DialContext
	}
	return g
}

// metadataAddrs are cloud metadata services outside the link-local ranges
// (AWS's IPv4 one, 169.254.169.254, is link-local).
var metadataAddrs = []netip.Addr{
	netip.MustParseAddr("fd00:ec2::254"),   // AWS instance metadata over IPv6
	netip.MustParseAddr("100.100.100.200"), // Alibaba Cloud metadata
}

var (
	thisNetwork = netip.MustParsePrefix("0.0.0.0/8") // "this host on this network": Linux connects it locally
	broadcast   = netip.MustParseAddr("255.255.255.255")
	// nat64 is the well-known NAT64 prefix (RFC 6052): 64:ff9b::a9fe:a9fe
	// reaches 169.254.169.254 on a node with a NAT64 gateway.
	nat64 = netip.MustParsePrefix("64:ff9b::/96")
)

// Check says whether a may be connected to for a tenant: nil, or the rule
// that refuses it. host is what was asked for, for the message.
func (g *Guard) Check(host string, a netip.Addr) error {
	a = a.WithZone("").Unmap()
	for _, p := range g.policy.Allow {
		if p.Contains(a) {
			return nil
		}
	}
	rule, why := g.rule(a)
	if rule == "" && nat64.Contains(a) {
		b := a.As16()
		rule, why = g.rule(netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]}))
		if rule != "" {
			rule = "nat64 " + rule
		}
	}
	if rule == "" {
		return nil
	}
	return &RefusedError{Host: host, Addr: a, Rule: rule, Why: why}
}

// rule names the rule refusing a, or "".
func (g *Guard) rule(a netip.Addr) (rule, why string) {
	switch {
	case a.IsUnspecified() || thisNetwork.Contains(a):
		return "unspecified", "it reaches the node itself"
	case a.IsLoopback():
		return "loopback", "it reaches the node itself"
	case a.IsLinkLocalUnicast():
		return "link-local", "it reaches the node's cloud metadata service (169.254.169.254) and link-local services"
	case a.IsMulticast() || a == broadcast:
		return "multicast", "it is not one host"
	}
	for _, m := range metadataAddrs {
		if a == m {
			return "cloud-metadata", "it could hand out the node's cloud credentials"
		}
	}
	for _, h := range g.policy.HostIPs {
		if a == h.Unmap() {
			return "node-address", "it reaches services on the node (kubelet, host-network daemons)"
		}
	}
	node, err := g.nodeAddrs()
	if err != nil {
		// Fail closed: no address can be shown not to be the node's.
		return "node-address", fmt.Sprintf("the node's own addresses cannot be read (%v), so no address can be shown not to be one of them", err)
	}
	for _, n := range node {
		if a == n {
			return "node-address", "it reaches services on the node (kubelet, host-network daemons)"
		}
	}
	for _, p := range g.policy.Deny {
		if p.Contains(a) {
			return "deny-endpoint " + p.String(), "the operator refused this range (--deny-endpoint)"
		}
	}
	return "", ""
}

// nodeAddrs are this host's interface addresses, re-read at most every
// interfacesTTL. An error reading them keeps the last set read, if any.
func (g *Guard) nodeAddrs() ([]netip.Addr, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ifaces != nil && time.Since(g.ifacesAt) < interfacesTTL {
		return g.ifaces, nil
	}
	addrs, err := g.interfaceAddrs()
	if err != nil {
		if g.ifaces != nil {
			return g.ifaces, nil
		}
		return nil, err
	}
	out := []netip.Addr{}
	for _, a := range addrs {
		var ip net.IP
		switch v := a.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		}
		if na, ok := netip.AddrFromSlice(ip); ok {
			out = append(out, na.Unmap())
		}
	}
	g.ifaces, g.ifacesAt = out, time.Now()
	return out, nil
}

// NodeAddrsReadable reports whether the node's own addresses can be read.
// Without them every connection is refused, so a caller may prefer to say
// so as a retryable failure first.
func (g *Guard) NodeAddrsReadable() error {
	_, err := g.nodeAddrs()
	return err
}

// LookupError is a failed DNS lookup of a connection's host. It is
// retryable: a Service created a moment later resolves.
type LookupError struct {
	Host string
	Err  error
}

func (e *LookupError) Error() string {
	return fmt.Sprintf("cannot resolve %s: %s", e.Host, lookupErrorText(e.Err))
}

func (e *LookupError) Unwrap() error { return e.Err }

// Resolve returns every address host stands for, each checked: one refused
// address refuses the host, so that an answer mixing a public and a
// refused address cannot be used to reach the refused one.
func (g *Guard) Resolve(ctx context.Context, host string) ([]netip.Addr, error) {
	var addrs []netip.Addr
	name := strings.ToLower(strings.TrimSuffix(host, "."))
	switch a, err := netip.ParseAddr(strings.Trim(host, "[]")); {
	case err == nil:
		addrs = []netip.Addr{a}
	case name == "localhost" || strings.HasSuffix(name, ".localhost"):
		// RFC 6761: always the loopback interface, whatever DNS says.
		addrs = []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	default:
		lctx, cancel := context.WithTimeout(ctx, lookupTimeout)
		addrs, err = g.resolver.LookupNetIP(lctx, "ip", host)
		cancel()
		if err == nil && len(addrs) == 0 {
			err = errors.New("no addresses")
		}
		if err != nil {
			return nil, &LookupError{Host: host, Err: err}
		}
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if err := g.Check(host, a); err != nil {
			return nil, err
		}
		out = append(out, a.WithZone("").Unmap())
	}
	return out, nil
}

// DialContext opens a TCP connection to address (host:port) for a tenant:
// the host is resolved once, every address checked, and only checked
// addresses dialled, in the resolver's order.
func (g *Guard) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return nil, fmt.Errorf("egress: network %q is not allowed", network)
	}
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return nil, fmt.Errorf("egress: %w", err)
	}
	port, err := net.LookupPort("tcp", portStr)
	if err != nil {
		return nil, fmt.Errorf("egress: port of %s: %w", address, err)
	}
	addrs, err := g.Resolve(ctx, host)
	if err != nil {
		return nil, err
	}
	var first error
	for _, a := range addrs {
		if (network == "tcp4" && !a.Is4()) || (network == "tcp6" && !a.Is6()) {
			continue
		}
		c, err := g.dial(ctx, network, netip.AddrPortFrom(a, uint16(port)).String())
		if err == nil {
			return c, nil
		}
		if first == nil {
			first = err
		}
		if ctx.Err() != nil {
			break
		}
	}
	if first == nil {
		first = fmt.Errorf("egress: %s has no %s address", host, network)
	}
	return nil, first
}

// record keeps a refusal for the request id that caused it, so that the
// request can report the host and rule instead of its client's error.
func (g *Guard) record(id string, err *RefusedError) {
	if id == "" {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	now := time.Now()
	for k, r := range g.refusals {
		if now.Sub(r.at) > refusalsTTL {
			delete(g.refusals, k)
		}
	}
	g.refusals[id] = refusal{err: err, at: now}
}

// Refused returns the last connection refused for request id, or nil.
func (g *Guard) Refused(id string) *RefusedError {
	g.mu.Lock()
	defer g.mu.Unlock()
	r, ok := g.refusals[id]
	if !ok || time.Since(r.at) > refusalsTTL {
		return nil
	}
	return r.err
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

// ParsePrefixes parses an operator's list of CIDR prefixes ("127.0.0.1/32",
// "fd00::/8") or single addresses ("10.0.0.5", "::1"). Empty entries are
// skipped. flagName names the flag in messages.
func ParsePrefixes(flagName string, list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil || p.Addr().Zone() != "" {
				return nil, fmt.Errorf("%s %q is not an IP address or CIDR prefix (for example 10.0.0.5 or 127.0.0.1/32)", flagName, s)
			}
			if p.Addr().Is4In6() && p.Bits() >= 96 {
				p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return nil, fmt.Errorf("%s %q is not an IP address or CIDR prefix (for example 10.0.0.5 or 127.0.0.1/32)", flagName, s)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// ParseAddrs parses a list of single addresses (the node's host IPs).
func ParseAddrs(flagName string, list []string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range list {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return nil, fmt.Errorf("%s %q is not an IP address", flagName, s)
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}

// GuardDefaultTransport makes http.DefaultTransport dial through g and
// ignore proxy variables: some of rclone's authentication paths (a GCS
// access token, say) build their clients on it rather than on rclone's own
// transport, and they too connect where a tenant's configuration says.
// Only a process that connects nowhere else through the default transport
// may call it (the node plugin: client-go builds its own transports).
func GuardDefaultTransport(g *Guard) {
	t := http.DefaultTransport.(*http.Transport)
	t.Proxy = nil
	t.DialContext = g.DialContext
}
