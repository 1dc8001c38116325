package fleet

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/names"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"
)

const (
	ns    = "serving"
	image = "registry.example/modelcache-csi:v1"
)

func cachedModel(name string, mutate ...func(*CachedModel)) *CachedModel {
	cm := &CachedModel{
		TypeMeta:   metav1.TypeMeta{APIVersion: Group + "/" + Version, Kind: Kind},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID("uid-" + name), Generation: 1},
		Spec: Spec{
			ModelURI:     "mys3:models/llama",
			SecretRef:    &SecretRef{Name: "seldon-rclone-secret"},
			NodeSelector: map[string]string{"gpu": "a100"},
			Tolerations:  []corev1.Toleration{{Key: "nvidia.com/gpu", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}},
		},
	}
	for _, m := range mutate {
		m(cm)
	}
	return cm
}

func TestHolders_PodMountsTheModelWithoutPrivileges(t *testing.T) {
	cm := cachedModel("llama", func(cm *CachedModel) {
		cm.Spec.PullPolicy, cm.Spec.Digest, cm.Spec.PriorityClassName = "Always", "sha256:"+strings.Repeat("a", 64), "warm"
	})
	ds := Holders(cm, image)
	if ds.Name != "cachedmodel-llama" || ds.Namespace != ns {
		t.Errorf("DaemonSet %s/%s, want %s/cachedmodel-llama", ds.Namespace, ds.Name, ns)
	}
	if !metav1.IsControlledBy(ds, cm) || !*ds.OwnerReferences[0].BlockOwnerDeletion {
		t.Errorf("owner references %+v do not make the CachedModel its controller", ds.OwnerReferences)
	}
	pod := ds.Spec.Template.Spec
	if got := ds.Spec.Template.Labels[LabelCachedModel]; got != "llama" {
		t.Errorf("holder label %q, want llama (model servers' affinity selects it)", got)
	}
	if v := pod.Volumes[0].CSI; v == nil || v.Driver != names.DriverName || !*v.ReadOnly ||
		v.NodePublishSecretRef.Name != "seldon-rclone-secret" ||
		v.VolumeAttributes[names.AttrModelURI] != "mys3:models/llama" ||
		v.VolumeAttributes[names.AttrPullPolicy] != "Always" || v.VolumeAttributes[names.AttrDigest] != cm.Spec.Digest {
		t.Errorf("volume %+v is not the model's inline CSI volume with its secret", pod.Volumes[0])
	}
	if pod.NodeSelector["gpu"] != "a100" || len(pod.Tolerations) != 1 || pod.PriorityClassName != "warm" {
		t.Errorf("placement %v %v %q is not the CachedModel's", pod.NodeSelector, pod.Tolerations, pod.PriorityClassName)
	}
	c := pod.Containers[0]
	if c.Image != image || strings.Join(c.Command, " ") != "/usr/local/bin/modelcache-csi --mode=hold" {
		t.Errorf("container runs %s %v, want the driver's image idling", c.Image, c.Command)
	}
	if *pod.AutomountServiceAccountToken || !*pod.SecurityContext.RunAsNonRoot || *c.SecurityContext.AllowPrivilegeEscalation ||
		!*c.SecurityContext.ReadOnlyRootFilesystem || c.SecurityContext.Capabilities.Drop[0] != "ALL" || c.SecurityContext.Privileged != nil {
		t.Errorf("holder is not unprivileged: pod %+v, container %+v", pod.SecurityContext, c.SecurityContext)
	}
	if !c.VolumeMounts[0].ReadOnly {
		t.Error("the model is mounted writable in the holder")
	}

	// Public models need no secret; no attribute is sent empty.
	public := Holders(cachedModel("pub", func(cm *CachedModel) { cm.Spec.SecretRef = nil }), image).Spec.Template.Spec.Volumes[0].CSI
	if public.NodePublishSecretRef != nil || len(public.VolumeAttributes) != 1 {
		t.Errorf("public model's volume %+v has a secret or empty attributes", public)
	}
}

