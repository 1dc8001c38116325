// Package nodes runs a fleet of real node plugins (modelcache-csi) on one
// machine, each in its own network namespace with a veth to a bridge, its
// own cache directory, CSI socket and node name, against a real API
// server and an origin behind a capped, counting proxy: what issue 23's
// peers need to be tried for real (docs/design.md "Peers").
//
// The bridge lives in a hub namespace of its own; the API server's relay
// and the origin's proxy listen there, so nothing listens on an address of
// the test's own namespace but loopback. Between every two nodes' peer
// ports sits a counting relay (reached by a DNAT rule in the client's
// namespace, so TLS still checks the real peer's address): a test knows
// exactly how many bytes each node read from each other node and from the
// origin. The plugins run under nsenter --net, which leaves the mount
// namespace shared: their bind mounts are the test's to read.
//
// Close undoes everything: processes, mounts, namespaces (the veths and
// the bridge go with them), relays and the Kubernetes objects.
package nodes

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"

	"github.com/modelcache/modelcache/test/testenv"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Config describes a fleet.
type Config struct {
	// Nodes is how many node plugins run.
	Nodes int
	// DriverBin is the modelcache-csi binary (testenv.BuildDriver).
	DriverBin string
	// Admin reaches the API server as an administrator, on the test's
	// loopback (cluster.ControlPlane's Rest).
	Admin *rest.Config
	// Origin is the server models come from, on the test's loopback (a
	// MinIO's http:// endpoint): the nodes reach it through Fleet.Origin.
	Origin string
	// Peers starts the plugins with --peers.
	Peers bool
	// Args are more flags for every plugin (a later flag wins).
	Args []string
	// Dir is the fleet's scratch directory (caches, sockets, mounts);
	// empty: a new temporary one, removed by Close.
	Dir string
}

// Fleet is a running fleet.
type Fleet struct {
	ID        string // unique to the run: names of namespaces and objects
	Namespace string // the Kubernetes namespace of the plugins
	Kube      kubernetes.Interface
	Nodes     []*Node
	// Origin is the proxy the nodes reach the origin through (its URL is
	// on the hub's address); it counts per object and per node.
	Origin *testenv.Proxy

	cfg     Config
	dir     string
	ownDir  bool
	net     *network
	api     *Relay
	apiURL  string
	mu      sync.Mutex
	members []Member
	taps    map[[2]string]*Relay // (from, to) node names
	fakes   []*Node
}

// Start builds the fleet and starts its plugins; on error whatever was
// made is undone.
func Start(ctx context.Context, cfg Config) (f *Fleet, err error) {
	if err := checkNetnsSupport(); err != nil {
		return nil, err
	}
	if cfg.Nodes < 1 || cfg.DriverBin == "" || cfg.Admin == nil || cfg.Origin == "" {
		return nil, errors.New("a fleet needs nodes, the driver, the API server and the origin")
	}
	id := runID()
	f = &Fleet{ID: id, Namespace: "modelcache-nodes-" + id, cfg: cfg, dir: cfg.Dir, taps: map[[2]string]*Relay{}}
	defer func() {
		if err != nil {
			f.Close()
			f = nil
		}
	}()
	if f.dir == "" {
		if f.dir, err = os.MkdirTemp("", "modelcache-nodes-"); err != nil {
			return f, err
		}
		f.ownDir = true
	}
	if f.Kube, err = kubernetes.NewForConfig(cfg.Admin); err != nil {
		return f, err
	}
	if err = f.wire(); err != nil {
		return f, err
	}
	if err = setupKube(ctx, f.Kube, f.Namespace); err != nil {
		return f, err
	}
	for i := range cfg.Nodes {
		if _, err = f.addNode(ctx, fmt.Sprintf("node-%d", i), true); err != nil {
			return f, err
		}
	}
	return f, f.startAll()
}

// wire makes the network, the API server's relay and the origin's proxy.
func (f *Fleet) wire() (err error) {
	if f.net, err = newNetwork(f.ID); err != nil {
		return err
	}
	u, err := url.Parse(f.cfg.Admin.Host)
	if err != nil {
		return fmt.Errorf("the API server's address %q: %w", f.cfg.Admin.Host, err)
	}
	if f.api, err = f.net.forwardToHost(u.Host); err != nil {
		return err
	}
	f.apiURL = "https://" + f.api.Addr()
	ln, err := f.net.listenInHub(0)
	if err != nil {
		return err
	}
	if f.Origin, err = testenv.StartProxyWith(f.cfg.Origin, testenv.ProxyOptions{Listener: ln}); err != nil {
		ln.Close()
		return err
	}
	return nil
}

