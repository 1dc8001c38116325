package nodes

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/modelcache/modelcache/pkg/peer"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
)

// Names the node plugin looks for by default (its --peer-* flags).
const (
	ServiceAccount = "modelcache-node"
	PeerService    = "modelcache-peers"
	PeerPortName   = "peer"
	PeerPort       = 9443
	// apiServerName is a name the API server's certificate holds: nodes
	// reach it through the hub's address, which it does not.
	apiServerName = "kubernetes.default.svc"
)

// rules are what the node plugin needs with --peers (docs/design.md
// "Peers"): in its namespace, Leases (holders), EndpointSlices (members)
// and Secrets get/create (the CA); in the cluster, TokenReviews (the peer
// gate) and events on pods.
var (
	namespaceRules = []rbacv1.PolicyRule{
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"get", "list", "watch", "create", "update", "delete"}},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"get", "create"}},
	}
	clusterRules = []rbacv1.PolicyRule{
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create", "patch", "update"}},
	}
)

// setupKube creates the fleet's namespace, the plugin's account and its
// rights, and the headless Service, and waits until the authorizer
// grants those rights.
func setupKube(ctx context.Context, kube kubernetes.Interface, ns string) error {
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating namespace %s: %w", ns, err)
	}
	if err := CreateServiceAccount(ctx, kube, ns, ServiceAccount); err != nil {
		return err
	}
	subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: ServiceAccount, Namespace: ns}}
	cr := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: ns}, Rules: clusterRules}
	crb := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: ns}, Subjects: subject,
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: ns}}
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: ServiceAccount, Namespace: ns}, Rules: namespaceRules}
	rb := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: ServiceAccount, Namespace: ns}, Subjects: subject,
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: ServiceAccount}}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: PeerService, Namespace: ns}, Spec: corev1.ServiceSpec{
		ClusterIP: corev1.ClusterIPNone,
		Ports:     []corev1.ServicePort{{Name: PeerPortName, Port: PeerPort, Protocol: corev1.ProtocolTCP}},
	}}
	var err error
	if _, err = kube.RbacV1().ClusterRoles().Create(ctx, cr, metav1.CreateOptions{}); err == nil {
		_, err = kube.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{})
	}
	if err == nil {
		_, err = kube.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{})
	}
	if err == nil {
		_, err = kube.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{})
	}
	if err == nil {
		_, err = kube.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	}
	if err != nil {
		return fmt.Errorf("creating the node plugin's rights and Service in %s: %w", ns, err)
	}
	return waitGranted(ctx, kube, ns)
}

// waitGranted waits until the API server's RBAC authorizer, fed by
// informers a moment behind the writes, grants the plugin every rule.
func waitGranted(ctx context.Context, kube kubernetes.Interface, ns string) error {
	user := "system:serviceaccount:" + ns + ":" + ServiceAccount
	check := func(rules []rbacv1.PolicyRule, inNS string) error {
		for _, r := range rules {
			for _, verb := range r.Verbs {
				sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
					User: user, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
					ResourceAttributes: &authorizationv1.ResourceAttributes{Namespace: inNS, Verb: verb, Group: r.APIGroups[0], Resource: r.Resources[0]},
				}}
				got, err := kube.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
				if err != nil {
					return err
				}
				if !got.Status.Allowed {
					return fmt.Errorf("%s may not yet %s %s", user, verb, r.Resources[0])
				}
			}
		}
		return nil
	}
	for {
		err := check(namespaceRules, ns)
		if err == nil {
			err = check(clusterRules, "default")
		}
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for RBAC: %w", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// CreateServiceAccount creates an account (an existing one is fine).
func CreateServiceAccount(ctx context.Context, kube kubernetes.Interface, ns, name string) error {
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}
	if _, err := kube.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating service account %s/%s: %w", ns, name, err)
	}
	return nil
}

// Token asks the API server for a token of an account, for audiences
// (none: the API server's own), valid for an hour.
func Token(ctx context.Context, kube kubernetes.Interface, ns, sa string, audiences ...string) (string, error) {
	tr, err := kube.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: ptr.To[int64](3600)}},
		metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("a token for %s/%s: %w", ns, sa, err)
	}
	return tr.Status.Token, nil
}

// Member is one endpoint of the peer Service: a node and its address.
type Member struct {
	Node, IP string
	Port     int
}

// writeMembers makes the EndpointSlices of the peer Service list members,
// ready, one slice per port (no endpoint slice controller runs here: the
// fleet plays it).
func writeMembers(ctx context.Context, kube kubernetes.Interface, ns string, members []Member) error {
	byPort := map[int][]Member{}
	for _, m := range members {
		byPort[m.Port] = append(byPort[m.Port], m)
	}
	slices := kube.DiscoveryV1().EndpointSlices(ns)
	for port, ms := range byPort {
		es := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("%s-%d", PeerService, port), Namespace: ns,
				Labels: map[string]string{discoveryv1.LabelServiceName: PeerService}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: ptr.To(PeerPortName), Port: ptr.To(int32(port)), Protocol: ptr.To(corev1.ProtocolTCP)}},
		}
		for _, m := range ms {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{m.IP}, NodeName: ptr.To(m.Node),
				Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}})
		}
		old, err := slices.Get(ctx, es.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = slices.Create(ctx, es, metav1.CreateOptions{})
		case err == nil:
			es.ResourceVersion = old.ResourceVersion
			_, err = slices.Update(ctx, es, metav1.UpdateOptions{})
		}
		if err != nil {
			return fmt.Errorf("writing the EndpointSlice of the peer Service: %w", err)
		}
	}
	return nil
}

// writeKubeconfig writes a kubeconfig for a node plugin: the API server
// at server (the hub's relay to it), checked as apiServerName, with a
// token of the plugin's account.
func writeKubeconfig(path, server string, admin *rest.Config, token string) error {
	ca := admin.CAData
	if len(ca) == 0 && admin.CAFile != "" {
		b, err := os.ReadFile(admin.CAFile)
		if err != nil {
			return fmt.Errorf("reading the API server's CA: %w", err)
		}
		ca = b
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["fleet"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca, TLSServerName: apiServerName}
	cfg.AuthInfos["node"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["fleet"] = &clientcmdapi.Context{Cluster: "fleet", AuthInfo: "node"}
	cfg.CurrentContext = "fleet"
	return clientcmd.WriteToFile(*cfg, path)
}

// PeerCA reads the CA the node plugins made (in the Secret they share).
func PeerCA(ctx context.Context, kube kubernetes.Interface, ns string) (*peer.CA, error) {
	return peer.LoadOrCreateCA(ctx, kube, ns, "modelcache-peer-ca")
}
