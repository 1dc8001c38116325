package peer_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/modelcache/modelcache/pkg/peer"
)

// TestClient_AgainstServer: the client reads what the server serves, and
// maps its refusals to the client's errors.
func TestClient_AgainstServer(t *testing.T) {
	p := startPeer(t, peer.Config{Objects: mapObjects{blobs: map[string]string{}}})
	content := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	sum := p.blobs.put(t, content)
	object := "sha256:" + strings.Repeat("5", 64)
	p.objects.blobs[object] = sum
	ctx := context.Background()

	c := p.client(t, pluginToken)
	gotSum, size, err := c.Lookup(ctx, p.addr, object)
	if err != nil || gotSum != sum || size != int64(len(content)) {
		t.Fatalf("Lookup = %s, %d, %v; want %s, %d", gotSum, size, err, sum, len(content))
	}

	tests := []struct {
		name   string
		client *peer.Client
		sum    string
		off, n int64
		want   string
		err    error
	}{
		{name: "first bytes", client: c, sum: sum, off: 0, n: 10, want: "0123456789"},
		{name: "middle", client: c, sum: sum, off: 10, n: 6, want: "abcdef"},
		{name: "last bytes", client: c, sum: sum, off: 30, n: 6, want: "uvwxyz"},
		{name: "whole", client: c, sum: sum, off: 0, n: 36, want: string(content)},
		{name: "past the end", client: c, sum: sum, off: 30, n: 10, err: peer.ErrBadReply},
		{name: "start past the end", client: c, sum: sum, off: 36, n: 1, err: peer.ErrBadReply},
		{name: "not held", client: c, sum: strings.Repeat("0", 64), off: 0, n: 1, err: peer.ErrNotHeld},
		{name: "refused token", client: p.client(t, "not-the-plugin"), sum: sum, off: 0, n: 1, err: peer.ErrRefused},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rc, err := tt.client.OpenRange(ctx, p.addr, tt.sum, tt.off, tt.n)
			if err == nil {
				var b []byte
				b, err = io.ReadAll(rc)
				rc.Close()
				if err == nil && string(b) != tt.want {
					t.Fatalf("read %q, want %q", b, tt.want)
				}
			}
			if !errors.Is(err, tt.err) {
				t.Fatalf("error %v, want %v", err, tt.err)
			}
		})
	}

	t.Run("lookup of an object not held", func(t *testing.T) {
		if _, _, err := c.Lookup(ctx, p.addr, "sha256:"+strings.Repeat("6", 64)); !errors.Is(err, peer.ErrNotHeld) {
			t.Errorf("error %v, want ErrNotHeld", err)
		}
	})
	t.Run("busy", func(t *testing.T) {
		busy := startPeer(t, peer.Config{MaxStreams: 1})
		big := strings.Repeat("d", 64)
		busy.blobs.putSparse(t, big, bigBlob)
		bc := busy.client(t, pluginToken)
		held, err := bc.OpenRange(ctx, busy.addr, big, 0, bigBlob)
		if err != nil {
			t.Fatal(err)
		}
		defer held.Close()
		_, err = bc.OpenRange(ctx, busy.addr, big, 0, 1)
		var se *peer.StatusError
		if !errors.Is(err, peer.ErrBusy) || !errors.As(err, &se) || se.Status != 503 {
			t.Errorf("error %v, want ErrBusy from a 503", err)
		}
	})
}

// rangedReply answers a range with Content-Range cr and body, chunked or
// with its length.
func rangedReply(cr string, body string, chunked bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Range", cr)
		if !chunked {
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		}
		w.WriteHeader(http.StatusPartialContent)
		if chunked {
			// Headers out before the body: no Content-Length.
			w.(http.Flusher).Flush()
		}
		_, _ = io.WriteString(w, body)
	}
}

func statusReply(code int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(code) }
}

func bodyReply(body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, body) }
}

