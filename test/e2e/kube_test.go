package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
)

// An install is deploy/ rendered for this node and applied.
type install struct {
	name    string
	objects []*unstructured.Unstructured
}

// renderKustomize builds the e2e overlay of deploy/kubernetes with the
// pinned kustomize.
func renderKustomize(t *testing.T) []byte {
	t.Helper()
	kustomize, err := testenv.Binary("kustomize")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(kustomize, "build", filepath.Join(testenv.RepoRoot(), "test/e2e/overlay/kustomize")).Output()
	if err != nil {
		t.Fatalf("kustomize build of the e2e overlay: %v\n%s", err, stderr(err))
	}
	return out
}

// renderHelm renders the chart with helm template (the image as the
// kustomize base names it) and puts the same loopback-node component over
// it with kustomize.
func renderHelm(t *testing.T) []byte {
	t.Helper()
	helm, err := testenv.Binary("helm")
	if err != nil {
		t.Fatal(err)
	}
	kustomize, err := testenv.Binary("kustomize")
	if err != nil {
		t.Fatal(err)
	}
	repo := testenv.RepoRoot()
	chart, err := exec.Command(helm, "template", "modelcache", filepath.Join(repo, "deploy/helm/modelcache"), "--include-crds",
		"--namespace", "modelcache", "--set", "image.repository=modelcache-csi", "--set", "image.tag=dev").Output()
	if err != nil {
		t.Fatalf("helm template: %v\n%s", err, stderr(err))
	}
	// Inside the repository, so kustomize's load restrictor lets the
	// overlay reach the component; removed when the test ends.
	dir, err := os.MkdirTemp(filepath.Join(repo, "test/e2e/overlay"), "helm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.WriteFile(filepath.Join(dir, "chart.yaml"), chart, 0o600); err != nil {
		t.Fatal(err)
	}
	k := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [chart.yaml]\ncomponents: [../loopback-node]\n"
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(kustomize, "build", dir).Output()
	if err != nil {
		t.Fatalf("kustomize build of the Helm output with the loopback-node component: %v\n%s", err, stderr(err))
	}
	return out
}

func stderr(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(ee.Stderr)
	}
	return ""
}

// decode splits a multi-document YAML stream into objects.
func decode(t *testing.T, rendered []byte) []*unstructured.Unstructured {
	t.Helper()
	d := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(rendered), 4096)
	var out []*unstructured.Unstructured
	for {
		var obj map[string]any
		if err := d.Decode(&obj); err != nil {
			if errors.Is(err, io.EOF) {
				return out
			}
			t.Fatalf("decoding rendered manifests: %v", err)
		}
		if len(obj) > 0 {
			out = append(out, &unstructured.Unstructured{Object: obj})
		}
	}
}

// installPlugin imports the images the rendered node DaemonSet names,
// creates every object and waits until the DaemonSet is ready. Cleanup
// deletes them again (model pods must be gone first; tests delete theirs).
// withSmallMinFree lowers the node plugin's --min-free from its default,
// a fifth of the cache filesystem, to 1Gi: the suite's models are a few
// MiB, and the node's filesystem is the machine's, which the build caches
// share (a cold CI run once left 38 GiB of 252 free, under the default's
// 50 GiB, and every publish was RESOURCE_EXHAUSTED). The budget is tested
// in pkg/cache and test/integration.
func withSmallMinFree(t *testing.T, objects []*unstructured.Unstructured) {
	t.Helper()
	found := 0
	for _, o := range objects {
		if o.GetKind() != "DaemonSet" {
			continue
		}
		containers, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		for _, c := range containers {
			args, _ := c.(map[string]any)["args"].([]any)
			for i, a := range args {
				if a == "--min-free=20%" {
					args[i], found = "--min-free=1Gi", found+1
				}
			}
		}
		if err := unstructured.SetNestedSlice(o.Object, containers, "spec", "template", "spec", "containers"); err != nil {
			t.Fatal(err)
		}
	}
	if found != 1 {
		t.Fatalf("the rendered manifests pass --min-free=20%% to %d containers, want one", found)
	}
}

