package manifests

// What keeps tenants off the node in the shipped manifests: each container
// of the controller holds only its own identity's token, an egress
// NetworkPolicy with the driver's refused ranges, the CachedModel
// admission policy and its parameters, memory limits, and the flags the
// driver's own checks read.

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

const tokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// tokenAccount is the service account whose token container c finds at
// tokenDir: the pod's for a projected serviceAccountToken, the annotated
// one for a kubernetes.io/service-account-token Secret; "" when none.
func tokenAccount(t *testing.T, docs []document, spec *corev1.PodSpec, namespace string, c *corev1.Container) string {
	t.Helper()
	m := mountAt(c, tokenDir)
	if m == nil {
		return ""
	}
	v := volumeNamed(t, spec, m.Name)
	switch {
	case v.Projected != nil:
		for _, s := range v.Projected.Sources {
			if s.ServiceAccountToken != nil {
				return spec.ServiceAccountName
			}
		}
	case v.Secret != nil:
		for _, s := range objectsOf[*corev1.Secret](docs) {
			if s.Name == v.Secret.SecretName && s.Namespace == namespace && s.Type == corev1.SecretTypeServiceAccountToken {
				return s.Annotations[corev1.ServiceAccountNameKey]
			}
		}
	}
	t.Fatalf("container %s mounts volume %s at %s, which holds no service account token of the base", c.Name, m.Name, tokenDir)
	return ""
}

func controllerDeployment(t *testing.T, docs []document) *appsv1.Deployment {
	t.Helper()
	return theObject[*appsv1.Deployment](t, docs, "modelcache-controller")
}

// The modelcache container of the controller parses tenant annotations and
// connects to tenant endpoints: its token reads no Secret. csi-provisioner
// keeps the token that gets provisioner secrets, mounted in it alone.
func TestBase_ControllerTokens_OnePerContainer(t *testing.T) {
	docs := baseDocs(t)
	dep := controllerDeployment(t, docs)
	spec := &dep.Spec.Template.Spec
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Fatalf("the controller pod mounts its service account's token into every container (automountServiceAccountToken %v), want false", spec.AutomountServiceAccountToken)
	}
	prov := containerWithImage(t, spec, "csi-provisioner")
	driver := containerWithImage(t, spec, "modelcache-csi")
	provSA := tokenAccount(t, docs, spec, dep.Namespace, prov)
	driverSA := tokenAccount(t, docs, spec, dep.Namespace, driver)
	if provSA == "" || driverSA == "" || provSA == driverSA {
		t.Fatalf("csi-provisioner holds the token of %q, modelcache of %q: want one each, different", provSA, driverSA)
	}
	if verbs := grantsOnSecrets(rulesOf(t, docs, dep.Namespace, driverSA)); len(verbs) != 0 {
		t.Errorf("the modelcache container's account %s may %v secrets; it must read none", driverSA, verbs)
	}
	if verbs := grantsOnSecrets(rulesOf(t, docs, dep.Namespace, provSA)); !slices.Equal(verbs, []string{"get"}) {
		t.Errorf("csi-provisioner's account %s may %v secrets, want get (provisioner secrets)", provSA, verbs)
	}
	// Each token volume is mounted by its own container only.
	for _, c := range allContainers(spec) {
		for _, m := range c.VolumeMounts {
			v := volumeNamed(t, spec, m.Name)
			holdsToken := v.Secret != nil || v.Projected != nil
			if holdsToken && m.MountPath != tokenDir {
				t.Errorf("container %s mounts token volume %s at %s too", c.Name, m.Name, m.MountPath)
			}
		}
	}
	pm, dm := mountAt(prov, tokenDir), mountAt(driver, tokenDir)
	if pm.Name == dm.Name {
		t.Errorf("both containers mount volume %s at %s", pm.Name, tokenDir)
	}
	for _, sa := range objectsOf[*corev1.ServiceAccount](docs) {
		if (sa.Name == provSA || sa.Name == driverSA) && (sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken) {
			t.Errorf("ServiceAccount %s lets any pod of it mount its token; want automountServiceAccountToken false", sa.Name)
		}
	}
}

// egressPolicy is the NetworkPolicy that restricts the egress of both
// workloads, with the address blocks it excepts from egress.
func egressPolicy(t *testing.T, objs []runtime.Object) (*networkingv1.NetworkPolicy, []string) {
	t.Helper()
	var found *networkingv1.NetworkPolicy
	for _, o := range objs {
		if np, ok := o.(*networkingv1.NetworkPolicy); ok && slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress) {
			if found != nil {
				t.Fatalf("NetworkPolicies %s and %s both restrict egress", found.Name, np.Name)
			}
			found = np
		}
	}
	if found == nil {
		t.Fatal("no egress NetworkPolicy")
	}
	var except []string
	for _, r := range found.Spec.Egress {
		for _, p := range r.To {
			if p.IPBlock != nil {
				except = append(except, p.IPBlock.Except...)
			}
		}
	}
	return found, except
}

