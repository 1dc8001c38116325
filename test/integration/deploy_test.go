package integration

// The deploy manifests run against the real binaries: the node DaemonSet's
// own arguments start the built driver, the examples' volumes go through
// NodePublishVolume as kubelet builds it from them, and the prefetch
// example's command warms a real cache. Root, real MinIO, real mounts.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	mccsi "github.com/modelcache/modelcache/pkg/csi"
	"github.com/modelcache/modelcache/pkg/fleet"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/test/testenv"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// yamlDocs returns the documents of a file under the repository root as
// JSON, each with its kind.
func yamlDocs(t *testing.T, rel string) []deployDoc {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), rel))
	if err != nil {
		t.Fatal(err)
	}
	var out []deployDoc
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		j, err := yaml.YAMLToJSON(doc)
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		var head struct {
			Kind     string            `json:"kind"`
			Metadata metav1.ObjectMeta `json:"metadata"`
		}
		if err := yaml.Unmarshal(j, &head); err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		if head.Kind != "" {
			out = append(out, deployDoc{kind: head.Kind, name: head.Metadata.Name, namespace: head.Metadata.Namespace, json: j})
		}
	}
}

type deployDoc struct {
	kind, name, namespace string
	json                  []byte
}

func (d deployDoc) decode(t *testing.T, into any) {
	t.Helper()
	if err := yaml.Unmarshal(d.json, into); err != nil {
		t.Fatalf("%s %s: %v", d.kind, d.name, err)
	}
}

// nodePluginContainer returns the node DaemonSet's modelcache-csi container
// and the DaemonSet.
func nodePluginContainer(t *testing.T) (*appsv1.DaemonSet, corev1.Container) {
	t.Helper()
	for _, d := range yamlDocs(t, "deploy/kubernetes/node.yaml") {
		if d.kind != "DaemonSet" {
			continue
		}
		var ds appsv1.DaemonSet
		d.decode(t, &ds)
		for _, c := range ds.Spec.Template.Spec.Containers {
			if strings.HasPrefix(c.Image, "modelcache-csi") {
				return &ds, c
			}
		}
	}
	t.Fatal("deploy/kubernetes/node.yaml has no DaemonSet running modelcache-csi")
	return nil, corev1.Container{}
}

