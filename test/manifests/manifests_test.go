// Package manifests checks the files under deploy/ and the image build: every
// document decodes strictly as the Kubernetes object it claims to be, the
// base manifests agree with each other and with the driver's flags, the
// examples name a model and mount it read-only, the StorageClass examples
// provision through the real controller code, the prefetch example's
// command is one modelcachectl accepts, and the Dockerfile builds the way
// the Makefile does. No root, no cluster: client-go's fake clientset serves
// the example claims.
package manifests

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/names"
	"github.com/modelcache/modelcache/test/testenv"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// document is one YAML document of a file under deploy/, decoded.
type document struct {
	file string // relative to the repository root
	raw  []byte
	obj  runtime.Object
}

// manifestFiles lists every YAML file under deploy/ that is applied as is:
// the kustomize base and the examples with their subdirectories. The
// kustomization.yaml files are kustomize's own configuration, and
// deploy/helm holds templates, which test/manifests/helm_test.go renders.
func manifestFiles(t *testing.T) []string {
	t.Helper()
	root := filepath.Join(testenv.RepoRoot(), "deploy")
	var files []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if p == filepath.Join(root, "helm") {
				return filepath.SkipDir
			}
			return nil
		}
		if ext := filepath.Ext(p); (ext == ".yaml" || ext == ".yml") && d.Name() != "kustomization.yaml" {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 4 {
		t.Fatalf("found only %v under deploy/", files)
	}
	return files
}

// documents decodes every YAML document of every file manifestFiles lists,
// strictly: a field the type does not have, or a field given twice, fails
// the test, for client-go's types and for the custom resources of
// crds_test.go alike.
func documents(t *testing.T) []document {
	t.Helper()
	dec := manifestDecoder()
	var out []document
	for _, f := range manifestFiles(t) {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(testenv.RepoRoot(), f)
		for _, doc := range yamlDocuments(t, rel, raw) {
			obj, gvk, err := dec.Decode(doc, nil, nil)
			if err != nil {
				t.Fatalf("%s: a document does not decode strictly: %v\n%s", rel, err, doc)
			}
			if gvk.Kind == "" {
				t.Fatalf("%s: a document has no kind", rel)
			}
			out = append(out, document{file: rel, raw: doc, obj: obj})
		}
	}
	return out
}

// objects returns the decoded documents by file, relative to the
// repository root.
func objects(t *testing.T) map[string][]runtime.Object {
	t.Helper()
	out := map[string][]runtime.Object{}
	for _, d := range documents(t) {
		out[d.file] = append(out[d.file], d.obj)
	}
	return out
}

func TestManifests_EveryDocumentDecodes(t *testing.T) {
	objs := objects(t)
	var driver, sc int
	for file, list := range objs {
		for _, o := range list {
			switch o := o.(type) {
			case *storagev1.CSIDriver:
				driver++
				if o.Name != names.DriverName {
					t.Errorf("%s: CSIDriver is named %q, want %q", file, o.Name, names.DriverName)
				}
			case *storagev1.StorageClass:
				sc++
				if o.Provisioner != names.DriverName {
					t.Errorf("%s: StorageClass %s provisioner is %q, want %q", file, o.Name, o.Provisioner, names.DriverName)
				}
			}
		}
	}
	if driver != 1 || sc == 0 {
		t.Fatalf("found %d CSIDriver and %d StorageClass objects, want 1 and at least 1", driver, sc)
	}
	// The custom resources decode into the typed definitions of
	// crds_test.go, not into something unstructured.
	all := documents(t)
	if n, m := len(objectsOf[*SeldonDeployment](all)), len(objectsOf[*InferenceService](all)); n == 0 || m == 0 {
		t.Fatalf("decoded %d SeldonDeployments and %d InferenceServices as typed objects, want some of each", n, m)
	}
}

