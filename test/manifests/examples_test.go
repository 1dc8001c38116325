package manifests

import (
	"context"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/csi"
	"github.com/modelcache/modelcache/pkg/fleet"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/names"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// Checks of deploy/examples: every model volume names a valid model with a
// secret that exists and is mounted read-only; the Seldon and KServe
// examples leave their own model download off; the StorageClass examples
// provision; the prefetch example's servers follow its CachedModel.

const examplesDir = "deploy/examples"

// The volume attributes the node plugin reads (pkg/csi).
var modelAttrs = []string{names.AttrModelURI, names.AttrPullPolicy, names.AttrDigest}

// checkModelAttrs checks a model reference as the node and controller read
// it: modelUri present and parseable, no key the driver would refuse.
func checkModelAttrs(t *testing.T, what string, attrs map[string]string) {
	t.Helper()
	uri := attrs[names.AttrModelURI]
	if uri == "" {
		t.Errorf("%s: no %s", what, names.AttrModelURI)
	} else if _, err := source.ParseURI(uri); err != nil {
		t.Errorf("%s: %s %q: %v", what, names.AttrModelURI, uri, err)
	}
	for k := range attrs {
		if !strings.Contains(k, "/") && !slices.Contains(modelAttrs, k) {
			t.Errorf("%s: attribute %q, which the driver refuses; it reads %v", what, k, modelAttrs)
		}
	}
}

// secretIn reports whether a Secret name/namespace is among docs.
func secretIn(docs []document, name, namespace string) bool {
	for _, s := range objectsOf[*corev1.Secret](docs) {
		ns := s.Namespace
		if ns == "" {
			ns = "default"
		}
		if s.Name == name && ns == namespace {
			return true
		}
	}
	return false
}

// Every volume of the driver in the examples is read-only, names a model
// the driver accepts, and names a node-publish secret the same directory
// defines in the pod's namespace; every container mounts it read-only.
// Claims of the driver's StorageClasses are ReadOnlyMany and mounted
// read-only too.
func TestExamples_ModelVolumesNameAModelAndAreReadOnly(t *testing.T) {
	all := docsUnder(documents(t), examplesDir)
	dirs := map[string][]document{}
	for _, d := range all {
		dirs[filepath.Dir(d.file)] = append(dirs[filepath.Dir(d.file)], d)
	}
	classes := map[string]bool{}
	for _, sc := range objectsOf[*storagev1.StorageClass](all) {
		if sc.Provisioner == names.DriverName {
			classes[sc.Name] = true
			params := withoutPrefixed(sc.Parameters)
			// A class's own parameter, never a volume attribute: the
			// modelUri prefixes claims may choose their model under.
			if prefixes, ok := params[csi.ParamAllowedModelURIPrefixes]; ok {
				for _, p := range strings.Split(prefixes, ",") {
					if _, err := source.ParseURI(strings.TrimSpace(p)); err != nil {
						t.Errorf("StorageClass %s: %s %q: %v", sc.Name, csi.ParamAllowedModelURIPrefixes, p, err)
					}
				}
				delete(params, csi.ParamAllowedModelURIPrefixes)
			}
			checkModelAttrs(t, "StorageClass "+sc.Name, params)
			if sc.Parameters["csi.storage.k8s.io/node-publish-secret-name"] == "" {
				t.Errorf("StorageClass %s names no node-publish secret: nodes could not read the model", sc.Name)
			}
		}
	}
	claims := map[string]*corev1.PersistentVolumeClaim{}
	for _, c := range objectsOf[*corev1.PersistentVolumeClaim](all) {
		claims[c.Namespace+"/"+c.Name] = c
		if c.Spec.StorageClassName != nil && classes[*c.Spec.StorageClassName] && !slices.Equal(c.Spec.AccessModes, []corev1.PersistentVolumeAccessMode{corev1.ReadOnlyMany}) {
			t.Errorf("claim %s/%s: access modes %v, want [ReadOnlyMany]: the driver refuses writer modes", c.Namespace, c.Name, c.Spec.AccessModes)
		}
	}
	for _, pv := range objectsOf[*corev1.PersistentVolume](all) {
		if c := pv.Spec.CSI; c != nil && c.Driver == names.DriverName {
			checkModelAttrs(t, "PersistentVolume "+pv.Name, c.VolumeAttributes)
			if !c.ReadOnly {
				t.Errorf("PersistentVolume %s: csi.readOnly is not true", pv.Name)
			}
			if c.NodePublishSecretRef == nil || !secretIn(all, c.NodePublishSecretRef.Name, c.NodePublishSecretRef.Namespace) {
				t.Errorf("PersistentVolume %s: node-publish secret %v is not among the examples", pv.Name, c.NodePublishSecretRef)
			}
		}
	}

	inline := map[string]int{}
	for dir, docs := range dirs {
		for _, p := range podSpecs(docs) {
			for _, v := range p.spec.Volumes {
				what := p.what + " volume " + v.Name
				model := false
				switch {
				case v.CSI != nil && v.CSI.Driver == names.DriverName:
					model = true
					inline[dir]++
					checkModelAttrs(t, what, v.CSI.VolumeAttributes)
					if v.CSI.ReadOnly == nil || !*v.CSI.ReadOnly {
						t.Errorf("%s: csi.readOnly is not true", what)
					}
					if r := v.CSI.NodePublishSecretRef; r == nil || !secretIn(docs, r.Name, p.namespace) {
						t.Errorf("%s: node-publish secret %v is not defined in %s for namespace %s", what, r, dir, p.namespace)
					}
				case v.PersistentVolumeClaim != nil:
					c := claims[p.namespace+"/"+v.PersistentVolumeClaim.ClaimName]
					if c == nil || c.Spec.StorageClassName == nil || (!classes[*c.Spec.StorageClassName] && c.Spec.VolumeName == "") {
						continue
					}
					model = true
					if !v.PersistentVolumeClaim.ReadOnly {
						t.Errorf("%s: the claim %s is not mounted readOnly", what, c.Name)
					}
				}
				if !model {
					continue
				}
				mounted := false
				for _, c := range allContainers(p.spec) {
					for _, m := range c.VolumeMounts {
						if m.Name == v.Name {
							mounted = true
							if !m.ReadOnly {
								t.Errorf("%s: container %s mounts it at %s without readOnly", what, c.Name, m.MountPath)
							}
						}
					}
				}
				if !mounted {
					t.Errorf("%s: no container mounts it", what)
				}
			}
		}
	}
	for _, dir := range []string{examplesDir, examplesDir + "/seldon", examplesDir + "/kserve"} {
		if inline[filepath.FromSlash(dir)] == 0 {
			t.Errorf("%s has no inline volume of %s", dir, names.DriverName)
		}
	}
}

// withoutPrefixed drops the keys Kubernetes reserves (csi.storage.k8s.io/...).
func withoutPrefixed(m map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		if !strings.Contains(k, "/") {
			out[k] = v
		}
	}
	return out
}

