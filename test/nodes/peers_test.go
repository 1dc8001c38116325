package nodes_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/test/testenv/nodes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestPeers_EightNodesFetchOnceFromTheOrigin: eight nodes publish the same
// 1 GiB model at once; one fetches it from the origin and the others read
// it from nodes that hold it, so the origin serves it about once, and
// every node ends with exact bytes.
func TestPeers_EightNodesFetchOnceFromTheOrigin(t *testing.T) {
	f := startFleet(t, 8, true)
	publishAll(t, f, f.Nodes, "big", big)
	var fromOrigin int64
	for _, n := range f.Nodes {
		checkFiles(t, n, "big", big)
		o, p := f.OriginBytes(n), f.PeerBytes(n)
		fromOrigin += o
		t.Logf("%s: %s from the origin, %s from peers", n.Name, mib(o), mib(p))
	}
	total := f.Origin.ObjectBytes()
	t.Logf("the origin served %s in all for a model of %s", mib(total), mib(big.size))
	if limit := big.size * 11 / 10; total > limit {
		t.Errorf("the origin served %s, want at most %s (1.1 times the model)", mib(total), mib(limit))
	}
	if fromOrigin != total {
		t.Errorf("the nodes read %s from the origin, the origin counted %s", mib(fromOrigin), mib(total))
	}
}

