package egress

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// Proxy is a SOCKS5 server (RFC 1928, CONNECT only, with RFC 1929
// username/password authentication) on loopback that opens every
// connection through its Guard. rclone is pointed at it with its
// http_proxy setting, which Go's HTTP transport honours for plain HTTP as
// well as HTTPS when the scheme is socks5: every request, every redirect
// and every signed URL a remote hands out becomes a CONNECT the Guard
// checks. SOCKS rather than an HTTP proxy because a SOCKS tunnel carries
// plain HTTP too, so bytes are only spliced between two sockets, never
// parsed or copied through user space.
//
// The password is random per process, so other processes sharing the
// node's loopback cannot borrow the plugin's egress. The user name carries
// the id of the request the connection is for, so that a refusal can be
// reported to that request with its host and rule.
type Proxy struct {
	guard    *Guard
	ln       net.Listener
	password string

	wg     sync.WaitGroup
	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]string // open connections → the remote they serve ("" before it authenticated)
}

// handshakeTimeout bounds a client's SOCKS negotiation; the connect that
// follows has the Guard's own timeouts.
const handshakeTimeout = 10 * time.Second

// Proxy returns the Guard's proxy, starting it on first use.
func (g *Guard) Proxy() (*Proxy, error) {
	g.proxyOnce.Do(func() { g.proxy, g.proxyErr = startProxy(g) })
	return g.proxy, g.proxyErr
}

// ProxyURL is the http_proxy value that sends a request's connections
// through the Guard, reporting refusals under id.
func (g *Guard) ProxyURL(id string) (string, error) {
	p, err := g.Proxy()
	if err != nil {
		return "", err
	}
	u := url.URL{Scheme: "socks5", User: url.UserPassword("r"+id, p.password), Host: p.ln.Addr().String()}
	return u.String(), nil
}

// CloseConns closes the connections the proxy holds for remote id (see
// Proxy.CloseConns). The remote's ProxyURL started the proxy already.
func (g *Guard) CloseConns(id string) {
	if p, err := g.Proxy(); err == nil {
		p.CloseConns(id)
	}
}

// Close stops the proxy, if it was started, and every connection through it.
func (g *Guard) Close() error {
	if g.proxy == nil {
		return nil
	}
	return g.proxy.Close()
}

func startProxy(g *Guard) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("starting the egress proxy on loopback: %w", err)
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		ln.Close()
		return nil, fmt.Errorf("egress proxy password: %w", err)
	}
	p := &Proxy{guard: g, ln: ln, password: hex.EncodeToString(b[:]), conns: map[net.Conn]string{}}
	p.wg.Add(1)
	go p.serve()
	return p, nil
}

// Addr is the proxy's loopback address.
func (p *Proxy) Addr() net.Addr { return p.ln.Addr() }

// Close stops accepting, cuts every tunnel and waits for them to end.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

func (p *Proxy) track(c net.Conn, id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = id
	return true
}

// CloseConns closes the upstream connections of remote id. The remote
// calls it once it has no request left: rclone's transports keep idle
// connections for a minute, one transport per remote (per request, since
// each carries its own credentials and proxy), so a burst of publishes
// would otherwise hold thousands of sockets, and the pipes that splice
// them, long after their downloads ended.
func (p *Proxy) CloseConns(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c, cid := range p.conns {
		if cid == id {
			c.Close()
		}
	}
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

func (p *Proxy) serve() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		if !p.track(c, "") {
			c.Close()
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.untrack(c)
			defer c.Close()
			p.handle(c)
		}()
	}
}

// SOCKS5 constants (RFC 1928, RFC 1929).
const (
	socksVersion     = 5
	authVersion      = 1
	methodUserPass   = 2
	methodNone       = 0xff
	cmdConnect       = 1
	atypIPv4         = 1
	atypDomain       = 3
	atypIPv6         = 4
	repSucceeded     = 0
	repFailure       = 1
	repNotAllowed    = 2
	repHostUnreach   = 4
	repRefused       = 5
	repCmdNotSupport = 7
	repAtypNotSupp   = 8
)

