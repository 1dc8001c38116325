package fleet_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/holders"
	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/test/testenv"
	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"
)

// renderedPlugin is the node plugin as `kustomize build deploy/kubernetes`
// renders it: its namespace, account and peer flags, and the documents
// of that account's RBAC.
type renderedPlugin struct {
	namespace, account string
	service, caSecret  string
	peerServiceAccount string
	rbac               [][]byte
	roles              map[string][]rbacv1.PolicyRule // kind/name → rules
	bindingNS          map[string]string              // kind/name → namespace it applies in, "" cluster-wide
}

func renderNodePlugin(t *testing.T) *renderedPlugin {
	t.Helper()
	out, err := testenv.RunTool("kustomize", "build", "deploy/kubernetes")
	if err != nil {
		t.Fatal(err)
	}
	docs := splitYAML(t, out)
	p := &renderedPlugin{roles: map[string][]rbacv1.PolicyRule{}, bindingNS: map[string]string{}}
	for _, doc := range docs {
		if kind, name := kindOf(t, doc); kind == "DaemonSet" && name == "modelcache-node" {
			var ds appsv1.DaemonSet
			if err := yaml.UnmarshalStrict(doc, &ds); err != nil {
				t.Fatal(err)
			}
			p.namespace, p.account = ds.Namespace, ds.Spec.Template.Spec.ServiceAccountName
			flags := map[string]string{}
			for _, a := range ds.Spec.Template.Spec.Containers[0].Args {
				k, v, _ := strings.Cut(a, "=")
				flags[k] = v
			}
			p.service, p.caSecret, p.peerServiceAccount = flags["--peer-service"], flags["--peer-ca-secret"], flags["--peer-service-account"]
		}
	}
	if p.account == "" || p.service == "" || p.caSecret == "" || p.peerServiceAccount != p.account {
		t.Fatalf("the rendered DaemonSet modelcache-node: account %q, --peer-service %q, --peer-ca-secret %q, --peer-service-account %q; want all, the last the pods' account",
			p.account, p.service, p.caSecret, p.peerServiceAccount)
	}
	// The account, the bindings that name it and the roles they refer to.
	refs := map[string]bool{}
	for _, doc := range docs {
		kind, name := kindOf(t, doc)
		switch kind {
		case "ServiceAccount":
			if name == p.account {
				p.rbac = append(p.rbac, doc)
			}
		case "RoleBinding", "ClusterRoleBinding":
			var b rbacv1.RoleBinding // the fields of both
			if err := yaml.Unmarshal(doc, &b); err != nil {
				t.Fatal(err)
			}
			for _, s := range b.Subjects {
				if s.Kind == rbacv1.ServiceAccountKind && s.Name == p.account && s.Namespace == p.namespace {
					p.rbac = append(p.rbac, doc)
					ref := b.RoleRef.Kind + "/" + b.RoleRef.Name
					refs[ref], p.bindingNS[ref] = true, b.Namespace
				}
			}
		}
	}
	for _, doc := range docs {
		kind, name := kindOf(t, doc)
		if (kind == "Role" || kind == "ClusterRole") && refs[kind+"/"+name] {
			var r rbacv1.Role // the fields of both
			if err := yaml.Unmarshal(doc, &r); err != nil {
				t.Fatal(err)
			}
			p.rbac = append(p.rbac, doc)
			p.roles[kind+"/"+name] = r.Rules
		}
	}
	return p
}

// grantOn is one access a rule grants, where and on which name.
type grantOn struct {
	access
	namespace, name string
}

// peerGrants are the accesses the plugin's roles grant, but events,
// which predate peers.
func (p *renderedPlugin) peerGrants() []grantOn {
	var out []grantOn
	for ref, rules := range p.roles {
		for _, r := range rules {
			names := r.ResourceNames
			if len(names) == 0 {
				names = []string{""}
			}
			for _, g := range r.APIGroups {
				for _, res := range r.Resources {
					if g == "" && res == "events" {
						continue
					}
					for _, v := range r.Verbs {
						for _, n := range names {
							out = append(out, grantOn{access{g, res, v}, p.bindingNS[ref], n})
						}
					}
				}
			}
		}
	}
	return out
}

// applyServerSide applies YAML documents with server-side apply.
func applyServerSide(t *testing.T, docs [][]byte) {
	t.Helper()
	dc, err := discovery.NewDiscoveryClientForConfig(env.admin)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	for _, doc := range docs {
		var obj map[string]any
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			t.Fatal(err)
		}
		u := &unstructured.Unstructured{Object: obj}
		m, err := mapper.RESTMapping(u.GroupVersionKind().GroupKind(), u.GroupVersionKind().Version)
		if err != nil {
			t.Fatalf("%s %s: %v", u.GetKind(), u.GetName(), err)
		}
		data, err := u.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := env.dyn.Resource(m.Resource).Namespace(u.GetNamespace()).Patch(context.Background(), u.GetName(), types.ApplyPatchType, data,
			metav1.PatchOptions{FieldManager: "fleet-test", Force: ptr.To(true)}); err != nil {
			t.Fatalf("applying %s %s/%s: %v", u.GetKind(), u.GetNamespace(), u.GetName(), err)
		}
	}
}

