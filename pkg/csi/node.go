package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/metrics"
	"github.com/modelcache/modelcache/pkg/names"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/units"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// Volume attributes (docs/design.md "Names"), kept in pkg/names for the
// packages that must not link this one.
const (
	AttrModelURI   = names.AttrModelURI
	AttrPullPolicy = names.AttrPullPolicy
	AttrDigest     = names.AttrDigest

	podNameKey      = "csi.storage.k8s.io/pod.name"
	podNamespaceKey = "csi.storage.k8s.io/pod.namespace"
	podUIDKey       = "csi.storage.k8s.io/pod.uid"
)

// PullPolicy values (the pullPolicy volume attribute).
const (
	PullIfNotPresent = cache.PullIfNotPresent
	PullAlways       = cache.PullAlways
	PullNever        = cache.PullNever
)

// Node serves the CSI Node service: it validates requests, calls the
// node's cache and maps its errors to CSI codes.
type Node struct {
	csi.UnimplementedNodeServer
	NodeID   string
	Resolver source.Resolver
	Cache    *cache.Cache
	// Metrics and Events may be nil: both are optional.
	Metrics *metrics.Metrics
	Events  *kube.Events
	// KubeletDir, when set, is the directory every target path must be
	// under (kubelet's root directory).
	KubeletDir string
	// RequirePodInfo refuses publishes without kubelet's pod keys
	// (podInfoOnMount), which events, listings and audits rely on.
	RequirePodInfo bool
}

// publishArgs are a validated NodePublishVolume request.
type publishArgs struct {
	volumeID, target       string
	uri, policy, digest    string
	podName, podNS, podUID string
	hash                   string // identifies the arguments for ALREADY_EXISTS
}

// maxVolumeContext bounds the volume_context a publish may carry, as the
// CSI spec bounds its maps (4 KiB).
const maxVolumeContext = 4096

func (n *Node) parsePublish(req *csi.NodePublishVolumeRequest) (publishArgs, error) {
	a, err := parsePublish(req)
	if err != nil {
		return a, err
	}
	if n.KubeletDir != "" && !strings.HasPrefix(a.target, filepath.Clean(n.KubeletDir)+"/") {
		return a, status.Errorf(codes.InvalidArgument, "target_path %q is outside the kubelet directory %s; kubelet only publishes under it (set --kubelet-dir if your kubelet uses another root)", a.target, n.KubeletDir)
	}
	if n.RequirePodInfo && (a.podName == "" || a.podNS == "" || a.podUID == "") {
		return a, status.Errorf(codes.InvalidArgument, "volume_context lacks kubelet's pod information (%s, %s, %s): set podInfoOnMount: true in the CSIDriver object %s", podNameKey, podNamespaceKey, podUIDKey, DriverName)
	}
	return a, nil
}

func parsePublish(req *csi.NodePublishVolumeRequest) (publishArgs, error) {
	a := publishArgs{volumeID: req.GetVolumeId(), target: req.GetTargetPath()}
	switch {
	case a.volumeID == "":
		return a, status.Error(codes.InvalidArgument, "volume_id is required")
	case a.target == "":
		return a, status.Error(codes.InvalidArgument, "target_path is required")
	case !filepath.IsAbs(a.target) || filepath.Clean(a.target) != a.target:
		return a, status.Errorf(codes.InvalidArgument, "target_path %q must be an absolute, clean path", a.target)
	}
	vc := req.GetVolumeCapability()
	if vc == nil {
		return a, status.Error(codes.InvalidArgument, "volume_capability is required")
	}
	if vc.GetBlock() != nil {
		return a, status.Error(codes.InvalidArgument, "block access is not supported: a model cache volume is a read-only directory; use a mount volume")
	}
	if vc.GetMount() == nil {
		return a, status.Error(codes.InvalidArgument, "volume_capability must request mount access")
	}
	ctx := req.GetVolumeContext()
	size := 0
	for k, v := range ctx {
		size += len(k) + len(v)
	}
	if size > maxVolumeContext {
		return a, status.Errorf(codes.InvalidArgument, "volume_context is %d bytes; the limit is %d", size, maxVolumeContext)
	}
	m, err := parseModelRef(ctx, "volume attribute")
	if err != nil {
		return a, status.Errorf(codes.InvalidArgument, "%v", err)
	}
	a.uri, a.policy, a.digest = m.URI, m.Policy, m.Digest
	a.podName, a.podNS, a.podUID = ctx[podNameKey], ctx[podNamespaceKey], ctx[podUIDKey]
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s\x00%s\x00%t\x00%s", a.volumeID, a.uri, a.policy, a.digest, req.GetReadonly(), vc.GetAccessMode().GetMode())
	a.hash = hex.EncodeToString(h.Sum(nil))
	return a, nil
}

