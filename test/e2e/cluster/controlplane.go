package cluster

import (
	"context"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ControlPlaneConfig says where etcd and kube-apiserver are and where the
// control plane keeps its state.
type ControlPlaneConfig struct {
	Bin  string // etcd and kube-apiserver
	Work string // scratch directory (PKI, logs, etcd's data), removed by Stop; empty: a new temporary one
	// ExtraAPIServerArgs come after the control plane's own flags, so a
	// flag given here overrides one of them.
	ExtraAPIServerArgs []string
}

// ControlPlane is a running etcd and kube-apiserver, as envtest runs them:
// no containerd, kubelet, controller-manager or scheduler, so nothing
// schedules, runs or garbage-collects anything. The API server authorizes
// with RBAC only and enforces OwnerReferencesPermissionEnforcement.
// Everything listens on free loopback ports, so it can run beside make
// e2e's cluster and beside other control planes.
type ControlPlane struct {
	Work       string
	URL        string // the API server, https://127.0.0.1:<port>
	EtcdURL    string
	Kubeconfig string // admin (system:masters)
	Rest       *rest.Config
	Client     kubernetes.Interface

	helper   *Cluster // the process and PKI helpers of Up; helper.procs are what was started
	stopOnce sync.Once
}

// StartControlPlane starts etcd and kube-apiserver and waits for the API
// server's /readyz. On error, whatever was started is stopped and the work
// directory removed.
func StartControlPlane(ctx context.Context, cfg ControlPlaneConfig) (cp *ControlPlane, err error) {
	var missing []string
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(cfg.Bin, b)); err != nil {
			missing = append(missing, filepath.Join(cfg.Bin, b))
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("the control plane needs %s", strings.Join(missing, " and "))
	}
	work := cfg.Work
	if work == "" {
		if work, err = os.MkdirTemp("", "modelcache-controlplane-"); err != nil {
			return nil, err
		}
	}
	if work, err = filepath.Abs(work); err != nil {
		return nil, err
	}
	cp = &ControlPlane{Work: work}
	defer func() {
		if err != nil {
			cp.Stop()
			cp = nil
		}
	}()
	if err := os.MkdirAll(filepath.Join(work, "logs"), 0o700); err != nil {
		return cp, err
	}
	p, err := newPKI(filepath.Join(work, "pki"))
	if err != nil {
		return cp, fmt.Errorf("creating certificates: %w", err)
	}
	// Free ports are only free until someone else takes them: a component
	// that exits because its port was taken meanwhile is started again on
	// new ones.
	for attempt := 1; ; attempt++ {
		err = cp.start(ctx, cfg, p, attempt)
		if err == nil || !errors.Is(err, errPortTaken) || attempt == 3 {
			return cp, err
		}
		cp.stopProcesses()
	}
}

var errPortTaken = errors.New("a port was taken meanwhile")

func (cp *ControlPlane) start(ctx context.Context, cfg ControlPlaneConfig, p *pki, attempt int) error {
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, secure := ports[0], ports[1], ports[2]
	cp.EtcdURL = fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	cp.URL = fmt.Sprintf("https://127.0.0.1:%d", secure)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", etcdPeer)
	cp.helper = &Cluster{cfg: Config{Bin: cfg.Bin, Work: cp.Work}, pki: p}
	data := filepath.Join(cp.Work, fmt.Sprintf("etcd-%d", attempt))
	if err := cp.helper.start("etcd", filepath.Join(cfg.Bin, "etcd"), "--name=controlplane", "--data-dir="+data,
		"--listen-client-urls="+cp.EtcdURL, "--advertise-client-urls="+cp.EtcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=controlplane="+peerURL,
		// Scratch data: durability buys nothing and costs seconds per test.
		"--unsafe-no-fsync"); err != nil {
		return err
	}
	args := []string{
		"--etcd-servers=" + cp.EtcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", secure),
		// No kube-proxy and nothing else listens for the service IP.
		"--endpoint-reconciler-type=none",
		"--service-cluster-ip-range=10.0.0.0/24",
		"--client-ca-file=" + p.path("ca.crt"),
		"--tls-cert-file=" + p.path("apiserver.crt"), "--tls-private-key-file=" + p.path("apiserver.key"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + p.path("sa.pub"), "--service-account-signing-key-file=" + p.path("sa.key"),
		"--authorization-mode=RBAC",
		// Added to the default plugins: blockOwnerDeletion needs the right
		// to update the owner's finalizers, as in production clusters.
		"--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
	}
	if err := cp.helper.start("kube-apiserver", filepath.Join(cfg.Bin, "kube-apiserver"), append(args, cfg.ExtraAPIServerArgs...)...); err != nil {
		return err
	}
	if cp.Kubeconfig, err = p.kubeconfig("admin", pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}}, cp.URL); err != nil {
		return err
	}
	if cp.Rest, err = clientcmd.BuildConfigFromFlags("", cp.Kubeconfig); err != nil {
		return err
	}
	if cp.Client, err = kubernetes.NewForConfig(cp.Rest); err != nil {
		return err
	}
	err = cp.helper.waitFor(ctx, "kube-apiserver", 2*time.Minute, func() error {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err := cp.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(rctx)
		return err
	})
	if err != nil && (strings.Contains(cp.Log("etcd", 30), "address already in use") ||
		strings.Contains(cp.Log("kube-apiserver", 30), "address already in use")) {
		return fmt.Errorf("%w: %v", errPortTaken, err)
	}
	return err
}

// Log returns the last lines of etcd's or kube-apiserver's log.
func (cp *ControlPlane) Log(name string, lines int) string {
	if cp.helper == nil {
		return ""
	}
	return cp.helper.Log(name, lines)
}

// Stop stops the processes StartControlPlane started, by their PIDs, and
// removes the work directory. It may be called more than once.
func (cp *ControlPlane) Stop() {
	cp.stopOnce.Do(func() {
		cp.stopProcesses()
		_ = os.RemoveAll(cp.Work)
	})
}

func (cp *ControlPlane) stopProcesses() {
	if cp.helper == nil {
		return
	}
	for i := len(cp.helper.procs) - 1; i >= 0; i-- {
		if p := cp.helper.procs[i]; !p.exited() {
			p.stop(15 * time.Second)
		}
	}
	cp.helper.procs = nil
}

// freePorts returns n distinct loopback ports nobody listened on a moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
