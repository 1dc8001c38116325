package fleet_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/fleet"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/yaml"
)

// policyCase is a CachedModel spec and, for one the policy refuses, a part
// of the message the admission policy and the reconciler both give.
type policyCase struct {
	name    string
	spec    map[string]any
	refused string
}

func policyCases() []policyCase {
	spec := func(extra map[string]any) map[string]any {
		s := map[string]any{"modelUri": "s3://models/llama", "pullPolicy": "Never"}
		for k, v := range extra {
			s[k] = v
		}
		return s
	}
	tol := func(ts ...map[string]any) map[string]any {
		var l []any
		for _, t := range ts {
			l = append(l, t)
		}
		return map[string]any{"tolerations": l}
	}
	return []policyCase{
		{name: "control-plane", spec: spec(tol(map[string]any{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"})),
			refused: "tolerates the control-plane taint node-role.kubernetes.io/control-plane: remove it"},
		{name: "master", spec: spec(tol(map[string]any{"key": "nvidia.com/gpu", "operator": "Exists"}, map[string]any{"key": "node-role.kubernetes.io/master", "operator": "Equal", "value": "", "effect": "NoSchedule"})),
			refused: "tolerates the control-plane taint node-role.kubernetes.io/master"},
		{name: "exists-without-key", spec: spec(tol(map[string]any{"operator": "Exists"})),
			refused: "operator Exists without a key, which tolerates every taint: name the taint's key"},
		{name: "exists-empty-key-noexecute", spec: spec(tol(map[string]any{"key": "", "operator": "Exists", "effect": "NoExecute"})),
			refused: "operator Exists without a key"},
		{name: "priority-class", spec: spec(map[string]any{"priorityClassName": "system-node-critical"}),
			refused: "spec.priorityClassName system-node-critical is not allowed for CachedModels (none is allowed): remove it or use an allowed one"},
		{name: "gpu-toleration", spec: spec(tol(map[string]any{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}))},
		{name: "plain", spec: spec(map[string]any{"nodeSelector": map[string]any{"gpu": "a100"}})},
	}
}

// trustedNamespace creates a namespace labelled modelcache.csi.dev/trusted=true.
func trustedNamespace(t *testing.T, name string) {
	t.Helper()
	newNamespace(t, name)
	ctx := context.Background()
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := env.kube.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		n.Labels[fleet.LabelTrusted] = "true"
		_, err = env.kube.CoreV1().Namespaces().Update(ctx, n, metav1.UpdateOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// refusalEvent finds the reconciler's Warning event on a CachedModel.
func refusalEvent(ctx context.Context, ns, name, says string) error {
	evs, err := env.kube.CoreV1().Events(ns).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("involvedObject.name", name).String(),
	})
	if err != nil {
		return err
	}
	for _, ev := range evs.Items {
		if ev.InvolvedObject.Kind == fleet.Kind && ev.Type == corev1.EventTypeWarning && ev.Reason == fleet.ReasonNotAllowed && strings.Contains(ev.Message, says) {
			return nil
		}
	}
	return fmt.Errorf("no Warning %s event saying %q among %d events", fleet.ReasonNotAllowed, says, len(evs.Items))
}

// TestCachedModelPolicy_ReconcilerRefusesWithoutTheAdmissionPolicy: with
// no admission policy installed, the reconciler, as its service account,
// creates no holders for a CachedModel that tolerates the control-plane
// taints or every taint or names a priority class not allowed, and says
// why in its status and an event; the same CachedModels in a trusted
// namespace, and harmless ones anywhere, get their holders.
func TestCachedModelPolicy_ReconcilerRefusesWithoutTheAdmissionPolicy(t *testing.T) {
	ensureCRD(t)
	ensureRBAC(t)
	const untrusted, trusted = "policy-reconciler", "policy-reconciler-trusted"
	newNamespace(t, untrusted)
	trustedNamespace(t, trusted)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rec := &recorder{}
	k, d := clientsFor(t, impersonating(serviceAccountUser(controllerNamespace, controllerSA), rec))
	r := &fleet.Reconciler{Kube: k, Dynamic: d, Image: holderImage}

	for _, tc := range policyCases() {
		for _, ns := range []string{untrusted, trusted} {
			t.Run(tc.name+" in "+ns, func(t *testing.T) {
				if _, err := env.dyn.Resource(fleet.Resource).Namespace(ns).Create(ctx, cachedModel(ns, tc.name, tc.spec), metav1.CreateOptions{}); err != nil {
					t.Fatalf("creating the CachedModel (is an admission policy left installed?): %v", err)
				}
				if _, err := r.Reconcile(ctx, ns, tc.name); err != nil {
					t.Fatal(err)
				}
				_, dsErr := env.kube.AppsV1().DaemonSets(ns).Get(ctx, fleet.HolderName(tc.name), metav1.GetOptions{})
				u, err := env.dyn.Resource(fleet.Resource).Namespace(ns).Get(ctx, tc.name, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				cm, err := fleet.FromUnstructured(u)
				if err != nil {
					t.Fatal(err)
				}
				c := meta.FindStatusCondition(cm.Status.Conditions, fleet.ConditionDegraded)
				if tc.refused == "" || ns == trusted {
					if dsErr != nil {
						t.Errorf("no holders: %v", dsErr)
					}
					if c != nil && c.Reason == fleet.ReasonNotAllowed {
						t.Errorf("Degraded %+v", c)
					}
					return
				}
				if !apierrors.IsNotFound(dsErr) {
					t.Errorf("holders of a refused CachedModel (%v)", dsErr)
				}
				if c == nil || c.Status != metav1.ConditionTrue || c.Reason != fleet.ReasonNotAllowed || !strings.Contains(c.Message, tc.refused) {
					t.Errorf("Degraded %+v, want True %s saying %q", c, fleet.ReasonNotAllowed, tc.refused)
				} else {
					t.Logf("status: %s", c.Message)
				}
				if err := refusalEvent(ctx, ns, tc.name, tc.refused); err != nil {
					t.Error(err)
				}
			})
		}
	}
	for _, req := range rec.requests() {
		if req.code == http.StatusForbidden {
			t.Errorf("the reconciler's role does not allow %s", req)
		}
	}
}

// TestCachedModelPolicy_AdmissionRefuses installs
// deploy/kubernetes/cachedmodel-policy.yaml as shipped: the API server
// refuses each CachedModel the reconciler refuses, with a message saying
// what to change, and admits harmless ones and any in a trusted namespace.
func TestCachedModelPolicy_AdmissionRefuses(t *testing.T) {
	ensureCRD(t)
	ensureRBAC(t) // the modelcache namespace, where the parameters live
	const untrusted, trusted = "policy-admission", "policy-admission-trusted"
	newNamespace(t, untrusted)
	trustedNamespace(t, trusted)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	params := installPolicy(t)
	models := func(ns string) interface {
		Create(context.Context, *unstructured.Unstructured, metav1.CreateOptions, ...string) (*unstructured.Unstructured, error)
	} {
		return env.dyn.Resource(fleet.Resource).Namespace(ns)
	}

	// The API server compiles a new policy and its binding in the
	// background: wait until a known-bad CachedModel is refused.
	cases := policyCases()
	probe := 0
	eventually(t, time.Minute, "the policy enforced", func(ctx context.Context) error {
		probe++
		_, err := models(untrusted).Create(ctx, cachedModel(untrusted, fmt.Sprintf("probe-%d", probe), cases[0].spec), metav1.CreateOptions{})
		if err == nil {
			return fmt.Errorf("probe-%d admitted", probe)
		}
		if !strings.Contains(err.Error(), "ValidatingAdmissionPolicy") {
			return err
		}
		return nil
	})

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := models(untrusted).Create(ctx, cachedModel(untrusted, tc.name, tc.spec), metav1.CreateOptions{})
			if tc.refused == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
			} else {
				if err == nil {
					t.Fatalf("admitted in namespace %s", untrusted)
				}
				if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), tc.refused) {
					t.Errorf("refused with %v (status %d), want 403 Forbidden saying %q", err, statusCode(err), tc.refused)
				}
				t.Logf("refused: %v", err)
			}
			if _, err := models(trusted).Create(ctx, cachedModel(trusted, tc.name, tc.spec), metav1.CreateOptions{}); err != nil {
				t.Errorf("refused in the trusted namespace %s: %v", trusted, err)
			}
		})
	}

	t.Run("an update that adds a refused toleration", func(t *testing.T) {
		res := env.dyn.Resource(fleet.Resource).Namespace(untrusted)
		cm, err := res.Get(ctx, "plain", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		_ = unstructured.SetNestedSlice(cm.Object, []any{map[string]any{"operator": "Exists"}}, "spec", "tolerations")
		if _, err := res.Update(ctx, cm, metav1.UpdateOptions{}); err == nil || !strings.Contains(err.Error(), "operator Exists without a key") {
			t.Errorf("update admitted or refused for another reason: %v", err)
		}
	})

	t.Run("a priority class the parameters list", func(t *testing.T) {
		spec := map[string]any{"modelUri": "s3://models/llama", "priorityClassName": "model-warm"}
		if _, err := models(untrusted).Create(ctx, cachedModel(untrusted, "warm-0", spec), metav1.CreateOptions{}); err == nil ||
			!strings.Contains(err.Error(), "spec.priorityClassName model-warm is not allowed") {
			t.Fatalf("model-warm not refused before it is listed: %v", err)
		}
		params.Data["priorityClasses"] = "batch, model-warm"
		if _, err := env.kube.CoreV1().ConfigMaps(params.Namespace).Update(ctx, params, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		n := 0
		eventually(t, time.Minute, "model-warm admitted once listed", func(ctx context.Context) error {
			n++
			_, err := models(untrusted).Create(ctx, cachedModel(untrusted, fmt.Sprintf("warm-%d", n), spec), metav1.CreateOptions{})
			return err
		})
		spec["priorityClassName"] = "system-cluster-critical"
		_, err := models(untrusted).Create(ctx, cachedModel(untrusted, "critical", spec), metav1.CreateOptions{})
		if err == nil || !strings.Contains(err.Error(), "(allowed: batch, model-warm)") {
			t.Errorf("an unlisted class refused without naming the allowed ones: %v", err)
		}
	})
}

// installPolicy creates the documents of deploy/kubernetes/cachedmodel-policy.yaml
// and removes them when the test ends; it returns the parameters.
func installPolicy(t *testing.T) *corev1.ConfigMap {
	t.Helper()
	ctx := context.Background()
	var params *corev1.ConfigMap
	for _, doc := range manifest(t, "cachedmodel-policy.yaml") {
		kind, name := kindOf(t, doc)
		var err error
		switch kind {
		case "ConfigMap":
			var o corev1.ConfigMap
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				params, err = env.kube.CoreV1().ConfigMaps(o.Namespace).Create(ctx, &o, metav1.CreateOptions{})
				t.Cleanup(func() { _ = env.kube.CoreV1().ConfigMaps(o.Namespace).Delete(ctx, o.Name, metav1.DeleteOptions{}) })
			}
		case "ValidatingAdmissionPolicy":
			var o admissionv1.ValidatingAdmissionPolicy
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.AdmissionregistrationV1().ValidatingAdmissionPolicies().Create(ctx, &o, metav1.CreateOptions{})
				t.Cleanup(func() {
					_ = env.kube.AdmissionregistrationV1().ValidatingAdmissionPolicies().Delete(ctx, o.Name, metav1.DeleteOptions{})
				})
			}
		case "ValidatingAdmissionPolicyBinding":
			var o admissionv1.ValidatingAdmissionPolicyBinding
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Create(ctx, &o, metav1.CreateOptions{})
				t.Cleanup(func() {
					_ = env.kube.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Delete(ctx, o.Name, metav1.DeleteOptions{})
				})
			}
		default:
			t.Fatalf("deploy/kubernetes/cachedmodel-policy.yaml: a %s the test does not know", kind)
		}
		if err != nil {
			t.Fatalf("creating %s %s: %v", kind, name, err)
		}
	}
	if params == nil {
		t.Fatal("deploy/kubernetes/cachedmodel-policy.yaml has no ConfigMap of parameters")
	}
	return params
}