// graphNodes returns every predictive unit of a graph, depth first.
func graphNodes(u PredictiveUnit) []PredictiveUnit {
	out := []PredictiveUnit{u}
	for _, c := range u.Children {
		out = append(out, graphNodes(c)...)
	}
	return out
}

// A graph node with a modelUri makes Seldon inject its storage initializer,
// whose emptyDir at /mnt/models would shadow the cache. Each model node
// leaves it empty and its container (named like the node) mounts a model
// volume at /mnt/models, where Seldon's prepackaged servers look.
func TestExamples_SeldonGraphsLeaveModelUriEmpty(t *testing.T) {
	docs := docsUnder(documents(t), examplesDir+"/seldon")
	sdeps := objectsOf[*SeldonDeployment](docs)
	if len(sdeps) < 2 {
		t.Fatalf("found %d SeldonDeployments in %s/seldon, want the inline and the PVC one", len(sdeps), examplesDir)
	}
	for _, sd := range sdeps {
		for _, p := range sd.Spec.Predictors {
			for _, u := range graphNodes(p.Graph) {
				what := "SeldonDeployment " + sd.Name + " graph node " + u.Name
				if u.ModelURI != "" || u.EnvSecretRefName != "" {
					t.Errorf("%s: modelUri %q, envSecretRefName %q; leave both empty, or Seldon injects its storage initializer", what, u.ModelURI, u.EnvSecretRefName)
				}
				if u.Implementation == "" {
					continue
				}
				var mount *corev1.VolumeMount
				for i := range p.ComponentSpecs {
					spec := &p.ComponentSpecs[i].Spec
					for j := range spec.Containers {
						if spec.Containers[j].Name == u.Name {
							mount = mountAt(&spec.Containers[j], "/mnt/models")
							if mount != nil {
								v := volumeNamed(t, spec, mount.Name)
								if (v.CSI == nil || v.CSI.Driver != names.DriverName) && v.PersistentVolumeClaim == nil {
									t.Errorf("%s: /mnt/models is volume %s, neither a %s volume nor a claim", what, v.Name, names.DriverName)
								}
							}
						}
					}
				}
				if mount == nil {
					t.Errorf("%s: no componentSpecs container named %s mounts /mnt/models", what, u.Name)
				}
			}
		}
	}
}

