package csi

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/keymutex"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/source"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// CreateVolume parameters the external-provisioner adds when it runs with
// --extra-create-metadata.
const (
	pvcNameKey      = "csi.storage.k8s.io/pvc/name"
	pvcNamespaceKey = "csi.storage.k8s.io/pvc/namespace"
)

// ParamAllowedModelURIPrefixes is the StorageClass parameter that lets
// claims name their own model: comma-separated modelUris under which a
// claim's model-uri annotation must fall, on whole path segments. Without
// it a claim cannot change the class's model: the class's node-publish
// secret may be shared platform credentials, and a claim choosing the
// model would read anything they reach.
const ParamAllowedModelURIPrefixes = "allowedModelUriPrefixes"

// ClaimReader reads the modelcache annotations of a PVC (pkg/kube).
type ClaimReader interface {
	Annotations(ctx context.Context, namespace, name string) (map[string]string, error)
}

// Controller serves the CSI Controller service for StorageClass-backed
// volumes. A volume here is a reference to a model, not allocated storage:
// CreateVolume works out which model the claim names, checks it, and hands
// it to the nodes in volume_context. Nothing is downloaded until a node
// publishes the volume, and then through the same cache as inline volumes.
type Controller struct {
	csi.UnimplementedControllerServer
	// Resolver lists the model to report its size when the StorageClass
	// names a provisioner secret.
	Resolver source.Resolver
	// Volumes records created volumes for CreateVolume's idempotency rules.
	Volumes cache.VolumeRecords
	// Claims reads PVC annotations; nil when not running in a cluster.
	Claims ClaimReader

	names keymutex.Map
}

// readerModes are the access modes a read-only model cache can honour.
var readerModes = map[csi.VolumeCapability_AccessMode_Mode]bool{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY: true,
	csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:  true,
}

// checkCapabilities returns why caps cannot be honoured, or nil.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	for _, c := range caps {
		switch {
		case c.GetBlock() != nil:
			return errors.New("block access is not supported: a modelcache volume is a read-only directory; use volumeMode: Filesystem")
		case c.GetMount() == nil:
			return errors.New("each volume capability must request mount access")
		case !readerModes[c.GetAccessMode().GetMode()]:
			return fmt.Errorf("access mode %s is not supported: a modelcache volume is a read-only model cache; use ReadOnlyMany (MULTI_NODE_READER_ONLY) or a single-node reader mode", c.GetAccessMode().GetMode())
		}
	}
	return nil
}

// CreateVolume implements csi.ControllerServer.
func (c *Controller) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	switch {
	case name == "":
		return nil, status.Error(codes.InvalidArgument, "name is required")
	case len(req.GetVolumeCapabilities()) == 0:
		return nil, status.Error(codes.InvalidArgument, "volume_capabilities are required")
	case req.GetVolumeContentSource() != nil:
		return nil, status.Error(codes.InvalidArgument, "volume content sources (snapshots, clones) are not supported: a modelcache volume's content is its model; remove dataSource from the claim")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "%v", err)
	}
	required, limit := req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes()
	if required < 0 || limit < 0 || (limit > 0 && required > limit) {
		return nil, status.Errorf(codes.InvalidArgument, "capacity range [%d, %d] bytes is not a valid range", required, limit)
	}
	ref, err := c.modelRef(ctx, req.GetParameters())
	if err != nil {
		return nil, err
	}
	id := volumeIDForName(name)
	unlock := c.names.Lock(id)
	defer unlock()

	prev, ok, err := c.Volumes.Volume(id)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "reading the record of volume %s: %v", name, err)
	}
	if ok {
		if prev.SpecHash != ref.hash() || !fits(prev.Capacity, required, limit) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s already exists for model %s with capacity %d bytes; this request asks for model %s with capacity [%d, %d]: delete the volume first or use another name", name, prev.Context[AttrModelURI], prev.Capacity, ref.URI, required, limit)
		}
		return createResponse(prev), nil
	}

	size, err := c.modelSize(ctx, ref, req.GetSecrets())
	if err != nil {
		return nil, err
	}
	capacity := size
	switch {
	case size == 0:
		// Unknown: the CO uses the claim's request.
	case limit > 0 && size > limit:
		return nil, status.Errorf(codes.OutOfRange, "model %s is %d bytes, more than the claim's limit of %d bytes; raise the claim's storage limit", ref.URI, size, limit)
	case size < required:
		// The model fits in what the claim asked for, and Kubernetes
		// refuses to bind a volume smaller than its claim.
		capacity = required
	}
	vol := cache.VolumeRecord{ID: id, Name: name, SpecHash: ref.hash(), Capacity: capacity, Context: ref.volumeContext(), Created: time.Now()}
	if err := c.Volumes.PutVolume(vol); err != nil {
		return nil, status.Errorf(codes.Internal, "recording volume %s: %v", name, err)
	}
	klog.InfoS("volume created", "name", name, "volume", id, "model", ref.URI, "modelBytes", size, "capacity", capacity)
	return createResponse(vol), nil
}

