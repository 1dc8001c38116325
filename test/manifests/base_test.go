package manifests

import (
	"net"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/names"
	"github.com/modelcache/modelcache/test/testenv"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// Checks of the kustomize base, deploy/kubernetes: each object has what
// kubelet, the sidecars and the driver need, and the objects agree with each
// other (paths, sockets, ports, flags).

const (
	baseDir        = "deploy/kubernetes"
	kubeletPodsDir = "/var/lib/kubelet/pods"
	cacheHostPath  = "/var/lib/modelcache"
)

func baseDocs(t *testing.T) []document {
	t.Helper()
	return docsUnder(documents(t), baseDir)
}

// kustomization.yaml lists every other file of the base, and only those.
func TestBase_KustomizationListsEveryFile(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), baseDir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		Resources []string `json:"resources"`
	}
	if err := yaml.Unmarshal(raw, &k); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(testenv.RepoRoot(), baseDir, "*.yaml"))
	var want []string
	for _, f := range files {
		if filepath.Base(f) != "kustomization.yaml" {
			want = append(want, filepath.Base(f))
		}
	}
	got := slices.Clone(k.Resources)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("kustomization.yaml resources = %v, want the base's files %v", got, want)
	}
}

func TestBase_CSIDriver(t *testing.T) {
	d := theObject[*storagev1.CSIDriver](t, baseDocs(t), names.DriverName)
	s := d.Spec
	if s.AttachRequired == nil || *s.AttachRequired {
		t.Errorf("attachRequired = %v, want false: there is nothing to attach", s.AttachRequired)
	}
	if s.PodInfoOnMount == nil || !*s.PodInfoOnMount {
		t.Errorf("podInfoOnMount = %v, want true: publishes record which pod uses a model", s.PodInfoOnMount)
	}
	modes := slices.Clone(s.VolumeLifecycleModes)
	slices.Sort(modes)
	if want := []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecycleEphemeral, storagev1.VolumeLifecyclePersistent}; !slices.Equal(modes, want) {
		t.Errorf("volumeLifecycleModes = %v, want %v", s.VolumeLifecycleModes, want)
	}
	if s.FSGroupPolicy == nil || *s.FSGroupPolicy != storagev1.NoneFSGroupPolicy {
		t.Errorf("fsGroupPolicy = %v, want None: the cache is shared and read-only, never chowned", s.FSGroupPolicy)
	}
	if s.RequiresRepublish == nil || *s.RequiresRepublish {
		t.Errorf("requiresRepublish = %v, want false", s.RequiresRepublish)
	}
}

// nodePlugin is the node DaemonSet and its three containers.
type nodePlugin struct {
	ds                      *appsv1.DaemonSet
	spec                    *corev1.PodSpec
	plugin, registrar, live *corev1.Container
}

func nodeDaemonSet(t *testing.T) nodePlugin {
	t.Helper()
	docs := baseDocs(t)
	var ds *appsv1.DaemonSet
	for _, d := range objectsOf[*appsv1.DaemonSet](docs) {
		for _, c := range d.Spec.Template.Spec.Containers {
			if strings.HasPrefix(c.Image, "modelcache-csi") {
				ds = d
			}
		}
	}
	if ds == nil {
		t.Fatalf("%s has no DaemonSet running the modelcache-csi image", baseDir)
	}
	spec := &ds.Spec.Template.Spec
	return nodePlugin{
		ds:        ds,
		spec:      spec,
		plugin:    containerWithImage(t, spec, "modelcache-csi"),
		registrar: containerWithImage(t, spec, "csi-node-driver-registrar"),
		live:      containerWithImage(t, spec, "livenessprobe"),
	}
}

// socketPath returns the file path of a unix:// endpoint or a plain path.
func socketPath(t *testing.T, endpoint string) string {
	t.Helper()
	p, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok && !strings.HasPrefix(endpoint, "/") {
		t.Fatalf("endpoint %q is not a unix socket", endpoint)
	}
	if !path.IsAbs(p) {
		t.Fatalf("endpoint %q is not an absolute path", endpoint)
	}
	return p
}

