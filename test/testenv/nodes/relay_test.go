package nodes

import (
	"bytes"
	"io"
	"net"
	"testing"
)

// TestRelay_CountsBothWays: a relay forwards a connection to its target
// and counts the bytes each way exactly, so that the fleet's tests can
// assert on them.
func TestRelay_CountsBothWays(t *testing.T) {
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	reply := bytes.Repeat([]byte("peer bytes "), 100_000)
	go func() {
		c, err := target.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		req := make([]byte, 5)
		if _, err := io.ReadFull(c, req); err == nil {
			_, _ = c.Write(reply)
		}
	}()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var d net.Dialer
	r := newRelay(ln, target.Addr().String(), d.DialContext)
	defer r.Close()
	c, err := net.Dial("tcp", r.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("read %d bytes, %v; want the target's %d", len(got), err, len(reply))
	}
	if r.Up.Load() != 5 || r.Down.Load() != int64(len(reply)) {
		t.Errorf("counted %d up and %d down, want 5 and %d", r.Up.Load(), r.Down.Load(), len(reply))
	}
}
