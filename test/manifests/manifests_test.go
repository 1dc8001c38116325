// Package manifests checks the files under deploy/: every document decodes
// as the Kubernetes object it claims to be, and the StorageClass + PVC
// example provisions through the real controller code to the model the
// README says it does. No root, no cluster: client-go's fake clientset
// serves the example claim.
package manifests

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/csi"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/test/testenv"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
)

// objects decodes every YAML document of every file under deploy/.
func objects(t *testing.T) map[string][]runtime.Object {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(testenv.RepoRoot(), "deploy", "kubernetes", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	examples, _ := filepath.Glob(filepath.Join(testenv.RepoRoot(), "deploy", "examples", "*.yaml"))
	files = append(files, examples...)
	if len(files) < 4 {
		t.Fatalf("found only %v under deploy/", files)
	}
	out := map[string][]runtime.Object{}
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
		for {
			doc, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			obj, gvk, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
			if err != nil {
				t.Fatalf("%s: a document does not decode: %v\n%s", f, err, doc)
			}
			if gvk.Kind == "" {
				t.Fatalf("%s: a document has no kind", f)
			}
			rel, _ := filepath.Rel(testenv.RepoRoot(), f)
			out[rel] = append(out[rel], obj)
		}
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
				if o.Name != csi.DriverName {
					t.Errorf("%s: CSIDriver is named %q, want %q", file, o.Name, csi.DriverName)
				}
			case *storagev1.StorageClass:
				sc++
				if o.Provisioner != csi.DriverName {
					t.Errorf("%s: StorageClass %s provisioner is %q, want %q", file, o.Name, o.Provisioner, csi.DriverName)
				}
			}
		}
	}
	if driver != 1 || sc == 0 {
		t.Fatalf("found %d CSIDriver and %d StorageClass objects, want 1 and at least 1", driver, sc)
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
	db, err := state.Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctrl := &csi.Controller{Resolver: source.NewRclone(make([]byte, 32)), Volumes: db, Claims: kube.NewClaims(fake.NewClientset(claim))}

	// What the external-provisioner sends: class parameters without its own
	// csi.storage.k8s.io/*-secret-* keys, plus the claim's metadata.
	params := map[string]string{
		"csi.storage.k8s.io/pvc/name":      claim.Name,
		"csi.storage.k8s.io/pvc/namespace": claim.Namespace,
		"csi.storage.k8s.io/pv/name":       "pvc-0000",
	}
	for k, v := range class.Parameters {
		if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			params[k] = v
		}
	}
	modes := map[corev1.PersistentVolumeAccessMode]csipb.VolumeCapability_AccessMode_Mode{
		corev1.ReadOnlyMany:  csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY,
		corev1.ReadWriteOnce: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
	}
	var caps []*csipb.VolumeCapability
	for _, m := range claim.Spec.AccessModes {
		caps = append(caps, &csipb.VolumeCapability{
			AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: modes[m]},
		})
	}
	resp, err := ctrl.CreateVolume(context.Background(), &csipb.CreateVolumeRequest{
		Name:               "pvc-0000",
		CapacityRange:      &csipb.CapacityRange{RequiredBytes: claim.Spec.Resources.Requests.Storage().Value()},
		VolumeCapabilities: caps,
		Parameters:         params,
	})
	if err != nil {
		t.Fatalf("the example claim does not provision: %v", err)
	}
	if got, want := resp.GetVolume().GetVolumeContext()["modelUri"], claim.Annotations[kube.AnnotationModelURI]; got != want || want == "" {
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
