package fleet

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
)

// Reconciler makes one CachedModel's holder DaemonSet match its spec and
// its status match what the holders show.
type Reconciler struct {
	Kube    kubernetes.Interface
	Dynamic dynamic.Interface
	// Image is the holder pods' image: the driver's own.
	Image string
	// Policy limits the holders of CachedModels in namespaces not labelled
	// LabelTrusted=true.
	Policy Policy
	// Now is the clock for condition times (time.Now when nil).
	Now func() time.Time
}

// Requeue intervals: holders that are not all ready are looked at again
// soon, since their events (a failing mount) change no DaemonSet status.
const (
	requeueNotReady = 15 * time.Second
	requeueReady    = 5 * time.Minute
	// A refused CachedModel is looked at again for its namespace's label,
	// whose change wakes no watch of the reconciler.
	requeueRefused = time.Minute
)

// ReasonNotAllowed is the conditions' and the event's reason for a
// CachedModel the Policy refuses.
const ReasonNotAllowed = "NotAllowed"

// ErrNotOwned means a DaemonSet of the holders' name exists and belongs to
// something else; the reconciler leaves it alone.
var ErrNotOwned = errors.New("a DaemonSet of that name exists and is not this CachedModel's")

// Reconcile brings one CachedModel to its desired state and returns when
// to look at it again (0: on the next change only).
func (r *Reconciler) Reconcile(ctx context.Context, namespace, name string) (time.Duration, error) {
	u, err := r.Dynamic.Resource(Resource).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		// The garbage collector removes the holders of a deleted
		// CachedModel through their owner reference; this covers a
		// cluster where it lags or the reference was stripped.
		return 0, r.removeOrphan(ctx, namespace, name)
	}
	if err != nil {
		return 0, fmt.Errorf("reading CachedModel %s/%s: %w", namespace, name, err)
	}
	cm, err := FromUnstructured(u)
	if err != nil {
		return 0, err
	}
	if cm.DeletionTimestamp != nil {
		return 0, nil
	}
	refusal, err := r.refusal(ctx, cm)
	if err != nil {
		return 0, err
	}
	if refusal != "" {
		return requeueRefused, r.refuse(ctx, u, cm, refusal)
	}
	ds, err := r.ensureHolders(ctx, cm)
	notOwned := errors.Is(err, ErrNotOwned)
	if err != nil && !notOwned {
		return 0, err
	}
	var obs Observed
	if !notOwned {
		if obs, err = r.observe(ctx, ds); err != nil {
			return 0, err
		}
	}
	st := ComputeStatus(cm, obs, metav1.NewTime(r.now()))
	if notOwned {
		setBlocked(cm, &st, HolderName(cm.Name), metav1.NewTime(r.now()))
	}
	if err := r.writeStatus(ctx, u, cm, st); err != nil {
		return 0, err
	}
	if st.DesiredNodes > 0 && st.ReadyNodes == st.DesiredNodes {
		return requeueReady, nil
	}
	return requeueNotReady, nil
}

