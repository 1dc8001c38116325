package egress

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/net/proxy"
)

// countingListener counts the TCP connections that reach it.
type countingListener struct {
	net.Listener
	accepted atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

// fakeMetadata is a stand-in for a cloud metadata service on an address
// the guard refuses (127.0.0.2: loopback, like 169.254.169.254 a range a
// tenant may not reach), handing out "credentials" to whoever connects.
func fakeMetadata(t *testing.T) (*countingListener, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2: %v", err)
	}
	cl := &countingListener{Listener: ln}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, `{"AccessKeyId":"ASIANODEROLE","SecretAccessKey":"node-role-secret"}`)
	})}
	go srv.Serve(cl)
	t.Cleanup(func() { srv.Close() })
	return cl, "http://" + ln.Addr().String() + "/latest/meta-data/iam/security-credentials/node-role"
}

func newTestGuard(t *testing.T) *Guard {
	t.Helper()
	// Only 127.0.0.1 is allowed, as the tests' loopback servers need.
	g := New(Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}})
	t.Cleanup(func() { g.Close() })
	return g
}

// proxiedClient is an HTTP client configured as rclone configures its
// transports from http_proxy: Go's own SOCKS5 client.
func proxiedClient(t *testing.T, g *Guard, id string) *http.Client {
	t.Helper()
	raw, err := g.ProxyURL(id)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{Proxy: http.ProxyURL(u)}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// A redirect from an allowed server to the metadata address is followed
// by the client, and refused by the proxy before any connection reaches
// it; the refusal is kept for the request that made it.
func TestProxyRefusesRedirects(t *testing.T) {
	for _, code := range []int{http.StatusFound, http.StatusTemporaryRedirect} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			meta, metaURL := fakeMetadata(t)
			hostile := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/ok" {
					io.WriteString(w, "model bytes")
					return
				}
				http.Redirect(w, r, metaURL, code)
			}))
			defer hostile.Close()
			g := newTestGuard(t)
			c := proxiedClient(t, g, "req1")

			resp, err := c.Get(hostile.URL + "/ok")
			if err != nil {
				t.Fatalf("GET of an allowed server through the proxy: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) != "model bytes" {
				t.Fatalf("body %q, want the server's", body)
			}

			resp, err = c.Get(hostile.URL + "/bucket/weights.bin")
			if err == nil {
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				t.Fatalf("redirect to %s was followed: %d %q", metaURL, resp.StatusCode, body)
			}
			if n := meta.accepted.Load(); n != 0 {
				t.Errorf("%d connections reached the metadata stand-in, want none", n)
			}
			refused := g.Refused("req1")
			if refused == nil || refused.Rule != "loopback" || refused.Addr != netip.MustParseAddr("127.0.0.2") {
				t.Fatalf("Refused(req1) = %v, want the loopback rule for 127.0.0.2", refused)
			}
			if g.Refused("another request") != nil {
				t.Error("a refusal is reported to a request that made none")
			}
		})
	}
}

// The proxy speaks SOCKS5 as golang.org/x/net/proxy's client does, and
// refuses clients without its password.
func TestProxyWithOfficialClient(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "hello") }))
	defer srv.Close()
	meta, _ := fakeMetadata(t)
	g := newTestGuard(t)
	p, err := g.Proxy()
	if err != nil {
		t.Fatal(err)
	}
	target := strings.TrimPrefix(srv.URL, "http://")

	d, err := proxy.SOCKS5("tcp", p.Addr().String(), &proxy.Auth{User: "rx", Password: p.password}, proxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.(proxy.ContextDialer).DialContext(context.Background(), "tcp", target)
	if err != nil {
		t.Fatalf("CONNECT %s: %v", target, err)
	}
	fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: x\r\n\r\n")
	b, _ := io.ReadAll(c)
	c.Close()
	if !strings.HasSuffix(string(b), "hello") {
		t.Errorf("response through the tunnel %q, want the server's", b)
	}

	if _, err := d.(proxy.ContextDialer).DialContext(context.Background(), "tcp", meta.Addr().String()); err == nil {
		t.Error("CONNECT to the metadata stand-in succeeded")
	}
	for _, auth := range []*proxy.Auth{nil, {User: "rx", Password: "wrong"}, {User: "x", Password: p.password}} {
		bad, _ := proxy.SOCKS5("tcp", p.Addr().String(), auth, proxy.Direct)
		if _, err := bad.(proxy.ContextDialer).DialContext(context.Background(), "tcp", target); err == nil {
			t.Errorf("CONNECT with auth %+v succeeded, want refused", auth)
		}
	}
	if n := meta.accepted.Load(); n != 0 {
		t.Errorf("%d connections reached the metadata stand-in, want none", n)
	}
}

// Closing the guard cuts tunnels in use.
func TestProxyClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(io.Discard, c) // holds the tunnel open
		}
	}()
	g := New(Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}})
	p, err := g.Proxy()
	if err != nil {
		t.Fatal(err)
	}
	d, _ := proxy.SOCKS5("tcp", p.Addr().String(), &proxy.Auth{User: "rx", Password: p.password}, proxy.Direct)
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && err == nil {
		t.Errorf("read from a tunnel after Close = %v, want it cut", err)
	}
}

// BenchmarkProxy compares a 64 MiB GET from a loopback server direct and
// through the proxy: what every rclone connection pays for the check.
func BenchmarkProxy(b *testing.B) {
	body := make([]byte, 64<<20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write(body) }))
	defer srv.Close()
	g := New(Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}})
	defer g.Close()
	raw, err := g.ProxyURL("bench")
	if err != nil {
		b.Fatal(err)
	}
	pu, _ := url.Parse(raw)
	for _, tc := range []struct {
		name  string
		proxy func(*http.Request) (*url.URL, error)
	}{{"direct", nil}, {"proxied", http.ProxyURL(pu)}} {
		b.Run(tc.name, func(b *testing.B) {
			tr := &http.Transport{Proxy: tc.proxy}
			defer tr.CloseIdleConnections()
			c := &http.Client{Transport: tr}
			b.SetBytes(int64(len(body)))
			for b.Loop() {
				resp, err := c.Get(srv.URL)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		})
	}
}

// Closing a remote's connections before the proxy ever started leaves the
// proxy startable: the next remote still gets a proxy URL.
func TestCloseConnsBeforeProxyStarted(t *testing.T) {
	g := New(Policy{Allow: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}})
	defer g.Close()
	g.CloseConns("early")
	u, err := g.ProxyURL("next")
	if err != nil || !strings.HasPrefix(u, "socks5://rnext:") {
		t.Fatalf("ProxyURL after an early CloseConns = %q, %v; want a socks5 URL for rnext", u, err)
	}
}