// NodePublishVolume validates the request, fetches the model through the
// node's cache (downloading it once per node when needed), mounts its tree
// read-only at the target and records the reference.
func (n *Node) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (_ *csi.NodePublishVolumeResponse, err error) {
	start := time.Now()
	defer func() { n.Metrics.Publish(status.Code(err).String()) }()
	a, err := n.parsePublish(req)
	if err != nil {
		return nil, err
	}
	pod := kube.PodRef{Namespace: a.podNS, Name: a.podName, UID: a.podUID}
	p, err := n.Cache.PublishVolume(waitContext(ctx), cache.PublishRequest{
		Target: a.target, VolumeID: a.volumeID, ArgsHash: a.hash, URI: a.uri,
		Resolve: func(ctx context.Context) (source.Remote, error) {
			return n.Resolver.Resolve(ctx, a.uri, req.GetSecrets())
		},
		Policy: a.policy, Digest: a.digest,
		PodName: a.podName, PodNamespace: a.podNS, PodUID: a.podUID,
		Observer: &podEvents{events: n.Events, pod: pod, uri: a.uri},
	})
	if p.Fetched {
		// A request that waited for another's download needed one: a miss.
		n.Metrics.Lookup(p.Hit)
	}
	if err != nil {
		return nil, publishError(a.uri, err)
	}
	if !p.Fetched {
		return &csi.NodePublishVolumeResponse{}, nil // published already
	}
	klog.InfoS("published", "volume", a.volumeID, "target", a.target, "model", a.uri,
		"tree", p.Tree.Digest, "cacheHit", p.Hit, "took", time.Since(start))
	return &csi.NodePublishVolumeResponse{}, nil
}

// podEvents reports a publish's fetch as events on its pod.
type podEvents struct {
	events   *kube.Events
	pod      kube.PodRef
	uri      string
	revision string // set by Resolved before Hit or Started
}

func (p *podEvents) Resolved(revision string) { p.revision = revision }
func (p *podEvents) Hit(t cache.ModelTree) {
	p.events.CacheHit(p.pod, p.uri, p.revision, t.Digest, t.Size)
}
func (p *podEvents) Started(total int64) {
	p.events.DownloadStarted(p.pod, p.uri, total)
}
func (p *podEvents) Progress(done, total int64, rate float64) {
	p.events.DownloadProgress(p.pod, p.uri, done, total, rate)
}
func (p *podEvents) Finished(t cache.ModelTree, took time.Duration, checks cache.Checks, from cache.BytesFrom) {
	detail := checksText(checks)
	if f := fromText(from); f != "" {
		detail = f + "; " + detail
	}
	p.events.DownloadFinished(p.pod, p.uri, p.revision, t.Digest, t.Size, took, detail)
}

// fromText says, for a pod event, where a download's bytes came from when
// peers sent any ("" when the origin sent them all, as without peers): the
// origin's bytes, then the peers', by node.
func fromText(f cache.BytesFrom) string {
	if f.Peers == 0 {
		return ""
	}
	var nodes []string
	named := int64(0)
	for _, n := range f.Nodes {
		nodes = append(nodes, fmt.Sprintf("%s %s", n.Node, units.Bytes(n.Bytes)))
		named += n.Bytes
	}
	if others := f.Peers - named; others > 0 {
		nodes = append(nodes, fmt.Sprintf("other nodes %s", units.Bytes(others)))
	}
	return fmt.Sprintf("%s from the origin, %s from peers (%s)", units.Bytes(f.Origin), units.Bytes(f.Peers), strings.Join(nodes, ", "))
}

