package kube_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/modelcache/modelcache/pkg/kube"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func pvc(namespace, name string, annotations map[string]string) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Annotations: annotations},
	}
}

// Unit tests with the client-go fake clientset.
func TestAnnotations(t *testing.T) {
	tests := []struct {
		name        string
		annotations map[string]string
		want        map[string]string
	}{
		{
			name: "all three modelcache annotations",
			annotations: map[string]string{
				kube.AnnotationModelURI:   "mys3:models/bert",
				kube.AnnotationPullPolicy: "IfNotPresent",
				kube.AnnotationDigest:     "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
			},
			want: map[string]string{
				kube.AnnotationModelURI:   "mys3:models/bert",
				kube.AnnotationPullPolicy: "IfNotPresent",
				kube.AnnotationDigest:     "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
			},
		},
		{
			name: "unrelated annotations left out",
			annotations: map[string]string{
				kube.AnnotationModelURI:                            "s3://bucket/llama",
				"kubectl.kubernetes.io/last-applied-configuration": `{"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"annotations":{"secret":"x"}}}`,
				"volume.kubernetes.io/storage-provisioner":         "modelcache.csi.dev",
				"volume.beta.kubernetes.io/storage-provisioner":    "modelcache.csi.dev",
				"modelcache.csi.dev/other":                         "not one of ours",
				"modelcache.csi.dev/model-uri-extra":               "prefix match is not a match",
			},
			want: map[string]string{kube.AnnotationModelURI: "s3://bucket/llama"},
		},
		{
			name: "only unrelated annotations",
			annotations: map[string]string{
				"volume.kubernetes.io/storage-provisioner": "modelcache.csi.dev",
			},
			want: map[string]string{},
		},
		{
			name: "empty values are present",
			annotations: map[string]string{
				kube.AnnotationModelURI:   "",
				kube.AnnotationPullPolicy: "",
				kube.AnnotationDigest:     "",
			},
			want: map[string]string{
				kube.AnnotationModelURI:   "",
				kube.AnnotationPullPolicy: "",
				kube.AnnotationDigest:     "",
			},
		},
		{
			name:        "no annotations",
			annotations: nil,
			want:        map[string]string{},
		},
		{
			name:        "empty annotation map",
			annotations: map[string]string{},
			want:        map[string]string{},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client := fake.NewClientset(pvc("serving", "bert-claim", tt.annotations))
			got, err := kube.NewClaims(client).Annotations(context.Background(), "serving", "bert-claim")
			if err != nil {
				t.Fatalf("Annotations: %v", err)
			}
			if got == nil {
				t.Fatal("Annotations returned a nil map")
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Annotations = %v, want %v", got, tt.want)
			}
		})
	}
}

// The returned map is the caller's own: changing it does not change what
// the next call sees.
func TestAnnotationsReturnsCopy(t *testing.T) {
	client := fake.NewClientset(pvc("ns", "c", map[string]string{kube.AnnotationModelURI: "u"}))
	claims := kube.NewClaims(client)
	first, err := claims.Annotations(context.Background(), "ns", "c")
	if err != nil {
		t.Fatal(err)
	}
	first[kube.AnnotationModelURI] = "changed"
	first["injected"] = "x"
	second, err := claims.Annotations(context.Background(), "ns", "c")
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]string{kube.AnnotationModelURI: "u"}; !reflect.DeepEqual(second, want) {
		t.Errorf("second Annotations = %v, want %v", second, want)
	}
}

func TestAnnotationsNotFound(t *testing.T) {
	client := fake.NewClientset(pvc("serving", "bert-claim", map[string]string{kube.AnnotationModelURI: "u"}))
	tests := []struct{ name, namespace, claim string }{
		{"wrong namespace", "default", "bert-claim"},
		{"wrong name", "serving", "gpt-claim"},
		{"empty cluster namespace", "nowhere", "x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := kube.NewClaims(client).Annotations(context.Background(), tt.namespace, tt.claim)
			if !errors.Is(err, kube.ErrClaimNotFound) {
				t.Fatalf("err = %v, want ErrClaimNotFound", err)
			}
			if got != nil {
				t.Errorf("annotations = %v alongside an error", got)
			}
			if want := tt.namespace + "/" + tt.claim; !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not name %s", err, want)
			}
		})
	}
}

