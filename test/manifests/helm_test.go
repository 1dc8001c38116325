package manifests

// The Helm chart under deploy/helm/modelcache: with default values it
// renders exactly the objects of the kustomize base, and each value reaches
// the objects it documents. Both tools are the pinned binaries in bin/.

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/test/testenv"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
)

const (
	helmChartDir      = "deploy/helm/modelcache"
	helmKustomizeDir  = "deploy/kubernetes"
	helmReleaseNS     = "modelcache"
	helmDaemonSetKey  = "DaemonSet/modelcache/modelcache-node"
	helmDeploymentKey = "Deployment/modelcache/modelcache-controller"
)

// helmStrictDecoder fails on unknown and duplicate fields, so a misspelt key in
// a template is an error here rather than a field the API server drops.
// helmStrictDecoder is the manifests' decoder: client-go's types and the CRD.
var helmStrictDecoder = manifestDecoder()

// helmTool returns the path of a pinned binary in bin/ or fails the test.
func helmTool(t *testing.T, name string) string {
	t.Helper()
	p, err := testenv.Binary(name)
	if err != nil {
		t.Fatalf("%v\n`make tools` builds the pinned kustomize and helm into bin/", err)
	}
	return p
}

// helmRun runs a pinned tool in the repository root and returns its
// standard output.
func helmRun(t *testing.T, name string, args ...string) ([]byte, error) {
	t.Helper()
	helmTool(t, name) // fails the test with how to get it
	return testenv.RunTool(name, args...)
}