func runtimeObjects(docs []document) []runtime.Object {
	var out []runtime.Object
	for _, d := range docs {
		out = append(out, d.obj)
	}
	return out
}

// The egress policy selects the node plugin's and the controller's pods
// (neither on the host network, where NetworkPolicy does not reach), lets
// them resolve names, and excepts the cloud metadata and link-local
// addresses the driver refuses.
func TestBase_EgressNetworkPolicy(t *testing.T) {
	docs := baseDocs(t)
	np, except := egressPolicy(t, runtimeObjects(docs))
	if !slices.Equal(np.Spec.PolicyTypes, []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}) {
		t.Errorf("policyTypes %v, want Egress only (ingress of the controller stays as it was; the node plugin's peer port has a policy of its own)", np.Spec.PolicyTypes)
	}
	sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	if err != nil {
		t.Fatal(err)
	}
	n := nodeDaemonSet(t)
	dep := controllerDeployment(t, docs)
	for what, tmpl := range map[string]*corev1.PodTemplateSpec{"node plugin": &n.ds.Spec.Template, "controller": &dep.Spec.Template} {
		if !sel.Matches(labelSet(tmpl.Labels)) {
			t.Errorf("the NetworkPolicy does not select the %s's pods (labels %v)", what, tmpl.Labels)
		}
		if tmpl.Spec.HostNetwork {
			t.Errorf("the %s runs on the host network, where the NetworkPolicy does not apply", what)
		}
	}
	for _, a := range []string{"169.254.169.254", "169.254.0.1", "100.100.100.200", "fd00:ec2::254", "fe80::1"} {
		addr := netip.MustParseAddr(a)
		if !slices.ContainsFunc(except, func(c string) bool { return netip.MustParsePrefix(c).Contains(addr) }) {
			t.Errorf("egress to %s is not excepted (excepted %v)", a, except)
		}
	}
	dns := false
	for _, r := range np.Spec.Egress {
		for _, p := range r.Ports {
			if p.Port != nil && p.Port.IntValue() == 53 && len(r.To) > 0 && r.To[0].PodSelector != nil {
				dns = true
			}
		}
	}
	if !dns {
		t.Error("no egress rule for DNS (port 53) to the cluster's resolver")
	}
}

type labelSet map[string]string

func (l labelSet) Has(k string) bool              { _, ok := l[k]; return ok }
func (l labelSet) Get(k string) string            { return l[k] }
func (l labelSet) Lookup(k string) (string, bool) { v, ok := l[k]; return v, ok }

// The driver's own egress check learns the node's address from the
// downward API, and both workloads take --deny-endpoint; memory limits
// keep one hostile model from the node's memory.
func TestBase_EgressFlagsAndMemoryLimits(t *testing.T) {
	docs := baseDocs(t)
	n := nodeDaemonSet(t)
	dep := controllerDeployment(t, docs)
	driver := containerWithImage(t, &dep.Spec.Template.Spec, "modelcache-csi")
	for _, c := range []*corev1.Container{n.plugin, driver} {
		var hostIP bool
		for _, e := range c.Env {
			if e.Name == "HOST_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP" {
				hostIP = true
			}
		}
		if !hostIP {
			t.Errorf("container %s has no HOST_IP from status.hostIP: the node's own address would not be refused", c.Name)
		}
		if v := argValues(c.Args, "--deny-endpoint"); len(v) != 1 {
			t.Errorf("container %s: --deny-endpoint given %d times, want once (the place to list pod and service CIDRs)", c.Name, len(v))
		}
		lim, req := c.Resources.Limits[corev1.ResourceMemory], c.Resources.Requests[corev1.ResourceMemory]
		if lim.IsZero() || req.IsZero() || lim.Cmp(req) < 0 {
			t.Errorf("container %s: memory request %s, limit %s: want both, limit above request", c.Name, req.String(), lim.String())
		}
	}
	// A cold 4 GiB download peaks near 130 MiB of RSS.
	if req := n.plugin.Resources.Requests[corev1.ResourceMemory]; req.Cmp(resource.MustParse("256Mi")) < 0 {
		t.Errorf("node plugin memory request %s, want at least 256Mi (a 4 GiB download peaks near 130 MiB)", req.String())
	}
}

