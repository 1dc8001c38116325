// Package fleet_test runs the CachedModel reconciler (pkg/fleet) against a
// real kube-apiserver and etcd, the way envtest runs them: the CRD and the
// RBAC of deploy/kubernetes exactly as shipped, the reconciler as its
// service account (by impersonation), and the test playing the DaemonSet
// controller and kubelet, which do not run here.
package fleet_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/fleet"
	"github.com/modelcache/modelcache/pkg/names"
	"github.com/modelcache/modelcache/test/e2e/cluster"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
)

// env is the control plane every test shares.
var env struct {
	repo  string
	cp    *cluster.ControlPlane
	admin *rest.Config // system:masters
	kube  kubernetes.Interface
	dyn   dynamic.Interface
}

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	env.repo = repoRoot()
	bin := filepath.Join(env.repo, "bin")
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			fmt.Fprintf(os.Stderr, "test/fleet needs %s (a real etcd and kube-apiserver at their pinned versions): run make test, which builds them\n", filepath.Join(bin, b))
			return 1
		}
	}
	work, err := os.MkdirTemp("", "modelcache-fleet-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	// Privileged pods allowed, as in the clusters the node plugin runs
	// in: TestDeploy_RenderedObjectsValidateOnTheAPIServer applies its DaemonSet.
	env.cp, err = cluster.StartControlPlane(ctx, cluster.ControlPlaneConfig{Bin: bin, Work: work,
		ExtraAPIServerArgs: []string{"--allow-privileged=true"}})
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting etcd and kube-apiserver: %v\n", err)
		_ = os.RemoveAll(work)
		return 1
	}
	defer env.cp.Stop()
	fmt.Printf("control plane at %s up in %s\n", env.cp.URL, time.Since(start).Round(100*time.Millisecond))

	env.admin = rest.CopyConfig(env.cp.Rest)
	env.admin.QPS, env.admin.Burst = 100, 200
	if env.kube, err = kubernetes.NewForConfig(env.admin); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if env.dyn, err = dynamic.NewForConfig(env.admin); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	if code != 0 {
		fmt.Fprintf(os.Stderr, "kube-apiserver's log ends:\n%s\n", env.cp.Log("kube-apiserver", 40))
	}
	return code
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// TestCRD_InstallsFromDeploy installs deploy/kubernetes/cachedmodel-crd.yaml
// itself and checks what the API server stored of it.
func TestCRD_InstallsFromDeploy(t *testing.T) {
	ensureCRD(t)
	got, err := env.dyn.Resource(crdResource).Get(context.Background(), crdFromFile(t).GetName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	versions, _, _ := unstructured.NestedSlice(got.Object, "spec", "versions")
	if len(versions) != 1 {
		t.Fatalf("stored CRD has %d versions, want %s alone", len(versions), fleet.Version)
	}
	v := versions[0].(map[string]any)
	if v["name"] != fleet.Version || v["storage"] != true || v["served"] != true {
		t.Errorf("stored version %v %v %v, want %s served and stored", v["name"], v["served"], v["storage"], fleet.Version)
	}
	if _, ok, _ := unstructured.NestedMap(v, "subresources", "status"); !ok {
		t.Error("the status subresource is not enabled: the reconciler writes status through it")
	}
	cols, _, _ := unstructured.NestedSlice(v, "additionalPrinterColumns")
	var names []string
	for _, c := range cols {
		m := c.(map[string]any)
		if p, _ := m["priority"].(int64); p == 0 {
			names = append(names, strings.ToUpper(m["name"].(string)))
		}
	}
	if want := []string{"READY", "DIGEST", "SIZE", "AGE"}; strings.Join(names, " ") != strings.Join(want, " ") {
		t.Errorf("kubectl get columns (besides NAME) %v, want %v", names, want)
	}
}

// TestCRD_ValidationRefusals: the API server, not the reconciler, refuses
// what the driver could never mount, with a 422 that names the field.
func TestCRD_ValidationRefusals(t *testing.T) {
	ensureCRD(t)
	const ns = "validation"
	newNamespace(t, ns)
	ctx := context.Background()
	models := env.dyn.Resource(fleet.Resource).Namespace(ns)
	digest := "sha256:" + strings.Repeat("0a", 32)

	tests := []struct {
		name   string
		before map[string]any // created first, then updated to spec
		spec   map[string]any
		field  string // the message names it
	}{
		{name: "missing modelUri", spec: map[string]any{"pullPolicy": "Always"}, field: "spec.modelUri"},
		{name: "empty modelUri", spec: map[string]any{"modelUri": ""}, field: "spec.modelUri"},
		{name: "modelUri not a URI", spec: map[string]any{"modelUri": "not a uri"}, field: "spec.modelUri"},
		{name: "modelUri ftp", spec: map[string]any{"modelUri": "ftp://x/y"}, field: "spec.modelUri"},
		{name: "modelUri https with a query", spec: map[string]any{"modelUri": "https://h/p?x=1"}, field: "spec.modelUri"},
		{name: "modelUri remote without a path", spec: map[string]any{"modelUri": "mys3:"}, field: "spec.modelUri"},
		{name: "modelUri hf with a path in the repository", spec: map[string]any{"modelUri": "hf://org/model/sub"}, field: "spec.modelUri"},
		{name: "modelUri hf with a query", spec: map[string]any{"modelUri": "hf://org/model?revision=x"}, field: "spec.modelUri"},
		{name: "modelUri oci without a repository", spec: map[string]any{"modelUri": "oci://registry.example.com"}, field: "spec.modelUri"},
		{name: "modelUri oci with a sha512 digest", spec: map[string]any{"modelUri": "oci://r.example.com/m@sha512:" + strings.Repeat("ab", 64)}, field: "spec.modelUri"},
		{name: "digest not hex", spec: map[string]any{"modelUri": "mys3:models/llama", "digest": "sha256:XYZ"}, field: "spec.digest"},
		{name: "digest md5", spec: map[string]any{"modelUri": "mys3:models/llama", "digest": "md5:d41d8cd98f00b204e9800998ecf8427e"}, field: "spec.digest"},
		{name: "digest uppercase", spec: map[string]any{"modelUri": "mys3:models/llama", "digest": strings.ToUpper(digest)}, field: "spec.digest"},
		{name: "pullPolicy Sometimes", spec: map[string]any{"modelUri": "mys3:models/llama", "pullPolicy": "Sometimes"}, field: "spec.pullPolicy"},
		{name: "modelUri changed", before: map[string]any{"modelUri": "mys3:models/llama"},
			spec: map[string]any{"modelUri": "mys3:models/mistral"}, field: "modelUri"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			name := fmt.Sprintf("refused-%d", i)
			var err error
			if tt.before == nil {
				_, err = models.Create(ctx, cachedModel(ns, name, tt.spec), metav1.CreateOptions{})
			} else {
				var cm *unstructured.Unstructured
				if cm, err = models.Create(ctx, cachedModel(ns, name, tt.before), metav1.CreateOptions{}); err != nil {
					t.Fatalf("creating the CachedModel to update: %v", err)
				}
				cm.Object["spec"] = tt.spec
				_, err = models.Update(ctx, cm, metav1.UpdateOptions{})
			}
			if err == nil {
				t.Fatalf("spec %v accepted", tt.spec)
			}
			if code := statusCode(err); code != http.StatusUnprocessableEntity || !apierrors.IsInvalid(err) {
				t.Errorf("refused with %d (%v), want 422 Invalid", code, err)
			}
			if !strings.Contains(err.Error(), tt.field) {
				t.Errorf("message %q does not name %s", err, tt.field)
			}
			t.Logf("%v", err)
		})
	}

	t.Run("valid forms accepted", func(t *testing.T) {
		for i, uri := range []string{"mys3:models/llama", "s3://b/p", "gs://b/p", "https://h/p", "https://h.example:8443/org/model",
			"hf://gpt2", "hf://meta-llama/Llama-3.1-8B@refs/pr/3", "oci://registry.example.com:5000/models/llama-3:v1.0",
			"oci://r.example.com/m@" + digest} {
			spec := map[string]any{"modelUri": uri, "pullPolicy": "Never", "digest": digest}
			created, err := models.Create(ctx, cachedModel(ns, fmt.Sprintf("valid-%d", i), spec), metav1.CreateOptions{})
			if err != nil {
				t.Errorf("modelUri %q refused: %v", uri, err)
				continue
			}
			// Modifiable fields stay modifiable.
			_ = unstructured.SetNestedField(created.Object, "Always", "spec", "pullPolicy")
			if _, err := models.Update(ctx, created, metav1.UpdateOptions{}); err != nil {
				t.Errorf("changing pullPolicy of %q refused: %v", uri, err)
			}
		}
		// pullPolicy defaults to IfNotPresent.
		got, err := models.Create(ctx, cachedModel(ns, "defaulted", map[string]any{"modelUri": "s3://b/p"}), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p, _, _ := unstructured.NestedString(got.Object, "spec", "pullPolicy"); p != "IfNotPresent" {
			t.Errorf("pullPolicy defaulted to %q, want IfNotPresent", p)
		}
	})
}

// TestCRD_TableShowsStatus asks for CachedModels as kubectl get does (a
// Table) and finds the columns and the status in them.
func TestCRD_TableShowsStatus(t *testing.T) {
	ensureCRD(t)
	const ns = "table"
	newNamespace(t, ns)
	ctx := context.Background()
	models := env.dyn.Resource(fleet.Resource).Namespace(ns)
	cm, err := models.Create(ctx, cachedModel(ns, "llama", map[string]any{"modelUri": "mys3:models/llama"}), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	digest := "sha256:" + strings.Repeat("ab", 32)
	cm.Object["status"] = map[string]any{"desiredNodes": int64(3), "readyNodes": int64(2), "ready": "2/3",
		"digest": digest, "size": "1.0 MiB", "sizeBytes": int64(1 << 20)}
	if _, err := models.UpdateStatus(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	raw, err := env.kube.CoreV1().RESTClient().Get().
		AbsPath("/apis", fleet.Group, fleet.Version, "namespaces", ns, fleet.Resource.Resource).
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").DoRaw(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var table metav1.Table
	if err := json.Unmarshal(raw, &table); err != nil {
		t.Fatalf("decoding the Table: %v\n%s", err, raw)
	}
	col := map[string]int{}
	var shown []string
	for i, c := range table.ColumnDefinitions {
		col[strings.ToUpper(c.Name)] = i
		if c.Priority == 0 {
			shown = append(shown, strings.ToUpper(c.Name))
		}
	}
	if want := "NAME READY DIGEST SIZE AGE"; strings.Join(shown, " ") != want {
		t.Errorf("kubectl get shows %v, want %s", shown, want)
	}
	if _, ok := col["URI"]; !ok {
		t.Error("no URI column for kubectl get -o wide")
	}
	if len(table.Rows) != 1 {
		t.Fatalf("%d rows, want 1", len(table.Rows))
	}
	cells := table.Rows[0].Cells
	for name, want := range map[string]string{"NAME": "llama", "READY": "2/3", "DIGEST": digest, "SIZE": "1.0 MiB", "URI": "mys3:models/llama"} {
		if i, ok := col[name]; !ok || i >= len(cells) || cells[i] != want {
			t.Errorf("%s cell is not %q: row %v", name, want, cells)
		}
	}
}

// TestReconciler_AsItsServiceAccount runs the reconciler as the controller
// does (fleet.OwnImage for the holders' image, then Run, with its
// informers) as the service account of deploy/kubernetes/controller.yaml,
// bound to the ClusterRole shipped there, while the test plays the
// DaemonSet controller and kubelet. Every request the reconciler makes is
// recorded: none may be forbidden (the role is sufficient), and every
// access the role grants must have been used (the role is least).
func TestReconciler_AsItsServiceAccount(t *testing.T) {
	ensureCRD(t)
	ensureRBAC(t)
	const ns = "serving"
	newNamespace(t, ns)
	rec := &recorder{}
	saKube, saDyn := clientsFor(t, impersonating(serviceAccountUser(controllerNamespace, controllerSA), rec))
	// As the controller starts it (cmd/modelcache-csi, --mode=controller
	// without --holder-image): the holders' image is the one of its own pod.
	image, err := fleet.OwnImage(context.Background(), saKube, controllerNamespace, controllerPod(t), fleet.ControllerContainer)
	if err != nil {
		t.Fatal(err)
	}
	r := &fleet.Reconciler{Kube: saKube, Dynamic: saDyn, Image: image}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx, 2) }()
	stopReconciler := func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return 30 s after its context ended")
		}
	}
	defer stop()

	models := env.dyn.Resource(fleet.Resource).Namespace(ns)
	dss := env.kube.AppsV1().DaemonSets(ns)
	holders := fleet.HolderName("llama")
	var cmUID types.UID
	var ds *appsv1.DaemonSet

	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"a CachedModel gets an owned DaemonSet and a status", func(t *testing.T) {
			cm, err := models.Create(context.Background(), cachedModel(ns, "llama", map[string]any{
				"modelUri": "mys3:models/llama", "secretRef": map[string]any{"name": "rclone"},
			}), metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			cmUID = cm.GetUID()
			eventually(t, 30*time.Second, "DaemonSet "+holders+" created", func(ctx context.Context) (err error) {
				ds, err = dss.Get(ctx, holders, metav1.GetOptions{})
				return err
			})
			refs := ds.OwnerReferences
			if len(refs) != 1 || refs[0].APIVersion != fleet.Group+"/"+fleet.Version || refs[0].Kind != fleet.Kind ||
				refs[0].Name != "llama" || refs[0].UID != cmUID ||
				refs[0].Controller == nil || !*refs[0].Controller || refs[0].BlockOwnerDeletion == nil || !*refs[0].BlockOwnerDeletion {
				t.Errorf("owner references %+v, want the CachedModel (uid %s) as controller blocking its deletion", refs, cmUID)
			}
			if got := ds.Spec.Template.Spec.Containers[0].Image; got != holderImage {
				t.Errorf("holders run %s, want %s", got, holderImage)
			}
			waitStatus(t, ns, "llama", 30*time.Second, "0/0, Ready False NoNodes", func(st fleet.Status) bool {
				c := meta.FindStatusCondition(st.Conditions, fleet.ConditionReady)
				return st.Ready == "0/0" && st.DesiredNodes == 0 && c != nil && c.Status == metav1.ConditionFalse && c.Reason == "NoNodes"
			})
		}},
		{"status follows the DaemonSet, its pods and their events", func(t *testing.T) {
			// What the DaemonSet controller and kubelet would do, pods and
			// events first: the DaemonSet's status change wakes the reconciler.
			ready := holderPod(t, ds, "n1", true)
			waiting := holderPod(t, ds, "n2", false)
			podEvent(t, ready, corev1.EventTypeNormal, "ModelDownloaded", "downloaded mys3:models/llama",
				map[string]string{"modelcache.csi.dev/tree": treeDigest, "modelcache.csi.dev/size": "1048576"})
			updateDaemonSetStatus(t, ns, holders, appsv1.DaemonSetStatus{
				DesiredNumberScheduled: 2, CurrentNumberScheduled: 2, NumberReady: 1, UpdatedNumberScheduled: 2,
				NumberAvailable: 1, NumberUnavailable: 1,
			})
			waitStatus(t, ns, "llama", 30*time.Second, "1/2 with the downloaded tree", func(st fleet.Status) bool {
				return st.Ready == "1/2" && st.ReadyNodes == 1 && st.DesiredNodes == 2 &&
					st.Digest == treeDigest && st.Size == "1.0 MiB" && st.SizeBytes == 1<<20
			})

			// kubelet cannot mount the model on n2: no DaemonSet change, the
			// reconciler sees it on its next look at a model not ready.
			podEvent(t, waiting, corev1.EventTypeWarning, "FailedMount",
				`MountVolume.SetUp failed for volume "model" : rpc error: code = PermissionDenied desc = the remote refused the credentials for mys3:models/llama`, nil)
			st := waitStatus(t, ns, "llama", 45*time.Second, "Degraded PermissionDenied", func(st fleet.Status) bool {
				c := meta.FindStatusCondition(st.Conditions, fleet.ConditionDegraded)
				return c != nil && c.Status == metav1.ConditionTrue && c.Reason == "PermissionDenied"
			})
			if c := meta.FindStatusCondition(st.Conditions, fleet.ConditionDegraded); !strings.Contains(c.Message, "1 of 2 holders") {
				t.Errorf("Degraded message %q does not say how many holders fail", c.Message)
			}
		}},
		{"a spec change rewrites the DaemonSet", func(t *testing.T) {
			ctx := context.Background()
			if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
				cm, err := models.Get(ctx, "llama", metav1.GetOptions{})
				if err != nil {
					return err
				}
				_ = unstructured.SetNestedField(cm.Object, "Always", "spec", "pullPolicy")
				_, err = models.Update(ctx, cm, metav1.UpdateOptions{})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			eventually(t, 30*time.Second, "holders with pullPolicy Always", func(ctx context.Context) error {
				got, err := dss.Get(ctx, holders, metav1.GetOptions{})
				if err != nil {
					return err
				}
				if p := got.Spec.Template.Spec.Volumes[0].CSI.VolumeAttributes[names.AttrPullPolicy]; p != "Always" {
					return fmt.Errorf("pullPolicy %q", p)
				}
				return nil
			})
			waitStatus(t, ns, "llama", 30*time.Second, "observedGeneration 2", func(st fleet.Status) bool {
				return st.ObservedGeneration == 2
			})
		}},
		{"a CachedModel tolerating every taint gets no holders, a status and an event", func(t *testing.T) {
			// The namespace is not labelled trusted: the reconciler reads
			// it, refuses, and says why on the CachedModel.
			ctx := context.Background()
			if _, err := models.Create(ctx, cachedModel(ns, "everywhere", map[string]any{
				"modelUri": "mys3:models/llama", "tolerations": []any{map[string]any{"operator": "Exists"}},
			}), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			waitStatus(t, ns, "everywhere", 30*time.Second, "Degraded NotAllowed", func(st fleet.Status) bool {
				c := meta.FindStatusCondition(st.Conditions, fleet.ConditionDegraded)
				return c != nil && c.Status == metav1.ConditionTrue && c.Reason == fleet.ReasonNotAllowed
			})
			eventually(t, 30*time.Second, "a Warning event on the CachedModel", func(ctx context.Context) error {
				return refusalEvent(ctx, ns, "everywhere", "operator Exists without a key")
			})
			if _, err := dss.Get(ctx, fleet.HolderName("everywhere"), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				t.Errorf("holders of a refused CachedModel: %v", err)
			}
		}},
		{"deleting the CachedModel removes its DaemonSet", func(t *testing.T) {
			// No garbage collector runs here: the reconciler's orphan
			// removal is what deletes the holders.
			if err := models.Delete(context.Background(), "llama", metav1.DeleteOptions{}); err != nil {
				t.Fatal(err)
			}
			eventually(t, 30*time.Second, "DaemonSet "+holders+" deleted", func(ctx context.Context) error {
				_, err := dss.Get(ctx, holders, metav1.GetOptions{})
				if apierrors.IsNotFound(err) {
					return nil
				}
				if err == nil {
					return errors.New("still there")
				}
				return err
			})
		}},
	}
	for _, s := range steps {
		if !t.Run(s.name, s.run) {
			stopReconciler()
			t.Fatalf("stopped after %q failed; the reconciler's requests:\n%s", s.name, requestLog(rec.requests()))
		}
	}
	stopReconciler()
	reqs := rec.requests()

	t.Run("sufficient: nothing forbidden", func(t *testing.T) {
		var forbidden []string
		for _, r := range reqs {
			if r.code == http.StatusForbidden {
				forbidden = append(forbidden, r.String())
			}
		}
		if len(forbidden) > 0 {
			t.Errorf("the ClusterRole %s is missing rights; forbidden requests:\n%s", controllerRole, strings.Join(forbidden, "\n"))
		}
	})

	t.Run("least: every granted verb used", func(t *testing.T) {
		used := map[access]bool{}
		for _, r := range reqs {
			used[r.access] = true
			if r.watchList {
				// A streaming list (watch with sendInitialEvents) is what an
				// informer's initial list is against this API server, which
				// authorizes it as a watch; against one that does not
				// stream, the reflector falls back to a plain list, which
				// needs the list verb. Both are the informer's list+watch.
				used[access{r.group, r.resource, "list"}] = true
			}
		}
		var unused []string
		for _, a := range grants(reconcilerRole(t)) {
			// Never requested: the OwnerReferencesPermissionEnforcement
			// admission plugin checks it when the reconciler creates a
			// DaemonSet whose owner reference has blockOwnerDeletion
			// (TestReconciler_NeedsFinalizersRule shows it is needed).
			if a == (access{fleet.Group, "cachedmodels/finalizers", "update"}) {
				continue
			}
			if !used[a] {
				unused = append(unused, a.String())
			}
		}
		if len(unused) > 0 {
			t.Errorf("the ClusterRole %s grants what the reconciler never used (tighten deploy/kubernetes/controller.yaml):\n  %s\nthe reconciler's requests:\n%s",
				controllerRole, strings.Join(sortedStrings(unused), "\n  "), requestLog(reqs))
		}
	})
}