func TestHolders_SpecHashFollowsSpecAndImage(t *testing.T) {
	base := Holders(cachedModel("m"), image).Annotations[annotationSpecHash]
	for name, ds := range map[string]*appsv1.DaemonSet{
		"pull policy": Holders(cachedModel("m", func(cm *CachedModel) { cm.Spec.PullPolicy = "Always" }), image),
		"selector":    Holders(cachedModel("m", func(cm *CachedModel) { cm.Spec.NodeSelector = nil }), image),
		"image":       Holders(cachedModel("m"), image+"-2"),
	} {
		if ds.Annotations[annotationSpecHash] == base {
			t.Errorf("a change of %s keeps the spec hash", name)
		}
	}
	if Holders(cachedModel("m"), image).Annotations[annotationSpecHash] != base {
		t.Error("the spec hash is not stable")
	}
}

func TestHolderNames_FitKubernetesLimits(t *testing.T) {
	long := strings.Repeat("a", 253)
	for _, n := range []string{"m", strings.Repeat("b", 45), strings.Repeat("c", 46), long} {
		if got := HolderName(n); len(got) > 57 {
			t.Errorf("HolderName(%d chars) is %d chars; its pods' names would pass 63", len(n), len(got))
		}
		if got := LabelValue(n); len(got) > 63 {
			t.Errorf("LabelValue(%d chars) is %d chars", len(n), len(got))
		}
	}
	if HolderName(long) == HolderName(long[:252]+"b") || LabelValue(long) == LabelValue(long[:252]+"b") {
		t.Error("two long names share holders")
	}
}

// status helpers

func holderDS(cm *CachedModel, desired, ready, updated int32) *appsv1.DaemonSet {
	ds := Holders(cm, image)
	ds.UID = "ds-uid"
	ds.Generation, ds.Status.ObservedGeneration = 1, 1
	ds.Status.DesiredNumberScheduled, ds.Status.NumberReady, ds.Status.UpdatedNumberScheduled = desired, ready, updated
	return ds
}

func holderPod(ds *appsv1.DaemonSet, name string, ready bool) corev1.Pod {
	st := corev1.ConditionFalse
	if ready {
		st = corev1.ConditionTrue
	}
	return corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID(name), Labels: ds.Spec.Template.Labels,
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID, Controller: ptr.To(true)}}},
		Status: corev1.PodStatus{Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: st}}},
	}
}

func podEvent(pod, typ, reason, msg string, at time.Time, annotations map[string]string) corev1.Event {
	return corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{Name: pod + "." + reason + at.String(), Namespace: ns, Annotations: annotations},
		InvolvedObject: corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: pod, UID: types.UID(pod)},
		Type:           typ, Reason: reason, Message: msg, LastTimestamp: metav1.NewTime(at),
	}
}

var t0 = time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)

func tree(d string, size int64) map[string]string {
	return map[string]string{kube.AnnotationTree: d, kube.AnnotationSize: strconv.FormatInt(size, 10)}
}

const denied = `MountVolume.SetUp failed for volume "model" : rpc error: code = PermissionDenied desc = the remote refused the credentials for mys3:models/llama`