func installPlugin(t *testing.T, name string, rendered []byte) *install {
	t.Helper()
	in := &install{name: name, objects: decode(t, rendered)}
	withSmallMinFree(t, in.objects)
	var ds *appsv1.DaemonSet
	var pods []corev1.PodSpec // of the DaemonSet and the controller Deployment
	for _, o := range in.objects {
		switch o.GetKind() {
		case "DaemonSet":
			ds = &appsv1.DaemonSet{}
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, ds); err != nil {
				t.Fatal(err)
			}
			pods = append(pods, ds.Spec.Template.Spec)
		case "Deployment":
			var d appsv1.Deployment
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &d); err != nil {
				t.Fatal(err)
			}
			pods = append(pods, d.Spec.Template.Spec)
		}
	}
	if ds == nil {
		t.Fatalf("%s: no DaemonSet in the rendered manifests", name)
	}
	containers := map[string]string{}
	for _, spec := range pods {
		for _, c := range spec.Containers {
			if other, ok := containers[c.Name]; ok && other != c.Image {
				t.Fatalf("%s: two containers %s with images %s and %s", name, c.Name, other, c.Image)
			}
			containers[c.Name] = c.Image
			if c.ImagePullPolicy != corev1.PullNever {
				t.Fatalf("%s: container %s would pull (%q); the e2e component sets Never", name, c.Name, c.ImagePullPolicy)
			}
		}
	}
	if err := pluginImages(containers); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dyn, mapper := dynamicClient(t)
	for _, o := range in.objects {
		ri := resourceFor(t, dyn, mapper, o)
		if _, err := ri.Create(ctx, o, metav1.CreateOptions{}); err != nil {
			t.Fatalf("%s: creating %s %s: %v", name, o.GetKind(), o.GetName(), err)
		}
	}
	t.Cleanup(func() { in.uninstall(t) })
	waitDaemonSetReady(t, ds.Namespace, ds.Name, 3*time.Minute)
	// Kubelet's plugin watcher found the registration socket and asked the
	// driver for its node ID: the driver is on the node's CSINode.
	waitFor(t, "modelcache.csi.dev registered on the CSINode", time.Minute, func() error {
		n, err := suite.cluster.Client.StorageV1().CSINodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, d := range n.Spec.Drivers {
			if d.Name == "modelcache.csi.dev" && d.NodeID == nodeName {
				return nil
			}
		}
		return fmt.Errorf("drivers: %+v", n.Spec.Drivers)
	})
	return in
}

func (in *install) uninstall(t *testing.T) {
	ctx := context.Background()
	dyn, mapper := dynamicClient(t)
	policy := metav1.DeletePropagationForeground
	for i := len(in.objects) - 1; i >= 0; i-- {
		o := in.objects[i]
		err := resourceFor(t, dyn, mapper, o).Delete(ctx, o.GetName(), metav1.DeleteOptions{PropagationPolicy: &policy})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("%s: deleting %s %s: %v", in.name, o.GetKind(), o.GetName(), err)
		}
	}
	// The namespace goes last and takes the plugin pods with it; a CRD
	// takes its objects with it. The next install creates both again.
	waitFor(t, "namespace modelcache and the CRDs deleted", 2*time.Minute, func() error {
		for _, o := range in.objects {
			if o.GetNamespace() != "" || (o.GetKind() != "Namespace" && o.GetKind() != "CustomResourceDefinition") {
				continue
			}
			if _, err := resourceFor(t, dyn, mapper, o).Get(ctx, o.GetName(), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return fmt.Errorf("%s %s still there (%v)", o.GetKind(), o.GetName(), err)
			}
		}
		return nil
	})
}

func dynamicClient(t *testing.T) (*dynamic.DynamicClient, meta.RESTMapper) {
	t.Helper()
	dyn, err := dynamic.NewForConfig(suite.cluster.Rest)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(suite.cluster.Client.Discovery()))
	return dyn, mapper
}

func resourceFor(t *testing.T, dyn *dynamic.DynamicClient, mapper meta.RESTMapper, o *unstructured.Unstructured) dynamic.ResourceInterface {
	t.Helper()
	gvk := o.GroupVersionKind()
	m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		t.Fatalf("no API resource for %s: %v", gvk, err)
	}
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		return dyn.Resource(m.Resource).Namespace(o.GetNamespace())
	}
	return dyn.Resource(m.Resource)
}

func waitDaemonSetReady(t *testing.T, ns, name string, limit time.Duration) {
	t.Helper()
	ctx := context.Background()
	waitFor(t, "DaemonSet "+name+" ready", limit, func() error {
		ds, err := suite.cluster.Client.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		s := ds.Status
		if s.ObservedGeneration >= ds.Generation && s.DesiredNumberScheduled == 1 && s.NumberReady == 1 && s.UpdatedNumberScheduled == 1 {
			return nil
		}
		return fmt.Errorf("desired %d, ready %d, updated %d; %s", s.DesiredNumberScheduled, s.NumberReady, s.UpdatedNumberScheduled, podStates(ns))
	})
}