// The admission policy refuses what the reconciler refuses, with the
// parameters the controller is given, and exempts trusted namespaces.
func TestBase_CachedModelAdmissionPolicy(t *testing.T) {
	docs := baseDocs(t)
	policy := theObject[*admissionv1.ValidatingAdmissionPolicy](t, docs, "modelcache-cachedmodels")
	binding := theObject[*admissionv1.ValidatingAdmissionPolicyBinding](t, docs, "modelcache-cachedmodels")
	if binding.Spec.PolicyName != policy.Name {
		t.Errorf("the binding names policy %s, want %s", binding.Spec.PolicyName, policy.Name)
	}
	if !slices.Equal(binding.Spec.ValidationActions, []admissionv1.ValidationAction{admissionv1.Deny}) {
		t.Errorf("validationActions %v, want [Deny]", binding.Spec.ValidationActions)
	}
	if p := policy.Spec.FailurePolicy; p == nil || *p != admissionv1.Fail {
		t.Errorf("failurePolicy %v, want Fail", p)
	}
	ref := binding.Spec.ParamRef
	if ref == nil || ref.ParameterNotFoundAction == nil || *ref.ParameterNotFoundAction != admissionv1.DenyAction {
		t.Fatalf("paramRef %+v, want one that denies when its ConfigMap is missing", ref)
	}
	cm := theObject[*corev1.ConfigMap](t, docs, ref.Name)
	if cm.Namespace != ref.Namespace {
		t.Errorf("the parameters are in %s, the binding looks in %s", cm.Namespace, ref.Namespace)
	}
	dep := controllerDeployment(t, docs)
	driver := containerWithImage(t, &dep.Spec.Template.Spec, "modelcache-csi")
	if got := theArg(t, driver, "--cachedmodel-priority-classes"); got != cm.Data["priorityClasses"] {
		t.Errorf("the controller allows priority classes %q, the admission policy %q", got, cm.Data["priorityClasses"])
	}
	sel, err := metav1.LabelSelectorAsSelector(binding.Spec.MatchResources.NamespaceSelector)
	if err != nil {
		t.Fatal(err)
	}
	if sel.Matches(labelSet{"modelcache.csi.dev/trusted": "true"}) || !sel.Matches(labelSet{}) || !sel.Matches(labelSet{"modelcache.csi.dev/trusted": "false"}) {
		t.Errorf("namespaceSelector %s: want every namespace but those labelled modelcache.csi.dev/trusted=true", sel)
	}
	rules := policy.Spec.MatchConstraints.ResourceRules
	if len(rules) != 1 || !slices.Equal(rules[0].Resources, []string{"cachedmodels"}) ||
		!slices.Contains(rules[0].Operations, admissionv1.Create) || !slices.Contains(rules[0].Operations, admissionv1.Update) {
		t.Errorf("the policy matches %+v, want creates and updates of cachedmodels (not their status)", rules)
	}
}

// Helm values reach the egress policy, the flags and the admission policy.
func TestHelm_EgressAndPolicyValues(t *testing.T) {
	objs := helmTemplate(t, "--set", "egress.denyCIDRs={10.96.0.0/12,fd00:10::/64}",
		"--set", "cachedModelPolicy.priorityClasses={model-warm,batch}")
	var list []runtime.Object
	for _, o := range objs {
		list = append(list, o)
	}
	np, except := egressPolicy(t, list)
	for _, want := range []string{"10.96.0.0/12", "fd00:10::/64", "169.254.0.0/16"} {
		if !slices.Contains(except, want) {
			t.Errorf("NetworkPolicy %s excepts %v, want %s", np.Name, except, want)
		}
	}
	for _, r := range np.Spec.Egress {
		for _, p := range r.To {
			if b := p.IPBlock; b != nil {
				v6 := strings.Contains(b.CIDR, ":")
				for _, e := range b.Except {
					if strings.Contains(e, ":") != v6 {
						t.Errorf("ipBlock %s excepts %s, of the other address family", b.CIDR, e)
					}
				}
			}
		}
	}
	helmCheckFlag(t, helmContainer(t, &helmDaemonSet(t, objs).Spec.Template.Spec, "modelcache"), "--deny-endpoint", "10.96.0.0/12,fd00:10::/64")
	dep := objs[helmDeploymentKey].(*appsv1.Deployment)
	driver := helmContainer(t, &dep.Spec.Template.Spec, "modelcache")
	helmCheckFlag(t, driver, "--deny-endpoint", "10.96.0.0/12,fd00:10::/64")
	helmCheckFlag(t, driver, "--cachedmodel-priority-classes", "model-warm,batch")
	cm := objs["ConfigMap/modelcache/modelcache-cachedmodel-policy"].(*corev1.ConfigMap)
	if cm.Data["priorityClasses"] != "model-warm,batch" {
		t.Errorf("admission policy parameters %v, want priorityClasses model-warm,batch", cm.Data)
	}

	off := helmTemplate(t, "--set", "egress.networkPolicy.enabled=false,peers.networkPolicy.enabled=false,cachedModelPolicy.enabled=false")
	for k := range off {
		for _, kind := range []string{"NetworkPolicy/", "ValidatingAdmissionPolicy", "ConfigMap/"} {
			if strings.HasPrefix(k, kind) {
				t.Errorf("%s rendered although turned off", k)
			}
		}
	}

	if _, err := helmRun(t, "helm", "template", "modelcache", helmChartDir, "--set", "egress.denyCIDRs={pods}"); err == nil || !strings.Contains(err.Error(), "/egress/denyCIDRs") {
		t.Errorf("egress.denyCIDRs={pods} not refused naming the value: %v", err)
	}
}
