package fleet_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"
)

const tokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// containerAccounts reads deploy/kubernetes/controller.yaml and returns,
// per container of the controller Deployment, the service account whose
// token it finds at tokenDir: the pod's for a projected
// serviceAccountToken, the annotated one for a
// kubernetes.io/service-account-token Secret.
func containerAccounts(t *testing.T) map[string]string {
	t.Helper()
	var dep *appsv1.Deployment
	tokenSecrets := map[string]string{}
	for _, doc := range manifest(t, "controller.yaml") {
		switch kind, _ := kindOf(t, doc); kind {
		case "Deployment":
			dep = &appsv1.Deployment{}
			if err := yaml.UnmarshalStrict(doc, dep); err != nil {
				t.Fatal(err)
			}
		case "Secret":
			var s corev1.Secret
			if err := yaml.UnmarshalStrict(doc, &s); err != nil {
				t.Fatal(err)
			}
			if s.Type == corev1.SecretTypeServiceAccountToken {
				tokenSecrets[s.Name] = s.Annotations[corev1.ServiceAccountNameKey]
			}
		}
	}
	if dep == nil {
		t.Fatal("deploy/kubernetes/controller.yaml has no Deployment")
	}
	spec := dep.Spec.Template.Spec
	if ptr.Deref(spec.AutomountServiceAccountToken, true) {
		t.Fatal("the controller pod mounts its account's token into every container")
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	out := map[string]string{}
	for _, c := range spec.Containers {
		for _, m := range c.VolumeMounts {
			if m.MountPath != tokenDir {
				continue
			}
			v := volumes[m.Name]
			switch {
			case v.Secret != nil:
				out[c.Name] = tokenSecrets[v.Secret.SecretName]
			case v.Projected != nil:
				for _, s := range v.Projected.Sources {
					if s.ServiceAccountToken != nil {
						out[c.Name] = spec.ServiceAccountName
					}
				}
			}
		}
	}
	return out
}

// asAccount is a client authenticated, as the container would be, by a
// token the API server issued for the service account (TokenRequest: no
// token controller runs here to fill a Secret).
func asAccount(t *testing.T, namespace, account string) kubernetes.Interface {
	t.Helper()
	ctx := context.Background()
	tr, err := env.kube.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, account,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](600)}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("a token for %s/%s: %v", namespace, account, err)
	}
	cfg := &rest.Config{Host: env.admin.Host, BearerToken: tr.Status.Token,
		TLSClientConfig: rest.TLSClientConfig{CAData: env.admin.CAData, CAFile: env.admin.CAFile}}
	k, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestControllerTokens_ModelcacheReadsNoSecret: each container of the
// controller Deployment authenticates with the token deploy/kubernetes
// mounts into it alone. The modelcache container, which parses tenant
// annotations and connects to tenant endpoints, can neither get nor list
// Secrets; csi-provisioner gets the provisioner secret a StorageClass
// names.
func TestControllerTokens_ModelcacheReadsNoSecret(t *testing.T) {
	ensureRBAC(t)
	accounts := containerAccounts(t)
	driverSA, provSA := accounts["modelcache"], accounts["csi-provisioner"]
	if driverSA == "" || provSA == "" || driverSA == provSA {
		t.Fatalf("token accounts per container %v: want one each for modelcache and csi-provisioner, different", accounts)
	}
	const ns = "tokens"
	newNamespace(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "provisioner-creds", Namespace: ns}, StringData: map[string]string{"AWS_SECRET_ACCESS_KEY": "x"}}
	if _, err := env.kube.CoreV1().Secrets(ns).Create(ctx, secret, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	driver, prov := asAccount(t, controllerNamespace, driverSA), asAccount(t, controllerNamespace, provSA)

	// The provisioner's rights reach the authorizer a moment after the
	// bindings (ensureRBAC waited for the reconciler's only).
	eventually(t, 30*time.Second, "csi-provisioner's account reads the provisioner secret", func(ctx context.Context) error {
		_, err := prov.CoreV1().Secrets(ns).Get(ctx, secret.Name, metav1.GetOptions{})
		return err
	})
	for _, ns := range []string{ns, controllerNamespace, "kube-system"} {
		_, err := driver.CoreV1().Secrets(ns).Get(ctx, secret.Name, metav1.GetOptions{})
		if !apierrors.IsForbidden(err) {
			t.Errorf("the modelcache container's account %s gets a secret in %s: %v, want 403", driverSA, ns, err)
		}
		_, err = driver.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
		if !apierrors.IsForbidden(err) {
			t.Errorf("the modelcache container's account %s lists secrets in %s: %v, want 403", driverSA, ns, err)
		}
	}
	// What modelcache does need still works: a claim's annotations (404,
	// not 403, for a claim that does not exist).
	if _, err := driver.CoreV1().PersistentVolumeClaims(ns).Get(ctx, "none", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the modelcache container's account gets a claim: %v (status %d), want 404", err, statusCode(err))
	}
	if _, err := prov.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{}); statusCode(err) != http.StatusForbidden {
		t.Errorf("csi-provisioner's account lists secrets (%v): it needs get only", err)
	}
}
