package manifests

import (
	"encoding/json"

	"github.com/modelcache/modelcache/pkg/fleet"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	clientscheme "k8s.io/client-go/kubernetes/scheme"
)

// Minimal typed definitions of the two model-serving custom resources the
// examples use: exactly the fields the examples write, with the upstream
// JSON names, and the pod specs typed as corev1 so a misspelt field in a
// pod spec is a decoding error too. They are not the upstream types (those
// would pull Seldon's and KServe's whole modules into ours); a field an
// example needs is added here first, from the upstream API.

// seldonGV is Seldon Core v1's API group.
var seldonGV = schema.GroupVersion{Group: "machinelearning.seldon.io", Version: "v1"}

// SeldonDeployment is machinelearning.seldon.io/v1 SeldonDeployment
// (github.com/SeldonIO/seldon-core operator/apis/machinelearning.seldon.io/v1).
type SeldonDeployment struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              SeldonDeploymentSpec `json:"spec"`
}

type SeldonDeploymentSpec struct {
	Name       string          `json:"name,omitempty"`
	Protocol   string          `json:"protocol,omitempty"`
	Predictors []PredictorSpec `json:"predictors"`
}

type PredictorSpec struct {
	Name           string          `json:"name"`
	Replicas       *int32          `json:"replicas,omitempty"`
	ComponentSpecs []SeldonPodSpec `json:"componentSpecs,omitempty"`
	Graph          PredictiveUnit  `json:"graph"`
}

type SeldonPodSpec struct {
	Metadata metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec     corev1.PodSpec    `json:"spec"`
}

type PredictiveUnit struct {
	Name             string           `json:"name"`
	Type             string           `json:"type,omitempty"`
	Implementation   string           `json:"implementation,omitempty"`
	ModelURI         string           `json:"modelUri,omitempty"`
	EnvSecretRefName string           `json:"envSecretRefName,omitempty"`
	Children         []PredictiveUnit `json:"children,omitempty"`
}

func (s *SeldonDeployment) DeepCopyObject() runtime.Object { return deepCopy(s) }

// kserveGV is KServe's API group.
var kserveGV = schema.GroupVersion{Group: "serving.kserve.io", Version: "v1beta1"}

// InferenceService is serving.kserve.io/v1beta1 InferenceService
// (github.com/kserve/kserve pkg/apis/serving/v1beta1).
type InferenceService struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              InferenceServiceSpec `json:"spec"`
}

type InferenceServiceSpec struct {
	Predictor KServePredictorSpec `json:"predictor"`
}

// KServePredictorSpec inlines a pod spec (volumes, or containers for a
// custom predictor) as upstream does.
type KServePredictorSpec struct {
	Model          *KServeModelSpec `json:"model,omitempty"`
	corev1.PodSpec `json:",inline"`
	MinReplicas    *int32 `json:"minReplicas,omitempty"`
	MaxReplicas    int32  `json:"maxReplicas,omitempty"`
}

// KServeModelSpec inlines the container overrides merged into the serving
// runtime's container, as upstream's PredictorExtensionSpec does.
type KServeModelSpec struct {
	ModelFormat      KServeModelFormat `json:"modelFormat"`
	Runtime          *string           `json:"runtime,omitempty"`
	StorageURI       *string           `json:"storageUri,omitempty"`
	ProtocolVersion  *string           `json:"protocolVersion,omitempty"`
	corev1.Container `json:",inline"`
}

type KServeModelFormat struct {
	Name    string  `json:"name"`
	Version *string `json:"version,omitempty"`
}

func (s *InferenceService) DeepCopyObject() runtime.Object { return deepCopy(s) }

// deepCopy copies through JSON: enough for objects that are only decoded.
func deepCopy[T any](in *T) *T {
	b, err := json.Marshal(in)
	if err != nil {
		panic(err)
	}
	out := new(T)
	if err := json.Unmarshal(b, out); err != nil {
		panic(err)
	}
	return out
}

// CachedModel is the reconciler's own type, so the examples decode
// against exactly the fields it reads.
type CachedModel struct{ fleet.CachedModel }

func (c *CachedModel) DeepCopyObject() runtime.Object { return deepCopy(c) }

var crdSchemeBuilder = runtime.NewSchemeBuilder(
	apiextensionsv1.AddToScheme,
	func(s *runtime.Scheme) error {
		gv := schema.GroupVersion{Group: fleet.Group, Version: fleet.Version}
		s.AddKnownTypeWithName(gv.WithKind(fleet.Kind), &CachedModel{})
		metav1.AddToGroupVersion(s, gv)
		return nil
	},
	func(s *runtime.Scheme) error {
		s.AddKnownTypes(seldonGV, &SeldonDeployment{})
		metav1.AddToGroupVersion(s, seldonGV)
		return nil
	},
	func(s *runtime.Scheme) error {
		s.AddKnownTypes(kserveGV, &InferenceService{})
		metav1.AddToGroupVersion(s, kserveGV)
		return nil
	},
)

// manifestDecoder decodes client-go's types, CRDs and the custom resources, and
// fails on any field the type does not have and on duplicate fields.
func manifestDecoder() runtime.Decoder {
	sch := runtime.NewScheme()
	if err := clientscheme.AddToScheme(sch); err != nil {
		panic(err)
	}
	if err := crdSchemeBuilder.AddToScheme(sch); err != nil {
		panic(err)
	}
	return serializer.NewCodecFactory(sch, serializer.EnableStrict).UniversalDeserializer()
}
