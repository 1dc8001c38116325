// Package e2e runs modelcache where users run it: the node plugin's image as
// a DaemonSet (from deploy/kubernetes and from the Helm chart) on a real
// kubelet, with real pods, against a loopback MinIO. make e2e runs it as
// root; the cluster is started and stopped by TestMain, and nothing of it
// is left running or mounted afterwards, pass or fail.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/e2e/cluster"
	"github.com/modelcache/modelcache/test/e2e/images"
	"github.com/modelcache/modelcache/test/testenv"
)

const (
	nodeName = "e2e-node"
	// cacheDir is the plugin's hostPath in deploy/ (--cache-dir).
	cacheDir = "/var/lib/modelcache"
	// testImage runs the model-server stand-in pods: busybox from Debian.
	testImage = "modelcache.e2e/busybox:1"
)

// suite is what every test shares.
var suite struct {
	work    string
	bin     string // binaries the suite built
	cluster *cluster.Cluster
	minio   *testenv.MinIO
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) (code int) {
	repo := testenv.RepoRoot()
	cfg := cluster.Config{Bin: filepath.Join(repo, "bin"), Node: nodeName}
	if err := cluster.Check(cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if _, err := os.Stat(cacheDir); err == nil {
		fmt.Fprintf(os.Stderr, "make e2e needs %s unused (the plugin's cache hostPath); it exists: remove it if an earlier run left it\n", cacheDir)
		return 1
	}
	work, err := os.MkdirTemp("", "modelcache-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	suite.work, cfg.Work = work, filepath.Join(work, "cluster")
	suite.bin = filepath.Join(work, "bin")
	defer func() {
		if suite.cluster != nil {
			start := time.Now()
			suite.cluster.Down()
			fmt.Printf("cluster down in %s\n", time.Since(start).Round(time.Second))
		}
		if suite.minio != nil {
			suite.minio.Stop()
		}
		_ = os.RemoveAll(cacheDir)
		if left := append(cluster.MountPoints(cluster.KubeletDir), cluster.MountPoints(work+"/")...); len(left) > 0 {
			fmt.Fprintf(os.Stderr, "mounts left after the cluster went down: %s\n", strings.Join(left, ", "))
			code = 1
		}
		if left := cluster.ProcessesMentioning(work); len(left) > 0 {
			fmt.Fprintf(os.Stderr, "processes left after the cluster went down:\n%s\n", strings.Join(left, "\n"))
			code = 1
		}
		_ = os.RemoveAll(work)
	}()

	start := time.Now()
	if err := buildBinaries(repo, suite.bin); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("images' binaries built in %s\n", time.Since(start).Round(time.Second))
	if suite.minio, err = testenv.StartMinIO(filepath.Join(work, "minio")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if suite.cluster, err = cluster.Up(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("cluster up in %s\n", time.Since(start).Round(time.Second))
	if err := importBaseImages(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// buildBinaries builds what the images hold, as make build and the
// Dockerfile build them (static, -trimpath), into out, each named after its
// package directory. One go build links them in parallel.
func buildBinaries(repo, out string) error {
	pkgs := []string{"./cmd/modelcache-csi", "./cmd/modelcachectl",
		"./test/e2e/standins/registrar", "./test/e2e/standins/livenessprobe", "./test/e2e/standins/pause"}
	args := append([]string{"build", "-trimpath", "-ldflags", "-s -w -X main.version=e2e", "-o", out + "/"}, pkgs...)
	cmd := exec.Command("go", args...)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building %s: %v\n%s", strings.Join(pkgs, " "), err, b)
	}
	return nil
}

// importBaseImages imports the sandbox image and the test pods' image.
func importBaseImages() error {
	dir := filepath.Join(suite.work, "images")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	pause := images.New(cluster.PauseImage, "/pause").Add("/pause", filepath.Join(suite.bin, "pause"))
	busybox := images.New(testImage, "/bin/sh").Add("/bin/busybox", "/bin/busybox")
	out, err := exec.Command("/bin/busybox", "--list").Output()
	if err != nil {
		return fmt.Errorf("listing busybox applets (apt-get install busybox-static): %w", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		if applet != "busybox" {
			busybox.Link("/bin/"+applet, "busybox")
		}
	}
	for _, im := range []*images.Image{pause, busybox} {
		if err := im.Import(suite.cluster.CtrAddress, dir); err != nil {
			return err
		}
	}
	return nil
}

// pluginImages imports the images a rendered DaemonSet names, built from
// this repository: the driver image for the modelcache container (the
// Dockerfile's final stage: both binaries in /usr/local/bin, mount(8) and
// umount(8) from this Debian host with their libraries, CA certificates),
// and the stand-ins tagged with the sidecars' image names.
func pluginImages(containers map[string]string) error {
	dir := filepath.Join(suite.work, "images")
	for container, tag := range containers {
		var im *images.Image
		switch container {
		case "modelcache":
			im = images.New(tag, "/usr/local/bin/modelcache-csi").
				Add("/usr/local/bin/modelcache-csi", filepath.Join(suite.bin, "modelcache-csi")).
				Add("/usr/local/bin/modelcachectl", filepath.Join(suite.bin, "modelcachectl")).
				Add("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-certificates.crt")
			for _, b := range []string{"/usr/bin/mount", "/usr/bin/umount"} {
				if err := im.AddWithLibraries(b); err != nil {
					return err
				}
			}
		case "node-driver-registrar":
			im = images.New(tag, "/registrar").Add("/registrar", filepath.Join(suite.bin, "registrar"))
		case "liveness-probe":
			im = images.New(tag, "/livenessprobe").Add("/livenessprobe", filepath.Join(suite.bin, "livenessprobe"))
		default:
			return fmt.Errorf("the node DaemonSet has a container %q the e2e suite has no image for", container)
		}
		if err := im.Import(suite.cluster.CtrAddress, dir); err != nil {
			return err
		}
	}
	return nil
}