func TestComputeStatus(t *testing.T) {
	cm := cachedModel("llama")
	digestA, digestB := "sha256:"+strings.Repeat("a", 64), "sha256:"+strings.Repeat("b", 64)
	type want struct {
		ready                        string
		digest, size                 string
		readyC, progressing, degrade metav1.ConditionStatus
		degradedReason               string
	}
	tests := []struct {
		name string
		obs  func() Observed
		want want
	}{
		{"no DaemonSet yet", func() Observed { return Observed{} },
			want{"0/0", "", "", "False", "True", "False", "NoFailures"}},
		{"no node admitted", func() Observed { return Observed{DaemonSet: holderDS(cm, 0, 0, 0)} },
			want{"0/0", "", "", "False", "False", "False", "NoFailures"}},
		{"two of three downloading", func() Observed {
			ds := holderDS(cm, 3, 1, 3)
			return Observed{DaemonSet: ds, Pods: []corev1.Pod{holderPod(ds, "a", true), holderPod(ds, "b", false), holderPod(ds, "c", false)},
				Events: []corev1.Event{podEvent("a", "Normal", kube.ReasonDownloaded, "downloaded", t0, tree(digestA, 3<<30))}}
		}, want{"1/3", digestA, "3.0 GiB", "False", "True", "False", "NoFailures"}},
		{"all ready, newest tree wins", func() Observed {
			ds := holderDS(cm, 2, 2, 2)
			return Observed{DaemonSet: ds, Pods: []corev1.Pod{holderPod(ds, "a", true), holderPod(ds, "b", true)},
				Events: []corev1.Event{
					podEvent("a", "Normal", kube.ReasonDownloaded, "downloaded", t0, tree(digestA, 1<<30)),
					podEvent("b", "Normal", kube.ReasonCached, "cached", t0.Add(time.Minute), tree(digestB, 2<<30)),
				}}
		}, want{"2/2", digestB, "2.0 GiB", "True", "False", "False", "NoFailures"}},
		{"failing mounts give the gRPC code", func() Observed {
			ds := holderDS(cm, 3, 1, 3)
			return Observed{DaemonSet: ds, Pods: []corev1.Pod{holderPod(ds, "a", true), holderPod(ds, "b", false), holderPod(ds, "c", false)},
				Events: []corev1.Event{
					podEvent("b", "Normal", kube.ReasonDownloading, "downloading", t0, nil),
					podEvent("b", "Warning", "FailedMount", denied, t0.Add(time.Second), nil),
					podEvent("c", "Warning", "FailedMount", denied, t0.Add(2*time.Second), nil),
				}}
		}, want{"1/3", "", "", "False", "False", "True", "PermissionDenied"}},
		{"a warning without a reason or code still names a reason", func() Observed {
			ds := holderDS(cm, 1, 0, 1)
			return Observed{DaemonSet: ds, Pods: []corev1.Pod{holderPod(ds, "a", false)},
				Events: []corev1.Event{podEvent("a", "Warning", "", "something broke", t0, nil)}}
		}, want{"0/1", "", "", "False", "False", "True", "MountFailed"}},
		{"a warning followed by progress is not a failure", func() Observed {
			ds := holderDS(cm, 1, 0, 1)
			return Observed{DaemonSet: ds, Pods: []corev1.Pod{holderPod(ds, "a", false)},
				Events: []corev1.Event{
					podEvent("a", "Warning", "FailedMount", denied, t0, nil),
					podEvent("a", "Normal", kube.ReasonDownloading, "downloading", t0.Add(time.Minute), nil),
				}}
		}, want{"0/1", "", "", "False", "True", "False", "NoFailures"}},
		{"rolling out after a change", func() Observed {
			ds := holderDS(cm, 2, 2, 1)
			return Observed{DaemonSet: ds, Pods: []corev1.Pod{holderPod(ds, "a", true), holderPod(ds, "b", true)}}
		}, want{"2/2", "", "", "False", "True", "False", "NoFailures"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := ComputeStatus(cm, tt.obs(), metav1.NewTime(t0))
			got := want{st.Ready, st.Digest, st.Size,
				cond(st, ConditionReady).Status, cond(st, ConditionProgressing).Status, cond(st, ConditionDegraded).Status,
				cond(st, ConditionDegraded).Reason}
			if got != tt.want {
				t.Errorf("status %+v\n got %+v\nwant %+v", st, got, tt.want)
			}
			if st.ObservedGeneration != cm.Generation {
				t.Errorf("observedGeneration %d, want %d", st.ObservedGeneration, cm.Generation)
			}
			if d := cond(st, ConditionDegraded); d.Status == "True" && !strings.Contains(d.Message, fmt.Sprintf("%d of %d holders", st.DesiredNodes-st.ReadyNodes, st.DesiredNodes)) {
				t.Errorf("degraded message %q does not say how many holders fail", d.Message)
			}
		})
	}
}

