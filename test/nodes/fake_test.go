package nodes_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/holders"
	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/test/testenv/nodes"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// peerHTTPClient asks peer endpoints from the hub, trusting the plugins'
// CA, as a plugin would.
func peerHTTPClient(t *testing.T, f *nodes.Fleet) *http.Client {
	t.Helper()
	ca, err := nodes.PeerCA(context.Background(), f.Kube, f.Namespace)
	if err != nil {
		t.Fatal(err)
	}
	tlsConf, err := peer.ClientConfig(ca)
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Transport: &http.Transport{DialContext: f.DialContext, TLSClientConfig: tlsConf, DisableCompression: true}}
}

// startFlippingPeer serves a peer endpoint on a fake node of the fleet
// with a certificate from the plugins' own CA: it relays upstream's
// answers, as the plugin's account, and flips the first byte of every
// blob body it sends. flips counts the bodies it flipped.
func startFlippingPeer(t *testing.T, f *nodes.Fleet, upstream *nodes.Node) (*nodes.Node, *atomic.Int64) {
	t.Helper()
	ctx := context.Background()
	fake, err := f.AddFakePeer(ctx, "fake-peer")
	if err != nil {
		t.Fatal(err)
	}
	ca, err := nodes.PeerCA(ctx, f.Kube, f.Namespace)
	if err != nil {
		t.Fatal(err)
	}
	serving, err := peer.ServingConfig(ca, fake.Name, fake.IP)
	if err != nil {
		t.Fatal(err)
	}
	clientTLS, err := peer.ClientConfig(ca)
	if err != nil {
		t.Fatal(err)
	}
	token, err := nodes.Token(ctx, f.Kube, f.Namespace, nodes.ServiceAccount, peer.Audience)
	if err != nil {
		t.Fatal(err)
	}
	up := &http.Client{Transport: &http.Transport{DialContext: fake.Netns.DialContext, TLSClientConfig: clientTLS, DisableCompression: true}}
	flips := &atomic.Int64{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequestWithContext(r.Context(), r.Method, "https://"+upstream.PeerAddr()+r.URL.Path, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		if rg := r.Header.Get("Range"); rg != "" {
			req.Header.Set("Range", rg)
		}
		resp, err := up.Do(req)
		if err != nil {
			http.Error(w, "upstream", http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		for _, k := range []string{"Content-Type", "Content-Range", "Content-Length", "ETag"} {
			if v := resp.Header.Get(k); v != "" {
				w.Header().Set(k, v)
			}
		}
		w.WriteHeader(resp.StatusCode)
		body := io.Reader(resp.Body)
		if strings.HasPrefix(r.URL.Path, peer.BlobsPath) && resp.StatusCode/100 == 2 {
			body = &flipFirst{r: resp.Body, n: flips}
		}
		_, _ = io.Copy(w, body)
	})
	ln, err := fake.Netns.Listen(fake.PeerAddr())
	if err != nil {
		t.Fatal(err)
	}
	hs := peer.NewHTTPServer(h, serving)
	done := make(chan error, 1)
	go func() { done <- hs.ServeTLS(ln, "", "") }()
	t.Cleanup(func() {
		_ = hs.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serving the flipping peer: %v", err)
		}
	})
	return fake, flips
}

// flipFirst inverts the first byte of a body.
type flipFirst struct {
	r       io.Reader
	n       *atomic.Int64
	started bool
}

func (f *flipFirst) Read(p []byte) (int, error) {
	k, err := f.r.Read(p)
	if k > 0 && !f.started {
		f.started = true
		p[0] ^= 0xff
		f.n.Add(1)
	}
	return k, err
}

// listFirstHolder puts node first in the holders of the fleet's one
// Lease, as that node's Committed would.
func listFirstHolder(t *testing.T, f *nodes.Fleet, node string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	leases := f.Kube.CoordinationV1().Leases(f.Namespace)
	l, err := leases.List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Items) != 1 {
		t.Fatalf("%d Leases, want the one of the model", len(l.Items))
	}
	lease := l.Items[0]
	var hs []string
	if err := json.Unmarshal([]byte(lease.Annotations[holders.HoldersAnnotation]), &hs); err != nil {
		t.Fatalf("the Lease's holders: %v", err)
	}
	b, _ := json.Marshal(append([]string{node}, hs...))
	lease.Annotations[holders.HoldersAnnotation] = string(b)
	if _, err := leases.Update(ctx, &lease, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}