func TestBase_NodeDaemonSet(t *testing.T) {
	n := nodeDaemonSet(t)
	spec, plugin := n.spec, n.plugin

	if m := theArg(t, plugin, "--mode"); m != "node" {
		t.Errorf("plugin --mode=%s, want node", m)
	}
	if sc := plugin.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
		t.Errorf("plugin container is not privileged: it makes bind mounts into kubelet's pods directory")
	}

	// Bidirectional on exactly the kubelet pods directory of the plugin:
	// the mounts the plugin makes there must reach kubelet and the pods,
	// and nothing else of the host may receive mounts from a container.
	var bidirectional int
	for _, c := range allContainers(spec) {
		for _, m := range c.VolumeMounts {
			if m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
				continue
			}
			v := volumeNamed(t, spec, m.Name)
			if c != plugin || v.HostPath == nil || v.HostPath.Path != kubeletPodsDir || m.MountPath != kubeletPodsDir {
				t.Errorf("container %s mounts volume %s at %s with Bidirectional propagation; only the plugin's %s (the same path on the host) may", c.Name, m.Name, m.MountPath, kubeletPodsDir)
				continue
			}
			bidirectional++
		}
	}
	if bidirectional != 1 {
		t.Errorf("the plugin has %d Bidirectional mounts of %s, want 1: kubelet would not see the model mounts", bidirectional, kubeletPodsDir)
	}
	if hp := hostPathOf(t, spec, plugin, kubeletPodsDir); hp != kubeletPodsDir {
		t.Errorf("plugin's %s comes from host %s", kubeletPodsDir, hp)
	}
	// The driver refuses targets outside --kubelet-dir (default
	// /var/lib/kubelet): it must be the root of the pods directory.
	kubeletDir := "/var/lib/kubelet"
	if v := argValues(plugin.Args, "--kubelet-dir"); len(v) > 0 {
		kubeletDir = v[len(v)-1]
	}
	if path.Clean(kubeletDir)+"/pods" != kubeletPodsDir {
		t.Errorf("--kubelet-dir=%s, but the pods directory mounted is %s: every publish would be refused", kubeletDir, kubeletPodsDir)
	}

	// The cache: a dedicated hostPath, mounted at --cache-dir.
	cacheDir := theArg(t, plugin, "--cache-dir")
	if hp := hostPathOf(t, spec, plugin, cacheDir); hp != cacheHostPath {
		t.Errorf("--cache-dir %s is mounted from host %s, want %s", cacheDir, hp, cacheHostPath)
	}
	if cacheDir != cacheHostPath {
		t.Errorf("--cache-dir is %s; keep it the host path %s so logs and modelcachectl name the same paths inside and out", cacheDir, cacheHostPath)
	}
	if v := argValues(plugin.Args, "--admin-socket"); len(v) != 0 {
		t.Errorf("plugin sets --admin-socket %q; the prefetch example and the README expect the default <cache-dir>/admin.sock", v)
	}

	// The CSI socket: the plugin serves it in the plugin directory, which
	// the registrar and the livenessprobe mount at their --csi-address.
	endpoint := socketPath(t, theArg(t, plugin, "--endpoint"))
	pluginDirHost := hostPathOf(t, spec, plugin, path.Dir(endpoint))
	if want := "/var/lib/kubelet/plugins/" + names.DriverName; pluginDirHost != want {
		t.Errorf("the plugin's socket directory %s is host %s, want %s", path.Dir(endpoint), pluginDirHost, want)
	}
	for _, c := range []*corev1.Container{n.registrar, n.live} {
		addr := socketPath(t, theArg(t, c, "--csi-address"))
		if hp := hostPathOf(t, spec, c, path.Dir(addr)); hp != pluginDirHost {
			t.Errorf("%s --csi-address=%s is in host %s, want the plugin's %s", c.Name, addr, hp, pluginDirHost)
		}
		if path.Base(addr) != path.Base(endpoint) {
			t.Errorf("%s --csi-address=%s, the plugin serves %s", c.Name, addr, endpoint)
		}
	}
	if got, want := theArg(t, n.registrar, "--kubelet-registration-path"), pluginDirHost+"/"+path.Base(endpoint); got != want {
		t.Errorf("registrar --kubelet-registration-path=%s, want the plugin's socket on the host, %s", got, want)
	}
	if hp := hostPathOf(t, spec, n.registrar, "/registration"); hp != "/var/lib/kubelet/plugins_registry" {
		t.Errorf("registrar's /registration is host %s, want /var/lib/kubelet/plugins_registry", hp)
	}

	// $(VAR) references in the plugin's args are defined, from the downward API.
	fields := map[string]string{}
	for _, e := range plugin.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			fields[e.Name] = e.ValueFrom.FieldRef.FieldPath
		} else {
			fields[e.Name] = "value"
		}
	}
	for _, a := range plugin.Args {
		for _, m := range regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).FindAllStringSubmatch(a, -1) {
			if _, ok := fields[m[1]]; !ok {
				t.Errorf("plugin arg %q references $(%s), which its env does not define", a, m[1])
			}
		}
	}
	if got := theArg(t, plugin, "--node-id"); got != "$(NODE_NAME)" || fields["NODE_NAME"] != "spec.nodeName" {
		t.Errorf("--node-id=%s with NODE_NAME from %q; want the node's name (spec.nodeName): kubelet matches it", got, fields["NODE_NAME"])
	}

	// Metrics on a declared port.
	if addr := argValues(plugin.Args, "--metrics-address"); len(addr) == 1 {
		_, p, err := net.SplitHostPort(addr[0])
		if err != nil {
			t.Errorf("--metrics-address=%s: %v", addr[0], err)
		} else if !declaresPort(plugin, intstr.Parse(p)) {
			t.Errorf("--metrics-address=%s: the plugin declares no containerPort %s", addr[0], p)
		}
	}

	// Probes: the plugin's liveness and readiness go through the
	// livenessprobe sidecar, which calls the plugin's Probe.
	healthPort, err := strconv.Atoi(theArg(t, n.live, "--health-port"))
	if err != nil {
		t.Fatalf("livenessprobe --health-port: %v", err)
	}
	for what, p := range map[string]*corev1.Probe{"livenessProbe": plugin.LivenessProbe, "readinessProbe": plugin.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("plugin has no HTTP %s", what)
			continue
		}
		if got := resolvePort(plugin, p.HTTPGet.Port); got != healthPort {
			t.Errorf("plugin %s is on port %v (%d), want the livenessprobe's --health-port %d", what, p.HTTPGet.Port.String(), got, healthPort)
		}
		if p.HTTPGet.Path != "/healthz" {
			t.Errorf("plugin %s path %s, the livenessprobe serves /healthz", what, p.HTTPGet.Path)
		}
	}

	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q, want system-node-critical: without the plugin no model pod starts on the node", spec.PriorityClassName)
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || *g < 30 {
		t.Errorf("terminationGracePeriodSeconds %v, want at least 30: commits and the 25 s gRPC drain must finish", g)
	}
	if n.ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType {
		t.Errorf("updateStrategy %q, want RollingUpdate", n.ds.Spec.UpdateStrategy.Type)
	}
	sa := theObject[*corev1.ServiceAccount](t, baseDocs(t), spec.ServiceAccountName)
	if sa.Namespace != n.ds.Namespace {
		t.Errorf("ServiceAccount %s is in %q, the DaemonSet in %q", sa.Name, sa.Namespace, n.ds.Namespace)
	}
}

