// Package names holds the names modelcache shares with Kubernetes objects
// and the people who write them (docs/design.md "Names"): the CSI driver's
// name and the volume attributes a pod, a PersistentVolume or a CachedModel's
// holders set. It imports nothing, so a package that needs only a name (the
// CachedModel reconciler, the manifests' tests) does not link the node
// plugin's downloader and database.
package names

// DriverName is the CSI driver's name: the CSIDriver object's, kubelet's
// plugin directory's and every volume's driver field.
const DriverName = "modelcache.csi.dev"

// Volume attributes: the model's URI (required), its pull policy and a pin
// of its content digest. The StorageClass parameters use the same names.
const (
	AttrModelURI   = "modelUri"
	AttrPullPolicy = "pullPolicy"
	AttrDigest     = "digest"
)
