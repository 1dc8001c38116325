package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const gib = int64(1) << 30

// readOnlyMany is the capability a ReadOnlyMany claim sends.
func readOnlyMany() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY},
	}
}

// createVolume sends CreateVolume as the external-provisioner does with
// --extra-create-metadata for a claim of 1Gi against a class with params.
func (e *env) createVolume(name string, params, secrets map[string]string, caps ...*csi.VolumeCapability) (*csi.Volume, error) {
	all := map[string]string{
		"csi.storage.k8s.io/pvc/name":      "models",
		"csi.storage.k8s.io/pvc/namespace": "serving",
		"csi.storage.k8s.io/pv/name":       name,
	}
	for k, v := range params {
		all[k] = v
	}
	if len(caps) == 0 {
		caps = []*csi.VolumeCapability{readOnlyMany()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resp, err := e.driver.Controller.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name:               name,
		CapacityRange:      &csi.CapacityRange{RequiredBytes: gib},
		VolumeCapabilities: caps,
		Parameters:         all,
		Secrets:            secrets,
	})
	return resp.GetVolume(), err
}

// publishPV sends NodePublishVolume as kubelet does for a PV: the PV's
// volume handle and attributes, the provisioner's identity key, pod info,
// no ephemeral flag, and the claim's access mode.
func (e *env) publishPV(volumeID, target string, volumeContext map[string]string) error {
	vc := map[string]string{
		"storage.kubernetes.io/csiProvisionerIdentity": "1764000000000-1234-modelcache.csi.dev",
		"csi.storage.k8s.io/pod.name":                  "model-server-0",
		"csi.storage.k8s.io/pod.namespace":             "serving",
		"csi.storage.k8s.io/pod.uid":                   "7d4c0b9e-1f2a-4b3c-9d8e-6f5a4b3c2d1e",
		"csi.storage.k8s.io/ephemeral":                 "false",
	}
	for k, v := range volumeContext {
		vc[k] = v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, err := e.driver.Node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId:         volumeID,
		TargetPath:       target,
		Readonly:         true,
		VolumeCapability: readOnlyMany(),
		VolumeContext:    vc,
		Secrets:          e.secret(),
	})
	return err
}

