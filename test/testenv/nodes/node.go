package nodes

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/test/testenv"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Node is one node of the fleet: a network namespace and, unless it is a
// fake peer, a node plugin.
type Node struct {
	Name     string // its node name (--node-id, the EndpointSlice's nodeName)
	IP       string // its address on the bridge (POD_IP)
	Netns    *Netns
	Dir      string // its kubelet directory: CSI socket, targets
	CacheDir string

	fleet      *Fleet
	kubeconfig string
	tokenFile  string
	mu         sync.Mutex
	driver     *testenv.Driver
}

// Start starts the node's plugin (again, after Kill or Stop) and waits
// until it answers Probe.
func (n *Node) Start() error {
	f := n.fleet
	wrap := []string{"nsenter", "--net=" + n.Netns.Path(), "--", "env", "POD_NAMESPACE=" + f.Namespace, "POD_IP=" + n.IP}
	args := []string{"--node-id=" + n.Name, "--kubeconfig=" + n.kubeconfig, "--peer-token-file=" + n.tokenFile,
		"--peers=" + strconv.FormatBool(f.cfg.Peers), "--admin-socket=none"}
	d, err := testenv.StartDriverWrapped(wrap, f.cfg.DriverBin, n.Dir, n.CacheDir, append(args, f.cfg.Args...)...)
	if err != nil {
		return fmt.Errorf("starting the plugin of %s: %w", n.Name, err)
	}
	n.mu.Lock()
	n.driver = d
	n.mu.Unlock()
	return nil
}

// Driver is the node's running plugin (nil before Start).
func (n *Node) Driver() *testenv.Driver {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.driver
}

// Kill kills the node's plugin with SIGKILL, as a node crash does.
func (n *Node) Kill() {
	if d := n.Driver(); d != nil {
		d.Kill()
	}
}

// Stop stops the node's plugin with SIGTERM (a no-op when it is not
// running).
func (n *Node) Stop() {
	if d := n.Driver(); d != nil {
		d.Stop()
	}
}

// Logs is what the node's plugin printed.
func (n *Node) Logs() string {
	if d := n.Driver(); d != nil {
		return d.Logs()
	}
	return ""
}

// Target is where volume id is published on this node.
func (n *Node) Target(volumeID string) string {
	return filepath.Join(n.Dir, "pods", volumeID, "volumes", "mount")
}

// Publish publishes modelURI as volume id as kubelet does, asking again
// while the plugin answers that the download still runs or that the
// remote is unavailable (kubelet asks again after any error; these are
// the ones another try can change), until it succeeds, fails otherwise
// or ctx ends; it returns the target path.
func (n *Node) Publish(ctx context.Context, volumeID, modelURI string, secrets map[string]string) (string, error) {
	target := n.Target(volumeID)
	req := testenv.PublishRequest(volumeID, target, map[string]string{"modelUri": modelURI}, secrets)
	for {
		d := n.Driver()
		if d == nil {
			return "", fmt.Errorf("%s runs no plugin", n.Name)
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := d.Node.NodePublishVolume(rctx, req)
		cancel()
		switch status.Code(err) {
		case codes.OK:
			return target, nil
		case codes.Aborted, codes.DeadlineExceeded, codes.Unavailable:
			if ctx.Err() != nil {
				return "", fmt.Errorf("publishing %s on %s: %w", volumeID, n.Name, err)
			}
			time.Sleep(100 * time.Millisecond)
		default:
			return "", err
		}
	}
}

// Unpublish unpublishes volume id.
func (n *Node) Unpublish(ctx context.Context, volumeID string) error {
	d := n.Driver()
	if d == nil {
		return fmt.Errorf("%s runs no plugin", n.Name)
	}
	_, err := d.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: n.Target(volumeID)})
	return err
}

// HashFiles returns the sha256 of every regular file under dir, by path
// relative to it.
func HashFiles(dir string) (map[string]string, error) {
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			return fmt.Errorf("reading %s: %w", path, err)
		}
		rel, _ := filepath.Rel(dir, path)
		out[rel] = hex.EncodeToString(h.Sum(nil))
		return nil
	})
	return out, err
}

// unmountUnder lazily unmounts every mount under dir, deepest first.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var targets []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			targets = append(targets, f[4])
		}
	}
	for i := len(targets) - 1; i >= 0; i-- {
		_ = unix.Unmount(targets[i], unix.MNT_DETACH)
	}
}