// An hf:// or oci:// model's status names the commit or manifest digest
// of the newest tree a holder reported; an object store's names none.
func TestComputeStatus_Revision(t *testing.T) {
	cm := cachedModel("llama")
	ds := holderDS(cm, 2, 2, 2)
	digest := "sha256:" + strings.Repeat("c", 64)
	withRev := func(rev string) map[string]string {
		a := tree(digest, 1<<20)
		if rev != "" {
			a[kube.AnnotationRevision] = rev
		}
		return a
	}
	commitA, commitB := strings.Repeat("1", 40), strings.Repeat("2", 40)
	tests := []struct {
		name   string
		events []corev1.Event
		want   string
	}{
		{"object store", []corev1.Event{podEvent("a", "Normal", kube.ReasonDownloaded, "d", t0, withRev(""))}, ""},
		{"newest commit wins", []corev1.Event{
			podEvent("a", "Normal", kube.ReasonDownloaded, "d", t0, withRev(commitA)),
			podEvent("b", "Normal", kube.ReasonCached, "c", t0.Add(time.Minute), withRev(commitB)),
		}, commitB},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := ComputeStatus(cm, Observed{DaemonSet: ds, Pods: []corev1.Pod{holderPod(ds, "a", true), holderPod(ds, "b", true)}, Events: tt.events}, metav1.NewTime(t0))
			if st.Revision != tt.want || st.Digest != digest {
				t.Errorf("status revision %q digest %q, want %q and %q", st.Revision, st.Digest, tt.want, digest)
			}
		})
	}
}

func TestComputeStatus_TransitionTimeKeptWhileStatusHolds(t *testing.T) {
	cm := cachedModel("llama")
	ds := holderDS(cm, 1, 1, 1)
	obs := Observed{DaemonSet: ds, Pods: []corev1.Pod{holderPod(ds, "a", true)}}
	first := ComputeStatus(cm, obs, metav1.NewTime(t0))
	cm.Status = first
	again := ComputeStatus(cm, obs, metav1.NewTime(t0.Add(time.Hour)))
	if got := cond(again, ConditionReady).LastTransitionTime; !got.Time.Equal(t0) {
		t.Errorf("Ready's transition time moved to %v without a transition", cond(again, ConditionReady).LastTransitionTime)
	}
}

func cond(st Status, typ string) metav1.Condition {
	if c := meta.FindStatusCondition(st.Conditions, typ); c != nil {
		return *c
	}
	return metav1.Condition{}
}

// Reconciler against fake clients.

type clients struct {
	kube *fake.Clientset
	dyn  *dynamicfake.FakeDynamicClient
	r    *Reconciler
}

func newClients(t *testing.T, cms []*CachedModel, objs ...runtime.Object) *clients {
	t.Helper()
	var us []runtime.Object
	for _, cm := range cms {
		obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(cm)
		if err != nil {
			t.Fatal(err)
		}
		us = append(us, &unstructured.Unstructured{Object: obj})
	}
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{Resource: "CachedModelList"}, us...)
	k := fake.NewClientset(objs...)
	return &clients{kube: k, dyn: dyn, r: &Reconciler{Kube: k, Dynamic: dyn, Image: image, Now: func() time.Time { return t0 }}}
}

func (c *clients) cachedModel(t *testing.T, name string) *CachedModel {
	t.Helper()
	u, err := c.dyn.Resource(Resource).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm, err := FromUnstructured(u)
	if err != nil {
		t.Fatal(err)
	}
	return cm
}

