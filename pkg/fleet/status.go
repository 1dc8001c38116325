package fleet

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/units"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Observed is what the reconciler read about one CachedModel's holders.
type Observed struct {
	DaemonSet *appsv1.DaemonSet // nil until created
	Pods      []corev1.Pod      // the DaemonSet's pods
	Events    []corev1.Event    // events whose object is one of Pods
}

// maxConditionMessage keeps a condition readable in kubectl describe.
const maxConditionMessage = 512

// grpcCode finds the gRPC code in kubelet's FailedMount message
// ("rpc error: code = PermissionDenied desc = ...").
var grpcCode = regexp.MustCompile(`code = ([A-Za-z]+)`)

// conditionReason is what the API accepts as a condition's reason.
var conditionReason = regexp.MustCompile(`^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`)

// ComputeStatus is cm's status from what was observed. Conditions keep
// their lastTransitionTime while their status does not change.
func ComputeStatus(cm *CachedModel, o Observed, now metav1.Time) Status {
	st := Status{ObservedGeneration: cm.Generation, Conditions: append([]metav1.Condition(nil), cm.Status.Conditions...)}
	set := func(typ string, ok bool, reason, msg string) {
		c := metav1.Condition{Type: typ, Status: metav1.ConditionFalse, Reason: reason, Message: truncate(msg), ObservedGeneration: cm.Generation, LastTransitionTime: now}
		if ok {
			c.Status = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&st.Conditions, c)
	}
	if o.DaemonSet == nil {
		st.Ready = "0/0"
		set(ConditionReady, false, "Creating", "the holder DaemonSet is being created")
		set(ConditionProgressing, true, "Creating", "the holder DaemonSet is being created")
		set(ConditionDegraded, false, "NoFailures", "")
		return st
	}
	ds := o.DaemonSet
	st.DesiredNodes, st.ReadyNodes = ds.Status.DesiredNumberScheduled, ds.Status.NumberReady
	st.Ready = fmt.Sprintf("%d/%d", st.ReadyNodes, st.DesiredNodes)
	st.Digest, st.Revision, st.SizeBytes = latestTree(o)
	if st.SizeBytes > 0 {
		st.Size = units.Bytes(st.SizeBytes)
	}
	rolledOut := ds.Status.ObservedGeneration >= ds.Generation && ds.Status.UpdatedNumberScheduled >= st.DesiredNodes

	failing, code, failure := failures(o)
	switch {
	case st.DesiredNodes == 0:
		set(ConditionReady, false, "NoNodes", "no node matches the CachedModel's nodeSelector and tolerations")
	case st.ReadyNodes >= st.DesiredNodes && rolledOut:
		set(ConditionReady, true, "AllNodesReady", fmt.Sprintf("the model is held on %d of %d nodes", st.ReadyNodes, st.DesiredNodes))
	default:
		set(ConditionReady, false, "NodesNotReady", fmt.Sprintf("the model is held on %d of %d nodes", st.ReadyNodes, st.DesiredNodes))
	}
	waiting := int(st.DesiredNodes-st.ReadyNodes) - failing
	switch {
	case !rolledOut:
		set(ConditionProgressing, true, "RollingOut", "holders are being replaced after a change")
	case waiting > 0:
		set(ConditionProgressing, true, "Downloading", fmt.Sprintf("%d nodes are fetching the model", waiting))
	default:
		set(ConditionProgressing, false, "Done", "no node is fetching the model")
	}
	if failing > 0 {
		set(ConditionDegraded, true, code, fmt.Sprintf("%d of %d holders cannot mount the model: %s", failing, st.DesiredNodes, failure))
	} else {
		set(ConditionDegraded, false, "NoFailures", "")
	}
	return st
}

// latestTree is the tree of the newest ModelDownloaded or ModelCached event
// on a holder, and the revision its modelUri resolved to: what the nodes
// hold (a pullPolicy Always model can change).
func latestTree(o Observed) (tree, revision string, size int64) {
	var newest *corev1.Event
	for i := range o.Events {
		ev := &o.Events[i]
		if ev.Annotations[kube.AnnotationTree] == "" {
			continue
		}
		if newest == nil || eventTime(ev).After(eventTime(newest).Time) {
			newest = ev
		}
	}
	if newest == nil {
		return "", "", 0
	}
	size, _ = strconv.ParseInt(newest.Annotations[kube.AnnotationSize], 10, 64)
	return newest.Annotations[kube.AnnotationTree], newest.Annotations[kube.AnnotationRevision], size
}

// failures counts the holders that are not ready and whose newest event is
// a warning (kubelet's FailedMount, the plugin's ModelDownloadFailed), and
// returns the most frequent gRPC code among them with the newest message
// that has it.
func failures(o Observed) (n int, code, message string) {
	newest := map[types.UID]*corev1.Event{}
	for i := range o.Events {
		ev := &o.Events[i]
		uid := ev.InvolvedObject.UID
		if cur := newest[uid]; cur == nil || eventTime(ev).After(eventTime(cur).Time) {
			newest[uid] = ev
		}
	}
	counts := map[string]int{}
	last := map[string]*corev1.Event{}
	for i := range o.Pods {
		p := &o.Pods[i]
		ev := newest[p.UID]
		if podReady(p) || ev == nil || ev.Type != corev1.EventTypeWarning {
			continue
		}
		n++
		c := ev.Reason
		if m := grpcCode.FindStringSubmatch(ev.Message); m != nil {
			c = m[1]
		}
		if !conditionReason.MatchString(c) {
			c = "MountFailed" // a condition's reason must be a CamelCase word
		}
		counts[c]++
		if l := last[c]; l == nil || eventTime(ev).After(eventTime(l).Time) {
			last[c] = ev
		}
	}
	for c, k := range counts {
		if k > counts[code] || k == counts[code] && c < code {
			code = c
		}
	}
	if n == 0 {
		return 0, "", ""
	}
	return n, code, last[code].Message
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// eventTime is when an event last happened, whichever API wrote it.
func eventTime(ev *corev1.Event) metav1.Time {
	switch {
	case !ev.LastTimestamp.IsZero():
		return ev.LastTimestamp
	case !ev.EventTime.IsZero():
		return metav1.Time{Time: ev.EventTime.Time}
	default:
		return ev.CreationTimestamp
	}
}

func truncate(s string) string {
	if len(s) <= maxConditionMessage {
		return s
	}
	return strings.ToValidUTF8(s[:maxConditionMessage-3], "") + "..."
}

// sortedConditions orders conditions by type, so two equal statuses
// compare equal whatever order the API returned them in.
func sortedConditions(cs []metav1.Condition) []metav1.Condition {
	out := append([]metav1.Condition(nil), cs...)
	sort.Slice(out, func(i, j int) bool { return out[i].Type < out[j].Type })
	return out
}