// TestCachedModelPolicy_TypeChecksAgainstTheCRD runs kube-controller-manager's
// ValidatingAdmissionPolicy status controller, which type-checks the
// shipped policy's CEL against the CachedModel schema as a cluster does
// (the API server only compiles it): no warnings.
func TestCachedModelPolicy_TypeChecksAgainstTheCRD(t *testing.T) {
	ensureCRD(t)
	ensureRBAC(t)
	bin := filepath.Join(env.repo, "bin", "kube-controller-manager")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("test/fleet needs %s (built with kube-apiserver by make fleet): %v", bin, err)
	}
	installPolicy(t)
	log, err := os.CreateTemp(t.TempDir(), "kube-controller-manager-*.log")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "--kubeconfig="+env.cp.Kubeconfig, "--controllers=validatingadmissionpolicy-status-controller",
		"--leader-elect=false", "--secure-port=0")
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stop()
		_ = cmd.Wait()
	})
	var p *admissionv1.ValidatingAdmissionPolicy
	limit := 90 * time.Second
	wait, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	if err := poll(wait, func() error {
		p, err = env.kube.AdmissionregistrationV1().ValidatingAdmissionPolicies().Get(wait, "modelcache-cachedmodels", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.ObservedGeneration < p.Generation || p.Status.TypeChecking == nil {
			return fmt.Errorf("not type-checked: status %+v", p.Status)
		}
		return nil
	}); err != nil {
		out, _ := os.ReadFile(log.Name())
		t.Fatalf("not after %s: %v\nkube-controller-manager's log:\n%s", limit, err, out)
	}
	if w := p.Status.TypeChecking.ExpressionWarnings; len(w) > 0 {
		t.Errorf("the policy's CEL does not type-check against the CachedModel schema: %+v", w)
	}
}
