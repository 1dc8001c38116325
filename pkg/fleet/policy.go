package fleet

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// LabelTrusted on a namespace (value "true") exempts its CachedModels from
// the Policy: their holders may be placed and prioritised as the
// namespace's own pods could be. Only cluster administrators should be able
// to set it; deploy/kubernetes/cachedmodel-policy.yaml exempts the same
// namespaces from its admission policy.
const LabelTrusted = "modelcache.csi.dev/trusted"

// ControlPlaneTaints are the taints that keep workloads off control-plane
// nodes; a CachedModel of an untrusted namespace may not tolerate them.
var ControlPlaneTaints = []string{"node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"}

// Policy is what the holder pods of a CachedModel in an untrusted namespace
// may ask for. The holder DaemonSet is created by the controller, not the
// user, so without it a user allowed only to create CachedModels would get
// a pod on every node, control plane included, at any priority: the
// reconciler refuses such a CachedModel even when the admission policy
// shipped with the manifests is missing.
type Policy struct {
	// PriorityClasses the holders may run at; empty allows none (only
	// CachedModels without a priorityClassName).
	PriorityClasses []string
}

// Violations says, one sentence each, what in spec the policy refuses and
// what to change; none when spec is allowed. The sentences match the
// messages of the shipped ValidatingAdmissionPolicy.
func (p Policy) Violations(spec Spec) []string {
	var out []string
	for i, t := range spec.Tolerations {
		switch {
		case slices.Contains(ControlPlaneTaints, t.Key):
			out = append(out, fmt.Sprintf("spec.tolerations[%d] tolerates the control-plane taint %s: remove it (holders never run on control-plane nodes unless the namespace is labelled %s=true)", i, t.Key, LabelTrusted))
		case t.Key == "" && t.Operator == corev1.TolerationOpExists:
			out = append(out, fmt.Sprintf("spec.tolerations[%d] has operator Exists without a key, which tolerates every taint: name the taint's key (e.g. nvidia.com/gpu)", i))
		}
	}
	if pc := spec.PriorityClassName; pc != "" && !slices.Contains(p.PriorityClasses, pc) {
		allowed := "none is allowed"
		if len(p.PriorityClasses) > 0 {
			allowed = "allowed: " + strings.Join(p.PriorityClasses, ", ")
		}
		out = append(out, fmt.Sprintf("spec.priorityClassName %s is not allowed for CachedModels (%s): remove it or use an allowed one", pc, allowed))
	}
	return out
}
