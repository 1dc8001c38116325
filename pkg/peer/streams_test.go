package peer_test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// bigBlob is larger than any socket buffer on the way: a reader that
// stops reading keeps the server's stream open.
const bigBlob = 64 << 20

// openBody sends a GET and returns the response once its headers came,
// without reading the body.
func openBody(t *testing.T, c *http.Client, addr, sum string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "https://"+addr+peer.BlobsPath+sum, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+pluginToken)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// TestServer_MaxStreams: while MaxStreams bodies are being served, the
// next body is refused at once with 503 and Retry-After when the server
// queues none (QueueWait < 0); HEADs and object lookups, which stream
// nothing, still work; a stream that ends frees its slot.
func TestServer_MaxStreams(t *testing.T) {
	for _, max := range []int{1, 3} {
		t.Run(fmt.Sprintf("MaxStreams=%d", max), func(t *testing.T) {
			p := startPeer(t, peer.Config{MaxStreams: max, QueueWait: -1})
			sum := strings.Repeat("b", 64)
			p.blobs.putSparse(t, sum, bigBlob)
			small := p.blobs.put(t, []byte("small"))
			c := p.httpClient(t)

			var held []*http.Response
			for i := range max {
				resp := openBody(t, c, p.addr, sum)
				if resp.StatusCode != 200 {
					t.Fatalf("stream %d of %d: status %d", i+1, max, resp.StatusCode)
				}
				held = append(held, resp)
			}
			if got := testutil.ToFloat64(p.metrics.Streams()); got != float64(max) {
				t.Errorf("streams gauge %v, want %d", got, max)
			}
			for _, path := range []string{small, sum} {
				if got := p.do(t, http.MethodGet, peer.BlobsPath+path, pluginToken, nil); got.status != 503 || got.header.Get("Retry-After") != "1" {
					t.Errorf("body %d while %d are served: status %d, Retry-After %q; want 503, 1", max+1, max, got.status, got.header.Get("Retry-After"))
				}
			}
			if got := testutil.ToFloat64(p.metrics.RefusalsFor("busy")); got != 2 {
				t.Errorf("refusals{reason=busy} = %v, want 2", got)
			}
			if got := p.do(t, http.MethodHead, peer.BlobsPath+sum, pluginToken, nil); got.status != 200 {
				t.Errorf("HEAD while full: status %d, want 200", got.status)
			}

			held[0].Body.Close()
			eventually(t, 30*time.Second, "a slot freed by a closed stream", func() error {
				got := p.do(t, http.MethodGet, peer.BlobsPath+small, pluginToken, nil)
				if got.status != 200 || got.body != "small" {
					return fmt.Errorf("status %d", got.status)
				}
				return nil
			})
			for _, r := range held[1:] {
				r.Body.Close()
			}
		})
	}
}

// TestServer_StalledReaderLosesItsStream: a reader that takes the headers
// and stops reading is cut after WriteTimeout without progress, and its
// slot serves the next requester.
func TestServer_StalledReaderLosesItsStream(t *testing.T) {
	p := startPeer(t, peer.Config{MaxStreams: 1, WriteTimeout: 200 * time.Millisecond})
	sum := strings.Repeat("c", 64)
	p.blobs.putSparse(t, sum, bigBlob)
	small := p.blobs.put(t, []byte("small"))

	stalled := openBody(t, p.httpClient(t), p.addr, sum)
	defer stalled.Body.Close()
	if stalled.StatusCode != 200 {
		t.Fatalf("status %d", stalled.StatusCode)
	}
	eventually(t, 30*time.Second, "the stalled stream's slot serving another", func() error {
		got := p.do(t, http.MethodGet, peer.BlobsPath+small, pluginToken, nil)
		if got.status != 200 {
			return fmt.Errorf("status %d", got.status)
		}
		return nil
	})
	// The stalled reader gets less than the blob: its stream was cut.
	n, err := io.Copy(io.Discard, stalled.Body)
	if err == nil || n >= bigBlob {
		t.Errorf("the stalled reader read %d bytes, %v: want the stream cut short", n, err)
	}
}

// TestServer_QueuedBodies: a body asked while MaxStreams are served waits
// for a stream, in order, and is served when one ends; one that finds
// MaxQueued waiting is refused at once, and one that waits QueueWait in
// vain is refused then, with Retry-After.
func TestServer_QueuedBodies(t *testing.T) {
	p := startPeer(t, peer.Config{MaxStreams: 1, MaxQueued: 1, QueueWait: time.Minute})
	sum := strings.Repeat("d", 64)
	p.blobs.putSparse(t, sum, bigBlob)
	small := p.blobs.put(t, []byte("small"))
	held := openBody(t, p.httpClient(t), p.addr, sum)
	if held.StatusCode != 200 {
		t.Fatalf("status %d", held.StatusCode)
	}
	queued := make(chan reply, 1)
	go func() { queued <- p.do(t, http.MethodGet, peer.BlobsPath+small, pluginToken, nil) }()
	eventually(t, 30*time.Second, "a body queued", func() error {
		if got := testutil.ToFloat64(p.metrics.Queued()); got != 1 {
			return fmt.Errorf("queued gauge %v", got)
		}
		return nil
	})
	if got := p.do(t, http.MethodGet, peer.BlobsPath+small, pluginToken, nil); got.status != 503 || got.header.Get("Retry-After") != "1" {
		t.Errorf("a body beyond MaxQueued: status %d, Retry-After %q; want 503 at once", got.status, got.header.Get("Retry-After"))
	}
	held.Body.Close()
	if got := <-queued; got.status != 200 || got.body != "small" {
		t.Errorf("the queued body: status %d %q, want 200 once the stream ended", got.status, got.body)
	}

	short := startPeer(t, peer.Config{MaxStreams: 1, QueueWait: 50 * time.Millisecond})
	short.blobs.putSparse(t, sum, bigBlob)
	held = openBody(t, short.httpClient(t), short.addr, sum)
	defer held.Body.Close()
	if got := short.do(t, http.MethodGet, peer.BlobsPath+sum, pluginToken, nil); got.status != 503 || got.header.Get("Retry-After") != "1" {
		t.Errorf("a body that waited QueueWait in vain: status %d, want 503", got.status)
	}
	if got := testutil.ToFloat64(short.metrics.RefusalsFor("busy")); got != 1 {
		t.Errorf("refusals{reason=busy} = %v, want 1", got)
	}
}
