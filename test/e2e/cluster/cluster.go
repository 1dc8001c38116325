// Package cluster starts and stops the real single-node Kubernetes of
// make e2e on this machine: containerd and runc from Debian, etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler and kubelet built
// from pinned Go modules into bin/. Everything listens on 127.0.0.1, and
// Down leaves nothing running or mounted, whatever state Up reached.
package cluster

import (
	"context"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// KubeletDir is kubelet's root directory: the one deploy/ and every
// production node use, so the manifests run unchanged.
const KubeletDir = "/var/lib/kubelet"

// marker marks a KubeletDir this package created, so that a run killed
// before Down can be cleaned by the next one and a real kubelet's never is.
const marker = ".modelcache-e2e"

// PauseImage is the sandbox image containerd is told to use; the suite
// builds and imports it before the first pod (nothing can be pulled).
const PauseImage = "modelcache.e2e/pause:1"

// Config says where the binaries are and where the cluster keeps its state.
type Config struct {
	Bin  string // kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, etcd
	Work string // scratch directory: PKI, logs, etcd, containerd
	Node string // node name
}

// Cluster is a running single-node cluster.
type Cluster struct {
	cfg        Config
	pki        *pki
	procs      []*process
	ipForward  []byte
	madeRunCtr bool

	Kubeconfig string // admin (system:masters)
	Rest       *rest.Config
	Client     kubernetes.Interface
	CtrAddress string // containerd's socket, for ctr
	PodLogsDir string
}

// Binaries from Debian packages the cluster needs, with the package to
// install when one is missing.
var debianBinaries = map[string]string{
	"containerd": "containerd", "runc": "runc", "ctr": "containerd",
	"/usr/lib/cni/bridge": "containernetworking-plugins", "/usr/lib/cni/host-local": "containernetworking-plugins",
	"/usr/lib/cni/loopback": "containernetworking-plugins",
}

// Check says what this machine lacks to run the cluster, in one error.
func Check(cfg Config) error {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root (kubelet, containerd and the node plugin make mounts)")
	}
	for bin, pkg := range debianBinaries {
		if _, err := exec.LookPath(bin); err != nil {
			missing = append(missing, fmt.Sprintf("%s (apt-get install %s)", bin, pkg))
		}
	}
	for _, b := range []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"} {
		if _, err := os.Stat(filepath.Join(cfg.Bin, b)); err != nil {
			missing = append(missing, fmt.Sprintf("%s in %s (make e2e builds it)", b, cfg.Bin))
		}
	}
	if out, _ := exec.Command("pgrep", "-x", "kubelet").Output(); len(out) > 0 {
		missing = append(missing, "a machine without a running kubelet (found pid "+strings.TrimSpace(string(out))+")")
	}
	if entries, err := os.ReadDir(KubeletDir); err == nil && len(entries) > 0 {
		if _, err := os.Stat(filepath.Join(KubeletDir, marker)); err != nil {
			missing = append(missing, KubeletDir+" unused: it exists and was not made by make e2e")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("make e2e cannot run here; it needs: %s", strings.Join(missing, "; "))
	}
	return nil
}

// Up starts the cluster and waits for the node to be Ready. On error the
// parts already started are stopped.
func Up(ctx context.Context, cfg Config) (c *Cluster, err error) {
	if err := Check(cfg); err != nil {
		return nil, err
	}
	c = &Cluster{cfg: cfg, CtrAddress: filepath.Join(cfg.Work, "containerd", "containerd.sock"), PodLogsDir: filepath.Join(cfg.Work, "pod-logs")}
	defer func() {
		if err != nil {
			c.Down()
			c = nil
		}
	}()
	// A run killed before its Down leaves mounts and a stale kubelet dir.
	cleanKubeletDir()
	for _, d := range []string{"logs", "etcd", "containerd", "cni", c.PodLogsDir} {
		if err := os.MkdirAll(filepath.Join(cfg.Work, d), 0o700); err != nil {
			return c, err
		}
	}
	if c.pki, err = newPKI(filepath.Join(cfg.Work, "pki")); err != nil {
		return c, fmt.Errorf("creating certificates: %w", err)
	}
	const server = "https://127.0.0.1:6443"
	if c.Kubeconfig, err = c.pki.kubeconfig("admin", pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}}, server); err != nil {
		return c, err
	}
	kubeletKubeconfig, err := c.pki.kubeconfig("kubelet", pkix.Name{CommonName: "system:node:" + cfg.Node, Organization: []string{"system:nodes"}}, server)
	if err != nil {
		return c, err
	}
	if err := c.startContainerd(ctx); err != nil {
		return c, err
	}
	if err := c.startControlPlane(ctx); err != nil {
		return c, err
	}
	if err := c.startKubelet(ctx, kubeletKubeconfig); err != nil {
		return c, err
	}
	return c, nil
}