func (r *Reconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// refusal is why the Policy refuses cm's holders, or "" when it does not
// (nothing to refuse, or a namespace labelled LabelTrusted=true). The
// namespace is read only for a CachedModel that breaks the policy.
func (r *Reconciler) refusal(ctx context.Context, cm *CachedModel) (string, error) {
	v := r.Policy.Violations(cm.Spec)
	if len(v) == 0 {
		return "", nil
	}
	ns, err := r.Kube.CoreV1().Namespaces().Get(ctx, cm.Namespace, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("reading namespace %s for its %s label: %w", cm.Namespace, LabelTrusted, err)
	}
	if ns.Labels[LabelTrusted] == "true" {
		return "", nil
	}
	return "not allowed in a namespace not labelled " + LabelTrusted + "=true: " + strings.Join(v, "; "), nil
}

// refuse removes cm's holders if it has any (a namespace that lost its
// trust loses what it placed), says why in the status, and records a
// Warning event on the CachedModel when the refusal is new.
func (r *Reconciler) refuse(ctx context.Context, u *unstructured.Unstructured, cm *CachedModel, why string) error {
	dss := r.Kube.AppsV1().DaemonSets(cm.Namespace)
	name := HolderName(cm.Name)
	ds, err := dss.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return fmt.Errorf("reading holder DaemonSet %s/%s: %w", cm.Namespace, name, err)
	case metav1.IsControlledBy(ds, cm):
		policy := metav1.DeletePropagationBackground
		err = dss.Delete(ctx, name, metav1.DeleteOptions{PropagationPolicy: &policy, Preconditions: &metav1.Preconditions{UID: &ds.UID}})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("deleting holder DaemonSet %s/%s of a refused CachedModel: %w", cm.Namespace, name, err)
		}
		klog.InfoS("holder DaemonSet of a refused CachedModel removed", "cachedModel", klog.KObj(cm), "daemonSet", name)
	}
	now := metav1.NewTime(r.now())
	st := Status{ObservedGeneration: cm.Generation, Ready: "0/0", Conditions: append([]metav1.Condition(nil), cm.Status.Conditions...)}
	msg := truncate(why)
	was := meta.FindStatusCondition(cm.Status.Conditions, ConditionDegraded)
	for _, c := range []metav1.Condition{
		{Type: ConditionReady, Status: metav1.ConditionFalse},
		{Type: ConditionProgressing, Status: metav1.ConditionFalse},
		{Type: ConditionDegraded, Status: metav1.ConditionTrue},
	} {
		c.Reason, c.Message, c.ObservedGeneration, c.LastTransitionTime = ReasonNotAllowed, msg, cm.Generation, now
		meta.SetStatusCondition(&st.Conditions, c)
	}
	if err := r.writeStatus(ctx, u, cm, st); err != nil {
		return err
	}
	if was != nil && was.Reason == ReasonNotAllowed && was.Message == msg {
		return nil
	}
	klog.InfoS("CachedModel refused", "cachedModel", klog.KObj(cm), "reason", why)
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: cm.Name + ".", Namespace: cm.Namespace},
		InvolvedObject: corev1.ObjectReference{APIVersion: Group + "/" + Version, Kind: Kind, Namespace: cm.Namespace,
			Name: cm.Name, UID: cm.UID, ResourceVersion: cm.ResourceVersion},
		Type: corev1.EventTypeWarning, Reason: ReasonNotAllowed, Message: msg, Count: 1,
		FirstTimestamp: now, LastTimestamp: now, Source: corev1.EventSource{Component: "modelcache-controller"},
	}
	// Best effort, as every event: the status already says it.
	if _, err := r.Kube.CoreV1().Events(cm.Namespace).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		klog.ErrorS(err, "recording the refusal of a CachedModel", "cachedModel", klog.KObj(cm))
	}
	return nil
}

// ensureHolders creates or rewrites the holder DaemonSet.
func (r *Reconciler) ensureHolders(ctx context.Context, cm *CachedModel) (*appsv1.DaemonSet, error) {
	want := Holders(cm, r.Image)
	dss := r.Kube.AppsV1().DaemonSets(cm.Namespace)
	have, err := dss.Get(ctx, want.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		created, err := dss.Create(ctx, want, metav1.CreateOptions{})
		if err != nil {
			return nil, fmt.Errorf("creating holder DaemonSet %s/%s: %w", want.Namespace, want.Name, err)
		}
		klog.InfoS("holder DaemonSet created", "cachedModel", klog.KObj(cm), "daemonSet", want.Name, "model", cm.Spec.ModelURI)
		return created, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading holder DaemonSet %s/%s: %w", want.Namespace, want.Name, err)
	}
	if !metav1.IsControlledBy(have, cm) {
		return nil, fmt.Errorf("%w: %s/%s", ErrNotOwned, have.Namespace, have.Name)
	}
	if have.Annotations[annotationSpecHash] == want.Annotations[annotationSpecHash] {
		return have, nil
	}
	upd := have.DeepCopy()
	upd.Labels, upd.Annotations, upd.OwnerReferences = want.Labels, want.Annotations, want.OwnerReferences
	upd.Spec.Template, upd.Spec.UpdateStrategy = want.Spec.Template, want.Spec.UpdateStrategy
	updated, err := dss.Update(ctx, upd, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("updating holder DaemonSet %s/%s: %w", want.Namespace, want.Name, err)
	}
	klog.InfoS("holder DaemonSet updated", "cachedModel", klog.KObj(cm), "daemonSet", want.Name)
	return updated, nil
}