// declaresPort reports whether c declares the container port p (a number
// or a name).
func declaresPort(c *corev1.Container, p intstr.IntOrString) bool {
	for _, cp := range c.Ports {
		if (p.Type == intstr.Int && int(cp.ContainerPort) == p.IntValue()) || (p.Type == intstr.String && cp.Name == p.StrVal) {
			return true
		}
	}
	return false
}

// resolvePort resolves a probe's port as kubelet does: a name is looked up
// among the ports of the container that has the probe. 0 when it does not
// resolve.
func resolvePort(c *corev1.Container, p intstr.IntOrString) int {
	if p.Type == intstr.Int {
		return p.IntValue()
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort)
		}
	}
	return 0
}

func TestBase_ControllerDeployment(t *testing.T) {
	docs := baseDocs(t)
	var dep *appsv1.Deployment
	for _, d := range objectsOf[*appsv1.Deployment](docs) {
		for _, c := range d.Spec.Template.Spec.Containers {
			if strings.Contains(c.Image, "csi-provisioner") {
				dep = d
			}
		}
	}
	if dep == nil {
		t.Fatalf("%s has no Deployment with the csi-provisioner", baseDir)
	}
	spec := &dep.Spec.Template.Spec
	prov := containerWithImage(t, spec, "csi-provisioner")
	driver := containerWithImage(t, spec, "modelcache-csi")

	// Without it the provisioner sends no claim name, and PVC annotations
	// (modelcache.csi.dev/model-uri) are silently ignored.
	if v := argValues(prov.Args, "--extra-create-metadata"); len(v) != 1 || v[0] != "true" {
		t.Errorf("csi-provisioner --extra-create-metadata = %q, want it set", v)
	}
	if m := theArg(t, driver, "--mode"); m != "controller" {
		t.Errorf("controller --mode=%s, want controller", m)
	}
	endpoint := socketPath(t, theArg(t, driver, "--endpoint"))
	addr := socketPath(t, theArg(t, prov, "--csi-address"))
	dm, pm := mountAt(driver, path.Dir(endpoint)), mountAt(prov, path.Dir(addr))
	switch {
	case dm == nil || pm == nil:
		t.Errorf("the driver's socket directory %s or the provisioner's %s is not a mounted volume", path.Dir(endpoint), path.Dir(addr))
	case dm.Name != pm.Name:
		t.Errorf("the driver serves its socket on volume %s, the provisioner looks on volume %s", dm.Name, pm.Name)
	case path.Base(endpoint) != path.Base(addr):
		t.Errorf("the driver serves %s, the provisioner dials %s", endpoint, addr)
	}
	if ns := argValues(prov.Args, "--leader-election-namespace"); len(ns) == 1 && ns[0] != dep.Namespace {
		t.Errorf("--leader-election-namespace=%s, but the controller and its lease Role are in %s", ns[0], dep.Namespace)
	}
}

