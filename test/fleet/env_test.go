package fleet_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/fleet"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// The controller's service account, as deploy/kubernetes/controller.yaml
// names it, and the ClusterRole of the CachedModel reconciler.
const (
	controllerNamespace = "modelcache"
	controllerSA        = "modelcache-controller"
	controllerRole      = "modelcache-controller-cachedmodels"
	holderImage         = "registry.example/modelcache-csi:fleet-test"
)

var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// manifest returns the YAML documents of a file of deploy/kubernetes.
func manifest(t *testing.T, name string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(env.repo, "deploy", "kubernetes", name))
	if err != nil {
		t.Fatal(err)
	}
	return splitYAML(t, b)
}

// kindOf is a YAML document's kind and name.
func kindOf(t *testing.T, doc []byte) (kind, name string) {
	t.Helper()
	var head struct {
		Kind     string            `json:"kind"`
		Metadata metav1.ObjectMeta `json:"metadata"`
	}
	if err := yaml.Unmarshal(doc, &head); err != nil {
		t.Fatal(err)
	}
	return head.Kind, head.Metadata.Name
}

// crdFromFile is deploy/kubernetes/cachedmodel-crd.yaml as an object.
func crdFromFile(t *testing.T) *unstructured.Unstructured {
	t.Helper()
	docs := manifest(t, "cachedmodel-crd.yaml")
	if len(docs) != 1 {
		t.Fatalf("deploy/kubernetes/cachedmodel-crd.yaml has %d documents, want the CRD alone", len(docs))
	}
	var obj map[string]any
	if err := yaml.Unmarshal(docs[0], &obj); err != nil {
		t.Fatalf("parsing deploy/kubernetes/cachedmodel-crd.yaml: %v", err)
	}
	return &unstructured.Unstructured{Object: obj}
}

var crdOnce struct {
	sync.Once
	err error
}

// ensureCRD installs the CRD from deploy/kubernetes once and waits until
// it is Established and CachedModels are served.
func ensureCRD(t *testing.T) {
	t.Helper()
	crd := crdFromFile(t)
	crdOnce.Do(func() { crdOnce.err = installCRD(crd) })
	if crdOnce.err != nil {
		t.Fatalf("installing deploy/kubernetes/cachedmodel-crd.yaml: %v", crdOnce.err)
	}
}

func installCRD(crd *unstructured.Unstructured) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := env.dyn.Resource(crdResource).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
		return err
	}
	return poll(ctx, func() error {
		got, err := env.dyn.Resource(crdResource).Get(ctx, crd.GetName(), metav1.GetOptions{})
		if err != nil {
			return err
		}
		conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
		established := false
		for _, c := range conds {
			m, _ := c.(map[string]any)
			if m["type"] == "Established" && m["status"] == "True" {
				established = true
			}
			if m["type"] == "NamesAccepted" && m["status"] == "False" {
				return fmt.Errorf("names not accepted: %v", m["message"])
			}
		}
		if !established {
			return fmt.Errorf("not Established: conditions %v", conds)
		}
		// Established: the API server serves it once its handler caught up.
		_, err = env.dyn.Resource(fleet.Resource).List(ctx, metav1.ListOptions{})
		return err
	})
}

var rbacOnce struct {
	sync.Once
	err error
}

// ensureRBAC applies deploy/kubernetes/namespace.yaml and the service
// accounts, token Secret, roles and bindings of
// deploy/kubernetes/controller.yaml (not its Deployment), and waits until
// the authorizer has them.
func ensureRBAC(t *testing.T) {
	t.Helper()
	var docs [][]byte
	docs = append(docs, manifest(t, "namespace.yaml")...)
	for _, doc := range manifest(t, "controller.yaml") {
		if kind, _ := kindOf(t, doc); kind != "Deployment" {
			docs = append(docs, doc)
		}
	}
	rbacOnce.Do(func() { rbacOnce.err = applyRBAC(docs) })
	if rbacOnce.err != nil {
		t.Fatalf("applying deploy/kubernetes/controller.yaml: %v", rbacOnce.err)
	}
}

