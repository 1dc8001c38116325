// Package kube is the driver's client of the Kubernetes API (client-go) for
// volumes: it reads the annotations of the PVC a volume is being provisioned
// for, and records events on the pods a node downloads models for.
// CachedModels are pkg/fleet's.
package kube

import (
	"context"
	"errors"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// PVC annotations that name the model for one claim, overriding the
// StorageClass parameters of the same meaning as far as the StorageClass
// allows: a model only under its allowedModelUriPrefixes, a digest only
// where it pins none (pkg/csi decides).
const (
	AnnotationModelURI   = "modelcache.csi.dev/model-uri"
	AnnotationPullPolicy = "modelcache.csi.dev/pull-policy"
	AnnotationDigest     = "modelcache.csi.dev/digest"
)

// ErrClaimNotFound is returned when the PVC does not exist (any more).
var ErrClaimNotFound = errors.New("persistent volume claim not found")

// Claims reads PVCs.
type Claims struct {
	client kubernetes.Interface
}

// NewClaims returns a Claims reading through client.
func NewClaims(client kubernetes.Interface) *Claims {
	return &Claims{client: client}
}

// Connect builds a Claims from a kubeconfig file, or from the pod's service
// account when kubeconfig is empty.
func Connect(kubeconfig string) (*Claims, error) {
	client, err := NewClient(kubeconfig)
	if err != nil {
		return nil, err
	}
	return NewClaims(client), nil
}

// NewClient builds a clientset from a kubeconfig file, or from the pod's
// service account when kubeconfig is empty.
func NewClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := RestConfig(kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating Kubernetes client: %w", err)
	}
	return client, nil
}

// RestConfig is the client configuration from a kubeconfig file, or from
// the pod's service account when kubeconfig is empty.
func RestConfig(kubeconfig string) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("loading Kubernetes client configuration: %w", err)
	}
	cfg.UserAgent = "modelcache-csi"
	return cfg, nil
}

// Annotations returns the modelcache annotations of a PVC; annotations of
// other owners are left out so nothing unrelated travels further.
func (c *Claims) Annotations(ctx context.Context, namespace, name string) (map[string]string, error) {
	pvc, err := c.client.CoreV1().PersistentVolumeClaims(namespace).Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, fmt.Errorf("%w: %s/%s", ErrClaimNotFound, namespace, name)
	case err != nil:
		return nil, fmt.Errorf("reading persistent volume claim %s/%s: %w", namespace, name, err)
	}
	out := map[string]string{}
	for _, k := range []string{AnnotationModelURI, AnnotationPullPolicy, AnnotationDigest} {
		if v, ok := pvc.Annotations[k]; ok {
			out[k] = v
		}
	}
	return out, nil
}