// The node DaemonSet's plugin arguments, with only the downward-API
// variables filled in (the node name, 127.0.0.1 for the pod IP), the
// metrics port moved to a free one, the host paths (--endpoint's socket,
// --cache-dir, --kubelet-dir and --peer-token-file if given) moved to
// temporary directories, and --peers turned off (it needs the API server
// that test/fleet and make e2e run it against; the other --peer* flags
// are still parsed), start the built
// driver: it answers Probe as the driver named in the manifests, serves
// metrics where --metrics-address says, creates its admin socket (0600) at
// <cache-dir>/admin.sock, makes the cache directory 0700, and exits on
// SIGTERM well within the DaemonSet's termination grace period.
func TestDeploy_NodeDaemonSetArgs_StartTheDriver_RealBinary(t *testing.T) {
	ds, plugin := nodePluginContainer(t)
	dir := t.TempDir()
	socketDir, cacheDir := filepath.Join(dir, "plugin"), filepath.Join(dir, "cache")
	if err := os.MkdirAll(socketDir, 0o755); err != nil {
		t.Fatal(err)
	}
	port, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	// HOST_IP (status.hostIP) is an address of TEST-NET-1: refused to
	// tenants like the node's own, and nothing here connects to it.
	env := map[string]string{"NODE_NAME": "test-node", "POD_IP": "127.0.0.1", "HOST_IP": "192.0.2.1", "POD_NAMESPACE": "modelcache"}
	for _, e := range plugin.Env {
		if _, ok := env[e.Name]; !ok {
			t.Fatalf("the plugin's env %s is new: decide what this test substitutes for it", e.Name)
		}
	}
	var args []string
	var socket, metricsAddr string
	for _, a := range plugin.Args {
		for k, v := range env {
			a = strings.ReplaceAll(a, "$("+k+")", v)
		}
		if strings.Contains(a, "$(") {
			t.Fatalf("plugin arg %q references a variable the test does not know", a)
		}
		name, value, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch name {
		case "endpoint":
			p, ok := strings.CutPrefix(value, "unix://")
			if !ok {
				t.Fatalf("--endpoint=%s is not a unix socket", value)
			}
			socket = filepath.Join(socketDir, path.Base(p))
			a = "--endpoint=unix://" + socket
		case "cache-dir":
			a = "--cache-dir=" + cacheDir
		case "kubelet-dir":
			a = "--kubelet-dir=" + filepath.Join(dir, "kubelet")
		case "peers":
			if value != "" {
				t.Fatalf("the DaemonSet passes %q; this test expects a bare --peers to turn off", a)
			}
			a = "--peers=false"
		case "peer-token-file":
			a = "--peer-token-file=" + filepath.Join(dir, "peer-token")
		case "metrics-address":
			host, _, ok := strings.Cut(value, ":")
			if !ok || host != "127.0.0.1" {
				t.Fatalf("--metrics-address=%s: want $(POD_IP):port", value)
			}
			metricsAddr = fmt.Sprintf("127.0.0.1:%d", port)
			a = "--metrics-address=" + metricsAddr
		default:
			if strings.HasPrefix(value, "/") || strings.Contains(value, "://") {
				t.Fatalf("plugin arg %q names a host path this test does not move to a temporary directory", a)
			}
		}
		args = append(args, a)
	}
	if socket == "" || metricsAddr == "" {
		t.Fatalf("plugin args %q lack --endpoint or --metrics-address", plugin.Args)
	}

	var logs testenv.SyncBuffer
	cmd := exec.Command(driverBin, args...)
	cmd.Env = os.Environ()
	for _, e := range plugin.Env {
		cmd.Env = append(cmd.Env, e.Name+"="+env[e.Name])
	}
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("driver args %q, logs:\n%s", args, logs.String())
		}
	})

	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	id := csi.NewIdentityClient(conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := id.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && resp.GetReady().GetValue() {
			break
		}
		select {
		case err := <-done:
			stopped = true
			t.Fatalf("the driver exited during start-up with the DaemonSet's args: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the driver did not answer Probe: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ctx := context.Background()
	info, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.GetName() != mccsi.DriverName {
		t.Fatalf("GetPluginInfo = %v, %v; want %s, the CSIDriver's name", info, err, mccsi.DriverName)
	}
	ni, err := csi.NewNodeClient(conn).NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || ni.GetNodeId() != env["NODE_NAME"] {
		t.Fatalf("NodeGetInfo = %v, %v; want node id %s from $(NODE_NAME)", ni, err, env["NODE_NAME"])
	}

	// Metrics where the DaemonSet says (the port it declares, here moved).
	var body []byte
	for {
		resp, err := http.Get("http://" + metricsAddr + "/metrics")
		if err == nil {
			body, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("GET /metrics: %s", resp.Status)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no metrics at %s: %v", metricsAddr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !bytes.Contains(body, []byte("modelcache_")) {
		t.Fatalf("/metrics has no modelcache_ series:\n%s", body)
	}

	// The node's address from the downward API is among the refused.
	if !strings.Contains(logs.String(), `hostIPs=["192.0.2.1"]`) {
		t.Errorf("the driver's egress rules do not name $(HOST_IP) 192.0.2.1 as the node's:\n%s", logs.String())
	}

	// The admin socket the prefetch example and modelcachectl expect.
	sock := filepath.Join(cacheDir, "admin.sock")
	if err := testenv.WaitAdmin(sock, 10*time.Second); err != nil {
		t.Fatalf("admin API at %s: %v", sock, err)
	}
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket %s: %v, %v; want a socket of mode 0600", sock, fi, err)
	}
	if fi, err := os.Stat(cacheDir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("cache dir %s: %v, %v; want mode 0700", cacheDir, fi, err)
	}

	// SIGTERM, as the DaemonSet's rolling update sends it.
	grace := 30 * time.Second
	if g := ds.Spec.Template.Spec.TerminationGracePeriodSeconds; g != nil {
		grace = time.Duration(*g) * time.Second
	}
	start := time.Now()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		stopped = true
		if err != nil {
			t.Fatalf("the driver exited with %v on SIGTERM, want 0", err)
		}
	case <-time.After(grace):
		t.Fatalf("the driver did not exit within the DaemonSet's terminationGracePeriodSeconds (%s) of SIGTERM", grace)
	}
	t.Logf("exited %s after SIGTERM", time.Since(start).Round(time.Millisecond))
}

const testVersion = "test-1.2.3"

var (
	versionedOnce sync.Once
	versionedDir  string
	versionedErr  error
)

// versionedBinaries builds both commands as `make build` does, stamped
// with testVersion, once per test run, and returns the directory.
func versionedBinaries(t *testing.T) string {
	t.Helper()
	versionedOnce.Do(func() {
		versionedDir, versionedErr = os.MkdirTemp("", "modelcache-versioned-")
		if versionedErr != nil {
			return
		}
		for _, cmd := range []string{"modelcache-csi", "modelcachectl"} {
			b := exec.Command("go", "build", "-trimpath", "-ldflags", "-X main.version="+testVersion, "-o", filepath.Join(versionedDir, cmd), "./cmd/"+cmd)
			b.Dir = testenv.RepoRoot()
			b.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := b.CombinedOutput(); err != nil {
				versionedErr = fmt.Errorf("building %s: %v\n%s", cmd, err, out)
				return
			}
		}
	})
	if versionedErr != nil {
		t.Fatal(versionedErr)
	}
	return versionedDir
}

// --version prints the version stamped at build time, for both binaries
// (the image and make build stamp it the same way), and the suite's
// unstamped driver says so too.
func TestDeploy_VersionFlag_PrintsTheStampedVersion_RealBinary(t *testing.T) {
	dir := versionedBinaries(t)
	for _, c := range []struct{ bin, want string }{
		{filepath.Join(dir, "modelcache-csi"), "modelcache-csi " + testVersion + "\n"},
		{filepath.Join(dir, "modelcachectl"), "modelcachectl " + testVersion + "\n"},
		{driverBin, "modelcache-csi dev\n"},
	} {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(c.bin, "--version")
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("%s --version: %v\n%s", c.bin, err, stderr.String())
		}
		if stdout.String() != c.want {
			t.Fatalf("%s --version printed %q, want %q", filepath.Base(c.bin), stdout.String(), c.want)
		}
	}
}

