package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
)

// fakeDNS answers each lookup of a name with the next of its answers (the
// last one repeats), the way a rebinding DNS server changes its answer
// between a check and a connect.
type fakeDNS struct {
	mu      sync.Mutex
	answers map[string][][]string
	lookups map[string]int
}

func (d *fakeDNS) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	seq, ok := d.answers[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	if d.lookups == nil {
		d.lookups = map[string]int{}
	}
	i := min(d.lookups[host], len(seq)-1)
	d.lookups[host]++
	var out []netip.Addr
	for _, s := range seq[i] {
		out = append(out, netip.MustParseAddr(s))
	}
	return out, nil
}

func ifaces(cidrs ...string) func() ([]net.Addr, error) {
	return func() ([]net.Addr, error) {
		var out []net.Addr
		for _, c := range cidrs {
			ip, n, err := net.ParseCIDR(c)
			if err != nil {
				return nil, err
			}
			n.IP = ip
			out = append(out, n)
		}
		return out, nil
	}
}

// recordingDialer records every address dialled and connects nowhere.
type recordingDialer struct {
	mu     sync.Mutex
	dialed []string
}

func (d *recordingDialer) dial(_ context.Context, _, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.dialed = append(d.dialed, addr)
	d.mu.Unlock()
	a, b := net.Pipe()
	b.Close()
	return a, nil
}

func TestCheck(t *testing.T) {
	g := New(Policy{
		Allow:   []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32"), netip.MustParsePrefix("10.96.5.0/24")},
		Deny:    []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12"), netip.MustParsePrefix("fd10::/64")},
		HostIPs: []netip.Addr{netip.MustParseAddr("192.168.1.20")},
	}, WithInterfaceAddrs(ifaces("127.0.0.1/8", "10.244.1.7/24", "fe80::1/64")))
	for _, tc := range []struct {
		addr string
		rule string // "" when allowed
	}{
		{"93.184.215.14", ""},
		{"2606:2800:21f:cb07:6820:80da:af6b:8b2c", ""},
		{"127.0.0.1", ""}, // allowed by the operator
		{"127.0.0.2", "loopback"},
		{"::1", "loopback"},
		{"::ffff:127.0.0.2", "loopback"},
		{"0.0.0.0", "unspecified"},
		{"0.1.2.3", "unspecified"},
		{"::", "unspecified"},
		{"169.254.169.254", "link-local"},
		{"169.254.170.2", "link-local"}, // ECS task credentials
		{"fe80::a9fe:a9fe", "link-local"},
		{"fd00:ec2::254", "cloud-metadata"},
		{"100.100.100.200", "cloud-metadata"},
		{"64:ff9b::a9fe:a9fe", "nat64 link-local"},
		{"64:ff9b::5db8:d70e", ""}, // NAT64 of a public address
		{"224.0.0.1", "multicast"},
		{"255.255.255.255", "multicast"},
		{"192.168.1.20", "node-address"}, // the host IP from the downward API
		{"10.244.1.7", "node-address"},   // an interface of this process
		{"10.96.0.10", "deny-endpoint 10.96.0.0/12"},
		{"10.96.5.9", ""}, // the allow-list wins over --deny-endpoint
		{"fd10::5", "deny-endpoint fd10::/64"},
	} {
		err := g.Check(tc.addr, netip.MustParseAddr(tc.addr))
		var refused *RefusedError
		switch {
		case tc.rule == "" && err != nil:
			t.Errorf("Check(%s) = %v, want allowed", tc.addr, err)
		case tc.rule != "" && (!errors.As(err, &refused) || refused.Rule != tc.rule):
			t.Errorf("Check(%s) = %v, want refused by %q", tc.addr, err, tc.rule)
		case tc.rule != "" && (!errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.rule)):
			t.Errorf("Check(%s) = %q: not ErrRefused, or does not name the rule", tc.addr, err)
		}
	}
}

