package peer_test

import (
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestServer_Blobs: a committed blob by its sha256, whole or in one range,
// GET or HEAD; names that are not a sha256 never reach the disk.
func TestServer_Blobs(t *testing.T) {
	p := startPeer(t, peer.Config{})
	content := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
	sum := p.blobs.put(t, content)
	absent := strings.Repeat("0", 64)

	tests := []struct {
		name   string
		method string
		path   string
		rng    string
		status int
		body   string
		header map[string]string // expected headers
		noDisk bool              // answered without opening anything
	}{
		{name: "whole", path: sum, status: 200, body: string(content),
			header: map[string]string{"Content-Length": "36", "Accept-Ranges": "bytes", "ETag": `"` + sum + `"`, "Content-Type": "application/octet-stream"}},
		{name: "first bytes", path: sum, rng: "bytes=0-9", status: 206, body: "0123456789",
			header: map[string]string{"Content-Range": "bytes 0-9/36", "Content-Length": "10"}},
		{name: "middle", path: sum, rng: "bytes=10-15", status: 206, body: "abcdef",
			header: map[string]string{"Content-Range": "bytes 10-15/36"}},
		{name: "suffix", path: sum, rng: "bytes=-4", status: 206, body: "wxyz",
			header: map[string]string{"Content-Range": "bytes 32-35/36"}},
		{name: "open-ended", path: sum, rng: "bytes=30-", status: 206, body: "uvwxyz"},
		{name: "end past the size is cut", path: sum, rng: "bytes=34-99", status: 206, body: "yz",
			header: map[string]string{"Content-Range": "bytes 34-35/36"}},
		{name: "start past the end", path: sum, rng: "bytes=36-40", status: 416,
			header: map[string]string{"Content-Range": "bytes */36"}},
		{name: "several ranges", path: sum, rng: "bytes=0-1,4-5", status: 416},
		{name: "HEAD", method: http.MethodHead, path: sum, status: 200, body: "",
			header: map[string]string{"Content-Length": "36", "Accept-Ranges": "bytes"}},
		{name: "HEAD of a range", method: http.MethodHead, path: sum, rng: "bytes=0-9", status: 206, body: "",
			header: map[string]string{"Content-Length": "10"}},
		{name: "If-Range with the ETag", path: sum, rng: "bytes=0-1", status: 206, body: "01",
			header: map[string]string{}},
		{name: "absent", path: absent, status: 404},
		{name: "upper-case name", path: strings.ToUpper(sum), status: 400, noDisk: true},
		{name: "short name", path: sum[:63], status: 400, noDisk: true},
		{name: "long name", path: sum + "0", status: 400, noDisk: true},
		{name: "digest form", path: "sha256:" + sum, status: 400, noDisk: true},
		{name: "dot dot", path: "..%2f" + sum[5:], status: 400, noDisk: true},
		{name: "POST", method: http.MethodPost, path: sum, status: 405, noDisk: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method := tt.method
			if method == "" {
				method = http.MethodGet
			}
			h := map[string]string{}
			if tt.rng != "" {
				h["Range"] = tt.rng
			}
			if tt.name == "If-Range with the ETag" {
				h["If-Range"] = `"` + sum + `"`
			}
			opens := p.blobs.opens.Load()
			got := p.do(t, method, peer.BlobsPath+tt.path, pluginToken, h)
			if got.status != tt.status {
				t.Fatalf("status %d (%q), want %d", got.status, got.body, tt.status)
			}
			if tt.status < 300 && got.body != tt.body {
				t.Errorf("body %q, want %q", got.body, tt.body)
			}
			for k, v := range tt.header {
				if got.header.Get(k) != v {
					t.Errorf("%s: %q, want %q", k, got.header.Get(k), v)
				}
			}
			if n := p.blobs.opens.Load() - opens; tt.noDisk && n != 0 {
				t.Errorf("opened %d files for a refused name", n)
			}
		})
	}
}

// TestServer_Objects: which blob holds an object, while the blob is there.
func TestServer_Objects(t *testing.T) {
	key := func(b string) string { return "sha256:" + strings.Repeat(b, 64) }
	gone := strings.Repeat("9", 64)
	blobs := map[string]string{key("1"): "", key("2"): gone, key("3"): "not-hex"}
	p := startPeer(t, peer.Config{Objects: mapObjects{blobs: blobs}})
	held := p.blobs.put(t, []byte("weights"))
	blobs[key("1")] = held

	broken := startPeer(t, peer.Config{Objects: mapObjects{err: errors.New("bbolt says no")}})

	tests := []struct {
		name   string
		p      *testPeer
		key    string
		status int
		want   peer.ObjectReply
	}{
		{name: "held", p: p, key: key("1"), status: 200, want: peer.ObjectReply{SHA256: held, Size: 7}},
		{name: "recorded but evicted since", p: p, key: key("2"), status: 404},
		{name: "recorded as no blob name", p: p, key: key("3"), status: 404},
		{name: "never recorded", p: p, key: key("4"), status: 404},
		{name: "key without sha256:", p: p, key: strings.Repeat("1", 64), status: 400},
		{name: "key with upper-case hex", p: p, key: "sha256:" + strings.Repeat("A", 64), status: 400},
		{name: "key of md5", p: p, key: "md5:" + strings.Repeat("1", 32), status: 400},
		{name: "index fails", p: broken, key: key("1"), status: 500},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.p.do(t, http.MethodGet, peer.ObjectsPath+tt.key, pluginToken, nil)
			if got.status != tt.status {
				t.Fatalf("status %d (%q), want %d", got.status, got.body, tt.status)
			}
			if tt.status != 200 {
				if strings.Contains(got.body, "bbolt") {
					t.Errorf("the answer %q shows the node's internal error", got.body)
				}
				return
			}
			var r peer.ObjectReply
			if err := json.Unmarshal([]byte(got.body), &r); err != nil || r != tt.want {
				t.Errorf("reply %q (%v), want %+v", got.body, err, tt.want)
			}
		})
	}
}

// TestServer_RequestsMetric: requests counted by status, bytes served by
// what went out, and no label names a blob or a token.
func TestServer_RequestsMetric(t *testing.T) {
	p := startPeer(t, peer.Config{})
	sum := p.blobs.put(t, []byte("0123456789"))
	p.do(t, http.MethodGet, peer.BlobsPath+sum, pluginToken, map[string]string{"Range": "bytes=2-5"})
	p.do(t, http.MethodGet, peer.BlobsPath+strings.Repeat("0", 64), pluginToken, nil)
	p.do(t, http.MethodGet, peer.BlobsPath+sum, "", nil)

	for code, want := range map[string]float64{"206": 1, "404": 1, "401": 1, "200": 0} {
		if got := testutil.ToFloat64(p.metrics.RequestsFor(code)); got != want {
			t.Errorf("requests{code=%s} = %v, want %v", code, got, want)
		}
	}
	if got := testutil.ToFloat64(p.metrics.ServedBytes()); got != 4 {
		t.Errorf("served bytes %v, want 4", got)
	}
	out, err := testutil.CollectAndLint(p.metrics)
	if err != nil || len(out) > 0 {
		t.Errorf("lint: %v %v", out, err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(p.metrics)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				for _, secret := range []string{sum, pluginToken, "127.0.0.1"} {
					if strings.Contains(l.GetValue(), secret) {
						t.Errorf("%s{%s=%q} shows %q", mf.GetName(), l.GetName(), l.GetValue(), secret)
					}
				}
			}
		}
	}
}