func (c *clients) daemonSet(t *testing.T, name string) *appsv1.DaemonSet {
	t.Helper()
	ds, err := c.kube.AppsV1().DaemonSets(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

func (c *clients) statusWrites() int {
	n := 0
	for _, a := range c.dyn.Actions() {
		if a.GetVerb() == "update" && a.GetSubresource() == "status" {
			n++
		}
	}
	return n
}

func TestReconcile_CreatesHoldersThenFollowsThem(t *testing.T) {
	ctx := context.Background()
	cm := cachedModel("llama")
	c := newClients(t, []*CachedModel{cm})

	after, err := c.r.Reconcile(ctx, ns, "llama")
	if err != nil {
		t.Fatal(err)
	}
	ds := c.daemonSet(t, "cachedmodel-llama")
	if ds.Spec.Template.Spec.Volumes[0].CSI.VolumeAttributes[names.AttrModelURI] != cm.Spec.ModelURI {
		t.Fatalf("DaemonSet does not hold the model: %+v", ds.Spec.Template.Spec.Volumes)
	}
	if after != requeueNotReady {
		t.Errorf("requeue after %v while nothing is ready, want %v", after, requeueNotReady)
	}

	// The DaemonSet controller schedules two holders; one becomes ready.
	ds.UID, ds.Generation = "ds-uid", 1
	ds.Status = appsv1.DaemonSetStatus{DesiredNumberScheduled: 2, NumberReady: 1, UpdatedNumberScheduled: 2, ObservedGeneration: 1}
	if _, err := c.kube.AppsV1().DaemonSets(ns).Update(ctx, ds, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []corev1.Pod{holderPod(ds, "a", true), holderPod(ds, "b", false)} {
		if _, err := c.kube.CoreV1().Pods(ns).Create(ctx, &p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ev := podEvent("a", "Normal", kube.ReasonDownloaded, "downloaded", t0, tree("sha256:"+strings.Repeat("c", 64), 5<<20))
	if _, err := c.kube.CoreV1().Events(ns).Create(ctx, &ev, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatal(err)
	}
	got := c.cachedModel(t, "llama").Status
	if got.Ready != "1/2" || got.DesiredNodes != 2 || got.ReadyNodes != 1 || got.Size != "5.0 MiB" || !strings.HasPrefix(got.Digest, "sha256:ccc") {
		t.Errorf("status %+v, want 1/2 with the tree of the downloaded event", got)
	}

	// Nothing changed: no write.
	writes := c.statusWrites()
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatal(err)
	}
	if c.statusWrites() != writes {
		t.Error("an unchanged status was written again")
	}
}

func TestReconcile_SpecChangeRewritesHolders(t *testing.T) {
	ctx := context.Background()
	c := newClients(t, []*CachedModel{cachedModel("llama")})
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatal(err)
	}
	u, _ := c.dyn.Resource(Resource).Namespace(ns).Get(ctx, "llama", metav1.GetOptions{})
	_ = unstructured.SetNestedField(u.Object, "Always", "spec", "pullPolicy")
	u.SetGeneration(2)
	if _, err := c.dyn.Resource(Resource).Namespace(ns).Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatal(err)
	}
	if got := c.daemonSet(t, "cachedmodel-llama").Spec.Template.Spec.Volumes[0].CSI.VolumeAttributes[names.AttrPullPolicy]; got != "Always" {
		t.Errorf("pullPolicy on the holders %q after the CachedModel changed, want Always", got)
	}
	if g := c.cachedModel(t, "llama").Status.ObservedGeneration; g != 2 {
		t.Errorf("observedGeneration %d, want 2", g)
	}
}

func TestReconcile_ForeignDaemonSetLeftAlone(t *testing.T) {
	ctx := context.Background()
	foreign := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "cachedmodel-llama", Namespace: ns, Labels: map[string]string{"app": "mine"}}}
	c := newClients(t, []*CachedModel{cachedModel("llama")}, foreign)
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatal(err)
	}
	if got := c.daemonSet(t, "cachedmodel-llama"); got.Labels["app"] != "mine" || len(got.Spec.Template.Spec.Volumes) != 0 {
		t.Error("the reconciler took over a DaemonSet it does not own")
	}
	d := cond(c.cachedModel(t, "llama").Status, ConditionDegraded)
	if d.Status != "True" || d.Reason != "DaemonSetExists" {
		t.Errorf("Degraded %+v, want True with DaemonSetExists", d)
	}
}