// TestPeers_RefusedTenantGetsNothing: a tenant whose credentials the
// origin refuses gets PERMISSION_DENIED and not one byte, from the origin
// or from the nodes that hold the model, and no peer is even asked.
func TestPeers_RefusedTenantGetsNothing(t *testing.T) {
	f := startFleet(t, 3, true)
	holders, tenant := f.Nodes[:2], f.Nodes[2]
	for _, n := range holders {
		publishAll(t, f, []*nodes.Node{n}, "small", small)
	}
	bad := secret(f)
	for k := range bad {
		if strings.HasSuffix(k, "_SECRET_ACCESS_KEY") {
			bad[k] = "not-the-secret-key"
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := tenant.Publish(ctx, "small", small.uri, bad)
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("publish with refused credentials: %v, want PERMISSION_DENIED", err)
	}
	if o := f.OriginBytes(tenant); o != 0 {
		t.Errorf("the origin served the refused tenant's node %d bytes", o)
	}
	for _, h := range holders {
		if tap := f.Tap(tenant, h); tap.Up.Load() != 0 || tap.Down.Load() != 0 {
			t.Errorf("the refused tenant's node talked to %s's peer endpoint: %d bytes sent, %d received", h.Name, tap.Up.Load(), tap.Down.Load())
		}
	}
	if _, err := os.Stat(filepath.Join(tenant.Target("small"), "weights.bin")); err == nil {
		t.Error("the refused tenant's target holds the model")
	}
}

// TestPeers_WrongBytesRefusedAndPeerDemoted: a peer that flips a byte of
// what it serves (a node the test plays, listed first among the holders,
// relaying a real holder's blobs) is refused: the node demotes it, reads
// the model again from the origin, and ends with exact bytes.
func TestPeers_WrongBytesRefusedAndPeerDemoted(t *testing.T) {
	f := startFleet(t, 2, true)
	holder, reader := f.Nodes[0], f.Nodes[1]
	publishAll(t, f, []*nodes.Node{holder}, "small", small)
	fake, flips := startFlippingPeer(t, f, holder)
	listFirstHolder(t, f, fake.Name)
	publishAll(t, f, []*nodes.Node{reader}, "small", small)
	checkFiles(t, reader, "small", small)
	served := f.Tap(reader, fake).Down.Load()
	t.Logf("the flipping peer sent %s (%d bytes flipped); the origin then served the reader %s, the holder %s",
		mib(served), flips.Load(), mib(f.OriginBytes(reader)), mib(f.Tap(reader, holder).Down.Load()))
	if served == 0 || flips.Load() == 0 {
		t.Fatalf("the flipping peer sent %d bytes, %d of them flipped: it was never read from", served, flips.Load())
	}
	if o := f.OriginBytes(reader); o < small.size {
		t.Errorf("the origin served the reader %s, want the whole model again (%s) after the peer's bad bytes", mib(o), mib(small.size))
	}
	if !strings.Contains(reader.Logs(), `"peer demoted for this download"`) || !strings.Contains(reader.Logs(), `node="`+fake.Name+`"`) {
		t.Errorf("the reader's log does not say it demoted %s", fake.Name)
	}
}

// TestPeers_ServingPeerKilledMidTransfer: the node a reader reads a model
// from is killed (SIGKILL) in the middle; the reader goes on from the
// origin where each range stopped, and fetches the model about once in
// all: at most its size and two chunks, and the TLS records' overhead.
func TestPeers_ServingPeerKilledMidTransfer(t *testing.T) {
	f := startFleet(t, 2, true)
	holder, reader := f.Nodes[0], f.Nodes[1]
	publishAll(t, f, []*nodes.Node{holder}, "small", small)
	tap := f.Tap(reader, holder)
	// Slow enough to be caught in the middle, whatever the machine.
	tap.Rate.Store(20 << 20)
	killed := make(chan struct{})
	go func() {
		defer close(killed)
		for tap.Down.Load() < small.size*3/10 {
			time.Sleep(10 * time.Millisecond)
		}
		holder.Kill()
	}()
	publishAll(t, f, []*nodes.Node{reader}, "small", small)
	select {
	case <-killed:
	default:
		t.Fatalf("the reader finished with %s from the holder, before it was killed", mib(tap.Down.Load()))
	}
	checkFiles(t, reader, "small", small)
	fromPeer, fromOrigin := tap.Down.Load(), f.OriginBytes(reader)
	total := fromPeer + fromOrigin
	t.Logf("the reader read %s from the killed peer and %s from the origin: %s for a model of %s",
		mib(fromPeer), mib(fromOrigin), mib(total), mib(small.size))
	if fromPeer >= small.size || fromOrigin == 0 {
		t.Fatalf("want the model read partly from the peer, partly from the origin")
	}
	const chunk = 4 << 20
	if limit := small.size + 2*chunk + small.size/200; total > limit {
		t.Errorf("the reader fetched %s in all, want at most %s (the model, two chunks, TLS overhead): it started over", mib(total), mib(limit))
	}
}

// TestPeers_EndpointRefusesCallersWithoutThePluginToken: a real plugin's
// peer endpoint answers 401 to a caller without a token or with one for
// another audience, and 403 to another account's token (another account
// of the namespace, the plugin's account name in another namespace).
func TestPeers_EndpointRefusesCallersWithoutThePluginToken(t *testing.T) {
	f := startFleet(t, 1, true)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := nodes.CreateServiceAccount(ctx, f.Kube, f.Namespace, "tenant"); err != nil {
		t.Fatal(err)
	}
	if err := nodes.CreateServiceAccount(ctx, f.Kube, "default", nodes.ServiceAccount); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = f.Kube.CoreV1().ServiceAccounts("default").Delete(context.Background(), nodes.ServiceAccount, metav1.DeleteOptions{})
	})
	token := func(ns, sa string, aud ...string) string {
		tok, err := nodes.Token(ctx, f.Kube, ns, sa, aud...)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	c := peerHTTPClient(t, f)
	url := "https://" + f.Nodes[0].PeerAddr() + peer.ObjectsPath + "sha256:" + strings.Repeat("0", 64)
	tests := []struct {
		name   string
		token  string
		status int
	}{
		{"the plugin's token", token(f.Namespace, nodes.ServiceAccount, peer.Audience), http.StatusNotFound},
		{"no token", "", http.StatusUnauthorized},
		{"the plugin's token for the API server", token(f.Namespace, nodes.ServiceAccount), http.StatusUnauthorized},
		{"the plugin's token for another audience", token(f.Namespace, nodes.ServiceAccount, "modelcache-peer-not"), http.StatusUnauthorized},
		{"another account of the namespace", token(f.Namespace, "tenant", peer.Audience), http.StatusForbidden},
		{"the plugin's account name in another namespace", token("default", nodes.ServiceAccount, peer.Audience), http.StatusForbidden},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			if err != nil {
				t.Fatal(err)
			}
			if tt.token != "" {
				req.Header.Set("Authorization", "Bearer "+tt.token)
			}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.status {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.status)
			}
		})
	}
}

// TestPeers_Off: with --peers=false every node reads the whole model from
// the origin, ends with the same bytes, and no Lease is written.
func TestPeers_Off(t *testing.T) {
	f := startFleet(t, 3, false)
	publishAll(t, f, f.Nodes, "small", small)
	for _, n := range f.Nodes {
		checkFiles(t, n, "small", small)
		o := f.OriginBytes(n)
		t.Logf("%s: %s from the origin, %s from peers", n.Name, mib(o), mib(f.PeerBytes(n)))
		if o < small.size {
			t.Errorf("%s read %s from the origin, want the whole model (%s)", n.Name, mib(o), mib(small.size))
		}
		if p := f.PeerBytes(n); p != 0 {
			t.Errorf("%s read %d bytes from peers with --peers=false", n.Name, p)
		}
	}
	leases, err := f.Leases(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if leases != 0 {
		t.Errorf("%d Leases in the plugins' namespace, want none", leases)
	}
}
