package fleet_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/pkg/peer/peertest"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
)

// The node plugin's account in the peer tests, in a namespace of their own.
const (
	peerNS     = "peer"
	peerSA     = "modelcache-node"
	peerSecret = "modelcache-peer-ca"
)

var peerOnce struct {
	sync.Once
	err error
}

// ensurePeerAccounts creates the peer tests' namespace, the plugin's
// account, the plugin's account name in another namespace and an account
// of a tenant, and gives the plugin's account what the peer endpoint
// needs and no more: create TokenReviews, get and create Secrets in its
// namespace (for the CA). It waits until the authorizer has them.
func ensurePeerAccounts(t *testing.T) {
	t.Helper()
	peerOnce.Do(func() { peerOnce.err = createPeerAccounts() })
	if peerOnce.err != nil {
		t.Fatalf("creating the peer tests' accounts: %v", peerOnce.err)
	}
}

func createPeerAccounts() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, ns := range []string{peerNS, peerNS + "-other"} {
		if _, err := env.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	for _, sa := range []struct{ ns, name string }{{peerNS, peerSA}, {peerNS, "tenant"}, {peerNS + "-other", peerSA}} {
		o := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa.name, Namespace: sa.ns}}
		if _, err := env.kube.CoreV1().ServiceAccounts(sa.ns).Create(ctx, o, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: peerSA, Namespace: peerNS}}
	cr := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "modelcache-peer-test-review"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}}}}
	crb := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: cr.Name}, Subjects: subject,
		RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: cr.Name}}
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "modelcache-peer-ca", Namespace: peerNS},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"get", "create"}}}}
	rb := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: role.Name, Namespace: peerNS}, Subjects: subject,
		RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name}}
	if _, err := env.kube.RbacV1().ClusterRoles().Create(ctx, cr, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := env.kube.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := env.kube.RbacV1().Roles(peerNS).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		return err
	}
	if _, err := env.kube.RbacV1().RoleBindings(peerNS).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		return err
	}
	user := serviceAccountUser(peerNS, peerSA)
	return poll(ctx, func() error {
		for _, a := range []struct {
			ns string
			access
		}{
			{"any", access{"authentication.k8s.io", "tokenreviews", "create"}},
			{peerNS, access{"", "secrets", "get"}},
			{peerNS, access{"", "secrets", "create"}},
		} {
			if ok, err := allowedIn(ctx, user, a.ns, a.access); err != nil || !ok {
				return fmt.Errorf("%s may not yet %s (%v)", user, a.access, err)
			}
		}
		return nil
	})
}

// allowedIn asks the authorizer whether user (a service account) may do
// a in namespace ns.
func allowedIn(ctx context.Context, user, ns string, a access) (bool, error) {
	saNS, _, _ := strings.Cut(strings.TrimPrefix(user, "system:serviceaccount:"), ":")
	sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
		User:               user,
		Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + saNS, "system:authenticated"},
		ResourceAttributes: &authorizationv1.ResourceAttributes{Namespace: ns, Verb: a.verb, Group: a.group, Resource: a.resource},
	}}
	got, err := env.kube.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
	if err != nil {
		return false, err
	}
	return got.Status.Allowed, nil
}