// helmTemplate renders the chart as release "modelcache" in namespace
// modelcache, plus args.
func helmTemplate(t *testing.T, args ...string) map[string]runtime.Object {
	t.Helper()
	// --include-crds: the chart's crds/ are part of what it installs.
	out, err := helmRun(t, "helm", append([]string{"template", "modelcache", helmChartDir, "--namespace", helmReleaseNS, "--include-crds"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return helmDecodeAll(t, "helm template", out)
}

// helmDecodeAll decodes every document of a multi-document stream strictly into
// typed objects, keyed kind/namespace/name.
func helmDecodeAll(t *testing.T, what string, raw []byte) map[string]runtime.Object {
	t.Helper()
	out := map[string]runtime.Object{}
	for _, doc := range yamlDocuments(t, what, raw) {
		obj, gvk, err := helmStrictDecoder.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%s: a document does not decode strictly: %v\n%s", what, err, doc)
		}
		m, err := meta.Accessor(obj)
		if err != nil {
			t.Fatalf("%s: %s has no metadata: %v", what, gvk, err)
		}
		key := gvk.Kind + "/" + m.GetNamespace() + "/" + m.GetName()
		if _, dup := out[key]; dup {
			t.Fatalf("%s: %s appears twice", what, key)
		}
		out[key] = obj
	}
	return out
}

// helmDifferences lists, in a readable form, how got differs from want.
func helmDifferences(want, got map[string]runtime.Object) []string {
	var out []string
	for _, k := range helmSortedKeys(want) {
		g, ok := got[k]
		if !ok {
			out = append(out, fmt.Sprintf("%s: in kustomize output, missing from helm output", k))
			continue
		}
		if !equality.Semantic.DeepEqual(want[k], g) {
			out = append(out, fmt.Sprintf("%s differs (-kustomize +helm):\n%s", k, helmLineDiff(want[k], g)))
		}
	}
	for _, k := range helmSortedKeys(got) {
		if _, ok := want[k]; !ok {
			out = append(out, fmt.Sprintf("%s: in helm output only", k))
		}
	}
	return out
}

func helmSortedKeys(m map[string]runtime.Object) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func TestHelm_DefaultValuesRenderTheKustomizeBase(t *testing.T) {
	out, err := helmRun(t, "kustomize", "build", helmKustomizeDir)
	if err != nil {
		t.Fatal(err)
	}
	want := helmDecodeAll(t, "kustomize build", out)
	for _, k := range []string{"Namespace//modelcache", "CSIDriver//modelcache.csi.dev", "CustomResourceDefinition//cachedmodels.modelcache.csi.dev", helmDaemonSetKey, helmDeploymentKey} {
		if want[k] == nil {
			t.Fatalf("kustomize build %s has no %s; found %v", helmKustomizeDir, k, helmSortedKeys(want))
		}
	}
	got := helmTemplate(t)
	for _, d := range helmDifferences(want, got) {
		t.Error(d)
	}

	// The comparison itself sees a one-argument change.
	changed := helmTemplate(t, "--set", "cache.minFree=12345Mi")
	if d := helmDifferences(want, changed); len(d) != 1 || !strings.HasPrefix(d[0], helmDaemonSetKey+" differs") {
		t.Errorf("with cache.minFree=12345Mi, want exactly the DaemonSet to differ, got %d differences:\n%s", len(d), strings.Join(d, "\n"))
	}
}

func TestHelm_LintPasses(t *testing.T) {
	for _, args := range [][]string{
		nil,
		{"--set", "createNamespace=false,controller.enabled=false,metrics.enabled=false"},
		{"--set", "kubeletDir=/var/lib/k0s/kubelet,cache.size=,image.pullPolicy=Always"},
		{"--set", "peers.enabled=false"},
	} {
		if _, err := helmRun(t, "helm", append([]string{"lint", "--strict", helmChartDir}, args...)...); err != nil {
			t.Errorf("helm lint %v: %v", args, err)
		}
	}
}

// Values the schema or the templates refuse, each with what the error names.
func TestHelm_BadValuesAreRefused(t *testing.T) {
	tests := []struct {
		set  string
		want string
	}{
		{"metrics.enable=false", "'enable' not allowed"},           // misspelt key
		{"kubeletDir=var/lib/kubelet", "/kubeletDir"},              // relative path
		{"cache.dir=modelcache", "/cache/dir"},                     // relative path
		{"metrics.port=0", "/metrics/port"},                        // out of range
		{"image.pullPolicy=Sometimes", "/image/pullPolicy"},        // not a policy
		{"controller.replicas=one", "/controller/replicas"},        // not a number
		{"sidecars.registrar.image=", "/sidecars/registrar/image"}, // no image
		{"peers.enable=false", "'enable' not allowed"},             // misspelt key
		{"peers.port=65536", "/peers/port"},                        // out of range
		{"peers.maxStreams=0", "/peers/maxStreams"},                // no stream at all
	}
	for _, tc := range tests {
		t.Run(tc.set, func(t *testing.T) {
			t.Parallel()
			out, err := helmRun(t, "helm", "template", "modelcache", helmChartDir, "--namespace", helmReleaseNS, "--set", tc.set)
			if err == nil {
				t.Fatalf("--set %s rendered:\n%s", tc.set, out)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("--set %s failed without naming %q: %v", tc.set, tc.want, err)
			}
		})
	}
}

func TestHelm_ValuesReachTheObjects(t *testing.T) {
	tests := []struct {
		name  string
		args  []string
		check func(t *testing.T, objs map[string]runtime.Object)
	}{
		{
			name: "kubeletDir moves every kubelet path together",
			args: []string{"--set", "kubeletDir=/var/lib/k0s/kubelet"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				helmCheckKubeletDir(t, objs, "/var/lib/k0s/kubelet")
			},
		},
		{
			name: "kubeletDir with a trailing slash",
			args: []string{"--set", "kubeletDir=/var/snap/microk8s/common/var/lib/kubelet/"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				helmCheckKubeletDir(t, objs, "/var/snap/microk8s/common/var/lib/kubelet")
			},
		},
		{
			name: "metrics disabled: no address, no port, POD_IP for the peer endpoint",
			args: []string{"--set", "metrics.enabled=false"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				c := helmContainer(t, &helmDaemonSet(t, objs).Spec.Template.Spec, "modelcache")
				if v := helmFlagValues(c, "--metrics-address"); len(v) != 0 {
					t.Errorf("--metrics-address=%v is still passed", v)
				}
				for _, p := range c.Ports {
					if p.Name == "metrics" || p.ContainerPort == 9808 {
						t.Errorf("port %s/%d is still declared", p.Name, p.ContainerPort)
					}
				}
				if helmEnv(c, "POD_IP") == nil {
					t.Error("POD_IP is gone; the peer endpoint serves on it")
				}
				np, ok := objs["NetworkPolicy/modelcache/modelcache-peers"].(*networkingv1.NetworkPolicy)
				if !ok {
					t.Fatal("no ingress NetworkPolicy modelcache-peers")
				}
				for _, r := range np.Spec.Ingress {
					for _, p := range r.Ports {
						if p.Port != nil && p.Port.String() == "metrics" {
							t.Error("the ingress NetworkPolicy still admits the metrics port")
						}
					}
				}
			},
		},
		{
			name: "metrics and peers disabled: no POD_IP",
			args: []string{"--set", "metrics.enabled=false,peers.enabled=false"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				c := helmContainer(t, &helmDaemonSet(t, objs).Spec.Template.Spec, "modelcache")
				if helmEnv(c, "POD_IP") != nil {
					t.Error("POD_IP is still set; only --metrics-address and the peer endpoint use it")
				}
			},
		},
		{
			name: "peers port and streams",
			args: []string{"--set", "peers.port=9555,peers.maxStreams=8"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				c := helmContainer(t, &helmDaemonSet(t, objs).Spec.Template.Spec, "modelcache")
				helmCheckFlag(t, c, "--peer-port", "9555")
				helmCheckFlag(t, c, "--peer-max-streams", "8")
				if p := helmPort(c, "peer"); p == nil || p.ContainerPort != 9555 {
					t.Errorf("peer port is %+v, want 9555", p)
				}
				svc, ok := objs["Service/modelcache/modelcache-peers"].(*corev1.Service)
				if !ok || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 9555 || svc.Spec.Ports[0].TargetPort.String() != "peer" {
					t.Errorf("peer Service %+v, want port 9555 to the pod's port named peer", svc)
				}
			},
		},
		{
			name: "peers' ingress policy off, peers on",
			args: []string{"--set", "peers.networkPolicy.enabled=false"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				if objs["NetworkPolicy/modelcache/modelcache-peers"] != nil {
					t.Error("the ingress NetworkPolicy modelcache-peers is still rendered")
				}
				if objs["Service/modelcache/modelcache-peers"] == nil || objs["Role/modelcache/modelcache-node-peers"] == nil {
					t.Error("peers' Service or Role went with their NetworkPolicy")
				}
			},
		},
		{
			name: "metrics port",
			args: []string{"--set", "metrics.port=9100"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				c := helmContainer(t, &helmDaemonSet(t, objs).Spec.Template.Spec, "modelcache")
				helmCheckFlag(t, c, "--metrics-address", "$(POD_IP):9100")
				if p := helmPort(c, "metrics"); p == nil || p.ContainerPort != 9100 {
					t.Errorf("metrics port is %+v, want 9100", p)
				}
			},
		},
		{
			name: "controller disabled: no Deployment, no controller RBAC",
			args: []string{"--set", "controller.enabled=false"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				for k, o := range objs {
					if strings.Contains(k, "modelcache-controller") {
						t.Errorf("%s is still rendered", k)
					}
					if _, ok := o.(*appsv1.Deployment); ok {
						t.Errorf("%s is still rendered", k)
					}
				}
				for _, k := range []string{helmDaemonSetKey, "CSIDriver//modelcache.csi.dev", "ClusterRoleBinding//modelcache-node"} {
					if objs[k] == nil {
						t.Errorf("%s is gone too", k)
					}
				}
			},
		},
		{
			name: "controller replicas",
			args: []string{"--set", "controller.replicas=2"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				d, ok := objs[helmDeploymentKey].(*appsv1.Deployment)
				if !ok {
					t.Fatalf("no %s", helmDeploymentKey)
				}
				if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
					t.Errorf("replicas %v, want 2", d.Spec.Replicas)
				}
			},
		},
		{
			name: "cache size, min free and dir",
			args: []string{"--set", "cache.size=200Gi,cache.minFree=5%,cache.dir=/mnt/nvme/modelcache"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				spec := &helmDaemonSet(t, objs).Spec.Template.Spec
				c := helmContainer(t, spec, "modelcache")
				helmCheckFlag(t, c, "--cache-size", "200Gi")
				helmCheckFlag(t, c, "--min-free", "5%")
				helmCheckFlag(t, c, "--cache-dir", "/mnt/nvme/modelcache")
				if h := helmHostPath(t, spec, "cache-dir"); h != "/mnt/nvme/modelcache" {
					t.Errorf("cache-dir hostPath %q", h)
				}
				if m := helmMountPath(t, c, "cache-dir"); m != "/mnt/nvme/modelcache" {
					t.Errorf("cache-dir mountPath %q, want the host path", m)
				}
			},
		},
		{
			name: "empty cache size: no limit flag",
			args: []string{"--set", "cache.size="},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				c := helmContainer(t, &helmDaemonSet(t, objs).Spec.Template.Spec, "modelcache")
				if v := helmFlagValues(c, "--cache-size"); len(v) != 0 {
					t.Errorf("--cache-size=%q passed for an empty cache.size", v)
				}
			},
		},
		{
			name: "nodeSelector and tolerations",
			args: []string{
				"--set", `node.nodeSelector.kubernetes\.io/os=linux,node.nodeSelector.gpu=true`,
				"--set-json", `node.tolerations=[{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}]`,
			},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				spec := helmDaemonSet(t, objs).Spec.Template.Spec
				want := map[string]string{"kubernetes.io/os": "linux", "gpu": "true"}
				if !equality.Semantic.DeepEqual(spec.NodeSelector, want) {
					t.Errorf("nodeSelector %v, want %v", spec.NodeSelector, want)
				}
				wantTol := []corev1.Toleration{{Key: "nvidia.com/gpu", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}}
				if !equality.Semantic.DeepEqual(spec.Tolerations, wantTol) {
					t.Errorf("tolerations %+v, want %+v", spec.Tolerations, wantTol)
				}
			},
		},
		{
			name: "no tolerations",
			args: []string{"--set-json", "node.tolerations=[]"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				if tol := helmDaemonSet(t, objs).Spec.Template.Spec.Tolerations; len(tol) != 0 {
					t.Errorf("tolerations %+v, want none", tol)
				}
			},
		},
		{
			name: "node resources",
			args: []string{"--set", "node.resources.limits.memory=1Gi"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				r := helmContainer(t, &helmDaemonSet(t, objs).Spec.Template.Spec, "modelcache").Resources
				if got := r.Limits.Memory().String(); got != "1Gi" {
					t.Errorf("memory limit %s, want 1Gi", got)
				}
				if got := r.Requests.Cpu().String(); got != "100m" {
					t.Errorf("cpu request %s, want the default 100m kept", got)
				}
			},
		},
		{
			name: "image and pull policy reach both modelcache containers only",
			args: []string{"--set", "image.repository=registry.example/modelcache-csi,image.tag=v1.2.3,image.pullPolicy=Always,sidecars.registrar.image=mirror.example/registrar:v2"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				d, ok := objs[helmDeploymentKey].(*appsv1.Deployment)
				if !ok {
					t.Fatalf("no %s", helmDeploymentKey)
				}
				for _, spec := range []*corev1.PodSpec{&helmDaemonSet(t, objs).Spec.Template.Spec, &d.Spec.Template.Spec} {
					for _, c := range spec.Containers {
						if c.Name == "modelcache" {
							if c.Image != "registry.example/modelcache-csi:v1.2.3" || c.ImagePullPolicy != corev1.PullAlways {
								t.Errorf("%s: image %q pull policy %q", c.Name, c.Image, c.ImagePullPolicy)
							}
						} else if c.ImagePullPolicy != "" {
							t.Errorf("sidecar %s has pull policy %q", c.Name, c.ImagePullPolicy)
						}
					}
				}
				if img := helmContainer(t, &helmDaemonSet(t, objs).Spec.Template.Spec, "node-driver-registrar").Image; img != "mirror.example/registrar:v2" {
					t.Errorf("registrar image %q", img)
				}
			},
		},
		{
			name: "another namespace, created by Helm instead of the chart",
			args: []string{"--namespace", "storage", "--set", "createNamespace=false"},
			check: func(t *testing.T, objs map[string]runtime.Object) {
				for k, o := range objs {
					if _, ok := o.(*corev1.Namespace); ok {
						t.Errorf("%s rendered with createNamespace=false", k)
					}
					m, _ := meta.Accessor(o)
					if ns := m.GetNamespace(); ns != "" && ns != "storage" {
						t.Errorf("%s is in namespace %q, want the release's", k, ns)
					}
					if b, ok := o.(*rbacv1.ClusterRoleBinding); ok {
						for _, s := range b.Subjects {
							if s.Namespace != "storage" {
								t.Errorf("%s binds %s in namespace %q", k, s.Name, s.Namespace)
							}
						}
					}
				}
				d, ok := objs["Deployment/storage/modelcache-controller"].(*appsv1.Deployment)
				if !ok {
					t.Fatalf("no controller Deployment in namespace storage: %v", helmSortedKeys(objs))
				}
				helmCheckFlag(t, helmContainer(t, &d.Spec.Template.Spec, "csi-provisioner"), "--leader-election-namespace", "storage")
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// A later --namespace overrides helmTemplate's.
			objs := helmTemplate(t, tc.args...)
			tc.check(t, objs)
		})
	}
}