// TestReconciler_NeedsFinalizersRule shows why the ClusterRole grants
// update on cachedmodels/finalizers though the reconciler never requests
// it: without it, the OwnerReferencesPermissionEnforcement admission plugin
// refuses the holders' owner reference with blockOwnerDeletion.
func TestReconciler_NeedsFinalizersRule(t *testing.T) {
	ensureCRD(t)
	ensureRBAC(t)
	const ns = "nofinalizers"
	newNamespace(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	role := reconcilerRole(t).DeepCopy()
	role.ObjectMeta = metav1.ObjectMeta{Name: "fleet-test-no-finalizers"}
	var rules []rbacv1.PolicyRule
	for _, r := range role.Rules {
		if !slices.Contains(r.Resources, "cachedmodels/finalizers") {
			rules = append(rules, r)
		}
	}
	if len(rules) == len(role.Rules) {
		t.Fatalf("the ClusterRole %s has no rule for cachedmodels/finalizers", controllerRole)
	}
	role.Rules = rules
	if _, err := env.kube.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	const sa = "no-finalizers"
	if _, err := env.kube.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa, Namespace: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: ns}},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
	}
	if _, err := env.kube.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	user := serviceAccountUser(ns, sa)
	if err := waitAuthorized(ctx, user, grants(role)); err != nil {
		t.Fatal(err)
	}
	if ok, err := allowed(ctx, user, access{fleet.Group, "cachedmodels/finalizers", "update"}); err != nil || ok {
		t.Fatalf("%s may update cachedmodels/finalizers (%v): the test proves nothing", user, err)
	}

	if _, err := env.dyn.Resource(fleet.Resource).Namespace(ns).Create(ctx, cachedModel(ns, "llama", map[string]any{"modelUri": "s3://models/llama"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	k, d := clientsFor(t, impersonating(user, rec))
	r := &fleet.Reconciler{Kube: k, Dynamic: d, Image: holderImage}
	_, err := r.Reconcile(ctx, ns, "llama")
	if err == nil {
		t.Fatal("the reconciler created the holders without the right to update cachedmodels/finalizers")
	}
	if c := statusCode(err); c != http.StatusForbidden && c != http.StatusUnprocessableEntity {
		t.Fatalf("Reconcile: %v (status %d), want the DaemonSet's creation refused with 403 or 422", err, c)
	}
	if !strings.Contains(err.Error(), "creating holder DaemonSet") || !strings.Contains(err.Error(), "blockOwnerDeletion") {
		t.Errorf("Reconcile: %v, want the holders' creation refused for blockOwnerDeletion", err)
	}
	t.Logf("refused as expected: %v", err)
	var refused []request
	for _, r := range rec.requests() {
		if r.code >= 400 && r.code != http.StatusNotFound {
			refused = append(refused, r)
		}
	}
	if len(refused) != 1 || refused[0].access != (access{"apps", "daemonsets", "create"}) {
		t.Errorf("refused requests %v, want only the DaemonSet's creation", refused)
	}
	if _, err := env.kube.AppsV1().DaemonSets(ns).Get(ctx, fleet.HolderName("llama"), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("holders exist after the refusal (%v)", err)
	}
}

// controllerPod creates the controller's pod as its Deployment would (not
// running: nothing runs pods here), for fleet.OwnImage to read.
func controllerPod(t *testing.T) string {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "modelcache-controller-", Namespace: controllerNamespace},
		Spec: corev1.PodSpec{
			ServiceAccountName:           controllerSA,
			AutomountServiceAccountToken: ptr.To(false),
			Containers: []corev1.Container{
				{Name: "csi-provisioner", Image: "registry.k8s.io/sig-storage/csi-provisioner:v5.3.0"},
				{Name: fleet.ControllerContainer, Image: holderImage},
			},
		},
	}
	created, err := env.kube.CoreV1().Pods(controllerNamespace).Create(context.Background(), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return created.Name
}

// treeDigest is the tree of the model the test's kubelet "downloads".
var treeDigest = "sha256:" + strings.Repeat("c0ffee", 10) + "beef"

// waitStatus waits until the CachedModel's status satisfies ok, and returns it.
func waitStatus(t *testing.T, ns, name string, limit time.Duration, what string, ok func(fleet.Status) bool) fleet.Status {
	t.Helper()
	var st fleet.Status
	eventually(t, limit, "status "+what, func(ctx context.Context) error {
		u, err := env.dyn.Resource(fleet.Resource).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		cm, err := fleet.FromUnstructured(u)
		if err != nil {
			return err
		}
		if st = cm.Status; !ok(st) {
			b, _ := json.Marshal(st)
			return fmt.Errorf("status %s", b)
		}
		return nil
	})
	return st
}

// holderPod creates the DaemonSet's pod on node as the DaemonSet
// controller would, and sets its Ready condition as kubelet would.
func holderPod(t *testing.T, ds *appsv1.DaemonSet, node string, ready bool) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	pods := env.kube.CoreV1().Pods(ds.Namespace)
	spec := *ds.Spec.Template.Spec.DeepCopy()
	spec.NodeName = node
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: ds.Name + "-", Namespace: ds.Namespace, Labels: ds.Spec.Template.Labels,
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID,
				Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true)}},
		},
		Spec: spec,
	}
	created, err := pods.Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	status := corev1.ConditionFalse
	phase := corev1.PodPending
	if ready {
		status, phase = corev1.ConditionTrue, corev1.PodRunning
	}
	now := metav1.Now()
	created.Status = corev1.PodStatus{Phase: phase, Conditions: []corev1.PodCondition{
		{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
		{Type: corev1.PodReady, Status: status, LastTransitionTime: now},
	}}
	updated, err := pods.UpdateStatus(ctx, created, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return updated
}

// podEvent records an event on pod, as kubelet or the node plugin would.
func podEvent(t *testing.T, pod *corev1.Pod, typ, reason, msg string, annotations map[string]string) {
	t.Helper()
	now := metav1.Now()
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: pod.Name + ".", Namespace: pod.Namespace, Annotations: annotations},
		InvolvedObject: corev1.ObjectReference{APIVersion: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name,
			UID: pod.UID, ResourceVersion: pod.ResourceVersion},
		Type: typ, Reason: reason, Message: msg, Count: 1,
		FirstTimestamp: now, LastTimestamp: now,
		Source: corev1.EventSource{Component: "kubelet", Host: pod.Spec.NodeName},
	}
	if _, err := env.kube.CoreV1().Events(pod.Namespace).Create(context.Background(), ev, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// updateDaemonSetStatus writes the DaemonSet's status as its controller
// would, for its current generation.
func updateDaemonSetStatus(t *testing.T, ns, name string, st appsv1.DaemonSetStatus) {
	t.Helper()
	ctx := context.Background()
	dss := env.kube.AppsV1().DaemonSets(ns)
	if err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		ds, err := dss.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		ds.Status = st
		ds.Status.ObservedGeneration = ds.Generation
		_, err = dss.UpdateStatus(ctx, ds, metav1.UpdateOptions{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// requestLog sums requests up by access and status code.
func requestLog(reqs []request) string {
	counts := map[string]int{}
	for _, r := range reqs {
		k := r.access.String()
		if r.watchList {
			k += " (streaming list)"
		}
		counts[fmt.Sprintf("%s -> %d", k, r.code)]++
	}
	var lines []string
	for k, n := range counts {
		lines = append(lines, fmt.Sprintf("  %s: %d", k, n))
	}
	return strings.Join(sortedStrings(lines), "\n")
}
