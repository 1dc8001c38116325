package testenv

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestStartProxyWith_AnyServer checks what the benchmarks of the hf:// and
// oci:// sources rely on: with AllRequests every answer is counted, and
// the server's own URL in redirects, page links and token challenges
// names the proxy, so a client that follows them stays behind it.
func TestStartProxyWith_AnyServer(t *testing.T) {
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/redirect":
			w.Header().Set("Location", srv.URL+"/file") // and no body
			w.WriteHeader(http.StatusFound)
		case "/elsewhere":
			http.Redirect(w, r, "http://cdn.invalid/file", http.StatusFound)
		case "/page":
			w.Header().Set("Link", "<"+srv.URL+"/page?cursor=2>; rel=\"next\"")
			w.Header().Set("WWW-Authenticate", "Bearer realm=\""+srv.URL+"/token\",service=\"test\"")
			io.WriteString(w, "[]")
		default:
			io.WriteString(w, "0123456789")
		}
	}))
	defer srv.Close()
	start := func() *Proxy {
		p, err := StartProxyWith(srv.URL, ProxyOptions{Objects: AllRequests})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Stop)
		return p
	}
	p := start()
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	cases := []struct {
		path, header, want string
	}{
		{"/redirect", "Location", p.URL + "/file"},
		{"/elsewhere", "Location", "http://cdn.invalid/file"},
		{"/page", "Link", "<" + p.URL + "/page?cursor=2>; rel=\"next\""},
		{"/page", "WWW-Authenticate", "Bearer realm=\"" + p.URL + "/token\",service=\"test\""},
	}
	for _, c := range cases {
		t.Run(c.path+" "+c.header, func(t *testing.T) {
			resp, err := noFollow.Get(p.URL + c.path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if got := resp.Header.Get(c.header); got != c.want {
				t.Errorf("%s: %q, want %q", c.header, got, c.want)
			}
		})
	}

	// A proxy of its own: the one above may still be counting the bodies
	// of answers whose reader went away.
	p = start()
	resp, err := http.Get(p.URL + "/redirect") // followed through the proxy
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "0123456789" || p.ObjectGets() != 2 || p.ObjectBytes() != int64(len(body)) {
		t.Errorf("got %q; the proxy counted %d GETs and %d bytes, want 2 GETs (the redirect and its target) and %d bytes",
			body, p.ObjectGets(), p.ObjectBytes(), len(body))
	}
	if !strings.HasPrefix(resp.Request.URL.String(), p.URL) {
		t.Errorf("the redirect was followed to %s, not through the proxy", resp.Request.URL)
	}
}

// TestProxy_TotalCapAndCounts: TotalBytesPerSec is one budget for every
// stream (four parallel GETs take as long as their sum at that rate, where
// a per-stream cap alone would let them run side by side), and bytes are
// counted per object and per client. Only a lower bound on time is
// checked: a slow machine makes the transfer longer, never shorter.
func TestProxy_TotalCapAndCounts(t *testing.T) {
	const size, streams, rate = 1 << 20, 4, 8 << 20
	body := strings.Repeat("m", size)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, body)
	}))
	defer srv.Close()
	p, err := StartProxy(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	p.TotalBytesPerSec.Store(rate)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range streams {
		wg.Go(func() {
			resp, err := http.Get(fmt.Sprintf("%s/bucket/key%d", p.URL, i))
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			if n, err := io.Copy(io.Discard, resp.Body); err != nil || n != size {
				t.Errorf("key%d: %d bytes, %v", i, n, err)
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	if want := time.Duration(float64(streams*size) / rate * float64(time.Second) * 0.9); took < want {
		t.Errorf("%d streams of %d bytes under a total cap of %d B/s took %s, want at least %s", streams, size, rate, took, want)
	}
	for i := range streams {
		if got := p.ObjectBytesOf(fmt.Sprintf("/bucket/key%d", i)); got != size {
			t.Errorf("key%d: counted %d bytes, want %d", i, got, size)
		}
	}
	if got := p.ObjectBytesTo("127.0.0.1"); got != streams*size {
		t.Errorf("counted %d bytes to 127.0.0.1, want %d", got, streams*size)
	}
	p.Reset()
	if p.ObjectBytesOf("/bucket/key0") != 0 || p.ObjectBytesTo("127.0.0.1") != 0 {
		t.Error("Reset left per-object or per-client counts")
	}
}