// may asks the authorizer whether a service account may do g.
func may(ctx context.Context, user string, g grantOn) (bool, error) {
	saNS, _, _ := strings.Cut(strings.TrimPrefix(user, "system:serviceaccount:"), ":")
	ns := g.namespace
	if ns == "" && g.resource != "tokenreviews" {
		ns = "any"
	}
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:   user,
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + saNS, "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{
			Namespace: ns, Verb: g.verb, Group: g.group, Resource: g.resource, Name: g.name,
		},
	}}
	got, err := env.kube.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
	if err != nil {
		return false, err
	}
	return got.Status.Allowed, nil
}

// TestDeploy_PeerRBAC_AsTheNodePlugin applies the node plugin's account
// and its roles and bindings as `kustomize build deploy/kubernetes`
// renders them (the Helm chart renders the same: test/manifests), and
// then, authenticated with a token of that account, does what --peers
// does through pkg/holders and pkg/peer: claims, renews, waits on, commits
// and evicts a Lease until the last holder deletes it, watches the peer
// Service's EndpointSlices, creates and reads the CA Secret --peer-ca-secret
// names, and reviews a peer's token. Nothing it does is forbidden, every
// right the roles grant is used, and it can neither read another Secret
// nor change the CA nor reach past its namespace.
func TestDeploy_PeerRBAC_AsTheNodePlugin(t *testing.T) {
	ensureRBAC(t) // the namespace
	p := renderNodePlugin(t)
	applyServerSide(t, p.rbac)
	user := serviceAccountUser(p.namespace, p.account)
	grants := p.peerGrants()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := poll(ctx, func() error {
		for _, g := range grants {
			if ok, err := may(ctx, user, g); err != nil || !ok {
				return fmt.Errorf("%s may not yet %s %q in %q (%v)", user, g.access, g.name, g.namespace, err)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	tenant := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "tenant-creds", Namespace: p.namespace}, StringData: map[string]string{"AWS_SECRET_ACCESS_KEY": "x"}}
	if _, err := env.kube.CoreV1().Secrets(p.namespace).Create(ctx, tenant, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, s := range []string{tenant.Name, p.caSecret} {
			_ = env.kube.CoreV1().Secrets(p.namespace).Delete(context.Background(), s, metav1.DeleteOptions{})
		}
	})

	rec := &recorder{}
	plugin := recordedAccount(t, p.namespace, p.account, rec)
	t.Run("Leases", func(t *testing.T) { peerLeases(ctx, t, plugin, p.namespace, rec) })
	t.Run("Members", func(t *testing.T) { peerMembers(ctx, t, plugin, p.namespace, p.service) })
	t.Run("CA", func(t *testing.T) {
		first, err := peer.LoadOrCreateCA(ctx, plugin, p.namespace, p.caSecret)
		if err != nil {
			t.Fatal(err)
		}
		again, err := peer.LoadOrCreateCA(ctx, plugin, p.namespace, p.caSecret)
		if err != nil || !bytes.Equal(first.Cert.Raw, again.Cert.Raw) {
			t.Fatalf("reading the CA back: %v (same: %v)", err, err == nil && bytes.Equal(first.Cert.Raw, again.Cert.Raw))
		}
	})
	t.Run("TokenReview", func(t *testing.T) {
		id, err := peer.TokenReviewer{Kube: plugin}.Review(ctx, mintToken(t, p.namespace, p.account, peer.Audience))
		if err != nil || !id.Authenticated || id.Username != user {
			t.Fatalf("reviewing a peer's token: %+v, %v; want %s authenticated", id, err, user)
		}
	})
	reqs := rec.requests()
	t.Run("sufficient: nothing forbidden", func(t *testing.T) {
		for _, r := range reqs {
			if r.code == http.StatusForbidden {
				t.Errorf("forbidden: %s", r)
			}
		}
	})
	t.Run("least: every granted verb used", func(t *testing.T) {
		used := map[access]bool{}
		for _, r := range reqs {
			used[r.access] = r.code < 300 || used[r.access]
			if r.watchList {
				// A streaming list is an informer's list here (see
				// TestReconciler_AsItsServiceAccount).
				used[access{r.group, r.resource, "list"}] = true
			}
		}
		for _, g := range grants {
			if !used[g.access] {
				t.Errorf("deploy/ grants the node plugin %s, which peers never did successfully", g.access)
			}
		}
		if t.Failed() {
			t.Logf("the plugin's requests:\n%s", requestLog(reqs))
		}
	})
	t.Run("refused", func(t *testing.T) { peerRefusals(ctx, t, asAccount(t, p.namespace, p.account), p, tenant.Name) })
}

// peerLeases runs pkg/holders as two node plugins over one content key,
// from the first claim until the last holder's eviction deletes the Lease.
func peerLeases(ctx context.Context, t *testing.T, plugin kubernetes.Interface, ns string, rec *recorder) {
	regs := make([]*holders.Registry, 2)
	for i := range regs {
		r, err := holders.New(plugin.CoordinationV1(), holders.Options{Namespace: ns, Node: fmt.Sprintf("node-%c", 'a'+i)})
		if err != nil {
			t.Fatal(err)
		}
		regs[i] = r
	}
	const key = "modelcache content key v1\x00deploy-test"
	if claimed, _, err := regs[0].Claim(ctx, key); err != nil || !claimed {
		t.Fatalf("Claim: %v, %v; want the first claim", claimed, err)
	}
	if err := regs[0].Renew(ctx, key); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() {
		_, err := regs[1].Wait(ctx, key, func(st holders.State) bool { return len(st.Holders) > 0 })
		waited <- err
	}()
	// Commit only once the waiting node watches, so that it sees the
	// commit through its watch.
	if err := poll(ctx, func() error {
		for _, r := range rec.requests() {
			if r.resource == "leases" && r.verb == "watch" {
				return nil
			}
		}
		return fmt.Errorf("node-b does not watch the Lease yet")
	}); err != nil {
		t.Fatal(err)
	}
	if err := regs[0].Committed(ctx, key); err != nil {
		t.Fatal(err)
	}
	if err := <-waited; err != nil {
		t.Fatalf("Wait: %v", err)
	}
	// What a plugin reads at start-up (Cache.RegisterHeld).
	if l, err := regs[0].List(ctx); err != nil || !l.Mine[key] {
		t.Fatalf("List: %+v, %v; want the key among node-a's", l, err)
	}
	for _, step := range []func(context.Context, string) error{regs[1].Committed, regs[0].Evicted, regs[1].Evicted} {
		if err := step(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	_, err := env.kube.CoordinationV1().Leases(ns).Get(ctx, holders.LeaseName(key), metav1.GetOptions{})
	if !apierrors.IsNotFound(err) {
		t.Fatalf("the Lease outlived its last holder: %v", err)
	}
}

// peerMembers watches the peer Service's EndpointSlices as the plugin and
// sees a slice the endpoint slice controller would write.
func peerMembers(ctx context.Context, t *testing.T, plugin kubernetes.Interface, ns, service string) {
	m, err := holders.WatchMembers(ctx, plugin, ns, service, "peer")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Stop()
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: service + "-deploy-test", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("peer"), Port: ptr.To[int32](9443)}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.7"}, NodeName: ptr.To("node-a"),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}},
	}
	if _, err := env.kube.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = env.kube.DiscoveryV1().EndpointSlices(ns).Delete(context.Background(), slice.Name, metav1.DeleteOptions{})
	})
	if err := poll(ctx, func() error {
		if addr, ok := m.Addr("node-a"); !ok || addr != "10.0.0.7:9443" {
			return fmt.Errorf("Addr(node-a) = %q, %v", addr, ok)
		}
		return nil
	}); err != nil {
		t.Fatalf("the watch never delivered the slice: %v", err)
	}
}