func applyRBAC(docs [][]byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, doc := range docs {
		var head struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			return err
		}
		var err error
		switch head.Kind {
		case "Namespace":
			var o corev1.Namespace
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.CoreV1().Namespaces().Create(ctx, &o, metav1.CreateOptions{})
			}
		case "Secret":
			// A service account token Secret stays empty here: no token
			// controller runs (tokens come from TokenRequest instead).
			var o corev1.Secret
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.CoreV1().Secrets(o.Namespace).Create(ctx, &o, metav1.CreateOptions{})
			}
		case "ServiceAccount":
			var o corev1.ServiceAccount
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, &o, metav1.CreateOptions{})
			}
		case "ClusterRole":
			var o rbacv1.ClusterRole
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.RbacV1().ClusterRoles().Create(ctx, &o, metav1.CreateOptions{})
			}
		case "ClusterRoleBinding":
			var o rbacv1.ClusterRoleBinding
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.RbacV1().ClusterRoleBindings().Create(ctx, &o, metav1.CreateOptions{})
			}
		case "Role":
			var o rbacv1.Role
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.RbacV1().Roles(o.Namespace).Create(ctx, &o, metav1.CreateOptions{})
			}
		case "RoleBinding":
			var o rbacv1.RoleBinding
			if err = yaml.UnmarshalStrict(doc, &o); err == nil {
				_, err = env.kube.RbacV1().RoleBindings(o.Namespace).Create(ctx, &o, metav1.CreateOptions{})
			}
		default:
			return fmt.Errorf("a %s the test does not know how to apply", head.Kind)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", head.Kind, err)
		}
	}
	user := serviceAccountUser(controllerNamespace, controllerSA)
	return waitAuthorized(ctx, user, grants(controllerClusterRole(docs)))
}

// controllerClusterRole is the reconciler's ClusterRole among docs.
func controllerClusterRole(docs [][]byte) *rbacv1.ClusterRole {
	for _, doc := range docs {
		var o rbacv1.ClusterRole
		if err := yaml.Unmarshal(doc, &o); err == nil && o.Kind == "ClusterRole" && o.Name == controllerRole {
			return &o
		}
	}
	return nil
}

// reconcilerRole is the ClusterRole of deploy/kubernetes/controller.yaml
// that the reconciler runs with.
func reconcilerRole(t *testing.T) *rbacv1.ClusterRole {
	t.Helper()
	role := controllerClusterRole(manifest(t, "controller.yaml"))
	if role == nil {
		t.Fatalf("deploy/kubernetes/controller.yaml has no ClusterRole %s", controllerRole)
	}
	return role
}

func serviceAccountUser(namespace, name string) string {
	return "system:serviceaccount:" + namespace + ":" + name
}

// access is one thing RBAC allows: a verb on a resource (with its
// subresource, "cachedmodels/status") of an API group.
type access struct {
	group, resource, verb string
}

func (a access) String() string {
	g := a.group
	if g == "" {
		g = "core"
	}
	return fmt.Sprintf("%s %s/%s", a.verb, g, a.resource)
}

// grants lists what a role's rules allow (no wildcards in ours).
func grants(role *rbacv1.ClusterRole) []access {
	if role == nil {
		return nil
	}
	var out []access
	for _, r := range role.Rules {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					out = append(out, access{g, res, v})
				}
			}
		}
	}
	return out
}

// waitAuthorized waits until the API server's RBAC authorizer (fed by
// informers, so a moment behind the bindings) allows user every access.
func waitAuthorized(ctx context.Context, user string, want []access) error {
	if len(want) == 0 {
		return fmt.Errorf("no ClusterRole %s", controllerRole)
	}
	return poll(ctx, func() error {
		for _, a := range want {
			if ok, err := allowed(ctx, user, a); err != nil || !ok {
				return fmt.Errorf("%s may not yet %s (%v)", user, a, err)
			}
		}
		return nil
	})
}

// allowed asks the API server's authorizer whether user may do a, in the
// CachedModels' namespace of the tests.
func allowed(ctx context.Context, user string, a access) (bool, error) {
	resource, sub, _ := strings.Cut(a.resource, "/")
	ns, _, _ := strings.Cut(user[len("system:serviceaccount:"):], ":")
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:   user,
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Namespace: "any", Verb: a.verb, Group: a.group, Resource: resource, Subresource: sub,
		},
	}}
	got, err := env.kube.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
	if err != nil {
		return false, err
	}
	return got.Status.Allowed, nil
}

// newNamespace creates a namespace with the default service account the
// ServiceAccount admission plugin wants for pods (no controller-manager
// makes it here).
func newNamespace(t *testing.T, name string) {
	t.Helper()
	ctx := context.Background()
	if _, err := env.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: name}}
	if _, err := env.kube.CoreV1().ServiceAccounts(name).Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A test's CachedModels would otherwise be reconciled by the next
	// test's reconciler, which watches every namespace.
	t.Cleanup(func() {
		err := env.dyn.Resource(fleet.Resource).Namespace(name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("deleting the CachedModels of namespace %s: %v", name, err)
		}
	})
}

