package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/holders"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/metrics"
	"github.com/modelcache/modelcache/pkg/peer"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
)

// peerSetup is what --peers starts before the cache opens: the registry,
// the members and the client the cache reads peers with, and the TLS the
// peer endpoint serves with once the cache is open (docs/design.md
// "Peers").
type peerSetup struct {
	o       options
	kube    kubernetes.Interface
	ns, ip  string
	peers   *cache.Peers
	members *holders.Members
	serving *tls.Config
}

// setupPeers connects to the API server and reads or creates the peer CA.
// The namespace and the pod IP come from the downward API (POD_NAMESPACE,
// POD_IP): the endpoint serves on the pod's address only.
func setupPeers(ctx context.Context, o options) (*peerSetup, error) {
	ns, ip := os.Getenv("POD_NAMESPACE"), os.Getenv("POD_IP")
	if ns == "" || net.ParseIP(ip) == nil {
		return nil, errors.New("--peers needs POD_NAMESPACE and POD_IP from the downward API")
	}
	cfg, err := kube.RestConfig(o.kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating Kubernetes client: %w", err)
	}
	reg, err := holders.New(client.CoordinationV1(), holders.Options{Namespace: ns, Node: o.nodeID})
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	members, err := holders.WatchMembers(wctx, client, ns, o.peerService, peerPortName)
	if err != nil {
		return nil, err
	}
	ca, err := peer.LoadOrCreateCA(wctx, client, ns, o.peerCASecret)
	if err != nil {
		members.Stop()
		return nil, err
	}
	serving, err := peer.ServingConfig(ca, o.nodeID, ip)
	if err != nil {
		members.Stop()
		return nil, err
	}
	clientTLS, err := peer.ClientConfig(ca)
	if err != nil {
		members.Stop()
		return nil, err
	}
	pc := &peer.Client{TLS: clientTLS, Tokens: &peer.FileTokenSource{Path: o.peerTokenFile}}
	return &peerSetup{o: o, kube: client, ns: ns, ip: ip, members: members, serving: serving,
		peers: &cache.Peers{Registry: reg, Members: members, Client: pc}}, nil
}

// peerPortName is the name of the peer port in the Service (deploy/).
const peerPortName = "peer"

// cachePeers is what the cache reads peers with; nil without --peers.
func (p *peerSetup) cachePeers() *cache.Peers {
	if p == nil {
		return nil
	}
	return p.peers
}

// serve serves the peer endpoint from c until ctx ends.
func (p *peerSetup) serve(ctx context.Context, c *cache.Cache, m *metrics.Metrics) error {
	blobs, objects := c.PeerContent()
	pm := peer.NewMetrics()
	if err := m.Register(pm); err != nil {
		return fmt.Errorf("registering the peer metrics: %w", err)
	}
	srv, err := peer.NewServer(peer.Config{Blobs: blobs, Objects: objects, Reviewer: peer.TokenReviewer{Kube: p.kube},
		Namespace: p.ns, ServiceAccount: p.o.peerServiceAccount, MaxStreams: p.o.peerMaxStreams, Metrics: pm})
	if err != nil {
		return err
	}
	addr := net.JoinHostPort(p.ip, strconv.Itoa(p.o.peerPort))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening for peers: %w", err)
	}
	hs := peer.NewHTTPServer(srv, p.serving)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = hs.Shutdown(sctx)
	}()
	go func() {
		if err := hs.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "peer endpoint stopped", "address", addr)
		}
	}()
	klog.InfoS("serving peers", "address", addr, "service", p.o.peerService)
	go func() {
		r, err := c.RegisterHeld(ctx)
		if err != nil {
			klog.InfoS("registering the trees this node holds for peers; each registers again when it commits", "err", err)
		}
		klog.InfoS("registered the trees this node holds for peers", "listed", r.Listed, "unlisted", r.Unlisted)
	}()
	return nil
}

// stop ends the membership watch.
func (p *peerSetup) stop() {
	if p != nil {
		p.members.Stop()
	}
}
