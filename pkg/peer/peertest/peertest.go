// Package peertest serves a peer endpoint on loopback for tests, the way
// the node plugin serves it (peer.NewHTTPServer over TLS).
package peertest

import (
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"testing"

	"github.com/modelcache/modelcache/pkg/peer"
)

// ServeTLS serves h with tlsConf on a loopback port until the test ends,
// and returns its address.
func ServeTLS(t testing.TB, h http.Handler, tlsConf *tls.Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := peer.NewHTTPServer(h, tlsConf)
	done := make(chan error, 1)
	go func() { done <- hs.ServeTLS(ln, "", "") }()
	t.Cleanup(func() {
		_ = hs.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serving the peer endpoint: %v", err)
		}
	})
	return ln.Addr().String()
}