// rulesOf returns the rules of every (Cluster)Role bound to a service account.
func rulesOf(t *testing.T, docs []document, namespace, account string) []rbacv1.PolicyRule {
	t.Helper()
	var refs []rbacv1.RoleRef
	isSubject := func(subjects []rbacv1.Subject, bindingNS string) bool {
		for _, s := range subjects {
			ns := s.Namespace
			if ns == "" {
				ns = bindingNS
			}
			if s.Kind == rbacv1.ServiceAccountKind && s.Name == account && ns == namespace {
				return true
			}
		}
		return false
	}
	for _, b := range objectsOf[*rbacv1.ClusterRoleBinding](docs) {
		if isSubject(b.Subjects, "") {
			refs = append(refs, b.RoleRef)
		}
	}
	roleNS := map[string]string{}
	for _, b := range objectsOf[*rbacv1.RoleBinding](docs) {
		if isSubject(b.Subjects, b.Namespace) {
			refs = append(refs, b.RoleRef)
			roleNS[b.RoleRef.Name] = b.Namespace
		}
	}
	if len(refs) == 0 {
		t.Fatalf("no binding names the ServiceAccount %s/%s", namespace, account)
	}
	var rules []rbacv1.PolicyRule
	for _, r := range refs {
		found := false
		switch r.Kind {
		case "ClusterRole":
			for _, cr := range objectsOf[*rbacv1.ClusterRole](docs) {
				if cr.Name == r.Name {
					rules, found = append(rules, cr.Rules...), true
				}
			}
		case "Role":
			for _, ro := range objectsOf[*rbacv1.Role](docs) {
				if ro.Name == r.Name && ro.Namespace == roleNS[r.Name] {
					rules, found = append(rules, ro.Rules...), true
				}
			}
		}
		if !found {
			t.Errorf("a binding of %s/%s refers to %s %s, which the base does not define", namespace, account, r.Kind, r.Name)
		}
	}
	return rules
}

// boundRole is a (Cluster)Role bound to an account, with its rules; the
// namespace is the RoleBinding's, "" for a ClusterRoleBinding.
type boundRole struct {
	role      string // kind/name
	namespace string
	rules     []rbacv1.PolicyRule
}