// TestClient_BadReplies: a peer that answers outside the protocol (a
// redirect, the wrong range, more bytes than asked, a bad lookup) is an
// error, ErrBadReply where the caller should demote the peer.
func TestClient_BadReplies(t *testing.T) {
	sum := strings.Repeat("a", 64)
	object := "sha256:" + strings.Repeat("1", 64)
	var redirected atomic.Int64
	elsewhere := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { redirected.Add(1) }))
	defer elsewhere.Close()

	ranged, status, json := rangedReply, statusReply, bodyReply
	tests := []struct {
		name    string
		handler http.HandlerFunc
		lookup  bool // else OpenRange(0, 4) and read it all
		err     error
	}{
		{name: "exact range", handler: ranged("bytes 0-3/10", "0123", false)},
		{name: "exact range, chunked", handler: ranged("bytes 0-3/10", "0123", true)},
		{name: "longer than asked", handler: ranged("bytes 0-3/10", "01234", false), err: peer.ErrBadReply},
		{name: "longer than asked, chunked", handler: ranged("bytes 0-3/10", "01234", true), err: peer.ErrBadReply},
		{name: "shorter than asked, chunked", handler: ranged("bytes 0-3/10", "012", true), err: io.ErrUnexpectedEOF},
		{name: "another range", handler: ranged("bytes 1-4/10", "1234", false), err: peer.ErrBadReply},
		{name: "no Content-Range", handler: ranged("", "0123", false), err: peer.ErrBadReply},
		{name: "whole blob instead of a range", handler: json("0123456789"), err: peer.ErrBadReply},
		{name: "redirect", handler: func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, elsewhere.URL+r.URL.Path, http.StatusFound)
		}, err: peer.ErrBadReply},
		{name: "404", handler: status(404), err: peer.ErrNotHeld},
		{name: "401", handler: status(401), err: peer.ErrRefused},
		{name: "403", handler: status(403), err: peer.ErrRefused},
		{name: "503", handler: status(503), err: peer.ErrBusy},
		{name: "500", handler: status(500), err: peer.ErrBadReply},
		{name: "lookup", lookup: true, handler: json(`{"sha256":"` + sum + `","size":4}`)},
		{name: "lookup, not JSON", lookup: true, handler: json(`<html>`), err: peer.ErrBadReply},
		{name: "lookup, no blob name", lookup: true, handler: json(`{"sha256":"../x","size":4}`), err: peer.ErrBadReply},
		{name: "lookup, negative size", lookup: true, handler: json(`{"sha256":"` + sum + `","size":-1}`), err: peer.ErrBadReply},
		{name: "lookup, endless", lookup: true, handler: json(`{"sha256":"` + sum + `","pad":"` + strings.Repeat("x", 1<<20) + `"}`), err: peer.ErrBadReply},
		{name: "lookup, redirect", lookup: true, handler: func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, elsewhere.URL+r.URL.Path, http.StatusMovedPermanently)
		}, err: peer.ErrBadReply},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var auth, rng string
			ts := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				auth, rng = r.Header.Get("Authorization"), r.Header.Get("Range")
				tt.handler(w, r)
			}))
			defer ts.Close()
			c := &peer.Client{TLS: ts.Client().Transport.(*http.Transport).TLSClientConfig, Tokens: staticToken("tok")}
			addr := ts.Listener.Addr().String()
			var err error
			if tt.lookup {
				var got string
				got, _, err = c.Lookup(context.Background(), addr, object)
				if err == nil && got != sum {
					t.Fatalf("Lookup named %q", got)
				}
			} else {
				var rc io.ReadCloser
				if rc, err = c.OpenRange(context.Background(), addr, sum, 0, 4); err == nil {
					var b []byte
					b, err = io.ReadAll(rc)
					rc.Close()
					if err == nil && string(b) != "0123" {
						t.Fatalf("read %q", b)
					}
				}
				if rng != "bytes=0-3" {
					t.Errorf("sent Range %q", rng)
				}
			}
			if !errors.Is(err, tt.err) {
				t.Errorf("error %v, want %v", err, tt.err)
			}
			if auth != "Bearer tok" {
				t.Errorf("sent Authorization %q", auth)
			}
			if n := redirected.Load(); n != 0 {
				t.Errorf("followed a redirect %d times", n)
			}
		})
	}
}

// TestClient_Arguments: what the client refuses to ask for.
func TestClient_Arguments(t *testing.T) {
	var asked atomic.Int64
	ts := httptest.NewTLSServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { asked.Add(1) }))
	defer ts.Close()
	c := &peer.Client{TLS: ts.Client().Transport.(*http.Transport).TLSClientConfig, Tokens: staticToken("tok")}
	addr := ts.Listener.Addr().String()
	sum := strings.Repeat("a", 64)
	ctx := context.Background()
	tests := []struct {
		name string
		call func() error
	}{
		{"upper-case blob", func() error { _, err := c.OpenRange(ctx, addr, strings.ToUpper(sum), 0, 1); return err }},
		{"blob path", func() error { _, err := c.OpenRange(ctx, addr, "../"+sum[3:], 0, 1); return err }},
		{"no bytes", func() error { _, err := c.OpenRange(ctx, addr, sum, 0, 0); return err }},
		{"negative offset", func() error { _, err := c.OpenRange(ctx, addr, sum, -1, 1); return err }},
		{"object key without sha256:", func() error { _, _, err := c.Lookup(ctx, addr, sum); return err }},
		{"object key with a path", func() error { _, _, err := c.Lookup(ctx, addr, "sha256:../"+sum[3:]); return err }},
		{"no token source", func() error {
			_, err := (&peer.Client{TLS: c.TLS}).OpenRange(ctx, addr, sum, 0, 1)
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(); err == nil {
				t.Error("no error")
			}
		})
	}
	if n := asked.Load(); n != 0 {
		t.Errorf("%d requests sent for calls refused before asking", n)
	}
}