// checksText says, for a pod event, how a download's bytes were checked.
func checksText(c cache.Checks) string {
	if c.MD5+c.Remote+c.Unchecked == 0 {
		return "every object linked from earlier downloads"
	}
	var parts []string
	if c.MD5 > 0 {
		parts = append(parts, fmt.Sprintf("%d objects checked against the remote's MD5", c.MD5))
	}
	if c.Remote > 0 {
		parts = append(parts, fmt.Sprintf("%d objects checked against a checksum asked of the remote (S3 x-amz-checksum-*, multipart ETag, GCS crc32c)", c.Remote))
	}
	if c.Unchecked > 0 {
		parts = append(parts, fmt.Sprintf("%d had no checksum at the remote and were not checked", c.Unchecked))
	}
	return strings.Join(parts, "; ")
}
func (p *podEvents) Failed(err error) {
	p.events.DownloadFailed(p.pod, p.uri, status.Convert(publishError(p.uri, err)).Message())
}

// waitContext ends a little before the RPC deadline so the non-final
// "still downloading" answer reaches kubelet before kubelet gives up.
func waitContext(ctx context.Context) context.Context {
	d, ok := ctx.Deadline()
	if !ok {
		return ctx
	}
	margin := min(time.Until(d)/10, 2*time.Second)
	wctx, cancel := context.WithDeadline(ctx, d.Add(-margin))
	context.AfterFunc(wctx, cancel)
	return wctx
}

// NodeUnpublishVolume unmounts the target and removes it. Unknown and
// already-unmounted targets are OK (the "idempotent publish" invariant).
func (n *Node) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "target_path is required")
	case !filepath.IsAbs(target):
		return nil, status.Errorf(codes.InvalidArgument, "target_path %q must be absolute", target)
	}
	// References are keyed by the clean path, as publish requires it.
	target = filepath.Clean(target)
	if err := n.Cache.ReleaseTarget(target); err != nil {
		return nil, status.Errorf(codes.Internal, "unpublishing volume %s: %v", id, err)
	}
	klog.InfoS("unpublished", "volume", id, "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports the model's size and whether its mount is healthy.
func (n *Node) NodeGetVolumeStats(_ context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id, p := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	case p == "":
		return nil, status.Error(codes.InvalidArgument, "volume_path is required")
	}
	v, ok, err := n.Cache.Volume(filepath.Clean(p))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "reading state for %s: %v", p, err)
	}
	if !ok || v.Ref.VolumeID != id {
		return nil, status.Errorf(codes.NotFound, "volume %s is not published at %s on this node", id, p)
	}
	cond := &csi.VolumeCondition{Message: fmt.Sprintf("model %s mounted read-only from %s", v.Ref.URI, v.Ref.Tree)}
	switch {
	case !v.TreePresent:
		cond.Abnormal, cond.Message = true, fmt.Sprintf("tree %s is missing from the cache; delete the pod to publish again", v.Ref.Tree)
	case !v.Mounted:
		cond.Abnormal, cond.Message = true, fmt.Sprintf("%s is not mounted from tree %s; delete the pod to publish again", v.Ref.TargetPath, v.Ref.Tree)
	}
	return &csi.NodeGetVolumeStatsResponse{
		Usage: []*csi.VolumeUsage{
			{Unit: csi.VolumeUsage_BYTES, Total: v.Size, Used: v.Size},
			{Unit: csi.VolumeUsage_INODES, Total: int64(v.Files), Used: int64(v.Files)},
		},
		VolumeCondition: cond,
	}, nil
}

// NodeGetCapabilities implements csi.NodeServer.
func (n *Node) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, c := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_VOLUME_CONDITION,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: c}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// NodeGetInfo implements csi.NodeServer.
func (n *Node) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: n.NodeID}, nil
}
