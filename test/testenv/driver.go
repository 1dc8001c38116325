package testenv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// DriverBuildFlagsEnv names the environment variable whose go build flags
// BuildDriver adds: make integration and make sanity set it to -race, so
// the race detector watches the driver process the tests drive (the test
// binary's own -race sees only the harness).
const DriverBuildFlagsEnv = "MODELCACHE_DRIVER_BUILDFLAGS"

// BuildDriver compiles cmd/modelcache-csi into dir, with the flags of
// DriverBuildFlagsEnv, and returns its path.
func BuildDriver(dir string) (string, error) {
	out := filepath.Join(dir, "modelcache-csi")
	args := append(append([]string{"build"}, strings.Fields(os.Getenv(DriverBuildFlagsEnv))...), "-o", out, "./cmd/modelcache-csi")
	cmd := exec.Command("go", args...)
	cmd.Dir = RepoRoot()
	// Not the harness's own CGO_ENABLED=0 (make integration builds it
	// static): -race needs cgo, and the driver then shares the build of
	// its packages with go vet -race and the unit tests.
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "CGO_ENABLED=") })
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building modelcache-csi: %v\n%s", err, b)
	}
	return out, nil
}

// Driver is a running modelcache-csi process.
type Driver struct {
	Socket     string
	CacheDir   string
	Conn       *grpc.ClientConn
	Node       csi.NodeClient
	Identity   csi.IdentityClient
	Controller csi.ControllerClient // answers only with --mode=controller or all

	cmd  *exec.Cmd
	mu   sync.Mutex
	logs bytes.Buffer
	done chan struct{}
}

// StartDriver runs bin in node mode (args may override, e.g. "--mode=all")
// on a socket under runDir with its cache in cacheDir, and waits until
// Probe answers.
func StartDriver(bin, runDir, cacheDir string, args ...string) (*Driver, error) {
	return StartDriverWrapped(nil, bin, runDir, cacheDir, args...)
}

// StartDriverWrapped is StartDriver with the driver run under wrap, a
// command and its arguments (e.g. unshare, to give the driver its own mount
// namespace as its DaemonSet container has).
func StartDriverWrapped(wrap []string, bin, runDir, cacheDir string, args ...string) (*Driver, error) {
	d := &Driver{Socket: filepath.Join(runDir, "csi.sock"), CacheDir: cacheDir, done: make(chan struct{})}
	// --min-free=0: how full the test machine's disk is must not decide a
	// test; tests of the budget pass their own limits.
	// --kubelet-dir=runDir: tests publish under their own directory, as
	// kubelet does under /var/lib/kubelet. --allow-endpoint: MinIO and the
	// test proxies listen on loopback, which the driver otherwise refuses.
	all := append([]string{"--mode=node", "--endpoint=unix://" + d.Socket, "--node-id=test-node", "--cache-dir=" + cacheDir,
		"--min-free=0", "--kubelet-dir=" + runDir, "--allow-endpoint=127.0.0.1/32", "-v=2"}, args...)
	argv := append(append(append([]string{}, wrap...), bin), all...)
	d.cmd = exec.Command(argv[0], argv[1:]...)
	d.cmd.Stdout, d.cmd.Stderr = (*lockedWriter)(d), (*lockedWriter)(d)
	if err := d.cmd.Start(); err != nil {
		return nil, err
	}
	started.add(d)
	go func() { _ = d.cmd.Wait(); close(d.done) }()
	conn, err := grpc.NewClient("unix://"+d.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		d.Kill()
		return nil, err
	}
	d.Conn, d.Node, d.Identity, d.Controller = conn, csi.NewNodeClient(conn), csi.NewIdentityClient(conn), csi.NewControllerClient(conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := d.Identity.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && resp.GetReady().GetValue() {
			return d, nil
		}
		select {
		case <-d.done:
			return nil, fmt.Errorf("modelcache-csi exited during start-up:\n%s", d.Logs())
		default:
		}
		if time.Now().After(deadline) {
			d.Kill()
			return nil, fmt.Errorf("modelcache-csi did not answer Probe: %v\n%s", err, d.Logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Pid is the driver's process ID (under a wrapper that execs it, such as
// unshare without --fork, the driver's own).
func (d *Driver) Pid() int { return d.cmd.Process.Pid }

// Kill sends SIGKILL, as a node crash or OOM kill would, and waits.
func (d *Driver) Kill() { d.signal(syscall.SIGKILL) }

// Stop sends SIGTERM, as Kubernetes does on a rolling update, and waits.
func (d *Driver) Stop() { d.signal(syscall.SIGTERM) }

func (d *Driver) signal(s os.Signal) {
	if d.Conn != nil {
		d.Conn.Close()
	}
	_ = d.cmd.Process.Signal(s)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// Logs returns what the driver printed.
func (d *Driver) Logs() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.logs.String()
}

// raceBanner opens and closes each report of a binary built with -race.
const raceBanner = "=================="

// Races returns the data race reports the driver printed so far, "" when
// none. A race-built driver only prints them and goes on, so a test must
// ask.
func (d *Driver) Races() string {
	logs := d.Logs()
	var out strings.Builder
	for {
		i := strings.Index(logs, "WARNING: DATA RACE")
		if i < 0 {
			return out.String()
		}
		end := strings.Index(logs[i:], raceBanner)
		if end < 0 {
			end = len(logs) - i
		}
		out.WriteString(logs[i:i+end] + "\n")
		logs = logs[i+end:]
	}
}

// started holds every driver this process started, for RaceReports.
var started drivers

type drivers struct {
	mu  sync.Mutex
	all []*Driver
}

func (s *drivers) add(d *Driver) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.all = append(s.all, d)
}

// RaceReports returns the data race reports of every driver this process
// started, "" when none.
func RaceReports() string {
	started.mu.Lock()
	defer started.mu.Unlock()
	var out strings.Builder
	for _, d := range started.all {
		out.WriteString(d.Races())
	}
	return out.String()
}

type lockedWriter Driver

func (w *lockedWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.logs.Write(b)
}

// PublishRequest is a NodePublishVolumeRequest as kubelet sends it for an
// inline volume.
func PublishRequest(volumeID, target string, attrs, secrets map[string]string) *csi.NodePublishVolumeRequest {
	ctx := map[string]string{
		"csi.storage.k8s.io/pod.name":      "model-server-0",
		"csi.storage.k8s.io/pod.namespace": "default",
		"csi.storage.k8s.io/pod.uid":       "0d6a4a6e-0000-4000-8000-" + fmt.Sprintf("%012x", len(target)),
		"csi.storage.k8s.io/ephemeral":     "true",
	}
	for k, v := range attrs {
		ctx[k] = v
	}
	return &csi.NodePublishVolumeRequest{
		VolumeId:   volumeID,
		TargetPath: target,
		Readonly:   true,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		VolumeContext: ctx,
		Secrets:       secrets,
	}
}