func TestReconcile_DeletedCachedModel_HoldersRemoved(t *testing.T) {
	ctx := context.Background()
	cm := cachedModel("llama")
	owned := Holders(cm, image)
	other := Holders(cachedModel("other"), image)
	c := newClients(t, nil, owned, other)
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.kube.AppsV1().DaemonSets(ns).Get(ctx, owned.Name, metav1.GetOptions{}); err == nil {
		t.Error("holders of a deleted CachedModel are still there")
	}
	c.daemonSet(t, other.Name) // another CachedModel's holders stay
	var deletes int
	for _, a := range c.kube.Actions() {
		if d, ok := a.(k8stesting.DeleteAction); ok && d.GetName() == owned.Name {
			deletes++
		}
	}
	if deletes != 1 {
		t.Errorf("%d deletes of the holders, want 1", deletes)
	}
}

func (c *clients) createCachedModel(cm *CachedModel) error {
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(cm)
	if err != nil {
		return err
	}
	_, err = c.dyn.Resource(Resource).Namespace(cm.Namespace).Create(context.Background(), &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
	return err
}

func TestPolicy_Violations(t *testing.T) {
	p := Policy{PriorityClasses: []string{"model-warm"}}
	tests := []struct {
		name string
		spec Spec
		want []string // each a part of one violation, in order
	}{
		{name: "a GPU toleration and an allowed class", spec: Spec{
			Tolerations:       []corev1.Toleration{{Key: "nvidia.com/gpu", Operator: corev1.TolerationOpExists}},
			PriorityClassName: "model-warm"}},
		{name: "nothing asked", spec: Spec{}},
		{name: "control-plane taint", spec: Spec{Tolerations: []corev1.Toleration{
			{Key: "node-role.kubernetes.io/control-plane", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}}},
			want: []string{"spec.tolerations[0] tolerates the control-plane taint node-role.kubernetes.io/control-plane: remove it"}},
		{name: "legacy master taint with Equal", spec: Spec{Tolerations: []corev1.Toleration{
			{Key: "nvidia.com/gpu", Operator: corev1.TolerationOpExists},
			{Key: "node-role.kubernetes.io/master", Operator: corev1.TolerationOpEqual, Value: ""}}},
			want: []string{"spec.tolerations[1] tolerates the control-plane taint node-role.kubernetes.io/master"}},
		{name: "Exists without a key", spec: Spec{Tolerations: []corev1.Toleration{{Operator: corev1.TolerationOpExists}}},
			want: []string{"spec.tolerations[0] has operator Exists without a key, which tolerates every taint: name the taint's key"}},
		{name: "Exists without a key, one effect", spec: Spec{Tolerations: []corev1.Toleration{{Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}}},
			want: []string{"spec.tolerations[0] has operator Exists without a key"}},
		{name: "priority class not listed", spec: Spec{PriorityClassName: "system-node-critical"},
			want: []string{"spec.priorityClassName system-node-critical is not allowed for CachedModels (allowed: model-warm): remove it or use an allowed one"}},
		{name: "all at once", spec: Spec{PriorityClassName: "x", Tolerations: []corev1.Toleration{
			{Operator: corev1.TolerationOpExists}, {Key: "node-role.kubernetes.io/control-plane"}}},
			want: []string{"tolerations[0] has operator Exists", "tolerations[1] tolerates the control-plane taint", "priorityClassName x"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := p.Violations(tt.spec)
			if len(got) != len(tt.want) {
				t.Fatalf("violations %q, want %d", got, len(tt.want))
			}
			for i := range got {
				if !strings.Contains(got[i], tt.want[i]) {
					t.Errorf("violation %q does not say %q", got[i], tt.want[i])
				}
			}
		})
	}
	if got := (Policy{}).Violations(Spec{PriorityClassName: "model-warm"}); len(got) != 1 || !strings.Contains(got[0], "none is allowed") {
		t.Errorf("with no classes allowed: %q, want the class refused saying none is allowed", got)
	}
}

// namespace is the CachedModels' namespace, labelled trusted or not.
func namespace(trusted bool) *corev1.Namespace {
	n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"team": "a"}}}
	if trusted {
		n.Labels[LabelTrusted] = "true"
	}
	return n
}

