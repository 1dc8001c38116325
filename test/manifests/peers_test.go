package manifests

// Peers in the shipped manifests (docs/design.md "Peers"): the node
// plugin's --peer* flags name the objects that exist, every right its
// account gets for peers is used by a call in the code, the peer port is
// reachable from node plugins only and the pod's other ports as before,
// and turning peers off (Helm peers.enabled=false, the kustomize component
// components/no-peers) renders the same objects either way and removes
// every one of them.

import (
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/test/testenv"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// noPeersDir is a user's kustomization of the base with the no-peers
// component.
const noPeersDir = "test/manifests/testdata/no-peers"

// envField returns the downward-API field an env variable of c reads, or "".
func envField(c *corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			return e.ValueFrom.FieldRef.FieldPath
		}
	}
	return ""
}

// The plugin's peer flags, its env, port and token, and the Service and
// Secret rule they name, agree with each other.
func TestBase_Peers_FlagsNameTheObjects(t *testing.T) {
	docs := baseDocs(t)
	n := nodeDaemonSet(t)
	plugin, spec := n.plugin, n.spec
	if v := argValues(plugin.Args, "--peers"); !slices.Equal(v, []string{"true"}) {
		t.Fatalf("--peers is %q, want it on", v)
	}
	for name, field := range map[string]string{"POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP"} {
		if got := envField(plugin, name); got != field {
			t.Errorf("env %s comes from %q, want %s: --peers needs it", name, got, field)
		}
	}
	port := intstr.Parse(theArg(t, plugin, "--peer-port"))
	if p := resolvePort(plugin, intstr.FromString("peer")); p == 0 || p != port.IntValue() {
		t.Errorf("the plugin serves peers on --peer-port=%s, its container port named peer is %d", port.String(), p)
	}

	svc := theObject[*corev1.Service](t, docs, theArg(t, plugin, "--peer-service"))
	if svc.Namespace != n.ds.Namespace || svc.Spec.ClusterIP != corev1.ClusterIPNone || svc.Spec.PublishNotReadyAddresses {
		t.Errorf("Service %s/%s: clusterIP %q, publishNotReadyAddresses %v; want headless, ready pods only, in %s",
			svc.Namespace, svc.Name, svc.Spec.ClusterIP, svc.Spec.PublishNotReadyAddresses, n.ds.Namespace)
	}
	if len(svc.Spec.Selector) == 0 || !labelsMatch(svc.Spec.Selector, n.ds.Spec.Template.Labels) ||
		labelsMatch(svc.Spec.Selector, controllerDeployment(t, docs).Spec.Template.Labels) {
		t.Errorf("Service %s selects %v: want the node plugin's pods (%v) alone", svc.Name, svc.Spec.Selector, n.ds.Spec.Template.Labels)
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Name != "peer" || resolvePort(plugin, svc.Spec.Ports[0].TargetPort) != port.IntValue() {
		t.Errorf("Service %s ports %+v: want one, named peer (the plugin reads that name), to --peer-port %s", svc.Name, svc.Spec.Ports, port.String())
	}

	if got := theArg(t, plugin, "--peer-service-account"); got != spec.ServiceAccountName {
		t.Errorf("--peer-service-account=%s, but the pods run as %s: the peer endpoint would refuse every node", got, spec.ServiceAccountName)
	}
	if a := spec.AutomountServiceAccountToken; a != nil && !*a {
		t.Error("the node plugin pod mounts no API token: --peers talks to the API server")
	}

	// The token shown to peers: projected for the peer audience only,
	// short-lived, read-only, in the plugin's container alone.
	file := theArg(t, plugin, "--peer-token-file")
	m := mountAt(plugin, path.Dir(file))
	if m == nil || !m.ReadOnly {
		t.Fatalf("--peer-token-file=%s is not in a read-only mount of the plugin (%+v)", file, m)
	}
	v := volumeNamed(t, spec, m.Name)
	if v.Projected == nil || len(v.Projected.Sources) != 1 || v.Projected.Sources[0].ServiceAccountToken == nil {
		t.Fatalf("volume %s is %+v, want a projected service account token alone", v.Name, v.VolumeSource)
	}
	tok := v.Projected.Sources[0].ServiceAccountToken
	if tok.Audience != peer.Audience || tok.Path != path.Base(file) || tok.ExpirationSeconds == nil || *tok.ExpirationSeconds != 3600 {
		t.Errorf("peer token %+v: want audience %s (never the API server's), path %s, expirationSeconds 3600", tok, peer.Audience, path.Base(file))
	}
	for _, c := range allContainers(spec) {
		if c != plugin && slices.ContainsFunc(c.VolumeMounts, func(vm corev1.VolumeMount) bool { return vm.Name == m.Name }) {
			t.Errorf("container %s mounts the peer token too", c.Name)
		}
	}
	// The CA Secret the plugin reads is the one its Role names.
	ca := theArg(t, plugin, "--peer-ca-secret")
	found := false
	for _, b := range boundRules(t, docs, n.ds.Namespace, spec.ServiceAccountName) {
		for _, r := range b.rules {
			found = found || b.namespace == n.ds.Namespace && slices.Equal(r.Resources, []string{"secrets"}) &&
				slices.Contains(r.Verbs, "get") && slices.Equal(r.ResourceNames, []string{ca})
		}
	}
	if !found {
		t.Errorf("no rule lets the plugin get its CA Secret %s (--peer-ca-secret) in %s", ca, n.ds.Namespace)
	}
}

// labelsMatch reports whether selector selects labels.
func labelsMatch(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// grant is one verb on one resource of an API group.
type grant struct{ group, resource, verb string }

// peerCalls are the calls of the node plugin that need each right peers
// add to its account, by file and the text of the call. A right granted
// that is not here, or a call that is no longer in its file, fails the
// test: the account gets what the code uses and no more (test/fleet shows
// the same against a real API server).
var peerCalls = map[grant]struct{ file, call string }{
	{"coordination.k8s.io", "leases", "get"}:    {"pkg/holders/holders.go", "leases.Get(ctx, name, metav1.GetOptions{})"},
	{"coordination.k8s.io", "leases", "create"}: {"pkg/holders/holders.go", "leases.Create(ctx, l, metav1.CreateOptions{})"},
	{"coordination.k8s.io", "leases", "update"}: {"pkg/holders/holders.go", "leases.Update(ctx, l, metav1.UpdateOptions{})"},
	{"coordination.k8s.io", "leases", "delete"}: {"pkg/holders/holders.go", "Delete(ctx, name, metav1.DeleteOptions{"},
	{"coordination.k8s.io", "leases", "list"}:   {"pkg/holders/holders.go", "leases.List(ctx, metav1.ListOptions{FieldSelector: sel})"},
	{"coordination.k8s.io", "leases", "watch"}:  {"pkg/holders/holders.go", "leases.Watch(ctx, metav1.ListOptions{FieldSelector: sel"},
	// An informer lists, then watches.
	{"discovery.k8s.io", "endpointslices", "list"}:      {"pkg/holders/members.go", "factory.Discovery().V1().EndpointSlices()"},
	{"discovery.k8s.io", "endpointslices", "watch"}:     {"pkg/holders/members.go", "factory.Discovery().V1().EndpointSlices()"},
	{"", "secrets", "get"}:                              {"pkg/peer/tls.go", "secrets.Get(ctx, secretName, metav1.GetOptions{})"},
	{"", "secrets", "create"}:                           {"pkg/peer/tls.go", "secrets.Create(ctx, s, metav1.CreateOptions{})"},
	{"authentication.k8s.io", "tokenreviews", "create"}: {"pkg/peer/gate.go", "AuthenticationV1().TokenReviews().Create(ctx, tr, metav1.CreateOptions{})"},
}

// grantsOf expands rules into grants, failing on wildcards.
func grantsOf(t *testing.T, role string, rules []rbacv1.PolicyRule) []grant {
	t.Helper()
	var out []grant
	for _, r := range rules {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					if g == "*" || res == "*" || v == "*" {
						t.Errorf("%s grants a wildcard (%+v)", role, r)
					}
					out = append(out, grant{g, res, v})
				}
			}
		}
	}
	return out
}