// A StorageClass-provisioned volume: CreateVolume lists the model with the
// provisioner secret (no object bytes), two pods on the node publish the PV,
// the node downloads once, and an inline volume of the same model reuses
// the same tree.
func TestPVC_CreateVolume_TwoPublishes_OneDownload_RealMinIO(t *testing.T) {
	e := newEnv(t)
	e.driver.Stop()
	e.start("--mode=all")
	files := randomModel(21, map[string]int{"model.safetensors": 4 << 20, "config.json": 512, "tokenizer/vocab.json": 64 << 10})
	e.upload("llm", files)
	uri := "mys3:" + e.bucket + "/llm"

	vol, err := e.createVolume("pvc-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", map[string]string{"modelUri": uri}, e.secret())
	if err != nil {
		t.Fatal(err)
	}
	switch id := vol.GetVolumeId(); {
	case len(id) > 128:
		t.Fatalf("volume ID %q is %d bytes; Kubernetes allows 128", id, len(id))
	case strings.Contains(id, e.bucket) || strings.Contains(id, "llm"):
		t.Fatalf("volume ID %q carries the model reference", id)
	}
	if got := vol.GetVolumeContext()["modelUri"]; got != uri {
		t.Fatalf("volume_context modelUri = %q, want %q", got, uri)
	}
	if got := vol.GetCapacityBytes(); got != gib {
		t.Fatalf("capacity = %d, want the claim's 1Gi (the %d-byte model fits)", got, total(files))
	}
	if n := e.proxy.ObjectBytes(); n != 0 {
		t.Fatalf("CreateVolume downloaded %d object bytes; it should only list", n)
	}

	again, err := e.createVolume("pvc-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", map[string]string{"modelUri": uri}, e.secret())
	if err != nil || again.GetVolumeId() != vol.GetVolumeId() {
		t.Fatalf("repeated CreateVolume = %v, %v; want the same volume %s", again.GetVolumeId(), err, vol.GetVolumeId())
	}

	for _, pod := range []string{"pod-a", "pod-b"} {
		if err := e.publishPV(vol.GetVolumeId(), e.target(pod), vol.GetVolumeContext()); err != nil {
			t.Fatalf("publishing the PV for %s: %v", pod, err)
		}
		sameFiles(t, e.target(pod), files)
		if opts := mountInfo(t, e.target(pod)); !strings.Contains(opts, "ro") {
			t.Fatalf("%s mounted with %q, want read-only", pod, opts)
		}
	}
	if got, want := e.proxy.ObjectBytes(), total(files); got != want {
		t.Fatalf("the remote served %d object bytes for two PV publishes, want one copy (%d)", got, want)
	}

	e.proxy.Reset()
	e.mustPublish("inline-vol", e.target("pod-inline"), map[string]string{"modelUri": uri})
	if n := e.proxy.ObjectBytes(); n != 0 {
		t.Fatalf("an inline volume of the PV's model downloaded %d bytes", n)
	}
	if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 1 {
		t.Fatalf("store holds trees %v, want the one tree shared by the PV and the inline volume", trees)
	}

	for _, pod := range []string{"pod-a", "pod-b"} {
		e.mustUnpublish(vol.GetVolumeId(), e.target(pod))
	}
	e.mustUnpublish("inline-vol", e.target("pod-inline"))
	for range 2 {
		if _, err := e.driver.Controller.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId()}); err != nil {
			t.Fatalf("DeleteVolume: %v", err)
		}
	}
	_, err = e.driver.Controller.ValidateVolumeCapabilities(context.Background(), &csi.ValidateVolumeCapabilitiesRequest{
		VolumeId: vol.GetVolumeId(), VolumeCapabilities: []*csi.VolumeCapability{readOnlyMany()},
	})
	wantCode(t, err, codes.NotFound)
}

// What a platform team sees in the claim's events when the class or the
// claim is wrong: each case gets the code the external-provisioner acts on
// and a message naming the fix, and nothing is recorded.
func TestPVC_CreateVolume_Refusals_RealMinIO(t *testing.T) {
	e := newEnv(t)
	e.driver.Stop()
	e.start("--mode=all")
	files := randomModel(22, map[string]int{"w.bin": 3 << 20})
	e.upload("m", files)
	uri := "mys3:" + e.bucket + "/m"
	rwo := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	wrongKey := e.secret()
	for k := range wrongKey {
		if strings.HasSuffix(k, "_SECRET_ACCESS_KEY") {
			wrongKey[k] = "not-the-secret-42"
		}
	}
	cases := []struct {
		name    string
		params  map[string]string
		secrets map[string]string
		caps    []*csi.VolumeCapability
		code    codes.Code
		msg     string
	}{
		{"ReadWriteOnce claim", map[string]string{"modelUri": uri}, e.secret(), []*csi.VolumeCapability{rwo}, codes.InvalidArgument, "read-only model cache"},
		{"no model named", nil, e.secret(), nil, codes.InvalidArgument, "modelcache.csi.dev/model-uri"},
		{"misspelt parameter", map[string]string{"modelUri": uri, "pullpolicy": "Always"}, e.secret(), nil, codes.InvalidArgument, `unknown StorageClass parameter "pullpolicy"`},
		{"model not at the remote", map[string]string{"modelUri": uri + "-missing"}, e.secret(), nil, codes.NotFound, "check the StorageClass modelUri"},
		{"provisioner secret refused", map[string]string{"modelUri": uri}, wrongKey, nil, codes.PermissionDenied, "provisioner-secret-name"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.createVolume(fmt.Sprintf("pvc-refused-%d", i), c.params, c.secrets, c.caps...)
			wantCode(t, err, c.code)
			if msg := status.Convert(err).Message(); !strings.Contains(msg, c.msg) || strings.Contains(msg, "not-the-secret-42") {
				t.Fatalf("message %q: want it to contain %q and no secret", msg, c.msg)
			}
			// Nothing was recorded: the same name with a good request succeeds.
			if _, err := e.createVolume(fmt.Sprintf("pvc-refused-%d", i), map[string]string{"modelUri": uri}, e.secret()); err != nil {
				t.Fatalf("a corrected request for the same name failed: %v", err)
			}
		})
	}
	if n := e.proxy.ObjectBytes(); n != 0 {
		t.Fatalf("CreateVolume downloaded %d object bytes", n)
	}

	t.Run("no provisioner secret: capacity unknown", func(t *testing.T) {
		vol, err := e.createVolume("pvc-no-secret", map[string]string{"modelUri": uri}, nil)
		if err != nil || vol.GetCapacityBytes() != 0 {
			t.Fatalf("got %v bytes, %v; want capacity 0 (unknown) and success", vol.GetCapacityBytes(), err)
		}
	})
	t.Run("model larger than the claim's limit", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, err := e.driver.Controller.CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: "pvc-too-small", CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20, LimitBytes: 1 << 20},
			VolumeCapabilities: []*csi.VolumeCapability{readOnlyMany()},
			Parameters:         map[string]string{"modelUri": uri}, Secrets: e.secret(),
		})
		wantCode(t, err, codes.OutOfRange)
	})
}