// The StorageClass + PVC example provisions, through the controller and a
// fake API server holding the example claim, the model its annotation names.
func TestManifests_StorageClassExample_ProvisionsAnnotatedModel(t *testing.T) {
	var class *storagev1.StorageClass
	var claim *corev1.PersistentVolumeClaim
	for _, o := range objects(t)[filepath.Join("deploy", "examples", "storageclass-pvc.yaml")] {
		switch o := o.(type) {
		case *storagev1.StorageClass:
			class = o
		case *corev1.PersistentVolumeClaim:
			claim = o
		}
	}
	if class == nil || claim == nil {
		t.Fatal("deploy/examples/storageclass-pvc.yaml needs a StorageClass and a PersistentVolumeClaim")
	}
	got := provisionExample(t, class, claim)[names.AttrModelURI]
	if want := claim.Annotations[kube.AnnotationModelURI]; got != want || want == "" {
		t.Fatalf("provisioned modelUri %q, want the claim's annotation %q", got, want)
	}
}

// stripComments drops comment-only lines so a document of comments is empty.
func stripComments(doc []byte) []byte {
	var out [][]byte
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// Strict decoding is what makes the checks above worth anything: a misspelt
// field would otherwise be dropped silently, by this test and by the API
// server. Each example document, with one field misspelt, must fail to
// decode, and must decode as written.
func TestManifests_StrictDecodingRefusesMisspeltFields(t *testing.T) {
	docs := documents(t)
	dec := manifestDecoder()
	for _, c := range []struct {
		file, kind, from, to, field string
	}{
		// In a core type.
		{"deploy/examples/inline-pod.yaml", "Pod", "mountPath:", "mountpath:", "mountpath"},
		{"deploy/kubernetes/node.yaml", "DaemonSet", "mountPropagation:", "mountPropogation:", "mountPropogation"},
		// In the typed custom resources, at their own level...
		{"deploy/examples/seldon/seldondeployment-inline.yaml", "SeldonDeployment", "componentSpecs:", "componentSpec:", "componentSpec"},
		{"deploy/examples/seldon/seldondeployment-inline.yaml", "SeldonDeployment", "modelUri: \"\"", "modelURI: \"\"", "modelURI"},
		{"deploy/examples/kserve/inferenceservice.yaml", "InferenceService", "modelFormat:", "modelformat:", "modelformat"},
		// ...and in the pod specs and containers they embed.
		{"deploy/examples/seldon/seldondeployment-inline.yaml", "SeldonDeployment", "volumeMounts:", "volumeMount:", "volumeMount"},
		{"deploy/examples/seldon/seldondeployment-pvc.yaml", "SeldonDeployment", "claimName:", "claim:", "claim"},
		{"deploy/examples/kserve/inferenceservice.yaml", "InferenceService", "nodePublishSecretRef:", "nodePublishSecret:", "nodePublishSecret"},
		{"deploy/examples/kserve/inferenceservice.yaml", "InferenceService", "readOnly: true\n    volumes:", "readonly: true\n    volumes:", "readonly"},
	} {
		t.Run(c.kind+"/"+c.field, func(t *testing.T) {
			var raw []byte
			for _, d := range docs {
				if d.file == filepath.FromSlash(c.file) && d.obj.GetObjectKind().GroupVersionKind().Kind == c.kind {
					raw = stripComments(d.raw)
				}
			}
			if raw == nil {
				t.Fatalf("%s has no %s", c.file, c.kind)
			}
			if !bytes.Contains(raw, []byte(c.from)) {
				t.Fatalf("%s's %s does not contain %q", c.file, c.kind, c.from)
			}
			bad := bytes.Replace(raw, []byte(c.from), []byte(c.to), 1)
			_, _, err := dec.Decode(bad, nil, nil)
			if err == nil || !strings.Contains(err.Error(), `unknown field "`) || !strings.Contains(err.Error(), c.field+`"`) {
				t.Fatalf("with %q misspelt as %q, decoding gave %v; want an unknown field error naming it", c.from, c.to, err)
			}
		})
	}
	// A field given twice is refused as well.
	if _, _, err := dec.Decode([]byte("apiVersion: v1\nkind: Pod\nmetadata: {name: a, name: b}\n"), nil, nil); err == nil {
		t.Fatal("a duplicate field decoded")
	}
}