// API errors other than NotFound are passed up wrapped, never mistaken for
// a missing claim.
func TestAnnotationsAPIError(t *testing.T) {
	gr := schema.GroupResource{Resource: "persistentvolumeclaims"}
	tests := []struct {
		name  string
		err   error
		check func(error) bool
	}{
		{"internal", apierrors.NewInternalError(errors.New("etcd unavailable")), apierrors.IsInternalError},
		{"forbidden", apierrors.NewForbidden(gr, "bert-claim", errors.New("RBAC: get not allowed")), apierrors.IsForbidden},
		{"unauthorized", apierrors.NewUnauthorized("token expired"), apierrors.IsUnauthorized},
		{"timeout", apierrors.NewTimeoutError("slow", 1), apierrors.IsTimeout},
		{"plain error", errors.New("connection refused"), func(error) bool { return true }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client := fake.NewClientset(pvc("serving", "bert-claim", map[string]string{kube.AnnotationModelURI: "u"}))
			client.PrependReactor("get", "persistentvolumeclaims", func(k8stesting.Action) (bool, runtime.Object, error) {
				return true, nil, tt.err
			})
			got, err := kube.NewClaims(client).Annotations(context.Background(), "serving", "bert-claim")
			if err == nil {
				t.Fatalf("Annotations = %v, want an error", got)
			}
			if got != nil {
				t.Errorf("annotations = %v alongside an error", got)
			}
			if errors.Is(err, kube.ErrClaimNotFound) {
				t.Errorf("err = %v; an API failure must not read as a missing claim", err)
			}
			if !errors.Is(err, tt.err) || !tt.check(err) {
				t.Errorf("err = %v; want it to wrap %v", err, tt.err)
			}
			if !strings.Contains(err.Error(), "serving/bert-claim") {
				t.Errorf("error %q does not name serving/bert-claim", err)
			}
		})
	}
}

// A NotFound from the API (as the real server returns it) is the sentinel.
func TestAnnotationsNotFoundFromReactor(t *testing.T) {
	client := fake.NewClientset()
	client.PrependReactor("get", "persistentvolumeclaims", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewNotFound(schema.GroupResource{Resource: "persistentvolumeclaims"}, "c")
	})
	_, err := kube.NewClaims(client).Annotations(context.Background(), "ns", "c")
	if !errors.Is(err, kube.ErrClaimNotFound) {
		t.Errorf("err = %v, want ErrClaimNotFound", err)
	}
}

// Annotations asks for exactly the claim it was given.
func TestAnnotationsRequest(t *testing.T) {
	client := fake.NewClientset(pvc("serving", "bert-claim", nil))
	if _, err := kube.NewClaims(client).Annotations(context.Background(), "serving", "bert-claim"); err != nil {
		t.Fatal(err)
	}
	actions := client.Actions()
	if len(actions) != 1 {
		t.Fatalf("%d API calls, want 1: %v", len(actions), actions)
	}
	get, ok := actions[0].(k8stesting.GetAction)
	if !ok || get.GetVerb() != "get" || get.GetResource().Resource != "persistentvolumeclaims" ||
		get.GetNamespace() != "serving" || get.GetName() != "bert-claim" {
		t.Errorf("API call = %#v, want get persistentvolumeclaims serving/bert-claim", actions[0])
	}
}

// apiServer is a loopback stand-in for the API server that serves PVCs as
// JSON and records the User-Agent of every request.
type apiServer struct {
	*httptest.Server
	mu         sync.Mutex
	userAgents []string
	paths      []string
}

func newAPIServer(t *testing.T, claims ...*corev1.PersistentVolumeClaim) *apiServer {
	t.Helper()
	s := &apiServer{}
	byPath := map[string]*corev1.PersistentVolumeClaim{}
	for _, c := range claims {
		byPath["/api/v1/namespaces/"+c.Namespace+"/persistentvolumeclaims/"+c.Name] = c
	}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.userAgents = append(s.userAgents, r.UserAgent())
		s.paths = append(s.paths, r.URL.Path)
		s.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		c, ok := byPath[r.URL.Path]
		if r.Method != http.MethodGet || !ok {
			w.WriteHeader(http.StatusNotFound)
			_ = json.NewEncoder(w).Encode(&metav1.Status{
				TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
				Status:   metav1.StatusFailure, Reason: metav1.StatusReasonNotFound, Code: http.StatusNotFound,
				Message: "persistentvolumeclaims not found",
			})
			return
		}
		out := c.DeepCopy()
		out.TypeMeta = metav1.TypeMeta{Kind: "PersistentVolumeClaim", APIVersion: "v1"}
		_ = json.NewEncoder(w).Encode(out)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *apiServer) requests() (userAgents, paths []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.userAgents...), append([]string(nil), s.paths...)
}