// fits reports whether a recorded capacity satisfies a capacity range.
func fits(capacity, required, limit int64) bool {
	if capacity == 0 {
		return true // unknown: the CO sized the volume from the claim
	}
	return capacity >= required && (limit == 0 || capacity <= limit)
}

func createResponse(v cache.VolumeRecord) *csi.CreateVolumeResponse {
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId:      v.ID,
		CapacityBytes: v.Capacity,
		VolumeContext: v.Context,
	}}
}

// modelRef works out the model a claim names: the StorageClass parameters,
// overridden by the claim's annotations when the provisioner passes the
// claim's name and namespace, as far as the class allows.
func (c *Controller) modelRef(ctx context.Context, params map[string]string) (modelRef, error) {
	class := make(map[string]string, len(params))
	for k, v := range params {
		class[k] = v
	}
	if err := checkClassKeys(class); err != nil {
		return modelRef{}, status.Errorf(codes.InvalidArgument, "%v", err)
	}
	allowed, err := allowedPrefixes(class)
	if err != nil {
		return modelRef{}, status.Errorf(codes.InvalidArgument, "%v", err)
	}
	delete(class, ParamAllowedModelURIPrefixes)
	pvcName, pvcNS := params[pvcNameKey], params[pvcNamespaceKey]
	if pvcName != "" && pvcNS != "" && c.Claims != nil {
		ann, err := c.Claims.Annotations(ctx, pvcNS, pvcName)
		if err != nil {
			if errors.Is(err, kube.ErrClaimNotFound) {
				return modelRef{}, status.Errorf(codes.NotFound, "%v; the claim was deleted while its volume was being provisioned", err)
			}
			return modelRef{}, status.Errorf(codes.Unavailable, "reading the annotations of claim %s/%s: %v; the provisioner will retry", pvcNS, pvcName, err)
		}
		if err := checkClaimAnnotations(ann); err != nil {
			return modelRef{}, status.Errorf(codes.InvalidArgument, "claim %s/%s: %v", pvcNS, pvcName, err)
		}
		if err := checkOverride(class, ann, allowed); err != nil {
			return modelRef{}, status.Errorf(codes.InvalidArgument, "claim %s/%s: %v", pvcNS, pvcName, err)
		}
		overrideFromClaim(class, ann)
	}
	if class[AttrModelURI] == "" {
		return modelRef{}, status.Errorf(codes.InvalidArgument, "no model named: set the StorageClass parameter %s, or annotate the claim with %s, list the prefixes claims may choose from in the StorageClass parameter %s and run the external-provisioner with --extra-create-metadata", AttrModelURI, kube.AnnotationModelURI, ParamAllowedModelURIPrefixes)
	}
	ref, err := parseModelRef(class, "StorageClass parameter")
	if err != nil {
		return modelRef{}, status.Errorf(codes.InvalidArgument, "%v", err)
	}
	return ref, nil
}

// checkClaimAnnotations validates a claim's annotations in the claim's own
// words, so its author is not sent to a StorageClass they may not own.
func checkClaimAnnotations(ann map[string]string) error {
	names := map[string]string{AttrModelURI: kube.AnnotationModelURI, AttrPullPolicy: kube.AnnotationPullPolicy, AttrDigest: kube.AnnotationDigest}
	return checkModelValues(ann[kube.AnnotationModelURI], ann[kube.AnnotationPullPolicy], ann[kube.AnnotationDigest], func(attr string) string {
		return "annotation " + names[attr]
	})
}

// checkClassKeys refuses a StorageClass parameter that is neither a model
// attribute nor ParamAllowedModelURIPrefixes, naming every one there is,
// as checkModelAttrs does for the model attributes alone. Namespaced keys
// ("csi.storage.k8s.io/...") are Kubernetes' own.
func checkClassKeys(class map[string]string) error {
	for _, k := range slices.Sorted(maps.Keys(class)) {
		switch {
		case strings.Contains(k, "/"), k == AttrModelURI, k == AttrPullPolicy, k == AttrDigest, k == ParamAllowedModelURIPrefixes:
		default:
			return fmt.Errorf("unknown StorageClass parameter %q: the StorageClass parameters are %s, %s, %s and %s", k, AttrModelURI, AttrPullPolicy, AttrDigest, ParamAllowedModelURIPrefixes)
		}
	}
	return nil
}

// allowedPrefixes parses the class's ParamAllowedModelURIPrefixes: nil
// when the class does not set it, so no claim may choose the model.
func allowedPrefixes(class map[string]string) ([]source.URI, error) {
	v, ok := class[ParamAllowedModelURIPrefixes]
	if !ok {
		return nil, nil
	}
	var out []source.URI
	for _, s := range strings.Split(v, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		u, err := source.ParseURI(s)
		if err != nil {
			return nil, fmt.Errorf("StorageClass parameter %s: %w", ParamAllowedModelURIPrefixes, err)
		}
		out = append(out, u)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("StorageClass parameter %s is empty: list the modelUri prefixes claims may choose models under, comma-separated (e.g. \"mys3:models/team-a,s3://public-models\"), or remove it so claims cannot choose", ParamAllowedModelURIPrefixes)
	}
	return out, nil
}