// The InferenceService has no storageUri (no storage initializer), runs as a
// plain Deployment (Knative allows no CSI volumes), and mounts the model at
// /mnt/models, the sklearn runtime's --model_dir.
func TestExamples_KServeUsesTheVolumeNotTheStorageInitializer(t *testing.T) {
	isvcs := objectsOf[*InferenceService](docsUnder(documents(t), examplesDir+"/kserve"))
	if len(isvcs) == 0 {
		t.Fatalf("no InferenceService in %s/kserve", examplesDir)
	}
	for _, is := range isvcs {
		m := is.Spec.Predictor.Model
		if m == nil {
			t.Fatalf("InferenceService %s has no predictor.model", is.Name)
		}
		if m.StorageURI != nil {
			t.Errorf("InferenceService %s: storageUri %q makes KServe inject its storage initializer", is.Name, *m.StorageURI)
		}
		if mode := is.Annotations["serving.kserve.io/deploymentMode"]; mode != "RawDeployment" && mode != "Standard" {
			t.Errorf("InferenceService %s: deploymentMode %q; Knative Serving refuses CSI volumes, use RawDeployment", is.Name, mode)
		}
		mount := mountAt(&m.Container, "/mnt/models")
		if mount == nil {
			t.Fatalf("InferenceService %s: the model container mounts nothing at /mnt/models", is.Name)
		}
		if v := volumeNamed(t, &is.Spec.Predictor.PodSpec, mount.Name); v.CSI == nil || v.CSI.Driver != names.DriverName {
			t.Errorf("InferenceService %s: /mnt/models is not a %s volume", is.Name, names.DriverName)
		}
	}
}

// provisionExample sends the CreateVolume the external-provisioner sends for
// claim of class, to the real controller with a fake API server holding the
// claim, and returns the provisioned volume context.
func provisionExample(t *testing.T, class *storagev1.StorageClass, claim *corev1.PersistentVolumeClaim) map[string]string {
	t.Helper()
	db, err := state.Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctrl := &csi.Controller{Resolver: source.NewSources(make([]byte, 32)), Volumes: db, Claims: kube.NewClaims(fake.NewClientset(claim))}

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
		t.Fatalf("the example claim %s does not provision: %v", claim.Name, err)
	}
	return resp.GetVolume().GetVolumeContext()
}

// The Seldon PVC example's claim provisions, through the real controller, a
// volume of the class's model, which the SeldonDeployment mounts.
func TestExamples_SeldonPVC_ProvisionsTheClassModel(t *testing.T) {
	docs := docsUnder(documents(t), examplesDir+"/seldon")
	var class *storagev1.StorageClass
	var claim *corev1.PersistentVolumeClaim
	for _, d := range docs {
		if filepath.Base(d.file) != "seldondeployment-pvc.yaml" {
			continue
		}
		switch o := d.obj.(type) {
		case *storagev1.StorageClass:
			class = o
		case *corev1.PersistentVolumeClaim:
			claim = o
		}
	}
	if class == nil || claim == nil || claim.Spec.StorageClassName == nil || *claim.Spec.StorageClassName != class.Name {
		t.Fatal("seldon/seldondeployment-pvc.yaml needs a StorageClass and a PersistentVolumeClaim of it")
	}
	if got, want := provisionExample(t, class, claim)[names.AttrModelURI], class.Parameters[names.AttrModelURI]; got != want {
		t.Fatalf("provisioned modelUri %q, want the class's %q", got, want)
	}
}

