package manifests

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/csi"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/test/testenv"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// Checks of deploy/examples: every model volume names a valid model with a
// secret that exists and is mounted read-only; the Seldon and KServe
// examples leave their own model download off; the StorageClass examples
// provision; the prefetch example runs a command modelcachectl accepts.

const examplesDir = "deploy/examples"

// The volume attributes the node plugin reads (pkg/csi).
var modelAttrs = []string{csi.AttrModelURI, csi.AttrPullPolicy, csi.AttrDigest}

// checkModelAttrs checks a model reference as the node and controller read
// it: modelUri present and parseable, no key the driver would refuse.
func checkModelAttrs(t *testing.T, what string, attrs map[string]string) {
	t.Helper()
	uri := attrs[csi.AttrModelURI]
	if uri == "" {
		t.Errorf("%s: no %s", what, csi.AttrModelURI)
	} else if _, err := source.ParseURI(uri); err != nil {
		t.Errorf("%s: %s %q: %v", what, csi.AttrModelURI, uri, err)
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
		if sc.Provisioner == csi.DriverName {
			classes[sc.Name] = true
			checkModelAttrs(t, "StorageClass "+sc.Name, withoutPrefixed(sc.Parameters))
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
		if c := pv.Spec.CSI; c != nil && c.Driver == csi.DriverName {
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
				case v.CSI != nil && v.CSI.Driver == csi.DriverName:
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
			t.Errorf("%s has no inline volume of %s", dir, csi.DriverName)
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
								if (v.CSI == nil || v.CSI.Driver != csi.DriverName) && v.PersistentVolumeClaim == nil {
									t.Errorf("%s: /mnt/models is volume %s, neither a %s volume nor a claim", what, v.Name, csi.DriverName)
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
		if v := volumeNamed(t, &is.Spec.Predictor.PodSpec, mount.Name); v.CSI == nil || v.CSI.Driver != csi.DriverName {
			t.Errorf("InferenceService %s: /mnt/models is not a %s volume", is.Name, csi.DriverName)
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
	if got, want := provisionExample(t, class, claim)[csi.AttrModelURI], class.Parameters[csi.AttrModelURI]; got != want {
		t.Fatalf("provisioned modelUri %q, want the class's %q", got, want)
	}
}

// buildModelcachectl builds cmd/modelcachectl into a temporary directory.
func buildModelcachectl(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "modelcachectl")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/modelcachectl")
	cmd.Dir = testenv.RepoRoot()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building modelcachectl: %v\n%s", err, out)
	}
	return bin
}

// modelcachectlFlags returns the flags `modelcachectl <command> -h` lists,
// its own and the global ones.
func modelcachectlFlags(t *testing.T, bin, command string) []string {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(bin, command, "-h")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("modelcachectl %s -h: %v\n%s", command, err, out.String())
	}
	var flags []string
	for _, m := range regexp.MustCompile(`(?m)^\s+--([a-z][a-z0-9-]*)`).FindAllStringSubmatch(out.String(), -1) {
		flags = append(flags, m[1])
	}
	slices.Sort(flags)
	flags = slices.Compact(flags)
	if len(flags) == 0 {
		t.Fatalf("modelcachectl %s -h lists no flags:\n%s", command, out.String())
	}
	return flags
}

// The prefetch example runs `modelcachectl prefetch` with only flags that
// command accepts, as root, against the node plugin's admin socket, on the
// nodes a nodeSelector picks, with a secret file in a format --secret-file
// reads that defines the remote of the URI. Run with its own arguments
// (paths moved to a temporary directory), the real binary gets as far as
// dialling the socket.
func TestExamples_PrefetchRunsACommandModelcachectlAccepts(t *testing.T) {
	all := documents(t)
	docs := docsUnder(all, examplesDir+"/prefetch")
	sets := objectsOf[*appsv1.DaemonSet](docs)
	if len(sets) != 1 {
		t.Fatalf("found %d DaemonSets in %s/prefetch, want 1", len(sets), examplesDir)
	}
	ds := sets[0]
	spec := &ds.Spec.Template.Spec
	var c *corev1.Container
	for _, cc := range allContainers(spec) {
		if len(cc.Command) > 0 && path.Base(cc.Command[0]) == "modelcachectl" {
			c = cc
		}
	}
	if c == nil {
		t.Fatal("no container of the prefetch DaemonSet runs modelcachectl")
	}
	if len(spec.NodeSelector) == 0 {
		t.Error("the prefetch DaemonSet has no nodeSelector: it would warm every node")
	}

	// The image the node plugin runs, where the Dockerfile puts modelcachectl.
	plugin := nodeDaemonSet(t).plugin
	if c.Image != plugin.Image {
		t.Errorf("prefetch image %s, want the node plugin's %s (it ships modelcachectl)", c.Image, plugin.Image)
	}
	if c.Command[0] != "/usr/local/bin/modelcachectl" || len(c.Command) != 1 {
		t.Errorf("prefetch command %q, want [/usr/local/bin/modelcachectl] where the Dockerfile installs it", c.Command)
	}
	var uid *int64
	if spec.SecurityContext != nil {
		uid = spec.SecurityContext.RunAsUser
	}
	if c.SecurityContext != nil && c.SecurityContext.RunAsUser != nil {
		uid = c.SecurityContext.RunAsUser
	}
	if uid == nil || *uid != 0 {
		t.Errorf("prefetch runs as user %v, want 0: only root may open the admin socket", uid)
	}

	// Flags: only those modelcachectl prefetch lists, and one positional URI.
	bin := buildModelcachectl(t)
	accepted := modelcachectlFlags(t, bin, "prefetch")
	if len(c.Args) == 0 || c.Args[0] != "prefetch" {
		t.Fatalf("prefetch args %q do not start with the prefetch command", c.Args)
	}
	var positional []string
	for i := 1; i < len(c.Args); i++ {
		a := c.Args[i]
		if !strings.HasPrefix(a, "-") {
			positional = append(positional, a)
			continue
		}
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !slices.Contains(accepted, name) {
			t.Errorf("prefetch arg %q: modelcachectl prefetch accepts only %v", a, accepted)
		}
		if !hasValue {
			i++ // every prefetch flag takes a value
		}
	}
	if len(positional) != 1 {
		t.Fatalf("prefetch args %q: want exactly one model URI, got %q", c.Args, positional)
	}
	uri, err := source.ParseURI(positional[0])
	if err != nil {
		t.Fatalf("prefetch URI %q: %v", positional[0], err)
	}

	// The socket: the node plugin's <cache-dir>/admin.sock on the host.
	socket := theArg(t, c, "--socket")
	if hp, want := hostPathOf(t, spec, c, socket), cacheHostPath+"/admin.sock"; hp != want {
		t.Errorf("prefetch --socket=%s is host %s, want the node plugin's %s", socket, hp, want)
	}

	// The secret file: a key of a Secret of the same namespace, mounted.
	secretFile := theArg(t, c, "--secret-file")
	m := mountAt(c, path.Dir(secretFile))
	if m == nil {
		t.Fatalf("--secret-file=%s: nothing is mounted at %s", secretFile, path.Dir(secretFile))
	}
	v := volumeNamed(t, spec, m.Name)
	if v.Secret == nil {
		t.Fatalf("--secret-file=%s is not in a Secret volume", secretFile)
	}
	key := path.Base(secretFile)
	for _, it := range v.Secret.Items {
		if it.Path == key {
			key = it.Key
		}
	}
	var content []byte
	for _, s := range objectsOf[*corev1.Secret](docs) {
		if s.Name == v.Secret.SecretName && s.Namespace == ds.Namespace {
			if sd, ok := s.StringData[key]; ok {
				content = []byte(sd)
			} else if d, ok := s.Data[key]; ok {
				content = d
			}
		}
	}
	if content == nil {
		t.Fatalf("--secret-file=%s: Secret %s/%s with key %s is not in the example", secretFile, ds.Namespace, v.Secret.SecretName, key)
	}
	if uri.Scheme == source.SchemeRemote {
		typeKey := "RCLONE_CONFIG_" + strings.ToUpper(strings.ReplaceAll(uri.Remote, "-", "_")) + "_TYPE="
		if !bytes.Contains(content, []byte("\n"+typeKey)) && !bytes.HasPrefix(content, []byte(typeKey)) {
			t.Errorf("the secret file defines no %s line for remote %q", typeKey, uri.Remote)
		}
	}

	// The real binary with the example's arguments: only the two paths
	// move. It must read the secret file and then fail to reach the
	// (absent) socket, not refuse the arguments (exit 2) or the file.
	dir := t.TempDir()
	file := filepath.Join(dir, key)
	if err := os.WriteFile(file, content, 0o600); err != nil {
		t.Fatal(err)
	}
	args := slices.Clone(c.Args)
	for i, a := range args {
		args[i] = strings.NewReplacer(secretFile, file, socket, filepath.Join(dir, "admin.sock")).Replace(a)
	}
	var out bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	code := cmd.ProcessState.ExitCode()
	if code != 1 || !strings.Contains(out.String(), "cannot reach the admin API: no socket at") {
		t.Fatalf("modelcachectl %q exited %d (%v), want 1 for the missing socket after reading the secret file:\n%s", args, code, err, out.String())
	}
}