// boundRules returns the (Cluster)Roles bound to a service account, each
// with where it applies: a ClusterRole bound by a RoleBinding applies in
// that binding's namespace only.
func boundRules(t *testing.T, docs []document, namespace, account string) []boundRole {
	t.Helper()
	isSubject := func(subjects []rbacv1.Subject, bindingNS string) bool {
		return slices.ContainsFunc(subjects, func(s rbacv1.Subject) bool {
			ns := s.Namespace
			if ns == "" {
				ns = bindingNS
			}
			return s.Kind == rbacv1.ServiceAccountKind && s.Name == account && ns == namespace
		})
	}
	find := func(ref rbacv1.RoleRef, ns string) []rbacv1.PolicyRule {
		if ref.Kind == "ClusterRole" {
			for _, cr := range objectsOf[*rbacv1.ClusterRole](docs) {
				if cr.Name == ref.Name {
					return cr.Rules
				}
			}
		}
		for _, ro := range objectsOf[*rbacv1.Role](docs) {
			if ref.Kind == "Role" && ro.Name == ref.Name && ro.Namespace == ns {
				return ro.Rules
			}
		}
		t.Fatalf("a binding of %s/%s refers to %s %s, which the manifests do not define", namespace, account, ref.Kind, ref.Name)
		return nil
	}
	var out []boundRole
	for _, b := range objectsOf[*rbacv1.ClusterRoleBinding](docs) {
		if isSubject(b.Subjects, "") {
			out = append(out, boundRole{b.RoleRef.Kind + "/" + b.RoleRef.Name, "", find(b.RoleRef, "")})
		}
	}
	for _, b := range objectsOf[*rbacv1.RoleBinding](docs) {
		if isSubject(b.Subjects, b.Namespace) {
			out = append(out, boundRole{b.RoleRef.Kind + "/" + b.RoleRef.Name, b.Namespace, find(b.RoleRef, b.Namespace)})
		}
	}
	if len(out) == 0 {
		t.Fatalf("no binding names the ServiceAccount %s/%s", namespace, account)
	}
	return out
}

// grantsOnSecrets returns the verbs rules grant on core secrets.
func grantsOnSecrets(rules []rbacv1.PolicyRule) []string {
	var verbs []string
	for _, r := range rules {
		core := slices.Contains(r.APIGroups, "") || slices.Contains(r.APIGroups, "*")
		secrets := slices.Contains(r.Resources, "secrets") || slices.Contains(r.Resources, "*")
		if core && secrets {
			verbs = append(verbs, r.Verbs...)
		}
	}
	return verbs
}

// The node plugin gets each volume's secret from kubelet: its own account
// can read one Secret, the peers' CA its --peer-ca-secret names, in its
// own namespace, and create Secrets there (RBAC cannot narrow create by
// name); nothing else on any Secret. The controller may only get the
// provisioner secret a StorageClass names, never list or watch all of
// them.
func TestBase_RBAC_NoSecretsForTheNode(t *testing.T) {
	docs := baseDocs(t)
	n := nodeDaemonSet(t)
	ca := theArg(t, n.plugin, "--peer-ca-secret")
	for _, b := range boundRules(t, docs, n.ds.Namespace, n.spec.ServiceAccountName) {
		for _, r := range b.rules {
			core := slices.Contains(r.APIGroups, "") || slices.Contains(r.APIGroups, "*")
			if !core || !slices.Contains(r.Resources, "secrets") && !slices.Contains(r.Resources, "*") {
				continue
			}
			switch {
			case !slices.Equal(r.APIGroups, []string{""}) || !slices.Equal(r.Resources, []string{"secrets"}):
				t.Errorf("%s grants %v on secrets in a rule with other groups or resources (%+v): keep the Secret rules apart, each as narrow as it can be", b.role, r.Verbs, r)
			case b.namespace != n.ds.Namespace:
				t.Errorf("%s grants %v on secrets beyond the plugin's namespace %s", b.role, r.Verbs, n.ds.Namespace)
			case slices.Equal(r.Verbs, []string{"get"}) && slices.Equal(r.ResourceNames, []string{ca}):
			case slices.Equal(r.Verbs, []string{"create"}) && len(r.ResourceNames) == 0:
			default:
				t.Errorf("%s grants %v on secrets %v; the plugin may get only %s (--peer-ca-secret) and create", b.role, r.Verbs, r.ResourceNames, ca)
			}
		}
	}
	for _, dep := range objectsOf[*appsv1.Deployment](docs) {
		sa := dep.Spec.Template.Spec.ServiceAccountName
		for _, v := range grantsOnSecrets(rulesOf(t, docs, dep.Namespace, sa)) {
			if v != "get" {
				t.Errorf("the controller's ServiceAccount %s may %s secrets; it needs only get", sa, v)
			}
		}
	}
}