// cachedModel is a CachedModel for the dynamic client.
func cachedModel(namespace, name string, spec map[string]any) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": fleet.Group + "/" + fleet.Version,
		"kind":       fleet.Kind,
		"metadata":   map[string]any{"name": name, "namespace": namespace},
		"spec":       spec,
	}}
}

// impersonating is the admin's config acting as user, every request of it
// recorded by rec.
func impersonating(user string, rec *recorder) *rest.Config {
	cfg := rest.CopyConfig(env.admin)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user}
	cfg.Wrap(rec.wrap)
	return cfg
}

func clientsFor(t *testing.T, cfg *rest.Config) (kubernetes.Interface, dynamic.Interface) {
	t.Helper()
	k, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	d, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return k, d
}

// request is one API request and the status code it got.
type request struct {
	access
	watchList bool // a watch that streams the initial list (sendInitialEvents)
	namespace string
	name      string
	method    string
	path      string
	code      int
}

func (r request) String() string {
	return fmt.Sprintf("%s %s -> %d (%s)", r.method, r.path, r.code, r.access)
}

// recorder records the requests of a client's transport.
type recorder struct {
	mu   sync.Mutex
	reqs []request
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (rec *recorder) wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripFunc(func(req *http.Request) (*http.Response, error) {
		resp, err := rt.RoundTrip(req)
		r := parseRequest(req)
		if resp != nil {
			r.code = resp.StatusCode
		}
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, r)
		rec.mu.Unlock()
		return resp, err
	})
}

func (rec *recorder) requests() []request {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]request(nil), rec.reqs...)
}

// parseRequest finds what RBAC sees in a request, as the API server's
// request info does (k8s.io/apiserver/pkg/endpoints/request): the verb from
// the method and whether a name and ?watch are there; the group, resource
// and subresource from the path.
func parseRequest(req *http.Request) request {
	r := request{method: req.Method, path: req.URL.Path}
	parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
	switch {
	case len(parts) >= 3 && parts[0] == "api":
		parts = parts[2:] // api/v1
	case len(parts) >= 4 && parts[0] == "apis":
		r.group, parts = parts[1], parts[3:] // apis/group/version
	default:
		r.verb, r.resource = strings.ToLower(req.Method), "nonresource:"+req.URL.Path
		return r
	}
	if parts[0] == "namespaces" && len(parts) > 2 && parts[2] != "status" && parts[2] != "finalize" {
		r.namespace, parts = parts[1], parts[2:]
	}
	r.resource = parts[0]
	if len(parts) > 1 {
		r.name = parts[1]
	}
	if len(parts) > 2 {
		r.resource += "/" + parts[2]
	}
	q := req.URL.Query()
	switch req.Method {
	case http.MethodGet, http.MethodHead:
		switch {
		case r.name != "":
			r.verb = "get"
		case q.Get("watch") == "true" || q.Get("watch") == "1":
			r.verb = "watch"
			r.watchList = q.Get("sendInitialEvents") == "true"
		default:
			r.verb = "list"
		}
	case http.MethodPost:
		r.verb = "create"
	case http.MethodPut:
		r.verb = "update"
	case http.MethodPatch:
		r.verb = "patch"
	case http.MethodDelete:
		r.verb = "delete"
		if r.name == "" {
			r.verb = "deletecollection"
		}
	}
	return r
}

// poll calls f every 200 ms until it returns nil or ctx ends, and then
// returns f's last error.
func poll(ctx context.Context, f func() error) error {
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// eventually fails t unless f returns nil within limit.
func eventually(t *testing.T, limit time.Duration, what string, f func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	start := time.Now()
	if err := poll(ctx, func() error { return f(ctx) }); err != nil {
		t.Fatalf("%s: not after %s: %v", what, limit, err)
	}
	t.Logf("%s after %s", what, time.Since(start).Round(10*time.Millisecond))
}

// statusCode is the HTTP status of an API error (0 if it is none).
func statusCode(err error) int32 {
	var s apierrors.APIStatus
	if errors.As(err, &s) {
		return s.Status().Code
	}
	return 0
}

func sortedStrings(s []string) []string {
	out := append([]string(nil), s...)
	sort.Strings(out)
	return out
}