// mintToken asks the API server for a token of an account, for audiences
// (none: the API server's own).
func mintToken(t *testing.T, ns, sa string, audiences ...string) string {
	t.Helper()
	tr, err := env.kube.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: ptr.To[int64](600)}},
		metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("a token for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}

// dirBlobs serves a directory's files as blobs.
type dirBlobs string

func (d dirBlobs) OpenBlob(sum string) (*os.File, error) {
	return os.Open(filepath.Join(string(d), sum))
}

type noObjects struct{}

func (noObjects) LookupObject(string) (string, bool, error) { return "", false, nil }

type staticToken string

func (s staticToken) Token() (string, error) { return string(s), nil }

// startPeerEndpoint serves a peer endpoint for the plugin's account on
// loopback, with the real TokenReviewer and ServingConfig, as the plugin's
// account; it returns the address and the CA.
func startPeerEndpoint(t *testing.T, plugin kubernetes.Interface, blobs string) (string, *peer.CA) {
	t.Helper()
	ctx := context.Background()
	ca, err := peer.LoadOrCreateCA(ctx, plugin, peerNS, peerSecret)
	if err != nil {
		t.Fatalf("LoadOrCreateCA as the plugin's account: %v", err)
	}
	srv, err := peer.NewServer(peer.Config{Blobs: dirBlobs(blobs), Objects: noObjects{},
		Reviewer: peer.TokenReviewer{Kube: plugin}, Namespace: peerNS, ServiceAccount: peerSA})
	if err != nil {
		t.Fatal(err)
	}
	conf, err := peer.ServingConfig(ca, "node-a", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return peertest.ServeTLS(t, srv, conf), ca
}

// TestPeer_TokenReviewGate: a peer endpoint with the real TokenReview
// reviewer, running as the plugin's account with only the rights it
// needs, serves a blob range over TLS (ServingConfig, ClientConfig) to a
// token of the plugin's account for the audience modelcache-peer, and
// nothing to a token for another audience, of another account, of the
// same account name in another namespace, or to no token.
func TestPeer_TokenReviewGate(t *testing.T) {
	ensurePeerAccounts(t)
	plugin := asAccount(t, peerNS, peerSA)
	dir := t.TempDir()
	content := bytes.Repeat([]byte("modelcache peer bytes "), 1000)
	h := sha256.Sum256(content)
	sum := hex.EncodeToString(h[:])
	if err := os.WriteFile(filepath.Join(dir, sum), content, 0o444); err != nil {
		t.Fatal(err)
	}
	addr, ca := startPeerEndpoint(t, plugin, dir)
	clientTLS, err := peer.ClientConfig(ca)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		token  string
		status int // 0: served
	}{
		{name: "plugin, peer audience", token: mintToken(t, peerNS, peerSA, peer.Audience)},
		{name: "plugin, peer audience among others", token: mintToken(t, peerNS, peerSA, "other", peer.Audience)},
		{name: "plugin, the API server's audience", token: mintToken(t, peerNS, peerSA), status: 401},
		{name: "plugin, another audience", token: mintToken(t, peerNS, peerSA, "modelcache-peer-not"), status: 401},
		{name: "tenant account, peer audience", token: mintToken(t, peerNS, "tenant", peer.Audience), status: 403},
		{name: "plugin's name in another namespace", token: mintToken(t, peerNS+"-other", peerSA, peer.Audience), status: 403},
		{name: "not a token", token: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", status: 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &peer.Client{TLS: clientTLS, Tokens: staticToken(tt.token)}
			rc, err := c.OpenRange(context.Background(), addr, sum, 100, 1000)
			if tt.status == 0 {
				if err != nil {
					t.Fatalf("OpenRange: %v", err)
				}
				defer rc.Close()
				got, err := io.ReadAll(rc)
				if err != nil || !bytes.Equal(got, content[100:1100]) {
					t.Fatalf("read %d bytes, %v; want bytes 100-1099 of the blob", len(got), err)
				}
				return
			}
			var se *peer.StatusError
			if !errors.As(err, &se) || se.Status != tt.status || !errors.Is(err, peer.ErrRefused) {
				t.Fatalf("error %v, want %d (ErrRefused)", err, tt.status)
			}
		})
	}
}

// recordedAccount is asAccount with every request recorded.
func recordedAccount(t *testing.T, namespace, account string, rec *recorder) kubernetes.Interface {
	t.Helper()
	token := mintToken(t, namespace, account)
	cfg := &rest.Config{Host: env.admin.Host, BearerToken: token,
		TLSClientConfig: rest.TLSClientConfig{CAData: env.admin.CAData, CAFile: env.admin.CAFile}}
	cfg.Wrap(rec.wrap)
	k, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestPeer_LoadOrCreateCAConcurrent: node plugins starting at once, each
// finding no CA, end with one CA: the first Secret created.
func TestPeer_LoadOrCreateCAConcurrent(t *testing.T) {
	ensurePeerAccounts(t)
	rec := &recorder{}
	plugins := []kubernetes.Interface{recordedAccount(t, peerNS, peerSA, rec), recordedAccount(t, peerNS, peerSA, rec)}
	for round := range 3 {
		name := fmt.Sprintf("peer-ca-race-%d", round)
		cas := make([]*peer.CA, len(plugins))
		errs := make([]error, len(plugins))
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, kube := range plugins {
			wg.Go(func() {
				<-start
				cas[i], errs[i] = peer.LoadOrCreateCA(context.Background(), kube, peerNS, name)
			})
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d, node %d: %v", round, i, err)
			}
		}
		if !bytes.Equal(cas[0].Cert.Raw, cas[1].Cert.Raw) {
			t.Fatalf("round %d: the nodes hold different CAs", round)
		}
		s, err := env.kube.CoreV1().Secrets(peerNS).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if s.Type != corev1.SecretTypeTLS || !bytes.Contains(s.Data[corev1.TLSCertKey], []byte("CERTIFICATE")) {
			t.Errorf("round %d: Secret of type %s", round, s.Type)
		}
	}
	// Only reads and creates: no node overwrites another's CA.
	raced := 0
	for _, r := range rec.requests() {
		if r.verb != "get" && r.verb != "create" {
			t.Errorf("%s: LoadOrCreateCA only reads and creates", r)
		}
		if r.code == http.StatusConflict {
			raced++
		}
	}
	t.Logf("%d of 3 rounds ran into AlreadyExists", raced)
	// The plugin's account may not read other Secrets than in its namespace.
	_, err := plugins[0].CoreV1().Secrets("kube-system").Get(context.Background(), "any", metav1.GetOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("the plugin's account reads Secrets in kube-system: %v, want 403", err)
	}
}
