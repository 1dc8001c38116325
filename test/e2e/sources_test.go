package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"regexp"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/source/hftest"
	"github.com/modelcache/modelcache/pkg/source/ocitest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// createSecret creates a node-publish secret in the models namespace,
// deleted when the test ends.
func createSecret(t *testing.T, s *corev1.Secret) {
	t.Helper()
	s.Namespace = modelsNS
	if _, err := suite.cluster.Client.CoreV1().Secrets(modelsNS).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating secret %s: %v", s.Name, err)
	}
	t.Cleanup(func() {
		_ = suite.cluster.Client.CoreV1().Secrets(modelsNS).Delete(context.Background(), s.Name, metav1.DeleteOptions{})
	})
}

// randomFiles makes files of the given sizes from seed and returns them
// with their sha256s.
func randomFiles(seed byte, sizes map[string]int) (map[string][]byte, map[string]string) {
	r := rand.NewChaCha8([32]byte{seed})
	files, sums := map[string][]byte{}, map[string]string{}
	for name, n := range sizes {
		b := make([]byte, n)
		_, _ = r.Read(b)
		files[name] = b
		s := sha256.Sum256(b)
		sums[name] = hex.EncodeToString(s[:])
	}
	return files, sums
}

// revisionEvent reports whether the pod has an event of reason annotated
// with revision and naming it in its message.
func revisionEvent(ns, pod, reason, revision string) bool {
	for _, e := range events(ns, pod) {
		if e.Reason == reason && e.Annotations[kube.AnnotationRevision] == revision {
			return hasEvent(ns, pod, reason, revision)
		}
	}
	return false
}

// hubModel publishes a gated hf:// model from a Hub stand-in on the node's
// loopback (the overlays allow 127.0.0.1 as an endpoint) to a pod on the
// real node: the pod sees it byte for byte, and its events name the
// commit main resolved to.
func hubModel(t *testing.T) {
	hub := hftest.New(t, hftest.Options{})
	const token = "hf_e2eTokenOfAnAccountThatAcceptedTheTerms"
	hub.AddToken(token)
	hub.CreateRepo("e2e-org/tiny-model", hftest.Repo{Gated: true, Access: []string{token}})
	files, sums := randomFiles(41, map[string]int{"config.json": 300, "tokenizer.json": 40 << 10, "model.safetensors": 3 << 20})
	commit := hub.Commit("e2e-org/tiny-model", "main", files)
	createSecret(t, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "hf-token"},
		StringData: map[string]string{"HF_TOKEN": token, "HF_ENDPOINT": hub.URL}})

	pod, out := checkedPod(t, modelPod(t, "hf-model", inlineVolume("hf://e2e-org/tiny-model", "hf-token", ptr(true)), true), 2*time.Minute)
	wantModel(t, pod, out, sums)
	if !revisionEvent(modelsNS, pod.Name, kube.ReasonDownloaded, commit) {
		t.Errorf("pod %s has no ModelDownloaded event naming commit %s; events: %s", pod.Name, commit, eventSummary(modelsNS, pod.Name))
	}
	deleteModelPod(t, pod, "models")
}

// The ModelPack registry of the oci:// test: plain HTTP on the node's
// loopback, so the plugin must be installed with --plain-http-registry
// naming it (withPlainHTTPRegistry).
const (
	registryUser     = "e2e-puller"
	registryPassword = "e2e-pull-secret-42"
)

func startRegistry(t *testing.T) *ocitest.Registry {
	return ocitest.New(t, ocitest.Options{Users: map[string]string{registryUser: registryPassword}})
}

// withPlainHTTPRegistry adds --plain-http-registry=host to the node
// plugin's arguments in rendered manifests, beside the loopback overlay's
// --allow-endpoint.
func withPlainHTTPRegistry(t *testing.T, rendered []byte, host string) []byte {
	t.Helper()
	re := regexp.MustCompile(`(?m)^(\s*)- --allow-endpoint=127\.0\.0\.1/32$`)
	if len(re.FindAll(rendered, -1)) != 1 {
		t.Fatalf("the rendered manifests do not pass --allow-endpoint=127.0.0.1/32 to one container")
	}
	return re.ReplaceAll(rendered, []byte("$0\n${1}- --plain-http-registry="+host))
}

// registryModel publishes a private oci:// ModelPack artifact (a raw and a
// tar layer) by tag to a pod on the real node, with an image pull secret
// as its node-publish secret: the pod sees it byte for byte, and its
// events name the manifest digest the tag resolved to.
func registryModel(reg *ocitest.Registry) func(t *testing.T) {
	return func(t *testing.T) {
		files, sums := randomFiles(42, map[string]int{"config.json": 200, "model.safetensors": 3 << 20})
		manifest, _ := reg.PushModel(t, "models/tiny", "v1",
			ocitest.File{Path: "config.json", Data: files["config.json"], Format: ocitest.Tar},
			ocitest.File{Path: "model.safetensors", Data: files["model.safetensors"]})
		auth := base64.StdEncoding.EncodeToString([]byte(registryUser + ":" + registryPassword))
		createSecret(t, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "registry-pull"}, Type: corev1.SecretTypeDockerConfigJson,
			StringData: map[string]string{corev1.DockerConfigJsonKey: fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, reg.Host, auth)}})

		uri := "oci://" + reg.Host + "/models/tiny:v1"
		pod, out := checkedPod(t, modelPod(t, "oci-model", inlineVolume(uri, "registry-pull", ptr(true)), true), 2*time.Minute)
		wantModel(t, pod, out, sums)
		if !revisionEvent(modelsNS, pod.Name, kube.ReasonDownloaded, manifest.Digest.String()) {
			t.Errorf("pod %s has no ModelDownloaded event naming manifest %s; events: %s", pod.Name, manifest.Digest, eventSummary(modelsNS, pod.Name))
		}
		deleteModelPod(t, pod, "models")
	}
}