// A static PV written by hand (any volumeHandle, volumeAttributes.modelUri)
// mounts through the node alone, and shares the tree an inline volume of
// the same model already put in the cache.
func TestStaticPV_HandWrittenHandle_SharesInlineTree_RealMinIO(t *testing.T) {
	e := newEnv(t)
	files := randomModel(23, map[string]int{"w.bin": 2 << 20, "config.json": 100})
	e.upload("m", files)
	uri := "mys3:" + e.bucket + "/m"
	e.mustPublish("inline-vol", e.target("pod-inline"), map[string]string{"modelUri": uri})

	e.proxy.Reset()
	if err := e.publishPV("llama-3-8b-static", e.target("pod-static"), map[string]string{"modelUri": uri, "pullPolicy": "IfNotPresent"}); err != nil {
		t.Fatal(err)
	}
	sameFiles(t, e.target("pod-static"), files)
	if n := e.proxy.ObjectBytes(); n != 0 {
		t.Fatalf("the static PV downloaded %d bytes of a cached model", n)
	}
	if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 1 {
		t.Fatalf("store holds trees %v, want one", trees)
	}
	e.mustUnpublish("llama-3-8b-static", e.target("pod-static"))
	e.mustUnpublish("inline-vol", e.target("pod-inline"))
}

// claimServer stands in for the API server's one answer the controller
// needs: GET of the claim "serving/models" the provisioner names, with the
// given annotations. Everything else is 404, as for objects that do not
// exist. It returns a kubeconfig file for --kubeconfig.
func claimServer(t *testing.T, dir string, annotations map[string]string) string {
	t.Helper()
	pvc := corev1.PersistentVolumeClaim{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "PersistentVolumeClaim"},
		ObjectMeta: metav1.ObjectMeta{Namespace: "serving", Name: "models", Annotations: annotations},
	}
	body, err := json.Marshal(pvc)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.Method == http.MethodGet && r.URL.Path == "/api/v1/namespaces/serving/persistentvolumeclaims/models" {
			_, _ = w.Write(body)
			return
		}
		w.WriteHeader(http.StatusNotFound)
		_ = json.NewEncoder(w).Encode(metav1.Status{
			TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Status"},
			Status:   metav1.StatusFailure, Reason: metav1.StatusReasonNotFound, Code: http.StatusNotFound,
		})
	}))
	t.Cleanup(srv.Close)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	cfg := fmt.Sprintf("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: %q}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\nusers:\n- name: u\n  user: {}\ncurrent-context: c\n", srv.URL)
	if err := os.WriteFile(kubeconfig, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return kubeconfig
}

