package peer_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/pkg/peer/peertest"
)

// The node plugin's account in these tests, and its tokens.
const (
	pluginNS, pluginSA = "modelcache", "modelcache-node"
	pluginUser         = "system:serviceaccount:" + pluginNS + ":" + pluginSA
	pluginToken        = "plugin-token"
)

// dirBlobs serves the files of a directory as blobs, counting opens.
type dirBlobs struct {
	dir   string
	opens atomic.Int64
}

func (d *dirBlobs) OpenBlob(sum string) (*os.File, error) {
	d.opens.Add(1)
	return os.Open(filepath.Join(d.dir, sum))
}

// put writes a blob and returns its name.
func (d *dirBlobs) put(t *testing.T, content []byte) string {
	t.Helper()
	h := sha256.Sum256(content)
	sum := hex.EncodeToString(h[:])
	if err := os.WriteFile(filepath.Join(d.dir, sum), content, 0o444); err != nil {
		t.Fatal(err)
	}
	return sum
}

// putSparse writes a blob of size zero bytes without writing them: large
// enough that no socket buffer holds it, so a reader that stops reading
// keeps the server writing.
func (d *dirBlobs) putSparse(t *testing.T, name string, size int64) {
	t.Helper()
	f, err := os.Create(filepath.Join(d.dir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

// mapObjects is an object index in memory.
type mapObjects struct {
	blobs map[string]string
	err   error
}

func (m mapObjects) LookupObject(key string) (string, bool, error) {
	if m.err != nil {
		return "", false, m.err
	}
	b, ok := m.blobs[key]
	return b, ok, nil
}

// fakeReviewer answers reviews from a table and counts them.
type fakeReviewer struct {
	mu    sync.Mutex
	ids   map[string]peer.Identity
	err   error
	calls map[string]int
}

func newReviewer() *fakeReviewer {
	return &fakeReviewer{ids: map[string]peer.Identity{pluginToken: pluginIdentity()}, calls: map[string]int{}}
}

func pluginIdentity() peer.Identity {
	return peer.Identity{Authenticated: true, Username: pluginUser, Audiences: []string{peer.Audience}}
}

func (f *fakeReviewer) Review(_ context.Context, token string) (peer.Identity, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[token]++
	if f.err != nil {
		return peer.Identity{}, f.err
	}
	return f.ids[token], nil
}

func (f *fakeReviewer) set(token string, id peer.Identity) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ids[token] = id
}

func (f *fakeReviewer) callsFor(token string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[token]
}

// jwt is an unsigned token with an exp claim: the gate reads exp, and
// the fake reviewer, not a signature, says whether it is valid.
func jwt(exp time.Time) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"ES256"}`)) + "." + enc(fmt.Appendf(nil, `{"sub":"x","exp":%d}`, exp.Unix())) + ".c2ln"
}

// testPeer is a peer endpoint on loopback over TLS with a CA of its own.
type testPeer struct {
	addr    string
	blobs   *dirBlobs
	objects mapObjects
	rev     *fakeReviewer
	metrics *peer.Metrics
	ca      *peer.CA
}

// startPeer serves a Server made from cfg, where cfg leaves Blobs,
// Objects, Reviewer, the account and Metrics to the test peer's.
func startPeer(t *testing.T, cfg peer.Config) *testPeer {
	t.Helper()
	p := &testPeer{blobs: &dirBlobs{dir: t.TempDir()}, objects: mapObjects{blobs: map[string]string{}}, rev: newReviewer(), metrics: peer.NewMetrics()}
	if cfg.Objects != nil {
		p.objects = cfg.Objects.(mapObjects)
	}
	cfg.Blobs, cfg.Objects, cfg.Metrics = p.blobs, p.objects, p.metrics
	if cfg.Reviewer == nil {
		cfg.Reviewer = p.rev
	}
	cfg.Namespace, cfg.ServiceAccount = pluginNS, pluginSA
	srv, err := peer.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if p.ca, err = peer.NewCA(); err != nil {
		t.Fatal(err)
	}
	tlsConf, err := peer.ServingConfig(p.ca, "node-a", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = peertest.ServeTLS(t, srv, tlsConf)
	return p
}

// httpClient is a plain HTTPS client trusting the test peer's CA, for
// requests the peer.Client would never make.
func (p *testPeer) httpClient(t *testing.T) *http.Client {
	t.Helper()
	conf, err := peer.ClientConfig(p.ca)
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: conf}}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// client is a peer.Client trusting the test peer's CA.
func (p *testPeer) client(t *testing.T, token string) *peer.Client {
	t.Helper()
	conf, err := peer.ClientConfig(p.ca)
	if err != nil {
		t.Fatal(err)
	}
	return &peer.Client{TLS: conf, Tokens: staticToken(token)}
}

type staticToken string

func (s staticToken) Token() (string, error) { return string(s), nil }

// reply is a raw answer of the test peer.
type reply struct {
	status int
	header http.Header
	body   string
}

// do sends one request to the test peer; token "" sends no Authorization.
func (p *testPeer) do(t *testing.T, method, path, token string, header map[string]string) reply {
	t.Helper()
	req, err := http.NewRequest(method, "https://"+p.addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := p.httpClient(t).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: string(b)}
}

// eventually fails t unless f returns nil within limit, polling.
func eventually(t *testing.T, limit time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s: %v", what, limit, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