// exampleVolume is a model volume of an example, with what kubelet knows
// of the pod that has it.
type exampleVolume struct {
	volume             corev1.Volume
	podName, namespace string
}

// findModelVolumes walks a decoded document for pod spec "volumes" lists
// and returns their volumes of the driver: Pods, SeldonDeployment
// componentSpecs and InferenceService predictors alike.
func findModelVolumes(t *testing.T, v any) []corev1.Volume {
	t.Helper()
	var out []corev1.Volume
	switch x := v.(type) {
	case map[string]any:
		for k, val := range x {
			if list, ok := val.([]any); ok && k == "volumes" {
				for _, item := range list {
					j, _ := yaml.Marshal(item)
					var vol corev1.Volume
					if err := yaml.Unmarshal(j, &vol); err != nil {
						t.Fatal(err)
					}
					if vol.CSI != nil && vol.CSI.Driver == mccsi.DriverName {
						out = append(out, vol)
					}
				}
				continue
			}
			out = append(out, findModelVolumes(t, val)...)
		}
	case []any:
		for _, item := range x {
			out = append(out, findModelVolumes(t, item)...)
		}
	}
	return out
}

// exampleSecret returns the Secret name/namespace of the example's
// directory, as the plain key → value map kubelet passes.
func exampleSecret(t *testing.T, dir, name, namespace string) map[string]string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(testenv.RepoRoot(), dir, "*.yaml"))
	for _, f := range files {
		rel, _ := filepath.Rel(testenv.RepoRoot(), f)
		for _, d := range yamlDocs(t, rel) {
			ns := d.namespace
			if ns == "" {
				ns = "default"
			}
			if d.kind != "Secret" || d.name != name || ns != namespace {
				continue
			}
			var s corev1.Secret
			d.decode(t, &s)
			out := map[string]string{}
			for k, v := range s.Data {
				out[k] = string(v)
			}
			for k, v := range s.StringData {
				out[k] = v
			}
			return out
		}
	}
	t.Fatalf("no Secret %s/%s in %s", namespace, name, dir)
	return nil
}

