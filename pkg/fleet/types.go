// Package fleet warms chosen nodes with a model declared as a CachedModel
// (modelcache.csi.dev/v1alpha1). Kubernetes does the fan-out: for each
// CachedModel the reconciler owns one DaemonSet of holder pods, each
// mounting the model through an ordinary CSI inline volume with the
// CachedModel's secret as nodePublishSecretRef. Kubelet reads that secret
// under its node authorization, the node plugin downloads the model once
// through its normal publish path, the mount keeps the tree from eviction
// while the holder runs, and a holder is Ready exactly when its node holds
// the model. Model servers follow the holders with pod affinity.
package fleet

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// The API, as deploy/kubernetes/cachedmodel-crd.yaml defines it.
const (
	Group   = "modelcache.csi.dev"
	Version = "v1alpha1"
	Kind    = "CachedModel"
)

// Resource is the CachedModels' resource for dynamic clients.
var Resource = schema.GroupVersionResource{Group: Group, Version: Version, Resource: "cachedmodels"}

// CachedModel asks for a model to be held in the cache of every node its
// selector and tolerations admit.
type CachedModel struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              Spec   `json:"spec"`
	Status            Status `json:"status,omitempty"`
}

// Spec is what the user asks for.
type Spec struct {
	ModelURI          string              `json:"modelUri"`
	SecretRef         *SecretRef          `json:"secretRef,omitempty"`
	PullPolicy        string              `json:"pullPolicy,omitempty"`
	Digest            string              `json:"digest,omitempty"`
	NodeSelector      map[string]string   `json:"nodeSelector,omitempty"`
	Tolerations       []corev1.Toleration `json:"tolerations,omitempty"`
	PriorityClassName string              `json:"priorityClassName,omitempty"`
}

// SecretRef names a Secret in the CachedModel's namespace holding the keys
// a pod's nodePublishSecretRef would (RCLONE_CONFIG_<REMOTE>_*, AWS_*).
type SecretRef struct {
	Name string `json:"name"`
}

// Status is what the reconciler observed.
type Status struct {
	ObservedGeneration int64  `json:"observedGeneration,omitempty"`
	DesiredNodes       int32  `json:"desiredNodes"`
	ReadyNodes         int32  `json:"readyNodes"`
	Ready              string `json:"ready,omitempty"` // "3/5", for kubectl get
	Digest             string `json:"digest,omitempty"`
	// Revision is the Hub commit or OCI manifest digest the modelUri
	// resolved to on the node that reported the tree.
	Revision   string             `json:"revision,omitempty"`
	Size       string             `json:"size,omitempty"` // "14.2 GiB", for kubectl get
	SizeBytes  int64              `json:"sizeBytes,omitempty"`
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Condition types.
const (
	ConditionReady       = "Ready"
	ConditionProgressing = "Progressing"
	ConditionDegraded    = "Degraded"
)

// FromUnstructured converts what a dynamic client returns.
func FromUnstructured(u *unstructured.Unstructured) (*CachedModel, error) {
	var cm CachedModel
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &cm); err != nil {
		return nil, fmt.Errorf("decoding CachedModel %s/%s: %w", u.GetNamespace(), u.GetName(), err)
	}
	return &cm, nil
}

// statusObject is the status as a dynamic client writes it.
func statusObject(s Status) (map[string]any, error) {
	return runtime.DefaultUnstructuredConverter.ToUnstructured(&s)
}