// helmCheckKubeletDir checks that every kubelet path of the node plugin is
// under dir, and that the pods directory is mounted at its host path.
func helmCheckKubeletDir(t *testing.T, objs map[string]runtime.Object, dir string) {
	t.Helper()
	ds := helmDaemonSet(t, objs)
	spec := &ds.Spec.Template.Spec
	plugin := helmContainer(t, spec, "modelcache")
	for vol, want := range map[string]string{
		"pods-dir":         dir + "/pods",
		"plugin-dir":       dir + "/plugins/modelcache.csi.dev",
		"registration-dir": dir + "/plugins_registry",
	} {
		if got := helmHostPath(t, spec, vol); got != want {
			t.Errorf("%s hostPath %q, want %q", vol, got, want)
		}
	}
	if got := helmMountPath(t, plugin, "pods-dir"); got != dir+"/pods" {
		t.Errorf("pods-dir mountPath %q, want the host path %q: kubelet's target paths must be valid in the container", got, dir+"/pods")
	}
	for _, m := range plugin.VolumeMounts {
		if m.Name == "pods-dir" && (m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional) {
			t.Errorf("pods-dir mount propagation %v, want Bidirectional", m.MountPropagation)
		}
	}
	helmCheckFlag(t, helmContainer(t, spec, "node-driver-registrar"), "--kubelet-registration-path", dir+"/plugins/modelcache.csi.dev/csi.sock")
	// No string anywhere in the DaemonSet names a path under the default
	// kubelet directory unless it is under dir.
	raw, err := json.Marshal(ds)
	if err != nil {
		t.Fatal(err)
	}
	var tree any
	if err := json.Unmarshal(raw, &tree); err != nil {
		t.Fatal(err)
	}
	for _, s := range helmStrings(tree) {
		if strings.Contains(s, "/var/lib/kubelet/") && !strings.HasPrefix(s, dir+"/") && !strings.Contains(s, "="+dir+"/") {
			t.Errorf("the DaemonSet still names the default kubelet directory: %q", s)
		}
	}
}