func (c *Cluster) startContainerd(ctx context.Context) error {
	dir := filepath.Join(c.cfg.Work, "containerd")
	// The bridge plugin turns on IPv4 forwarding (isGateway); Down restores it.
	c.ipForward, _ = os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	// containerd 1.6 keeps shim sockets under /run/containerd whatever its
	// state directory; Down removes it only if it was made here.
	if _, err := os.Stat("/run/containerd"); errors.Is(err, os.ErrNotExist) {
		c.madeRunCtr = true
	}
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[plugins."io.containerd.grpc.v1.cri"]
  # Nothing can be pulled here: the sandbox image is imported by the suite.
  sandbox_image = %[4]q
  netns_mounts_under_state_dir = true
  # This sandbox has no CAP_SYS_RESOURCE: runc cannot set kubelet's negative
  # oom_score_adj and every pod would fail with "can't get final child's PID
  # from pipe: EOF".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[5]q
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
      Root = %[6]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.CtrAddress, PauseImage,
		filepath.Join(c.cfg.Work, "cni"), filepath.Join(dir, "runc"))
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(config), 0o600); err != nil {
		return err
	}
	// Pods reach each other and this node (10.88.0.1), nothing beyond: no
	// masquerade, and pods get no default route.
	cni := `{"cniVersion": "1.0.0", "name": "e2e", "plugins": [
  {"type": "bridge", "bridge": "mce2e0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]], "dataDir": "` + filepath.Join(c.cfg.Work, "cni", "ipam") + `"}},
  {"type": "loopback"}]}`
	if err := os.WriteFile(filepath.Join(c.cfg.Work, "cni", "10-e2e.conflist"), []byte(cni), 0o600); err != nil {
		return err
	}
	if err := c.start("containerd", "containerd", "--config", filepath.Join(dir, "config.toml")); err != nil {
		return err
	}
	return c.waitFor(ctx, "containerd", 30*time.Second, func() error {
		return exec.Command("ctr", "--address", c.CtrAddress, "version").Run()
	})
}

func (c *Cluster) startControlPlane(ctx context.Context) error {
	w, p := c.cfg.Work, c.pki.path
	if err := c.start("etcd", filepath.Join(c.cfg.Bin, "etcd"), "--name=e2e", "--data-dir="+filepath.Join(w, "etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=e2e=http://127.0.0.1:2380", "--listen-metrics-urls=http://127.0.0.1:2381"); err != nil {
		return err
	}
	if err := c.start("kube-apiserver", filepath.Join(c.cfg.Bin, "kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port=6443",
		// No kube-proxy and nothing else listens for the service IP.
		"--endpoint-reconciler-type=none",
		"--service-cluster-ip-range=10.0.0.0/24",
		"--client-ca-file="+p("ca.crt"),
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--kubelet-client-certificate="+p("admin.crt"), "--kubelet-client-key="+p("admin.key"),
		"--kubelet-preferred-address-types=Hostname",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
		"--authorization-mode=Node,RBAC", "--allow-privileged=true"); err != nil {
		return err
	}
	var err error
	if c.Rest, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig); err != nil {
		return err
	}
	if c.Client, err = kubernetes.NewForConfig(c.Rest); err != nil {
		return err
	}
	if err := c.waitFor(ctx, "kube-apiserver", 2*time.Minute, func() error {
		_, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return err
	}
	common := []string{"--kubeconfig=" + c.Kubeconfig, "--authentication-kubeconfig=" + c.Kubeconfig,
		"--authorization-kubeconfig=" + c.Kubeconfig, "--bind-address=127.0.0.1", "--leader-elect=false"}
	if err := c.start("kube-controller-manager", filepath.Join(c.cfg.Bin, "kube-controller-manager"), append(common,
		"--service-account-private-key-file="+p("sa.key"), "--root-ca-file="+p("ca.crt"),
		"--use-service-account-credentials=true")...); err != nil {
		return err
	}
	return c.start("kube-scheduler", filepath.Join(c.cfg.Bin, "kube-scheduler"), common...)
}

func (c *Cluster) startKubelet(ctx context.Context, kubeconfig string) error {
	if err := os.MkdirAll(KubeletDir, 0o750); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(KubeletDir, marker), nil, 0o600); err != nil {
		return err
	}
	// Bidirectional mount propagation needs kubelet's root on a shared
	// mount; here / is private, on a production node systemd makes it shared.
	if err := syscall.Mount(KubeletDir, KubeletDir, "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("binding %s onto itself: %w", KubeletDir, err)
	}
	if err := syscall.Mount("", KubeletDir, "", syscall.MS_SHARED|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("making %s rshared: %w", KubeletDir, err)
	}
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %q}
authorization: {mode: AlwaysAllow}
# cgroup v1 without systemd, as on this machine.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: "unix://%s"
podLogsDir: %q
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%%", imagefs.available: "1%%", nodefs.inodesFree: "1%%"}
makeIPTablesUtilChains: false
resolvConf: /etc/resolv.conf
`, c.pki.path("ca.crt"), c.CtrAddress, c.PodLogsDir)
	path := filepath.Join(c.cfg.Work, "kubelet-config.yaml")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		return err
	}
	if err := c.start("kubelet", filepath.Join(c.cfg.Bin, "kubelet"), "--config="+path, "--kubeconfig="+kubeconfig,
		"--root-dir="+KubeletDir, "--hostname-override="+c.cfg.Node, "-v=2"); err != nil {
		return err
	}
	if err := c.waitFor(ctx, "node "+c.cfg.Node+" Ready", 3*time.Minute, func() error {
		n, err := c.Client.CoreV1().Nodes().Get(ctx, c.cfg.Node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return fmt.Errorf("not Ready")
	}); err != nil {
		return err
	}
	return c.waitFor(ctx, "default ServiceAccount", time.Minute, func() error {
		_, err := c.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// Log returns the last lines of a component's log, for failure messages.
func (c *Cluster) Log(name string, lines int) string {
	b, _ := os.ReadFile(filepath.Join(c.cfg.Work, "logs", name+".log"))
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

func (c *Cluster) waitFor(ctx context.Context, what string, limit time.Duration, ready func() error) error {
	deadline := time.Now().Add(limit)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		for _, p := range c.procs {
			if p.exited() {
				return fmt.Errorf("waiting for %s: %s exited; its log ends:\n%s", what, p.name, c.Log(p.name, 30))
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %w", what, limit, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}