// checkOverride refuses a claim's annotations that would take the volume
// beyond what its class allows: a model outside the class's allowed
// prefixes, or any model or digest that drops the class's digest pin. A
// pin names the class model's content; a claim may name another URI only
// for that same content, by pinning the same digest.
func checkOverride(class, ann map[string]string, allowed []source.URI) error {
	classPin := class[AttrDigest]
	if d := ann[kube.AnnotationDigest]; d != "" && classPin != "" && d != classPin {
		return fmt.Errorf("annotation %s is %s, but the StorageClass pins %s: remove the annotation, or use a StorageClass without a digest pin", kube.AnnotationDigest, d, classPin)
	}
	uri := ann[kube.AnnotationModelURI]
	if uri == "" {
		return nil
	}
	// Checked by checkClaimAnnotations before.
	want, err := source.ParseURI(uri)
	if err != nil {
		return fmt.Errorf("annotation %s: %w", kube.AnnotationModelURI, err)
	}
	if cu, err := source.ParseURI(class[AttrModelURI]); err == nil && cu.String() == want.String() {
		return nil // the class's own model: nothing is overridden
	}
	if allowed == nil {
		return fmt.Errorf("annotation %s names model %s, but its StorageClass does not let claims choose the model: remove the annotation, or ask the cluster administrator to list allowed modelUri prefixes in the StorageClass parameter %s", kube.AnnotationModelURI, want, ParamAllowedModelURIPrefixes)
	}
	if !slices.ContainsFunc(allowed, want.Within) {
		names := make([]string, len(allowed))
		for i, a := range allowed {
			names[i] = a.String()
		}
		return fmt.Errorf("annotation %s names model %s, which is not under the prefixes its StorageClass allows (%s): name a model under one of them", kube.AnnotationModelURI, want, strings.Join(names, ", "))
	}
	if classPin != "" && ann[kube.AnnotationDigest] != classPin {
		return fmt.Errorf("annotation %s names model %s, but the StorageClass pins digest %s: another model would never match it; annotate %s with that digest if %s holds the same content, or use a StorageClass without a digest pin", kube.AnnotationModelURI, want, classPin, kube.AnnotationDigest, want)
	}
	return nil
}

// overrideFromClaim applies a claim's annotations, checked by
// checkOverride, over the class parameters. The class's digest pin stays:
// checkOverride let through only annotations that keep it.
func overrideFromClaim(params, ann map[string]string) {
	if uri := ann[kube.AnnotationModelURI]; uri != "" {
		params[AttrModelURI] = uri
	}
	if p := ann[kube.AnnotationPullPolicy]; p != "" {
		params[AttrPullPolicy] = p
	}
	if d := ann[kube.AnnotationDigest]; d != "" {
		params[AttrDigest] = d
	}
}

// modelSize lists the model with the provisioner secret to report its size,
// and fails early when the remote says the model or the credentials are
// wrong. Without a provisioner secret the size is unknown (0).
func (c *Controller) modelSize(ctx context.Context, ref modelRef, secrets map[string]string) (int64, error) {
	if len(secrets) == 0 {
		return 0, nil
	}
	remote, err := c.Resolver.Resolve(ctx, ref.URI, secrets)
	if err != nil {
		return 0, provisionError(ref.URI, err)
	}
	m, err := remote.List(ctx)
	if err != nil {
		return 0, provisionError(ref.URI, err)
	}
	return m.Size(), nil
}

// DeleteVolume implements csi.ControllerServer. Nothing was allocated, so
// deleting forgets the record; unknown IDs are already gone.
func (c *Controller) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	if checkVolumeID(id) != nil {
		return &csi.DeleteVolumeResponse{}, nil
	}
	unlock := c.names.Lock(id)
	defer unlock()
	if err := c.Volumes.DeleteVolume(id); err != nil {
		return nil, status.Errorf(codes.Internal, "forgetting volume %s: %v", id, err)
	}
	klog.InfoS("volume deleted", "volume", id)
	return &csi.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities implements csi.ControllerServer.
func (c *Controller) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	case len(req.GetVolumeCapabilities()) == 0:
		return nil, status.Error(codes.InvalidArgument, "volume_capabilities are required")
	}
	if err := checkVolumeID(id); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist: %v", id, err)
	}
	if _, ok, err := c.Volumes.Volume(id); err != nil {
		return nil, status.Errorf(codes.Internal, "reading the record of volume %s: %v", id, err)
	} else if !ok {
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist (deleted, or created by a controller whose records were lost)", id)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	params := maps.Clone(req.GetParameters())
	if err := checkClassKeys(params); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	if _, err := allowedPrefixes(params); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	delete(params, ParamAllowedModelURIPrefixes)
	if err := checkModelAttrs(params, "StorageClass parameter"); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// ControllerGetCapabilities implements csi.ControllerServer.
func (c *Controller) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{{
		Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{
			Type: csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		}},
	}}}, nil
}