// events are the events recorded on the CachedModel name.
func (c *clients) events(t *testing.T, name string) []corev1.Event {
	t.Helper()
	evs, err := c.kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Event
	for _, ev := range evs.Items {
		if ev.InvolvedObject.Kind == Kind && ev.InvolvedObject.Name == name {
			out = append(out, ev)
		}
	}
	return out
}

func TestReconcile_PolicyRefusesHoldersOutsideTrustedNamespaces(t *testing.T) {
	ctx := context.Background()
	controlPlane := func(cm *CachedModel) {
		cm.Spec.Tolerations = append(cm.Spec.Tolerations, corev1.Toleration{Key: "node-role.kubernetes.io/control-plane", Operator: corev1.TolerationOpExists})
	}
	everything := func(cm *CachedModel) {
		cm.Spec.Tolerations = []corev1.Toleration{{Operator: corev1.TolerationOpExists}}
	}
	critical := func(cm *CachedModel) { cm.Spec.PriorityClassName = "system-node-critical" }
	allowedClass := func(cm *CachedModel) { cm.Spec.PriorityClassName = "model-warm" }
	tests := []struct {
		name    string
		mutate  func(*CachedModel)
		trusted bool
		refused string // a part of the message; "" when the holders are created
	}{
		{name: "GPU toleration", mutate: func(*CachedModel) {}},
		{name: "allowed priority class", mutate: allowedClass},
		{name: "control-plane toleration", mutate: controlPlane, refused: "tolerates the control-plane taint node-role.kubernetes.io/control-plane"},
		{name: "Exists without a key", mutate: everything, refused: "operator Exists without a key"},
		{name: "priority class not allowed", mutate: critical, refused: "spec.priorityClassName system-node-critical is not allowed"},
		{name: "control-plane toleration, trusted namespace", mutate: controlPlane, trusted: true},
		{name: "Exists without a key, trusted namespace", mutate: everything, trusted: true},
		{name: "priority class not allowed, trusted namespace", mutate: critical, trusted: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cm := cachedModel("llama", tt.mutate)
			c := newClients(t, []*CachedModel{cm}, namespace(tt.trusted))
			c.r.Policy = Policy{PriorityClasses: []string{"model-warm"}}
			after, err := c.r.Reconcile(ctx, ns, "llama")
			if err != nil {
				t.Fatal(err)
			}
			_, dsErr := c.kube.AppsV1().DaemonSets(ns).Get(ctx, HolderName("llama"), metav1.GetOptions{})
			st := c.cachedModel(t, "llama").Status
			if tt.refused == "" {
				if dsErr != nil {
					t.Fatalf("holders not created: %v", dsErr)
				}
				if d := cond(st, ConditionDegraded); d.Reason == ReasonNotAllowed {
					t.Errorf("Degraded %+v for an allowed CachedModel", d)
				}
				return
			}
			if dsErr == nil {
				t.Fatal("holders created for a CachedModel the policy refuses")
			}
			if after != requeueRefused {
				t.Errorf("requeue after %v, want %v (the namespace may become trusted)", after, requeueRefused)
			}
			for _, typ := range []string{ConditionReady, ConditionProgressing, ConditionDegraded} {
				c := cond(st, typ)
				wantStatus := metav1.ConditionFalse
				if typ == ConditionDegraded {
					wantStatus = metav1.ConditionTrue
				}
				if c.Status != wantStatus || c.Reason != ReasonNotAllowed || !strings.Contains(c.Message, tt.refused) || !strings.Contains(c.Message, LabelTrusted+"=true") {
					t.Errorf("%s %+v, want %s %s saying %q and naming the trusted label", typ, c, wantStatus, ReasonNotAllowed, tt.refused)
				}
			}
			// Looked at again: no second event for the same refusal.
			if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
				t.Fatal(err)
			}
			evs := c.events(t, "llama")
			if len(evs) != 1 || evs[0].Type != corev1.EventTypeWarning || evs[0].Reason != ReasonNotAllowed || !strings.Contains(evs[0].Message, tt.refused) {
				t.Errorf("events %+v, want one Warning %s saying %q", evs, ReasonNotAllowed, tt.refused)
			}
		})
	}
}