// A claim annotated with another model than its StorageClass's: refused
// while the class lists no allowed prefixes (the class's provisioner and
// node-publish secrets are the platform's), refused outside the prefixes
// and under a digest pin, and provisioned and published when the class
// allows it. The controller reads the annotation through client-go, as in
// a cluster; the remote is the real MinIO.
func TestPVC_ClaimOverride_OnlyWhereTheStorageClassAllows_RealMinIO(t *testing.T) {
	e := newEnv(t)
	classFiles := randomModel(24, map[string]int{"w.bin": 1 << 20})
	claimFiles := randomModel(25, map[string]int{"private.bin": 2 << 20, "config.json": 300})
	e.upload("shared/m", classFiles)
	e.upload("team-a/m", claimFiles)
	classURI := "mys3:" + e.bucket + "/shared/m"
	claimURI := "mys3:" + e.bucket + "/team-a/m"
	e.driver.Stop()
	e.start("--mode=all", "--kubeconfig="+claimServer(t, e.dir, map[string]string{"modelcache.csi.dev/model-uri": claimURI}),
		"--holder-image=example.invalid/holder:test")

	refused := []struct {
		name   string
		params map[string]string
		msg    string
	}{
		{"class without allowed prefixes", map[string]string{"modelUri": classURI}, "allowedModelUriPrefixes"},
		{"class allowing a sibling prefix", map[string]string{"modelUri": classURI, "allowedModelUriPrefixes": "mys3:" + e.bucket + "/team"}, "not under the prefixes"},
		{"class allowing another bucket", map[string]string{"modelUri": classURI, "allowedModelUriPrefixes": "mys3:" + e.bucket + "-x"}, "not under the prefixes"},
		{"class pinning its model's digest", map[string]string{"modelUri": classURI, "allowedModelUriPrefixes": "mys3:" + e.bucket + "/team-a", "digest": "sha256:" + strings.Repeat("0", 64)}, "pins digest"},
	}
	for i, c := range refused {
		t.Run("refused: "+c.name, func(t *testing.T) {
			_, err := e.createVolume(fmt.Sprintf("pvc-override-refused-%d", i), c.params, e.secret())
			wantCode(t, err, codes.InvalidArgument)
			if msg := status.Convert(err).Message(); !strings.Contains(msg, c.msg) || !strings.Contains(msg, "serving/models") {
				t.Fatalf("message %q: want it to name the claim and say %q", msg, c.msg)
			}
		})
	}
	if n := e.proxy.ObjectBytes(); n != 0 {
		t.Fatalf("refused claims read %d object bytes", n)
	}

	vol, err := e.createVolume("pvc-override-allowed", map[string]string{"modelUri": classURI, "allowedModelUriPrefixes": "mys3:" + e.bucket + "/team-a"}, e.secret())
	if err != nil {
		t.Fatalf("a claim under the class's allowed prefix: %v", err)
	}
	if got := vol.GetVolumeContext()["modelUri"]; got != claimURI {
		t.Fatalf("volume_context modelUri = %q, want the claim's %q", got, claimURI)
	}
	if _, ok := vol.GetVolumeContext()["allowedModelUriPrefixes"]; ok {
		t.Fatalf("volume_context %v carries the class's allowed prefixes to the node", vol.GetVolumeContext())
	}
	if err := e.publishPV(vol.GetVolumeId(), e.target("pod-a"), vol.GetVolumeContext()); err != nil {
		t.Fatalf("publishing the claim's model: %v", err)
	}
	sameFiles(t, e.target("pod-a"), claimFiles)
	e.mustUnpublish(vol.GetVolumeId(), e.target("pod-a"))
}