// Every right of the node plugin's account beyond events is one peers use,
// in a call that is in the code.
func TestBase_Peers_EveryRightIsACallInTheCode(t *testing.T) {
	docs := baseDocs(t)
	n := nodeDaemonSet(t)
	granted := map[grant]bool{}
	for _, b := range boundRules(t, docs, n.ds.Namespace, n.spec.ServiceAccountName) {
		for _, g := range grantsOf(t, b.role, b.rules) {
			// Events on pods predate peers, for pkg/kube's events.
			if g.group == "" && g.resource == "events" {
				continue
			}
			granted[g] = true
			if b.namespace != n.ds.Namespace && g.resource != "tokenreviews" {
				t.Errorf("%s grants %v cluster-wide; peers need it in %s only", b.role, g, n.ds.Namespace)
			}
		}
	}
	for g := range granted {
		if _, ok := peerCalls[g]; !ok {
			t.Errorf("the node plugin may %s %s of group %q, which no call of the plugin needs: remove it, or add the call to peerCalls", g.verb, g.resource, g.group)
		}
	}
	sources := map[string]string{}
	for g, c := range peerCalls {
		if !granted[g] {
			t.Errorf("the node plugin may not %s %s of group %q, which %s does (%s)", g.verb, g.resource, g.group, c.file, c.call)
		}
		if _, ok := sources[c.file]; !ok {
			b, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), c.file))
			if err != nil {
				t.Fatal(err)
			}
			sources[c.file] = string(b)
		}
		if !strings.Contains(sources[c.file], c.call) {
			t.Errorf("%s no longer calls %q, which is why the plugin may %s %s: update peerCalls and the RBAC in deploy/", c.file, c.call, g.verb, g.resource)
		}
	}
}