// The prefetch example: a CachedModel whose holders the reconciler builds
// into exactly the inline volume the example's model servers mount (same
// modelUri and secret, so their publishes are cache hits), with a secret
// that exists beside it, on GPU nodes; the Deployment requires affinity
// to those holders and the SeldonDeployment prefers it, and neither
// server matches its own affinity term.
func TestExamples_Prefetch_ServersFollowTheCachedModel(t *testing.T) {
	docs := docsUnder(documents(t), examplesDir+"/prefetch")
	cms := objectsOf[*CachedModel](docs)
	if len(cms) != 1 {
		t.Fatalf("found %d CachedModels in %s/prefetch, want 1", len(cms), examplesDir)
	}
	cm := &cms[0].CachedModel
	if _, err := source.ParseURI(cm.Spec.ModelURI); err != nil {
		t.Errorf("CachedModel modelUri: %v", err)
	}
	if len(cm.Spec.NodeSelector) == 0 {
		t.Error("the CachedModel has no nodeSelector: it would warm every node")
	}
	secrets := map[string]bool{}
	for _, s := range objectsOf[*corev1.Secret](docs) {
		secrets[s.Namespace+"/"+s.Name] = true
	}
	if cm.Spec.SecretRef == nil || !secrets[cm.Namespace+"/"+cm.Spec.SecretRef.Name] {
		t.Errorf("the CachedModel's secretRef %+v names no Secret of the example in namespace %s", cm.Spec.SecretRef, cm.Namespace)
	}
	holders := fleet.Holders(cm, "image")
	held := holders.Spec.Template.Spec.Volumes[0].CSI

	type server struct {
		name     string
		spec     *corev1.PodSpec
		labels   map[string]string
		required bool
	}
	var servers []server
	for _, d := range objectsOf[*appsv1.Deployment](docs) {
		servers = append(servers, server{"Deployment " + d.Name, &d.Spec.Template.Spec, d.Spec.Template.Labels, true})
	}
	for _, sd := range objectsOf[*SeldonDeployment](docs) {
		for _, p := range sd.Spec.Predictors {
			for _, c := range p.ComponentSpecs {
				servers = append(servers, server{"SeldonDeployment " + sd.Name, &c.Spec, c.Metadata.Labels, false})
			}
		}
	}
	if len(servers) != 2 {
		t.Fatalf("found %d model servers (a Deployment and a SeldonDeployment expected)", len(servers))
	}
	for _, s := range servers {
		var vol *corev1.CSIVolumeSource
		for _, v := range s.spec.Volumes {
			if v.CSI != nil && v.CSI.Driver == names.DriverName {
				vol = v.CSI
			}
		}
		if vol == nil || vol.VolumeAttributes[names.AttrModelURI] != held.VolumeAttributes[names.AttrModelURI] ||
			vol.NodePublishSecretRef == nil || vol.NodePublishSecretRef.Name != held.NodePublishSecretRef.Name {
			t.Errorf("%s mounts %+v, not the held model with the same secret", s.name, vol)
		}
		var terms []corev1.PodAffinityTerm
		if a := s.spec.Affinity; a != nil && a.PodAffinity != nil {
			if s.required {
				terms = a.PodAffinity.RequiredDuringSchedulingIgnoredDuringExecution
			} else {
				for _, w := range a.PodAffinity.PreferredDuringSchedulingIgnoredDuringExecution {
					terms = append(terms, w.PodAffinityTerm)
				}
			}
		}
		if len(terms) != 1 || terms[0].TopologyKey != "kubernetes.io/hostname" || terms[0].LabelSelector == nil ||
			!maps.Equal(terms[0].LabelSelector.MatchLabels, holders.Spec.Template.Labels) {
			t.Errorf("%s: pod affinity %+v does not follow the holders (%v, per node); required=%v", s.name, terms, holders.Spec.Template.Labels, s.required)
		}
		if _, own := s.labels[fleet.LabelCachedModel]; own {
			t.Errorf("%s carries %s itself and would match its own affinity term", s.name, fleet.LabelCachedModel)
		}
	}
}