// startAll starts every plugin at once, as a DaemonSet's pods start: they
// race for the peer CA.
func (f *Fleet) startAll() error {
	errs := make([]error, len(f.Nodes))
	var wg sync.WaitGroup
	for i, n := range f.Nodes {
		wg.Go(func() { errs[i] = n.Start() })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// addNode makes a node's namespace, files and membership, and taps the
// peer ports between it and every node there is; plugin says whether a
// plugin will run there (a fake peer's namespace has none).
func (f *Fleet) addNode(ctx context.Context, name string, plugin bool) (*Node, error) {
	f.mu.Lock()
	i := len(f.Nodes) + len(f.fakes)
	f.mu.Unlock()
	ns, addr, err := f.net.addNetns(i)
	if err != nil {
		return nil, err
	}
	n := &Node{Name: name, IP: addr, Netns: ns, Dir: filepath.Join(f.dir, name), fleet: f}
	n.CacheDir = filepath.Join(n.Dir, "cache")
	if err := os.MkdirAll(n.CacheDir, 0o700); err != nil {
		return nil, err
	}
	if plugin {
		if err := f.nodeFiles(ctx, n); err != nil {
			return nil, err
		}
	}
	f.mu.Lock()
	others := append(append([]*Node{}, f.Nodes...), f.fakes...)
	if plugin {
		f.Nodes = append(f.Nodes, n)
	} else {
		f.fakes = append(f.fakes, n)
	}
	f.members = append(f.members, Member{Node: name, IP: addr, Port: PeerPort})
	members := append([]Member{}, f.members...)
	f.mu.Unlock()
	for _, o := range others {
		if err := f.tapPair(o, n); err != nil {
			return nil, err
		}
	}
	return n, writeMembers(ctx, f.Kube, f.Namespace, members)
}

// tapPair puts a counting relay each way between two nodes' peer ports.
func (f *Fleet) tapPair(a, b *Node) error {
	for _, p := range [][2]*Node{{a, b}, {b, a}} {
		r, err := f.net.tap(p[0].Netns, p[1].IP, PeerPort)
		if err != nil {
			return err
		}
		f.mu.Lock()
		f.taps[[2]string{p[0].Name, p[1].Name}] = r
		f.mu.Unlock()
	}
	return nil
}

// nodeFiles writes a node's kubeconfig and peer token.
func (f *Fleet) nodeFiles(ctx context.Context, n *Node) error {
	apiToken, err := Token(ctx, f.Kube, f.Namespace, ServiceAccount)
	if err != nil {
		return err
	}
	peerToken, err := Token(ctx, f.Kube, f.Namespace, ServiceAccount, "modelcache-peer")
	if err != nil {
		return err
	}
	n.kubeconfig = filepath.Join(n.Dir, "kubeconfig")
	if err := writeKubeconfig(n.kubeconfig, f.apiURL, f.cfg.Admin, apiToken); err != nil {
		return err
	}
	n.tokenFile = filepath.Join(n.Dir, "peer-token")
	return os.WriteFile(n.tokenFile, []byte(peerToken), 0o600)
}

// AddFakePeer makes a namespace on the bridge for a peer the test plays
// (listen there with Node.Netns.Listen on Node.IP and PeerPort), lists it
// as a member of the peer Service, and taps the peer ports between it and
// every node.
func (f *Fleet) AddFakePeer(ctx context.Context, name string) (*Node, error) {
	return f.addNode(ctx, name, false)
}

// Tap is the relay between from and to's peer port: its Down counts the
// bytes from read from to.
func (f *Fleet) Tap(from, to *Node) *Relay {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.taps[[2]string{from.Name, to.Name}]
}

// PeerBytes is what node n read from every other node's peer port.
func (f *Fleet) PeerBytes(n *Node) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	var sum int64
	for k, r := range f.taps {
		if k[0] == n.Name {
			sum += r.Down.Load()
		}
	}
	return sum
}

// OriginBytes is what node n read from the origin (object bytes).
func (f *Fleet) OriginBytes(n *Node) int64 { return f.Origin.ObjectBytesTo(n.IP) }

// DialContext dials from the hub, from where every node's address is
// reachable (a test asking a plugin's peer endpoint itself).
func (f *Fleet) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return f.net.DialContext(ctx, network, addr)
}

// PeerAddr is the host:port of a node's peer endpoint.
func (n *Node) PeerAddr() string { return net.JoinHostPort(n.IP, fmt.Sprint(PeerPort)) }

// Close stops the plugins, unmounts what they mounted and removes the
// fleet's namespaces, relays, proxy, Kubernetes objects and files.
func (f *Fleet) Close() {
	var wg sync.WaitGroup
	for _, n := range f.Nodes {
		wg.Go(n.Stop)
	}
	wg.Wait()
	if f.dir != "" {
		unmountUnder(f.dir)
	}
	for _, r := range f.taps {
		r.Close()
	}
	if f.api != nil {
		f.api.Close()
	}
	if f.Origin != nil {
		f.Origin.Stop()
	}
	if f.net != nil {
		f.net.remove()
	}
	if f.Kube != nil {
		ctx := context.Background()
		_ = f.Kube.RbacV1().ClusterRoleBindings().Delete(ctx, f.Namespace, metav1.DeleteOptions{})
		_ = f.Kube.RbacV1().ClusterRoles().Delete(ctx, f.Namespace, metav1.DeleteOptions{})
		// No namespace controller runs beside a bare API server: the
		// namespace stays Terminating, its objects with it, under a name
		// no other run uses.
		_ = f.Kube.CoreV1().Namespaces().Delete(ctx, f.Namespace, metav1.DeleteOptions{})
	}
	if f.ownDir {
		_ = os.RemoveAll(f.dir)
	}
}

// Leases lists the Leases in the plugins' namespace.
func (f *Fleet) Leases(ctx context.Context) (int, error) {
	l, err := f.Kube.CoordinationV1().Leases(f.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return 0, err
	}
	return len(l.Items), nil
}