// ingressRules are the rules of the NetworkPolicies that restrict ingress
// of pods labelled labels.
func ingressRules(t *testing.T, objs []runtime.Object, labels map[string]string) []networkingv1.NetworkPolicyIngressRule {
	t.Helper()
	var out []networkingv1.NetworkPolicyIngressRule
	for _, o := range objs {
		np, ok := o.(*networkingv1.NetworkPolicy)
		if !ok || !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
			continue
		}
		sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
		if err != nil {
			t.Fatal(err)
		}
		if sel.Matches(labelSet(labels)) {
			out = append(out, np.Spec.Ingress...)
		}
	}
	return out
}

// admits reports whether a policy port list admits the container port p
// of a pod whose ports are ports.
func admits(ports []networkingv1.NetworkPolicyPort, p corev1.ContainerPort) bool {
	if len(ports) == 0 {
		return true
	}
	return slices.ContainsFunc(ports, func(np networkingv1.NetworkPolicyPort) bool {
		proto := corev1.ProtocolTCP
		if np.Protocol != nil {
			proto = *np.Protocol
		}
		want := p.Protocol
		if want == "" {
			want = corev1.ProtocolTCP
		}
		if proto != want {
			return false
		}
		return np.Port == nil || np.Port.Type == intstr.String && np.Port.StrVal == p.Name ||
			np.Port.Type == intstr.Int && np.Port.IntValue() == int(p.ContainerPort)
	})
}

// checkPeerNetworkPolicies checks what the NetworkPolicies of objs let
// reach the node plugin's pods, and that its peers can reach each other
// past the egress policy.
func checkPeerNetworkPolicies(t *testing.T, objs []runtime.Object, ds *appsv1.DaemonSet, controllerLabels map[string]string) {
	t.Helper()
	node := ds.Spec.Template.Labels
	rules := ingressRules(t, objs, node)
	if len(rules) == 0 {
		t.Fatal("no NetworkPolicy restricts ingress of the node plugin's pods")
	}
	if len(ingressRules(t, objs, controllerLabels)) != 0 {
		t.Error("a NetworkPolicy restricts the controller's ingress, which peers do not need")
	}
	nodeOnly := func(from []networkingv1.NetworkPolicyPeer) bool {
		return len(from) > 0 && !slices.ContainsFunc(from, func(p networkingv1.NetworkPolicyPeer) bool {
			if p.PodSelector == nil || p.NamespaceSelector != nil || p.IPBlock != nil {
				return true
			}
			sel, err := metav1.LabelSelectorAsSelector(p.PodSelector)
			return err != nil || !sel.Matches(labelSet(node)) || sel.Matches(labelSet(controllerLabels))
		})
	}
	var peerPort *corev1.ContainerPort
	for _, c := range allContainers(&ds.Spec.Template.Spec) {
		for _, p := range c.Ports {
			var admitted, fromAnywhere, fromOthers bool
			for _, r := range rules {
				if admits(r.Ports, p) {
					admitted = true
					fromAnywhere = fromAnywhere || len(r.From) == 0
					fromOthers = fromOthers || !nodeOnly(r.From)
				}
			}
			switch {
			case p.Name == "peer":
				peerPort = &p
				if !admitted || fromOthers {
					t.Errorf("the peer port: admitted %v, from other than node plugin pods %v; want node plugin pods alone", admitted, fromOthers)
				}
			case !fromAnywhere:
				t.Errorf("port %s/%d of container %s is no longer reachable as before the ingress policy: list it", p.Name, p.ContainerPort, c.Name)
			}
		}
	}
	if peerPort == nil {
		t.Fatal("the node plugin declares no port named peer")
	}
	np, _ := egressPolicy(t, objs)
	toPeers := false
	for _, r := range np.Spec.Egress {
		if admits(r.Ports, *peerPort) && len(r.Ports) > 0 && nodeOnly(r.To) {
			toPeers = true
		}
	}
	if !toPeers {
		t.Errorf("egress NetworkPolicy %s has no rule to node plugin pods' peer port: patching the pod CIDR into its except lists would cut peers off", np.Name)
	}
}

