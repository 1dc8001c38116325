package e2e

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/fleet"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// cacheBudget is the node plugin's --cache-size in TestCachedModel: room
// for two of its 10 MiB models, not three.
const cacheBudget = "24Mi"

// TestCachedModel warms the node through the controller's reconciler as
// installed by deploy/kubernetes: a CachedModel's holder becomes Ready,
// its status says 1/1, a model server with required affinity to the
// holders starts without fetching a byte, and under an LRU budget smaller
// than the models the node serves, the held model is never evicted while
// others are; deleting the CachedModel makes it an ordinary candidate.
func TestCachedModel(t *testing.T) {
	ensureNamespace(t, modelsNS)
	rendered := withNodeArgs(t, renderKustomize(t), "--cache-size="+cacheBudget)
	installPlugin(t, "deploy/kubernetes with --cache-size="+cacheBudget, rendered)
	t.Cleanup(func() { deleteModelPods(t) })
	r := newRemote(t)
	r.secret(t, "warm-secret", nil)
	sizes := map[string]int{"config.json": 256, "model.bin": 10 << 20}
	heldURI, heldSums := model(t, "held", 11, sizes)
	otherURI, otherSums := model(t, "other", 12, sizes)
	thirdURI, _ := model(t, "third", 13, sizes)

	ctx := context.Background()
	dyn, _ := dynamicClient(t)
	models := dyn.Resource(fleet.Resource).Namespace(modelsNS)
	cm := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": fleet.Group + "/" + fleet.Version, "kind": fleet.Kind,
		"metadata": map[string]any{"name": "held", "namespace": modelsNS},
		"spec":     map[string]any{"modelUri": heldURI, "secretRef": map[string]any{"name": "warm-secret"}},
	}}
	waitFor(t, "the CachedModel API served", time.Minute, func() error {
		_, err := models.Create(ctx, cm, metav1.CreateOptions{})
		return err
	})
	t.Cleanup(func() { _ = models.Delete(ctx, "held", metav1.DeleteOptions{}) })

	var st fleet.Status
	t.Run("HolderWarmsTheNode_ReadyNodes1", func(t *testing.T) {
		start := time.Now()
		waitFor(t, "CachedModel held ready on the node", 3*time.Minute, func() error {
			u, err := models.Get(ctx, "held", metav1.GetOptions{})
			if err != nil {
				return err
			}
			got, err := fleet.FromUnstructured(u)
			if err != nil {
				return err
			}
			st = got.Status
			if c := meta.FindStatusCondition(st.Conditions, fleet.ConditionReady); st.ReadyNodes != 1 || c == nil || c.Status != metav1.ConditionTrue {
				return fmt.Errorf("status %+v; holder pods: %s", st, podStates(modelsNS))
			}
			return nil
		})
		t.Logf("CachedModel Ready 1/1 in %s: digest %s, size %s", time.Since(start).Round(100*time.Millisecond), st.Digest, st.Size)
		if st.Ready != "1/1" || st.DesiredNodes != 1 || !strings.HasPrefix(st.Digest, "sha256:") || st.Size != "10.0 MiB" {
			t.Errorf("status %+v, want 1/1 with the tree's digest and 10.0 MiB", st)
		}
		if n := r.proxy.ObjectBytes(); n != int64(10<<20+256) {
			t.Errorf("warming fetched %d bytes, want the model once (%d)", n, 10<<20+256)
		}
	})
	if st.ReadyNodes != 1 {
		t.FailNow()
	}

	t.Run("ServerWithRequiredAffinity_FetchesNothing", func(t *testing.T) {
		r.proxy.Reset()
		pod := modelPodWith(t, "affine", inlineVolume(heldURI, "warm-secret", ptr(true)), func(p *corev1.Pod) {
			p.Spec.Affinity = &corev1.Affinity{PodAffinity: &corev1.PodAffinity{
				RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
					LabelSelector: &metav1.LabelSelector{MatchLabels: map[string]string{fleet.LabelCachedModel: "held"}},
					TopologyKey:   "kubernetes.io/hostname",
				}},
			}}
		})
		pod, out := checkedPod(t, pod, time.Minute)
		wantModel(t, pod, out, heldSums)
		if n := r.proxy.ObjectBytes(); n != 0 {
			t.Errorf("the model server on a warm node fetched %d bytes, want 0", n)
		}
		if !hasEvent(modelsNS, pod.Name, "ModelCached", st.Digest) {
			t.Errorf("pod %s has no ModelCached event for %s; events: %s", pod.Name, st.Digest, eventSummary(modelsNS, pod.Name))
		}
		deleteModelPod(t, pod, "models")
	})

	// Affinity to the holders of a model nobody warms keeps a server off
	// every node: required affinity means "only where it is held".
	t.Run("AffinityToNoHolders_StaysPending", func(t *testing.T) {
		pod := modelPodWith(t, "no-holders", inlineVolume(heldURI, "warm-secret", ptr(true)), func(p *corev1.Pod) {
			p.Spec.Affinity = &corev1.Affinity{PodAffinity: &corev1.PodAffinity{
				RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
					LabelSelector: &metav1.LabelSelector{MatchLabels: map[string]string{fleet.LabelCachedModel: "nobody"}},
					TopologyKey:   "kubernetes.io/hostname",
				}},
			}}
		})
		time.Sleep(5 * time.Second)
		p, err := suite.cluster.Client.CoreV1().Pods(modelsNS).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Spec.NodeName != "" {
			t.Errorf("pod with affinity to no holder was scheduled on %s", p.Spec.NodeName)
		}
		deletePod(t, p)
	})

	// Two more models through a budget of two: the third evicts the
	// least recently used tree that is not mounted, the other model's,
	// and never the held one, which the holder keeps mounted.
	t.Run("BudgetOfTwoModels_HeldOneNeverEvicted", func(t *testing.T) {
		for _, m := range []struct{ name, uri string }{{"other", otherURI}, {"third", thirdURI}} {
			pod, _ := checkedPod(t, modelPod(t, m.name, inlineVolume(m.uri, "warm-secret", ptr(true)), true), 2*time.Minute)
			deleteModelPod(t, pod, "models")
		}
		r.proxy.Reset()
		pod, out := checkedPod(t, modelPod(t, "held-again", inlineVolume(heldURI, "warm-secret", ptr(true)), true), time.Minute)
		wantModel(t, pod, out, heldSums)
		if n := r.proxy.ObjectBytes(); n != 0 {
			t.Errorf("the held model was fetched again (%d bytes) after two other models passed through the budget: it was evicted", n)
		}
		deleteModelPod(t, pod, "models")
		// The budget did evict: the other model is fetched again.
		r.proxy.Reset()
		pod, out = checkedPod(t, modelPod(t, "other-again", inlineVolume(otherURI, "warm-secret", ptr(true)), true), 2*time.Minute)
		wantModel(t, pod, out, otherSums)
		if n := r.proxy.ObjectBytes(); n == 0 {
			t.Error("the other model was still cached: the budget evicted nothing and the test proves nothing")
		}
		deleteModelPod(t, pod, "models")
	})

	t.Run("DeletedCachedModel_HoldersGo", func(t *testing.T) {
		if err := models.Delete(ctx, "held", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "holder DaemonSet and pods gone", 2*time.Minute, func() error {
			_, err := suite.cluster.Client.AppsV1().DaemonSets(modelsNS).Get(ctx, fleet.HolderName("held"), metav1.GetOptions{})
			if !apierrors.IsNotFound(err) {
				return fmt.Errorf("DaemonSet still there (%v)", err)
			}
			pods, err := suite.cluster.Client.CoreV1().Pods(modelsNS).List(ctx, metav1.ListOptions{LabelSelector: fleet.LabelCachedModel + "=held"})
			if err != nil || len(pods.Items) > 0 {
				return fmt.Errorf("holder pods left: %d (%v)", len(pods.Items), err)
			}
			return nil
		})
	})
}

// withNodeArgs adds arguments to the node plugin's driver container in a
// rendered manifest stream.
func withNodeArgs(t *testing.T, rendered []byte, args ...string) []byte {
	t.Helper()
	var out bytes.Buffer
	for _, o := range decode(t, rendered) {
		if o.GetKind() == "DaemonSet" && o.GetName() == "modelcache-node" {
			containers, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
			c := containers[0].(map[string]any)
			for _, a := range args {
				c["args"] = append(c["args"].([]any), a)
			}
			if err := unstructured.SetNestedSlice(o.Object, containers, "spec", "template", "spec", "containers"); err != nil {
				t.Fatal(err)
			}
		}
		b, err := o.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		out.Write(b)
		out.WriteString("\n---\n")
	}
	return out.Bytes()
}