// helmStrings returns every string value in a decoded JSON tree.
func helmStrings(v any) []string {
	switch v := v.(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, e := range v {
			out = append(out, helmStrings(e)...)
		}
		return out
	case map[string]any:
		var out []string
		for _, e := range v {
			out = append(out, helmStrings(e)...)
		}
		return out
	}
	return nil
}

func helmDaemonSet(t *testing.T, objs map[string]runtime.Object) *appsv1.DaemonSet {
	t.Helper()
	ds, ok := objs[helmDaemonSetKey].(*appsv1.DaemonSet)
	if !ok {
		t.Fatalf("no %s among %v", helmDaemonSetKey, helmSortedKeys(objs))
	}
	return ds
}

func helmContainer(t *testing.T, spec *corev1.PodSpec, name string) *corev1.Container {
	t.Helper()
	for i := range spec.Containers {
		if spec.Containers[i].Name == name {
			return &spec.Containers[i]
		}
	}
	t.Fatalf("no container %s", name)
	return nil
}

func helmHostPath(t *testing.T, spec *corev1.PodSpec, volume string) string {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Name == volume && v.HostPath != nil {
			return v.HostPath.Path
		}
	}
	t.Fatalf("no hostPath volume %s", volume)
	return ""
}

func helmMountPath(t *testing.T, c *corev1.Container, volume string) string {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == volume {
			return m.MountPath
		}
	}
	t.Fatalf("container %s does not mount %s", c.Name, volume)
	return ""
}