func TestBase_Peers_NetworkPolicy(t *testing.T) {
	docs := baseDocs(t)
	checkPeerNetworkPolicies(t, runtimeObjects(docs), nodeDaemonSet(t).ds, controllerDeployment(t, docs).Spec.Template.Labels)
}

func TestHelm_Peers_NetworkPolicy(t *testing.T) {
	for _, args := range [][]string{nil, {"--set", "metrics.enabled=false,peers.port=9555"}} {
		objs := helmTemplate(t, args...)
		var list []runtime.Object
		for _, o := range objs {
			list = append(list, o)
		}
		dep := objs[helmDeploymentKey].(*appsv1.Deployment)
		checkPeerNetworkPolicies(t, list, helmDaemonSet(t, objs), dep.Spec.Template.Labels)
	}
}

// peerObjects are what only peers need, by kind/namespace/name.
var peerObjects = []string{
	"Service/modelcache/modelcache-peers",
	"Role/modelcache/modelcache-node-peers",
	"RoleBinding/modelcache/modelcache-node-peers",
	"ClusterRole//modelcache-node-peers",
	"ClusterRoleBinding//modelcache-node-peers",
	"NetworkPolicy/modelcache/modelcache-peers",
}

// Peers off: Helm's peers.enabled=false and the kustomize component
// render the same objects; they are the defaults without the peer objects,
// with a DaemonSet and an egress policy that name no peer, and the node
// plugin's account can read no Secret.
func TestHelm_PeersOff_RendersTheNoPeersComponent(t *testing.T) {
	out, err := helmRun(t, "kustomize", "build", noPeersDir)
	if err != nil {
		t.Fatal(err)
	}
	off := helmDecodeAll(t, "kustomize build "+noPeersDir, out)
	for _, d := range helmDifferences(off, helmTemplate(t, "--set", "peers.enabled=false")) {
		t.Error(d)
	}

	on := helmTemplate(t)
	var changed, gone []string
	for _, k := range helmSortedKeys(on) {
		switch o, ok := off[k]; {
		case !ok:
			gone = append(gone, k)
		case !equalObjects(on[k], o):
			changed = append(changed, k)
		}
	}
	wantGone := slices.Sorted(slices.Values(peerObjects))
	if !slices.Equal(gone, wantGone) {
		t.Errorf("peers off removes %v, want %v", gone, wantGone)
	}
	if want := []string{helmDaemonSetKey, "NetworkPolicy/modelcache/modelcache-egress"}; !slices.Equal(changed, want) {
		t.Errorf("peers off changes %v, want %v", changed, want)
	}
	for k := range off {
		if _, ok := on[k]; !ok {
			t.Errorf("peers off adds %s", k)
		}
	}

	ds := off[helmDaemonSetKey].(*appsv1.DaemonSet)
	spec := &ds.Spec.Template.Spec
	plugin := helmContainer(t, spec, "modelcache")
	for _, a := range plugin.Args {
		if strings.HasPrefix(a, "--peer") {
			t.Errorf("peers off still passes %s", a)
		}
	}
	if helmEnv(plugin, "POD_NAMESPACE") != nil || helmPort(plugin, "peer") != nil {
		t.Error("peers off still sets POD_NAMESPACE or declares the peer port")
	}
	for _, v := range spec.Volumes {
		if v.Projected != nil {
			t.Errorf("peers off still mounts the projected volume %s", v.Name)
		}
	}
	np := off["NetworkPolicy/modelcache/modelcache-egress"].(*networkingv1.NetworkPolicy)
	if len(np.Spec.Egress) != 2 {
		t.Errorf("peers off leaves %d egress rules, want DNS and the remotes", len(np.Spec.Egress))
	}
	var docs []document
	for _, o := range off {
		docs = append(docs, document{obj: o})
	}
	if verbs := grantsOnSecrets(rulesOf(t, docs, ds.Namespace, spec.ServiceAccountName)); len(verbs) != 0 {
		t.Errorf("with peers off the node plugin's account may %v secrets; it must read none", verbs)
	}
}

// equalObjects compares two decoded objects as the equivalence test does.
func equalObjects(a, b runtime.Object) bool {
	return len(helmDifferences(map[string]runtime.Object{"x": a}, map[string]runtime.Object{"x": b})) == 0
}