// peerRefusals: what the plugin's account must not do. 403 each, never
// 404: a 404 would mean it may look.
func peerRefusals(ctx context.Context, t *testing.T, plugin kubernetes.Interface, p *renderedPlugin, tenantSecret string) {
	secrets := plugin.CoreV1().Secrets(p.namespace)
	ca, err := secrets.Get(ctx, p.caSecret, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("getting the CA Secret: %v", err)
	}
	lease := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: "elsewhere"}}
	for what, call := range map[string]func() error{
		"get a tenant's Secret in its namespace": func() error {
			_, err := secrets.Get(ctx, tenantSecret, metav1.GetOptions{})
			return err
		},
		"list Secrets": func() error { _, err := secrets.List(ctx, metav1.ListOptions{}); return err },
		"watch Secrets": func() error {
			w, err := secrets.Watch(ctx, metav1.ListOptions{})
			if err == nil {
				w.Stop()
			}
			return err
		},
		"update the CA": func() error { _, err := secrets.Update(ctx, ca, metav1.UpdateOptions{}); return err },
		"delete the CA": func() error { return secrets.Delete(ctx, p.caSecret, metav1.DeleteOptions{}) },
		"get a Secret in kube-system": func() error {
			_, err := plugin.CoreV1().Secrets("kube-system").Get(ctx, p.caSecret, metav1.GetOptions{})
			return err
		},
		"create a Secret in default": func() error {
			_, err := plugin.CoreV1().Secrets("default").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, metav1.CreateOptions{})
			return err
		},
		"create a Lease in default": func() error {
			_, err := plugin.CoordinationV1().Leases("default").Create(ctx, lease, metav1.CreateOptions{})
			return err
		},
		"get an EndpointSlice by name": func() error {
			_, err := plugin.DiscoveryV1().EndpointSlices(p.namespace).Get(ctx, p.service, metav1.GetOptions{})
			return err
		},
		"list EndpointSlices elsewhere": func() error {
			_, err := plugin.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{})
			return err
		},
	} {
		if err := call(); !apierrors.IsForbidden(err) {
			t.Errorf("the node plugin's account could %s: %v (status %d), want 403", what, err, statusCode(err))
		}
	}
}