// helmFlagValues returns the values of every --flag=value among c's args.
func helmFlagValues(c *corev1.Container, flag string) []string {
	var vals []string
	for _, a := range c.Args {
		if v, ok := strings.CutPrefix(a, flag+"="); ok {
			vals = append(vals, v)
		}
	}
	return vals
}

// helmCheckFlag checks that c passes flag exactly once, with value want.
func helmCheckFlag(t *testing.T, c *corev1.Container, flag, want string) {
	t.Helper()
	if got := helmFlagValues(c, flag); len(got) != 1 || got[0] != want {
		t.Errorf("container %s: %s values %q, want exactly %q (args %q)", c.Name, flag, got, want, c.Args)
	}
}

// helmEnv returns c's environment variable name, or nil.
func helmEnv(c *corev1.Container, name string) *corev1.EnvVar {
	for i := range c.Env {
		if c.Env[i].Name == name {
			return &c.Env[i]
		}
	}
	return nil
}

func helmPort(c *corev1.Container, name string) *corev1.ContainerPort {
	for i := range c.Ports {
		if c.Ports[i].Name == name {
			return &c.Ports[i]
		}
	}
	return nil
}

// helmLineDiff shows a and b as indented JSON, with lines only in a marked "-"
// and lines only in b marked "+" (a longest-common-subsequence diff; only
// changed lines and their neighbours are shown).
func helmLineDiff(a, b any) string {
	ja, _ := json.MarshalIndent(a, "", "  ")
	jb, _ := json.MarshalIndent(b, "", "  ")
	x, y := strings.Split(string(ja), "\n"), strings.Split(string(jb), "\n")
	// lcs[i][j]: length of the longest common subsequence of x[i:] and y[j:].
	lcs := make([][]int, len(x)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(y)+1)
	}
	for i := len(x) - 1; i >= 0; i-- {
		for j := len(y) - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var lines []string
	var changed []bool
	for i, j := 0, 0; i < len(x) || j < len(y); {
		switch {
		case i < len(x) && j < len(y) && x[i] == y[j]:
			lines, changed = append(lines, "  "+x[i]), append(changed, false)
			i, j = i+1, j+1
		case j < len(y) && (i == len(x) || lcs[i][j+1] >= lcs[i+1][j]):
			lines, changed = append(lines, "+ "+y[j]), append(changed, true)
			j++
		default:
			lines, changed = append(lines, "- "+x[i]), append(changed, true)
			i++
		}
	}
	const context = 3
	var out strings.Builder
	last := -1
	for i := range lines {
		near := false
		for k := max(0, i-context); k <= min(len(lines)-1, i+context); k++ {
			near = near || changed[k]
		}
		if !near {
			continue
		}
		if last >= 0 && i != last+1 {
			out.WriteString("  ...\n")
		}
		out.WriteString(lines[i] + "\n")
		last = i
	}
	return out.String()
}