// A resolver answering a public address first and the metadata address
// after (DNS rebinding) never gets a connection to the metadata address:
// each connection resolves once and dials exactly what it checked.
func TestDialContextRebinding(t *testing.T) {
	dns := &fakeDNS{answers: map[string][][]string{
		"rebind.example": {{"93.184.215.14"}, {"169.254.169.254"}},
		"mixed.example":  {{"93.184.215.14", "127.0.0.1"}},
	}}
	d := &recordingDialer{}
	g := New(Policy{}, WithResolver(dns), WithInterfaceAddrs(ifaces("127.0.0.1/8")), WithDialer(d.dial))

	c, err := g.DialContext(context.Background(), "tcp", "rebind.example:443")
	if err != nil {
		t.Fatalf("first connection: %v", err)
	}
	c.Close()
	_, err = g.DialContext(context.Background(), "tcp", "rebind.example:443")
	var refused *RefusedError
	if !errors.As(err, &refused) || refused.Addr != netip.MustParseAddr("169.254.169.254") || refused.Host != "rebind.example" {
		t.Fatalf("second connection after rebinding = %v, want refused naming the host and 169.254.169.254", err)
	}
	// One answer with a refused address refuses the host, though another
	// address in it is allowed.
	if _, err := g.DialContext(context.Background(), "tcp", "mixed.example:80"); !errors.As(err, &refused) || refused.Rule != "loopback" {
		t.Fatalf("mixed answer = %v, want refused by loopback", err)
	}
	if want := []string{"93.184.215.14:443"}; strings.Join(d.dialed, ",") != strings.Join(want, ",") {
		t.Errorf("dialled %v, want exactly %v", d.dialed, want)
	}
	if n := dns.lookups["rebind.example"]; n != 2 {
		t.Errorf("rebind.example looked up %d times for two connections, want once each", n)
	}
}

func TestDialContextRefusesLiteralsAndOtherNetworks(t *testing.T) {
	d := &recordingDialer{}
	g := New(Policy{}, WithResolver(&fakeDNS{}), WithInterfaceAddrs(ifaces("127.0.0.1/8")), WithDialer(d.dial))
	for _, addr := range []string{"169.254.169.254:80", "[::1]:9000", "[::ffff:127.0.0.1]:80", "localhost:80", "app.localhost:80"} {
		if _, err := g.DialContext(context.Background(), "tcp", addr); !errors.Is(err, ErrRefused) {
			t.Errorf("DialContext(%s) = %v, want ErrRefused", addr, err)
		}
	}
	if _, err := g.DialContext(context.Background(), "udp", "93.184.215.14:53"); err == nil {
		t.Error("DialContext(udp) succeeded; only TCP is dialled for tenants")
	}
	var lookup *LookupError
	if _, err := g.DialContext(context.Background(), "tcp", "nowhere.example:80"); !errors.As(err, &lookup) {
		t.Errorf("DialContext(unknown host) = %v, want a LookupError", err)
	}
	if len(d.dialed) != 0 {
		t.Errorf("dialled %v, want nothing", d.dialed)
	}
}

// Without the node's own addresses no address can be shown not to be one:
// the guard refuses everything rather than guess.
func TestCheckFailsClosedWithoutInterfaces(t *testing.T) {
	g := New(Policy{}, WithInterfaceAddrs(func() ([]net.Addr, error) { return nil, errors.New("netlink: permission denied") }))
	if err := g.Check("93.184.215.14", netip.MustParseAddr("93.184.215.14")); !errors.Is(err, ErrRefused) {
		t.Errorf("Check with unreadable interfaces = %v, want refused", err)
	}
	if err := g.NodeAddrsReadable(); err == nil {
		t.Error("NodeAddrsReadable = nil, want the netlink error")
	}
}

func TestParsePrefixes(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string
	}{
		{[]string{"10.96.0.0/12", " fd00::/8 ", "", "10.0.0.5", "::ffff:169.254.0.0/112", "10.1.2.3/16"}, "[10.96.0.0/12 fd00::/8 10.0.0.5/32 169.254.0.0/16 10.1.0.0/16]"},
		{[]string{"127.0.0.1/32", "10.0.0.5", "::1", " fd00::/8 ", "", "10.1.2.3/16", "::ffff:169.254.169.254"}, "[127.0.0.1/32 10.0.0.5/32 ::1/128 fd00::/8 10.1.0.0/16 169.254.169.254/32]"},
	} {
		got, err := ParsePrefixes("--deny-endpoint", tc.in)
		if err != nil {
			t.Fatal(err)
		}
		if s := fmt.Sprint(got); s != tc.want {
			t.Errorf("ParsePrefixes(%q) = %s, want %s", tc.in, s, tc.want)
		}
	}
	for _, bad := range []string{"10.0.0.0/33", "example.com", "fe80::1%eth0", "10.0.0.1/", "localhost", "10.0.0.300", "http://10.0.0.1", "10.0.0.1:9000", "*"} {
		_, err := ParsePrefixes("--allow-endpoint", []string{"10.0.0.1", bad})
		if err == nil || !strings.Contains(err.Error(), "--allow-endpoint") || !strings.Contains(err.Error(), bad) {
			t.Errorf("ParsePrefixes(%q) = %v, want an error naming the flag and the entry", bad, err)
		}
	}
}