// podStates describes a namespace's pods for failure messages.
func podStates(ns string) string {
	pods, err := suite.cluster.Client.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, p := range pods.Items {
		s := fmt.Sprintf("%s %s", p.Name, p.Status.Phase)
		for _, c := range p.Status.ContainerStatuses {
			if w := c.State.Waiting; w != nil {
				s += fmt.Sprintf(" %s:%s(%s)", c.Name, w.Reason, w.Message)
			}
			if c.RestartCount > 0 {
				s += fmt.Sprintf(" %s restarted %d", c.Name, c.RestartCount)
			}
		}
		out = append(out, s)
	}
	return strings.Join(out, "; ")
}

// waitFor polls ready every 500 ms until it returns nil, failing the test
// with its last error after limit.
func waitFor(t *testing.T, what string, limit time.Duration, ready func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := ready()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s: %v", what, limit, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitPodReady waits for a pod's Ready condition.
func waitPodReady(t *testing.T, pod *corev1.Pod, limit time.Duration) *corev1.Pod {
	t.Helper()
	var got *corev1.Pod
	waitFor(t, "pod "+pod.Name+" Ready", limit, func() error {
		p, err := suite.cluster.Client.CoreV1().Pods(pod.Namespace).Get(context.Background(), pod.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				got = p
				return nil
			}
		}
		return fmt.Errorf("%s; events: %s", podStates(pod.Namespace), eventSummary(pod.Namespace, pod.Name))
	})
	return got
}

// deletePod deletes a pod and waits until kubelet has torn it down.
func deletePod(t *testing.T, pod *corev1.Pod) {
	t.Helper()
	ctx := context.Background()
	grace := int64(2)
	err := suite.cluster.Client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace})
	if err != nil && !apierrors.IsNotFound(err) {
		t.Fatalf("deleting pod %s: %v", pod.Name, err)
	}
	waitFor(t, "pod "+pod.Name+" deleted", 2*time.Minute, func() error {
		_, err := suite.cluster.Client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("still there (%v)", err)
	})
}

// events returns the reasons and messages of an object's events, oldest first.
func events(ns, name string) []corev1.Event {
	list, err := suite.cluster.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
		FieldSelector: "involvedObject.name=" + name,
	})
	if err != nil {
		return nil
	}
	return list.Items
}

func eventSummary(ns, name string) string {
	var out []string
	for _, e := range events(ns, name) {
		out = append(out, e.Reason+": "+e.Message)
	}
	return strings.Join(out, " | ")
}

// hasEvent reports whether the object has an event with reason whose
// message contains every one of words.
func hasEvent(ns, name, reason string, words ...string) bool {
	for _, e := range events(ns, name) {
		if e.Reason != reason {
			continue
		}
		all := true
		for _, w := range words {
			all = all && strings.Contains(e.Message, w)
		}
		if all {
			return true
		}
	}
	return false
}

// podLog returns what a pod's container wrote, read from kubelet's log
// directory (kubectl logs would go through the node's non-loopback address).
func podLog(pod *corev1.Pod, container string) string {
	dir := filepath.Join(suite.cluster.PodLogsDir, fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID), container)
	files, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	var out strings.Builder
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		// CRI log lines: <time> <stream> <P|F> <text>
		s := bufio.NewScanner(bytes.NewReader(b))
		for s.Scan() {
			if parts := strings.SplitN(s.Text(), " ", 4); len(parts) == 4 {
				out.WriteString(parts[3] + "\n")
			}
		}
	}
	return out.String()
}

// pluginPod returns the node plugin pod that is not being deleted.
func pluginPod(t *testing.T) *corev1.Pod {
	t.Helper()
	p, err := findPluginPod()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func findPluginPod() (*corev1.Pod, error) {
	pods, err := suite.cluster.Client.CoreV1().Pods("modelcache").List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=modelcache-node"})
	if err != nil {
		return nil, err
	}
	for i := range pods.Items {
		if pods.Items[i].DeletionTimestamp == nil {
			return &pods.Items[i], nil
		}
	}
	return nil, fmt.Errorf("no node plugin pod; %s", podStates("modelcache"))
}

// hostTarget is where kubelet publishes a pod's CSI volume, on the host.
func hostTarget(pod *corev1.Pod, volume string) string {
	return filepath.Join("/var/lib/kubelet/pods", string(pod.UID), "volumes/kubernetes.io~csi", volume, "mount")
}