func (p *Proxy) handle(c net.Conn) {
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	id, ok := p.authenticate(c)
	if !ok {
		return
	}
	host, port, rep := readRequest(c)
	if rep != repSucceeded {
		reply(c, rep)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	target := net.JoinHostPort(host, strconv.Itoa(int(port)))
	// The handshake deadline does not bound the connect: the Guard's own
	// lookup and connect timeouts do.
	c.SetDeadline(time.Time{})
	up, err := p.guard.DialContext(ctx, "tcp", target)
	if err != nil {
		var refused *RefusedError
		switch {
		case errors.As(err, &refused):
			p.guard.record(id, refused)
			klog.InfoS("egress refused", "host", refused.Host, "address", refused.Addr, "rule", refused.Rule)
			reply(c, repNotAllowed)
		case errors.As(err, new(*LookupError)):
			reply(c, repHostUnreach)
		default:
			reply(c, repRefused)
		}
		return
	}
	if !p.track(up, id) {
		up.Close()
		return
	}
	defer p.untrack(up)
	defer up.Close()
	if reply(c, repSucceeded) != nil {
		return
	}
	splice(c, up)
}

// authenticate runs method negotiation and username/password
// authentication; the user name is "r<request id>".
func (p *Proxy) authenticate(c net.Conn) (id string, ok bool) {
	var hdr [2]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil || hdr[0] != socksVersion {
		return "", false
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(c, methods); err != nil {
		return "", false
	}
	offered := false
	for _, m := range methods {
		offered = offered || m == methodUserPass
	}
	if !offered {
		c.Write([]byte{socksVersion, methodNone})
		return "", false
	}
	if _, err := c.Write([]byte{socksVersion, methodUserPass}); err != nil {
		return "", false
	}
	var v [2]byte
	if _, err := io.ReadFull(c, v[:]); err != nil || v[0] != authVersion {
		return "", false
	}
	user := make([]byte, v[1])
	if _, err := io.ReadFull(c, user); err != nil {
		return "", false
	}
	var plen [1]byte
	if _, err := io.ReadFull(c, plen[:]); err != nil {
		return "", false
	}
	pass := make([]byte, plen[0])
	if _, err := io.ReadFull(c, pass); err != nil {
		return "", false
	}
	if subtle.ConstantTimeCompare(pass, []byte(p.password)) != 1 || len(user) == 0 || user[0] != 'r' {
		c.Write([]byte{authVersion, 1})
		return "", false
	}
	if _, err := c.Write([]byte{authVersion, 0}); err != nil {
		return "", false
	}
	return string(user[1:]), true
}

// readRequest reads a CONNECT request: its host (a name or an address)
// and port, or the reply code refusing it.
func readRequest(c net.Conn) (host string, port uint16, rep byte) {
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil || hdr[0] != socksVersion {
		return "", 0, repFailure
	}
	if hdr[1] != cmdConnect {
		return "", 0, repCmdNotSupport
	}
	switch hdr[3] {
	case atypIPv4, atypIPv6:
		b := make([]byte, 4)
		if hdr[3] == atypIPv6 {
			b = make([]byte, 16)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return "", 0, repFailure
		}
		host = net.IP(b).String()
	case atypDomain:
		var n [1]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return "", 0, repFailure
		}
		b := make([]byte, n[0])
		if _, err := io.ReadFull(c, b); err != nil {
			return "", 0, repFailure
		}
		host = string(b)
	default:
		return "", 0, repAtypNotSupp
	}
	var pb [2]byte
	if _, err := io.ReadFull(c, pb[:]); err != nil {
		return "", 0, repFailure
	}
	return host, binary.BigEndian.Uint16(pb[:]), repSucceeded
}

func reply(c net.Conn, rep byte) error {
	_, err := c.Write([]byte{socksVersion, rep, 0, atypIPv4, 0, 0, 0, 0, 0, 0})
	return err
}

// splice copies both ways until one side ends, then closes both: HTTP
// never half-closes, so an ended side means the exchange is over, and a
// remote must not keep a tunnel open after its client went away. Between
// two TCP sockets io.Copy uses splice(2), so the bytes never enter user
// space.
func splice(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		io.Copy(dst, src)
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	a.Close()
	b.Close()
	<-done
}