// pointAtTestMinIO rewrites a secret's endpoint to endpoint and its keys to
// the suite's MinIO's, whatever form (rclone remote or AWS) the example
// uses, and fails unless all three were found: the example's key names are
// what is tested.
func pointAtTestMinIO(t *testing.T, secrets map[string]string, endpoint string) map[string]string {
	t.Helper()
	out := map[string]string{}
	var ep, id, key bool
	for k, v := range secrets {
		switch {
		case strings.HasSuffix(k, "_ENDPOINT") || k == "AWS_ENDPOINT_URL" || k == "AWS_ENDPOINT_URL_S3":
			v, ep = endpoint, true
		case strings.HasSuffix(k, "SECRET_ACCESS_KEY"):
			v, key = testenv.SecretKey, true
		case strings.HasSuffix(k, "ACCESS_KEY_ID"):
			v, id = testenv.AccessKey, true
		}
		out[k] = v
	}
	if !ep || !id || !key {
		t.Fatalf("the example's secret has keys %v; the test found no endpoint, access key id or secret key among them", keysOf(secrets))
	}
	return out
}

func keysOf(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// exampleModel is what the tests upload where an example's modelUri
// points: a small sklearn-like model.
var exampleModel = map[string][]byte{
	"model.joblib":  randomModel(200, map[string]int{"x": 64 << 10})["x"],
	"metadata.yaml": []byte("name: iris\nversions: [iris/v1]\nplatform: sklearn\n"),
}

// uploadExampleModel puts exampleModel where uri points in the suite's MinIO:
// the first path segment is the bucket, the rest the prefix.
func uploadExampleModel(t *testing.T, uri string) {
	t.Helper()
	u, err := source.ParseURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	bucket, prefix, _ := strings.Cut(u.Path, "/")
	if err := testenv.PutModel(context.Background(), testenv.Client(minio.Endpoint), bucket, prefix, exampleModel); err != nil {
		t.Fatal(err)
	}
}

// Each example's inline volume, as kubelet turns it into a
// NodePublishVolume: the volume's attributes plus the pod information
// (podInfoOnMount) and ephemeral=true, the example Secret's keys (endpoint
// and keys pointed at the test MinIO), readonly from csi.readOnly, and the
// SINGLE_NODE_WRITER mode kubelet sends for inline volumes. The model is
// mounted read-only at kubelet's target path, with the right bytes, and
// unpublish removes mount and directory.
func TestExample_InlineVolumes_PublishAsKubeletDoes_RealMinIO(t *testing.T) {
	for _, c := range []struct {
		file    string
		podName string // what the workload controller names the pod
	}{
		{"deploy/examples/inline-pod.yaml", ""},
		{"deploy/examples/seldon/seldondeployment-inline.yaml", "iris-default-0-classifier-6c9b7d8f4-x2x7k"},
		{"deploy/examples/kserve/inferenceservice.yaml", "sklearn-iris-predictor-7f9c6d5b8-q4mzt"},
	} {
		t.Run(filepath.Base(c.file), func(t *testing.T) {
			var vols []exampleVolume
			for _, d := range yamlDocs(t, c.file) {
				if d.kind == "Secret" {
					continue
				}
				var generic any
				d.decode(t, &generic)
				ns := d.namespace
				if ns == "" {
					ns = "default"
				}
				pod := c.podName
				if d.kind == "Pod" {
					pod = d.name
				}
				for _, v := range findModelVolumes(t, generic) {
					vols = append(vols, exampleVolume{volume: v, podName: pod, namespace: ns})
				}
			}
			if len(vols) != 1 {
				t.Fatalf("%s has %d inline volumes of %s, want 1", c.file, len(vols), mccsi.DriverName)
			}
			ev := vols[0]
			src := ev.volume.CSI
			if src.NodePublishSecretRef == nil {
				t.Fatalf("%s: the volume has no nodePublishSecretRef", c.file)
			}
			secrets := pointAtTestMinIO(t, exampleSecret(t, filepath.Dir(c.file), src.NodePublishSecretRef.Name, ev.namespace), minio.Endpoint)
			uploadExampleModel(t, src.VolumeAttributes[mccsi.AttrModelURI])

			dir := t.TempDir()
			d, err := testenv.StartDriver(driverBin, dir, filepath.Join(dir, "cache"), "-v=10")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				d.Stop()
				if strings.Contains(d.Logs(), testenv.SecretKey) {
					t.Errorf("the driver logged the example secret's key")
				}
				if t.Failed() {
					t.Logf("driver logs:\n%s", d.Logs())
				}
				unmountAll(dir)
			})

			// What kubelet's CSI volume plugin sends for this pod.
			podUID := fmt.Sprintf("8f0e3a52-%04x-4c1e-9d2b-%012x", len(c.file), time.Now().UnixNano()&0xffffffffffff)
			volumeID := fmt.Sprintf("csi-%x", sha256.Sum256([]byte(podUID+ev.volume.Name)))
			target := filepath.Join(dir, "kubelet/pods", podUID, "volumes/kubernetes.io~csi", ev.volume.Name, "mount")
			if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
				t.Fatal(err)
			}
			volumeContext := map[string]string{
				"csi.storage.k8s.io/pod.name":            ev.podName,
				"csi.storage.k8s.io/pod.namespace":       ev.namespace,
				"csi.storage.k8s.io/pod.uid":             podUID,
				"csi.storage.k8s.io/serviceAccount.name": "default",
				"csi.storage.k8s.io/ephemeral":           "true",
			}
			for k, v := range src.VolumeAttributes {
				volumeContext[k] = v
			}
			fsType := ""
			if src.FSType != nil {
				fsType = *src.FSType
			}
			req := &csi.NodePublishVolumeRequest{
				VolumeId:   volumeID,
				TargetPath: target,
				Readonly:   src.ReadOnly != nil && *src.ReadOnly,
				VolumeCapability: &csi.VolumeCapability{
					AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
					AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
				},
				VolumeContext: volumeContext,
				Secrets:       secrets,
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if _, err := d.Node.NodePublishVolume(ctx, req); err != nil {
				t.Fatalf("NodePublishVolume of %s's volume: %v", c.file, err)
			}
			opts := mountInfo(t, target)
			if !strings.Contains(","+opts+",", ",ro,") {
				t.Fatalf("target %s is mounted %q, want ro", target, opts)
			}
			sameFiles(t, target, exampleModel)
			// Model servers run as non-root (KServe's runtimes, Seldon's
			// servers): everything must be readable by any user.
			err = filepath.WalkDir(target, func(p string, de os.DirEntry, err error) error {
				if err != nil {
					return err
				}
				fi, err := de.Info()
				if err != nil {
					return err
				}
				want := os.FileMode(0o444)
				if de.IsDir() {
					want = 0o555
				}
				if fi.Mode().Perm()&want != want {
					return fmt.Errorf("%s has mode %s, not readable by every user", p, fi.Mode())
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(target, "written-by-pod"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
				t.Fatalf("writing into the model mount: %v, want EROFS", err)
			}

			if _, err := d.Node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target}); err != nil {
				t.Fatalf("NodeUnpublishVolume: %v", err)
			}
			if opts := mountInfo(t, target); opts != "" {
				t.Fatalf("target %s is still mounted (%s) after unpublish", target, opts)
			}
			if _, err := os.Lstat(target); !os.IsNotExist(err) {
				t.Fatalf("target %s still exists after unpublish (err=%v)", target, err)
			}
		})
	}
}

