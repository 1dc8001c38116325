package fleet

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"github.com/modelcache/modelcache/pkg/names"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// Labels and annotations on what the reconciler creates.
const (
	// LabelCachedModel is on every holder pod: model servers' pod affinity
	// selects it (modelcache.csi.dev/cachedmodel: <name>).
	LabelCachedModel = "modelcache.csi.dev/cachedmodel"
	// LabelManagedBy tells the reconciler's DaemonSets from any other.
	LabelManagedBy = "app.kubernetes.io/managed-by"
	managedBy      = "modelcache"
	// annotationSpecHash is the hash of the DaemonSet the reconciler last
	// wrote: a change in the CachedModel (or the image) rewrites it.
	annotationSpecHash = "modelcache.csi.dev/spec-hash"
)

const (
	holderMount = "/model"
	holderUID   = 65532 // the "nonroot" user of distroless images
)

// HolderName is the DaemonSet of a CachedModel; its pods are named after it.
func HolderName(cachedModel string) string {
	const prefix = "cachedmodel-"
	// A DaemonSet's pods add a 6-character suffix to a 63-character name.
	if len(prefix)+len(cachedModel) <= 57 {
		return prefix + cachedModel
	}
	return prefix + cachedModel[:34] + "-" + shortHash(cachedModel)
}

// LabelValue is the CachedModel's name as a label value (63 characters at most).
func LabelValue(cachedModel string) string {
	if len(cachedModel) <= 63 {
		return cachedModel
	}
	return cachedModel[:52] + "-" + shortHash(cachedModel)
}

func shortHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:5])
}

// Holders is the DaemonSet that holds cm's model on every node it admits.
// Its pods run image's driver binary (/usr/local/bin, as the Dockerfile puts it) idling (--mode=hold): no privileges,
// no service account token, a few MiB of memory.
func Holders(cm *CachedModel, image string) *appsv1.DaemonSet {
	labels := map[string]string{LabelCachedModel: LabelValue(cm.Name)}
	attrs := map[string]string{names.AttrModelURI: cm.Spec.ModelURI}
	if cm.Spec.PullPolicy != "" {
		attrs[names.AttrPullPolicy] = cm.Spec.PullPolicy
	}
	if cm.Spec.Digest != "" {
		attrs[names.AttrDigest] = cm.Spec.Digest
	}
	vol := &corev1.CSIVolumeSource{Driver: names.DriverName, ReadOnly: ptr.To(true), VolumeAttributes: attrs}
	if cm.Spec.SecretRef != nil && cm.Spec.SecretRef.Name != "" {
		vol.NodePublishSecretRef = &corev1.LocalObjectReference{Name: cm.Spec.SecretRef.Name}
	}
	pod := corev1.PodSpec{
		AutomountServiceAccountToken:  ptr.To(false),
		EnableServiceLinks:            ptr.To(false),
		TerminationGracePeriodSeconds: ptr.To[int64](5),
		NodeSelector:                  cm.Spec.NodeSelector,
		Tolerations:                   cm.Spec.Tolerations,
		PriorityClassName:             cm.Spec.PriorityClassName,
		SecurityContext: &corev1.PodSecurityContext{
			RunAsNonRoot:   ptr.To(true),
			RunAsUser:      ptr.To[int64](holderUID),
			RunAsGroup:     ptr.To[int64](holderUID),
			SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
		Containers: []corev1.Container{{
			Name:    "hold",
			Image:   image,
			Command: []string{"/usr/local/bin/modelcache-csi", "--mode=hold"},
			Resources: corev1.ResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1m"), corev1.ResourceMemory: resource.MustParse("8Mi")},
				Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("32Mi")},
			},
			SecurityContext: &corev1.SecurityContext{
				AllowPrivilegeEscalation: ptr.To(false),
				ReadOnlyRootFilesystem:   ptr.To(true),
				Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			},
			VolumeMounts: []corev1.VolumeMount{{Name: "model", MountPath: holderMount, ReadOnly: true}},
		}},
		Volumes: []corev1.Volume{{Name: "model", VolumeSource: corev1.VolumeSource{CSI: vol}}},
	}
	// A quarter of the holders at a time: a change (a new pullPolicy, a new
	// image) keeps the model held on most nodes while it rolls.
	maxUnavailable := intstr.FromString("25%")
	ds := &appsv1.DaemonSet{
		TypeMeta: metav1.TypeMeta{APIVersion: "apps/v1", Kind: "DaemonSet"},
		ObjectMeta: metav1.ObjectMeta{
			Name:      HolderName(cm.Name),
			Namespace: cm.Namespace,
			Labels:    map[string]string{LabelCachedModel: LabelValue(cm.Name), LabelManagedBy: managedBy},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: Group + "/" + Version, Kind: Kind, Name: cm.Name, UID: cm.UID,
				Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true),
			}},
		},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			UpdateStrategy: appsv1.DaemonSetUpdateStrategy{
				Type:          appsv1.RollingUpdateDaemonSetStrategyType,
				RollingUpdate: &appsv1.RollingUpdateDaemonSet{MaxUnavailable: &maxUnavailable},
			},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: pod},
		},
	}
	ds.Annotations = map[string]string{annotationSpecHash: specHash(ds)}
	return ds
}

// specHash is what decides whether a DaemonSet must be rewritten: the
// parts the reconciler sets, not what the API server defaults.
func specHash(ds *appsv1.DaemonSet) string {
	b, _ := json.Marshal(struct {
		Labels map[string]string
		Spec   appsv1.DaemonSetSpec
	}{ds.Labels, ds.Spec})
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:8])
}