// observe reads the holders and the events on them.
func (r *Reconciler) observe(ctx context.Context, ds *appsv1.DaemonSet) (Observed, error) {
	obs := Observed{DaemonSet: ds}
	sel := labels.SelectorFromSet(ds.Spec.Selector.MatchLabels).String()
	pods, err := r.Kube.CoreV1().Pods(ds.Namespace).List(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		return obs, fmt.Errorf("listing holder pods of %s/%s: %w", ds.Namespace, ds.Name, err)
	}
	uids := map[string]bool{}
	for _, p := range pods.Items {
		if metav1.IsControlledBy(&p, ds) {
			obs.Pods = append(obs.Pods, p)
			uids[string(p.UID)] = true
		}
	}
	if len(obs.Pods) == 0 {
		return obs, nil
	}
	evs, err := r.Kube.CoreV1().Events(ds.Namespace).List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("involvedObject.kind", "Pod").String(),
	})
	if err != nil {
		return obs, fmt.Errorf("listing events of holder pods of %s/%s: %w", ds.Namespace, ds.Name, err)
	}
	for _, ev := range evs.Items {
		if uids[string(ev.InvolvedObject.UID)] {
			obs.Events = append(obs.Events, ev)
		}
	}
	return obs, nil
}

// writeStatus updates the status subresource of u (cm, as read) when it
// changed. u's resourceVersion makes the API refuse the write if the
// CachedModel changed since, and the refused key is queued again.
func (r *Reconciler) writeStatus(ctx context.Context, u *unstructured.Unstructured, cm *CachedModel, st Status) error {
	old := cm.Status
	old.Conditions, st.Conditions = sortedConditions(old.Conditions), sortedConditions(st.Conditions)
	if reflect.DeepEqual(old, st) {
		return nil
	}
	obj, err := statusObject(st)
	if err != nil {
		return err
	}
	u.Object["status"] = obj
	if _, err := r.Dynamic.Resource(Resource).Namespace(cm.Namespace).UpdateStatus(ctx, u, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("updating the status of CachedModel %s/%s: %w", cm.Namespace, cm.Name, err)
	}
	return nil
}

// removeOrphan deletes the holders of a CachedModel that no longer exists.
func (r *Reconciler) removeOrphan(ctx context.Context, namespace, name string) error {
	dss := r.Kube.AppsV1().DaemonSets(namespace)
	ds, err := dss.Get(ctx, HolderName(name), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading holder DaemonSet %s/%s: %w", namespace, HolderName(name), err)
	}
	owner := metav1.GetControllerOf(ds)
	if ds.Labels[LabelManagedBy] != managedBy || owner == nil || owner.Kind != Kind || owner.Name != name {
		return nil
	}
	policy := metav1.DeletePropagationBackground
	err = dss.Delete(ctx, ds.Name, metav1.DeleteOptions{PropagationPolicy: &policy, Preconditions: &metav1.Preconditions{UID: &ds.UID}})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting holder DaemonSet %s/%s: %w", namespace, ds.Name, err)
	}
	klog.InfoS("holder DaemonSet of a deleted CachedModel removed", "cachedModel", klog.KRef(namespace, name), "daemonSet", ds.Name)
	return nil
}

// setBlocked marks a CachedModel whose holders' name is taken.
func setBlocked(cm *CachedModel, st *Status, dsName string, now metav1.Time) {
	msg := fmt.Sprintf("DaemonSet %s/%s exists and is not owned by this CachedModel; delete or rename it", cm.Namespace, dsName)
	for _, typ := range []string{ConditionReady, ConditionDegraded} {
		c := metav1.Condition{Type: typ, Status: metav1.ConditionFalse, Reason: "DaemonSetExists", Message: msg, ObservedGeneration: cm.Generation, LastTransitionTime: now}
		if typ == ConditionDegraded {
			c.Status = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&st.Conditions, c)
	}
}