func TestReconcile_PolicyRemovesHoldersOfANamespaceNoLongerTrusted(t *testing.T) {
	ctx := context.Background()
	cm := cachedModel("llama", func(cm *CachedModel) {
		cm.Spec.Tolerations = []corev1.Toleration{{Operator: corev1.TolerationOpExists}}
	})
	held := Holders(cm, image)
	foreign := Holders(cachedModel("other"), image)
	foreign.Name = HolderName("llama2")
	c := newClients(t, []*CachedModel{cm}, namespace(false), held, foreign)
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.kube.AppsV1().DaemonSets(ns).Get(ctx, held.Name, metav1.GetOptions{}); err == nil {
		t.Error("the holders placed while the namespace was trusted are still there")
	}
	c.daemonSet(t, foreign.Name)
	if d := cond(c.cachedModel(t, "llama").Status, ConditionDegraded); d.Reason != ReasonNotAllowed {
		t.Errorf("Degraded %+v, want %s", d, ReasonNotAllowed)
	}
}

func TestReconcile_PolicyReadsNoNamespaceForAnAllowedCachedModel(t *testing.T) {
	c := newClients(t, []*CachedModel{cachedModel("llama")}) // no namespace object at all
	if _, err := c.r.Reconcile(context.Background(), ns, "llama"); err != nil {
		t.Fatal(err)
	}
	for _, a := range c.kube.Actions() {
		if a.GetResource().Resource == "namespaces" {
			t.Errorf("%s namespaces for a CachedModel the policy allows", a.GetVerb())
		}
	}
}

func TestReconcile_PolicyRefusalSurvivesAFailedEventAndClearsWhenFixed(t *testing.T) {
	ctx := context.Background()
	cm := cachedModel("llama", func(cm *CachedModel) { cm.Spec.PriorityClassName = "system-node-critical" })
	c := newClients(t, []*CachedModel{cm}, namespace(false))
	c.kube.PrependReactor("create", "events", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, fmt.Errorf("events are down")
	})
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatalf("a failed event failed the reconcile: %v", err)
	}
	if d := cond(c.cachedModel(t, "llama").Status, ConditionDegraded); d.Reason != ReasonNotAllowed {
		t.Fatalf("Degraded %+v, want %s although the event failed", d, ReasonNotAllowed)
	}

	// The user removes the priority class: holders, and the refusal is gone.
	u, _ := c.dyn.Resource(Resource).Namespace(ns).Get(ctx, "llama", metav1.GetOptions{})
	unstructured.RemoveNestedField(u.Object, "spec", "priorityClassName")
	u.SetGeneration(2)
	if _, err := c.dyn.Resource(Resource).Namespace(ns).Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.r.Reconcile(ctx, ns, "llama"); err != nil {
		t.Fatal(err)
	}
	c.daemonSet(t, HolderName("llama"))
	st := c.cachedModel(t, "llama").Status
	for _, typ := range []string{ConditionReady, ConditionProgressing, ConditionDegraded} {
		if got := cond(st, typ); got.Reason == ReasonNotAllowed {
			t.Errorf("%s still %+v after the spec was fixed", typ, got)
		}
	}
}