func writeKubeconfig(t *testing.T, server string) string {
	t.Helper()
	const tmpl = `apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: SERVER
contexts:
- name: test
  context:
    cluster: test
    user: test
current-context: test
users:
- name: test
  user:
    token: not-a-real-token
`
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, []byte(strings.Replace(tmpl, "SERVER", server, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Connect with a kubeconfig file talks to the server it names, as
// modelcache-csi.
func TestConnectKubeconfig(t *testing.T) {
	srv := newAPIServer(t, pvc("serving", "bert-claim", map[string]string{
		kube.AnnotationModelURI:                    "mys3:models/bert",
		kube.AnnotationDigest:                      "",
		"volume.kubernetes.io/storage-provisioner": "modelcache.csi.dev",
	}))
	claims, err := kube.Connect(writeKubeconfig(t, srv.URL))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}

	got, err := claims.Annotations(context.Background(), "serving", "bert-claim")
	if err != nil {
		t.Fatalf("Annotations: %v", err)
	}
	want := map[string]string{kube.AnnotationModelURI: "mys3:models/bert", kube.AnnotationDigest: ""}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Annotations = %v, want %v", got, want)
	}

	_, err = claims.Annotations(context.Background(), "default", "bert-claim")
	if !errors.Is(err, kube.ErrClaimNotFound) {
		t.Errorf("Annotations of a claim the server does not have: err = %v, want ErrClaimNotFound", err)
	}

	userAgents, paths := srv.requests()
	wantPaths := []string{
		"/api/v1/namespaces/serving/persistentvolumeclaims/bert-claim",
		"/api/v1/namespaces/default/persistentvolumeclaims/bert-claim",
	}
	if !reflect.DeepEqual(paths, wantPaths) {
		t.Errorf("request paths = %v, want %v", paths, wantPaths)
	}
	for _, ua := range userAgents {
		if ua != "modelcache-csi" {
			t.Errorf("User-Agent = %q, want modelcache-csi", ua)
		}
	}
}

// A cancelled context stops the request before it reaches the server.
func TestConnectCancelledContext(t *testing.T) {
	srv := newAPIServer(t, pvc("ns", "c", map[string]string{kube.AnnotationModelURI: "u"}))
	claims, err := kube.Connect(writeKubeconfig(t, srv.URL))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	got, err := claims.Annotations(ctx, "ns", "c")
	if err == nil {
		t.Fatalf("Annotations with a cancelled context = %v, want an error", got)
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want it to wrap context.Canceled", err)
	}
	if errors.Is(err, kube.ErrClaimNotFound) {
		t.Errorf("err = %v; a cancelled request must not read as a missing claim", err)
	}
	if !strings.Contains(err.Error(), "ns/c") {
		t.Errorf("error %q does not name ns/c", err)
	}
}

func TestConnectErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, []byte("this: [is not a kubeconfig"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, kubeconfig string }{
		{"nonexistent file", filepath.Join(dir, "does-not-exist")},
		{"directory", dir},
		{"not a kubeconfig", garbage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if c, err := kube.Connect(tt.kubeconfig); err == nil {
				t.Fatalf("Connect(%s) = %v, want an error", tt.kubeconfig, c)
			}
		})
	}
}

// Without a kubeconfig, Connect needs the in-cluster environment.
func TestConnectInClusterOutsideCluster(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	c, err := kube.Connect("")
	if err == nil {
		t.Fatalf("Connect(\"\") outside a cluster = %v, want an error", c)
	}
	if !strings.Contains(err.Error(), "configuration") {
		t.Errorf("error %q does not say the client configuration failed", err)
	}
}
