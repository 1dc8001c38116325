package nodes

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
)

// Relay forwards TCP connections from a listener to one target and counts
// the bytes each way: the fleet puts one between every pair of nodes'
// peer ports (its clients reach it through a DNAT rule, so TLS still
// names the real peer), which is how a test knows exactly what each node
// read from each other node, and the API server's loopback port behind
// one in the hub.
type Relay struct {
	ln     net.Listener
	target string
	dial   func(ctx context.Context, network, addr string) (net.Conn, error)

	// Down counts bytes from the target to the clients, Up the other way.
	Down, Up atomic.Int64
	// Rate, when positive, caps Down in bytes a second over all of the
	// relay's connections: a test slows one peer down to act in the
	// middle of its transfer.
	Rate atomic.Int64

	mu     sync.Mutex
	conns  map[net.Conn]bool
	closed bool
	wg     sync.WaitGroup
	pace   testenv.Pacer // shared by the relay's connections
}

// newRelay serves ln, dialling target with dial for every connection.
func newRelay(ln net.Listener, target string, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *Relay {
	r := &Relay{ln: ln, target: target, dial: dial, conns: map[net.Conn]bool{}}
	r.wg.Go(r.serve)
	return r
}

// Addr is where the relay listens.
func (r *Relay) Addr() string { return r.ln.Addr().String() }

func (r *Relay) serve() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		if !r.track(c, true) {
			c.Close()
			return
		}
		r.wg.Go(func() { r.forward(c) })
	}
}

// track adds or removes a connection; false once the relay is closed.
func (r *Relay) track(c net.Conn, add bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if add && r.closed {
		return false
	}
	if add {
		r.conns[c] = true
	} else {
		delete(r.conns, c)
	}
	return true
}

func (r *Relay) forward(client net.Conn) {
	defer r.track(client, false)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	server, err := r.dial(ctx, "tcp", r.target)
	cancel()
	if err != nil {
		return // the client sees its connection closed, as a dead peer's
	}
	if !r.track(server, true) {
		server.Close()
		return
	}
	defer r.track(server, false)
	defer server.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.copy(server, client, &r.Up, false)
		closeWrite(server)
	}()
	r.copy(client, server, &r.Down, true)
	closeWrite(client)
	<-done
}

// copy moves bytes from src to dst, counting them, paced when down.
func (r *Relay) copy(dst, src net.Conn, n *atomic.Int64, down bool) {
	buf := make([]byte, 64<<10)
	for {
		k, err := src.Read(buf)
		if k > 0 {
			if rate := r.Rate.Load(); down && rate > 0 {
				r.pace.Take(int64(k), rate)
			}
			w, werr := dst.Write(buf[:k])
			n.Add(int64(w))
			if werr != nil {
				// The other side is gone: end both directions.
				src.Close()
				return
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				dst.Close()
			}
			return
		}
	}
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}

// Close stops accepting, cuts every connection and waits for the relay's
// goroutines.
func (r *Relay) Close() {
	r.mu.Lock()
	r.closed = true
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.ln.Close()
	r.wg.Wait()
}
