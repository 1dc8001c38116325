package csi

// Fakes and helpers shared by the unit tests of this package. They need no
// root and no network: the remote serves bytes from memory, the mounter is
// mount.Fake, and the store and state database are the real ones in a
// temporary directory.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/cache/cachetest"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// TestMain keeps klog's per-publish lines out of test output; tests that
// check logging capture it themselves.
func TestMain(m *testing.M) {
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	os.Exit(m.Run())
}

// waitLimit bounds every wait on another goroutine. Correctness never
// depends on it; it only turns a hang into a failure on a loaded machine.
const waitLimit = 60 * time.Second

// Test models and credentials.
const (
	testURI   = "mys3:models/iris"
	otherURI  = "mys3:models/resnet"
	secretKey = sourcetest.SecretKey
	accessKey = sourcetest.AccessKey
	otherKey  = "an0ther-Tenants-Secret-Key-fedcba9876543210"
)

// testSecrets is a node-publish secret in rclone's environment form.
func testSecrets() map[string]string { return sourcetest.Secrets() }

// otherSecrets is another tenant's secret for the same remote.
func otherSecrets() map[string]string {
	s := testSecrets()
	s["RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY"] = otherKey
	return s
}

// secretValues are the values no message or log line may contain.
var secretValues = []string{secretKey, accessKey, otherKey}

// irisFiles is a small model.
func irisFiles() map[string][]byte {
	return map[string][]byte{
		"model-settings.json": []byte(`{"name":"iris","implementation":"mlserver_sklearn.SKLearnModel"}`),
		"model.joblib":        bytes.Repeat([]byte("iris weights "), 300),
		"tokenizer/vocab.txt": []byte("setosa\nversicolor\nvirginica\n"),
	}
}

// harness is a Node wired to a real store and state database in a
// temporary directory, the fake mounter and the fake resolver.
type harness struct {
	t     *testing.T
	dir   string
	node  *Node
	store *store.Store
	state *state.DB
	mnt   *mount.Fake
	res   *sourcetest.Resolver
	cache *cache.Cache
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	return newHarnessWith(t, cache.Options{})
}

// newHarnessWith builds the harness over a cache opened with opt.
func newHarnessWith(t *testing.T, opt cache.Options) *harness {
	t.Helper()
	dir := t.TempDir()
	ct := cachetest.Open(t, filepath.Join(dir, "cache"), opt)
	t.Cleanup(func() { cachetest.MakeWritable(dir) })
	res := sourcetest.NewResolver()
	res.SetModel(testURI, irisFiles())
	return &harness{
		t: t, dir: dir, store: ct.Store, state: ct.State, mnt: ct.Mounter, res: res, cache: ct.Cache,
		node: &Node{NodeID: "node-a", Resolver: res, Cache: ct.Cache},
	}
}

// in returns h reporting to t, for use inside a subtest.
func (h *harness) in(t *testing.T) *harness {
	c := *h
	c.t = t
	return &c
}

// target is a kubelet-like target path for a pod's inline volume.
func (h *harness) target(pod string) string {
	return filepath.Join(h.dir, "kubelet", "pods", pod, "volumes", "kubernetes.io~csi", "model", "mount")
}

// publishReq builds a NodePublishVolume request the way kubelet does for a
// CSI inline volume: mount access, read-only, pod info in the context and
// the node-publish secret.
func publishReq(volumeID, target, uri string, attrs map[string]string) *csi.NodePublishVolumeRequest {
	vc := map[string]string{
		podNameKey:                               "model-server-0",
		podNamespaceKey:                          "seldon",
		podUIDKey:                                "0f3c2b1a-5d6e-4f70-8a9b-0c1d2e3f4a5b",
		"csi.storage.k8s.io/serviceAccount.name": "default",
		"csi.storage.k8s.io/ephemeral":           "true",
		AttrModelURI:                             uri,
	}
	for k, v := range attrs {
		vc[k] = v
	}
	return &csi.NodePublishVolumeRequest{
		VolumeId:   volumeID,
		TargetPath: target,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		Readonly:      true,
		VolumeContext: vc,
		Secrets:       testSecrets(),
	}
}

// publish calls NodePublishVolume with a hang guard.
func (h *harness) publish(req *csi.NodePublishVolumeRequest) error {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	_, err := h.node.NodePublishVolume(ctx, req)
	return err
}

// mustPublish publishes and fails the test on any error.
func (h *harness) mustPublish(req *csi.NodePublishVolumeRequest) {
	h.t.Helper()
	if err := h.publish(req); err != nil {
		h.t.Fatalf("NodePublishVolume(%s → %s): %v", req.GetVolumeContext()[AttrModelURI], req.GetTargetPath(), err)
	}
}

// wantMounted checks that target is mounted from the tree with digest.
func (h *harness) wantMounted(target, digest string) {
	h.t.Helper()
	got, ok := h.mnt.Mounts()[target]
	if !ok {
		h.t.Fatalf("%s is not mounted; mounts: %v", target, h.mnt.Mounts())
	}
	if want := h.store.TreePath(digest); got != want {
		h.t.Fatalf("%s is mounted from %s, want %s", target, got, want)
	}
}

// wantRef checks the recorded reference for target.
func (h *harness) wantRef(target, volumeID, digest string) state.Ref {
	h.t.Helper()
	ref, ok, err := h.state.Ref(target)
	if err != nil || !ok {
		h.t.Fatalf("state.Ref(%s) = %v, %v; want a reference", target, ok, err)
	}
	if ref.VolumeID != volumeID || ref.Tree != digest || ref.TargetPath != target {
		h.t.Fatalf("reference = %+v; want volume %s, tree %s", ref, volumeID, digest)
	}
	return ref
}

// wantNothingAt checks that a failed publish left no trace at target.
func (h *harness) wantNothingAt(target string) {
	h.t.Helper()
	if src, ok := h.mnt.Mounts()[target]; ok {
		h.t.Errorf("%s is mounted from %s after a failed publish", target, src)
	}
	if _, ok, err := h.state.Ref(target); ok || err != nil {
		h.t.Errorf("state has a reference for %s after a failed publish (err %v)", target, err)
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		h.t.Errorf("target %s exists after a failed publish (stat: %v)", target, err)
	}
}

// wantCode checks a gRPC status: its code, a message that is not empty and
// holds every hint, and no secret value anywhere in it.
func wantCode(t *testing.T, err error, want codes.Code, hints ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", want)
	}
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("error %v is not a gRPC status", err)
	}
	if st.Code() != want {
		t.Fatalf("code = %v (%s), want %v", st.Code(), st.Message(), want)
	}
	msg := st.Message()
	if strings.TrimSpace(msg) == "" {
		t.Fatalf("%v error has an empty message", want)
	}
	for _, s := range secretValues {
		if strings.Contains(msg, s) {
			t.Fatalf("message leaks a secret: %q", msg)
		}
	}
	for _, h := range hints {
		if !strings.Contains(msg, h) {
			t.Errorf("message %q does not contain %q", msg, h)
		}
	}
}

// recv waits for a value from ch with a hang guard.
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	return sourcetest.Recv(t, ch, waitLimit, what)
}