// The prefetch example as the cluster runs it: the reconciler turns the
// example CachedModel into holder pods whose inline volume, published with
// the example Secret as kubelet would, warms the node with the model once;
// the example Deployment's model volume then publishes with no download.
func TestExample_Prefetch_WarmsTheCache_RealMinIO(t *testing.T) {
	const dir = "deploy/examples/prefetch"
	var cm fleet.CachedModel
	var server appsv1.Deployment
	for _, f := range []string{"cachedmodel.yaml", "deployment.yaml"} {
		for _, d := range yamlDocs(t, filepath.Join(dir, f)) {
			switch d.kind {
			case fleet.Kind:
				d.decode(t, &cm)
			case "Deployment":
				d.decode(t, &server)
			}
		}
	}
	if cm.Spec.SecretRef == nil || len(server.Spec.Template.Spec.Volumes) == 0 {
		t.Fatalf("%s: want a CachedModel with a secretRef and a Deployment with a model volume", dir)
	}
	held := fleet.Holders(&cm, "image").Spec.Template.Spec.Volumes[0].CSI
	uri := held.VolumeAttributes[mccsi.AttrModelURI]
	uploadExampleModel(t, uri)

	// A driver with its own cache; its remote is MinIO behind a counting proxy.
	e := newEnv(t)
	secrets := pointAtTestMinIO(t, exampleSecret(t, dir, cm.Spec.SecretRef.Name, cm.Namespace), e.proxy.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := e.publish(ctx, "holder", e.target("holder"), held.VolumeAttributes, secrets); err != nil {
		t.Fatalf("publishing the holder's volume: %v", err)
	}
	if got, want := e.proxy.ObjectBytes(), total(exampleModel); got != want {
		t.Fatalf("warming fetched %d bytes, want the model once (%d)", got, want)
	}
	e.proxy.Reset()

	var vol *corev1.CSIVolumeSource
	for _, v := range server.Spec.Template.Spec.Volumes {
		if v.CSI != nil && v.CSI.Driver == mccsi.DriverName {
			vol = v.CSI
		}
	}
	if vol == nil || vol.NodePublishSecretRef == nil {
		t.Fatalf("%s: the Deployment has no model volume with a secret", dir)
	}
	serverSecrets := pointAtTestMinIO(t, exampleSecret(t, dir, vol.NodePublishSecretRef.Name, server.Namespace), e.proxy.URL)
	if err := e.publish(ctx, "server", e.target("server"), vol.VolumeAttributes, serverSecrets); err != nil {
		t.Fatalf("publishing the model server's volume: %v", err)
	}
	if n := e.proxy.ObjectGets(); n != 0 {
		t.Fatalf("the model server's publish on a warm node fetched %d objects, want none", n)
	}
	sameFiles(t, e.target("server"), exampleModel)
	e.mustUnpublish("server", e.target("server"))
	e.mustUnpublish("holder", e.target("holder"))
}

// cachedModelControllerRules is what the CachedModel reconciler in the
// controller Deployment needs (deploy/kubernetes/cachedmodel-crd.yaml): read
// CachedModels and write their status, own a holder DaemonSet per
// CachedModel (ownerReferences with blockOwnerDeletion need update on
// cachedmodels/finalizers), and read the holder pods and events. Resources
// marked exact may be granted nothing more (least privilege); core events
// are shared with the external-provisioner, which also writes them.
var cachedModelControllerRules = []struct {
	group, resource string
	verbs           []string
	exact           bool
}{
	{"modelcache.csi.dev", "cachedmodels", []string{"get", "list", "watch"}, true},
	{"modelcache.csi.dev", "cachedmodels/status", []string{"update"}, true},
	{"modelcache.csi.dev", "cachedmodels/finalizers", []string{"update"}, true},
	{"apps", "daemonsets", []string{"get", "list", "watch", "create", "update", "delete"}, true},
	{"", "pods", []string{"get", "list"}, true},
	{"", "events", []string{"list"}, false},
}

// renderDeploy runs a pinned tool (bin/kustomize, bin/helm) in the
// repository root.
func renderDeploy(t *testing.T, tool string, args ...string) []byte {
	t.Helper()
	out, err := testenv.RunTool(tool, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// The CachedModel CRD is one file in two places: the kustomize base and the
// Helm chart's crds/ (which Helm installs before the templates, and renders
// only with --include-crds). Both must be byte for byte the same, and both
// renders must hold it and grant the controller's ServiceAccount the rules
// of the CachedModel reconciler, through bindings of that account.
func TestDeploy_CachedModelCRDAndRBAC_SameInKustomizeAndHelm(t *testing.T) {
	const (
		kustomizeCRD = "deploy/kubernetes/cachedmodel-crd.yaml"
		helmCRD      = "deploy/helm/modelcache/crds/cachedmodel-crd.yaml"
		crdName      = "cachedmodels.modelcache.csi.dev"
		namespace    = "modelcache"
		account      = "modelcache-controller"
	)
	k, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), kustomizeCRD))
	if err != nil {
		t.Fatal(err)
	}
	h, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), helmCRD))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k, h) {
		t.Errorf("%s and %s differ: copy the first over the second (cp %s %s)", kustomizeCRD, helmCRD, kustomizeCRD, helmCRD)
	}
	var crdFile map[string]any
	if err := yaml.Unmarshal(k, &crdFile); err != nil {
		t.Fatalf("%s: %v", kustomizeCRD, err)
	}

	for _, r := range []struct {
		name     string
		rendered []byte
	}{
		{"kustomize build deploy/kubernetes", renderDeploy(t, "kustomize", "build", "deploy/kubernetes")},
		{"helm template --include-crds", renderDeploy(t, "helm", "template", "modelcache", "deploy/helm/modelcache", "--namespace", namespace, "--include-crds")},
	} {
		t.Run(strings.Fields(r.name)[0], func(t *testing.T) {
			var (
				crds         []map[string]any
				clusterRoles = map[string][]rbacv1.PolicyRule{}
				roles        = map[string][]rbacv1.PolicyRule{} // namespace/name
				rules        []rbacv1.PolicyRule
			)
			var bound []string // kind/namespace/name of the (Cluster)Roles bound to the account
			reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(r.rendered)))
			for {
				doc, err := reader.Read()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatalf("%s: %v", r.name, err)
				}
				var head struct {
					Kind     string            `json:"kind"`
					Metadata metav1.ObjectMeta `json:"metadata"`
				}
				if err := yaml.Unmarshal(doc, &head); err != nil {
					t.Fatalf("%s: %v", r.name, err)
				}
				switch head.Kind {
				case "CustomResourceDefinition":
					if head.Metadata.Name == crdName {
						var m map[string]any
						if err := yaml.Unmarshal(doc, &m); err != nil {
							t.Fatal(err)
						}
						crds = append(crds, m)
					}
				case "ClusterRole":
					var cr rbacv1.ClusterRole
					if err := yaml.Unmarshal(doc, &cr); err != nil {
						t.Fatal(err)
					}
					clusterRoles[cr.Name] = cr.Rules
				case "Role":
					var ro rbacv1.Role
					if err := yaml.Unmarshal(doc, &ro); err != nil {
						t.Fatal(err)
					}
					roles[ro.Namespace+"/"+ro.Name] = ro.Rules
				case "ClusterRoleBinding", "RoleBinding":
					var b rbacv1.RoleBinding // same fields as a ClusterRoleBinding
					if err := yaml.Unmarshal(doc, &b); err != nil {
						t.Fatal(err)
					}
					for _, s := range b.Subjects {
						ns := s.Namespace
						if ns == "" {
							ns = b.Namespace
						}
						if s.Kind == rbacv1.ServiceAccountKind && s.Name == account && ns == namespace {
							if b.RoleRef.Kind == "ClusterRole" {
								bound = append(bound, "ClusterRole//"+b.RoleRef.Name)
							} else {
								bound = append(bound, "Role/"+b.Namespace+"/"+b.RoleRef.Name)
							}
						}
					}
				}
			}
			if len(crds) != 1 {
				t.Errorf("%s holds %d CustomResourceDefinitions %s, want 1", r.name, len(crds), crdName)
			} else if got, _ := json.Marshal(crds[0]); !bytes.Equal(got, mustJSON(t, crdFile)) {
				t.Errorf("%s renders CRD %s other than %s:\n%s", r.name, crdName, kustomizeCRD, got)
			}
			for _, b := range bound {
				kind, rest, _ := strings.Cut(b, "/")
				ns, name, _ := strings.Cut(rest, "/")
				var rs []rbacv1.PolicyRule
				var ok bool
				if kind == "ClusterRole" {
					rs, ok = clusterRoles[name]
				} else {
					rs, ok = roles[ns+"/"+name]
				}
				if !ok {
					t.Errorf("%s binds %s/%s to %s, which it does not define", r.name, namespace, account, b)
				}
				rules = append(rules, rs...)
			}
			if len(bound) == 0 {
				t.Fatalf("%s binds nothing to the ServiceAccount %s/%s", r.name, namespace, account)
			}
			for _, want := range cachedModelControllerRules {
				granted := map[string]bool{}
				resource, sub, _ := strings.Cut(want.resource, "/")
				for _, rule := range rules {
					groupOK := slices.Contains(rule.APIGroups, want.group) || slices.Contains(rule.APIGroups, "*")
					resOK := slices.Contains(rule.Resources, want.resource) || slices.Contains(rule.Resources, "*") ||
						(sub != "" && slices.Contains(rule.Resources, resource+"/*"))
					if groupOK && resOK {
						for _, v := range rule.Verbs {
							granted[v] = true
						}
					}
				}
				for _, v := range want.verbs {
					if !granted[v] && !granted["*"] {
						t.Errorf("%s: %s/%s may not %s %s (group %q); the CachedModel reconciler needs %v", r.name, namespace, account, v, want.resource, want.group, want.verbs)
					}
				}
				if want.exact {
					for v := range granted {
						if !slices.Contains(want.verbs, v) {
							t.Errorf("%s: %s/%s may %s %s (group %q); it needs only %v", r.name, namespace, account, v, want.resource, want.group, want.verbs)
						}
					}
				}
			}
		})
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	j, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return j
}
