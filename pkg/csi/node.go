package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/metrics"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// Volume attributes (docs/design.md "Names").
const (
	AttrModelURI   = "modelUri"
	AttrPullPolicy = "pullPolicy"
	AttrDigest     = "digest"

	podNameKey      = "csi.storage.k8s.io/pod.name"
	podNamespaceKey = "csi.storage.k8s.io/pod.namespace"
	podUIDKey       = "csi.storage.k8s.io/pod.uid"
)

// VerifyCredentials values.
const (
	VerifyAlways        = "Always"
	VerifyIfNotRecorded = "IfNotRecorded"
	VerifyNever         = "Never"
)

// PullPolicy values.
const (
	PullIfNotPresent = "IfNotPresent"
	PullAlways       = "Always"
	PullNever        = "Never"
)

// Node serves the CSI Node service.
type Node struct {
	csi.UnimplementedNodeServer
	NodeID   string
	Resolver source.Resolver
	Store    *store.Store
	State    *state.DB
	Mounter  mount.Mounter
	// Metrics and Events may be nil: both are optional.
	Metrics *metrics.Metrics
	Events  *kube.Events
	// KubeletDir, when set, is the directory every target path must be
	// under (kubelet's root directory).
	KubeletDir string
	// RequirePodInfo refuses publishes without kubelet's pod keys
	// (podInfoOnMount), which events, listings and audits rely on.
	RequirePodInfo bool
	// VerifyCredentials is when a cache hit checks the request's
	// credentials against the remote: VerifyIfNotRecorded (default, "")
	// once per credential and tree, VerifyAlways on every publish,
	// VerifyNever not at all (single-tenant clusters).
	VerifyCredentials string
	// ReverifyAfter, when positive, expires recorded checks.
	ReverifyAfter time.Duration

	targets keyedMutex
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

// NodePublishVolume validates the request, resolves the model to a tree
// (downloading it once per node when needed), bind-mounts the tree read-only
// at the target and records the reference.
func (n *Node) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (_ *csi.NodePublishVolumeResponse, err error) {
	start := time.Now()
	defer func() { n.Metrics.Publish(status.Code(err).String()) }()
	a, err := n.parsePublish(req)
	if err != nil {
		return nil, err
	}
	unlock := n.targets.Lock(a.target)
	defer unlock()

	if done, err := n.alreadyPublished(a); done || err != nil {
		return &csi.NodePublishVolumeResponse{}, err
	}
	remote, err := n.Resolver.Resolve(ctx, a.uri, req.GetSecrets())
	if err != nil {
		return nil, publishError(a.uri, err)
	}
	tree, sourceKey, hit, err := n.resolveTree(ctx, a, remote)
	if err != nil {
		return nil, publishError(a.uri, err)
	}
	n.Metrics.Lookup(hit)
	if a.digest != "" && tree.Digest != a.digest {
		return nil, publishError(a.uri, mismatch(a.digest, tree.Digest))
	}
	// Mount and record under the store's tree lock: an eviction cannot
	// remove the tree between the lookup and the reference that protects it.
	err = n.Store.UseTree(tree.Digest, func() error {
		if err := n.Mounter.BindReadOnly(n.Store.TreePath(tree.Digest), a.target); err != nil {
			return status.Errorf(codes.Internal, "mounting model %s at %s: %v", a.uri, a.target, err)
		}
		ref := state.Ref{
			VolumeID: a.volumeID, TargetPath: a.target, Tree: tree.Digest, ArgsHash: a.hash,
			URI: a.uri, PodName: a.podName, PodNS: a.podNS, PodUID: a.podUID, Published: time.Now(),
		}
		if err := n.State.AddRef(ref, sourceKey); err != nil {
			// Without a record the mount could not be found again after a restart.
			if uerr := n.Mounter.Unpublish(a.target); uerr != nil {
				klog.ErrorS(uerr, "rolling back mount after state failure", "target", a.target)
			}
			return status.Errorf(codes.Internal, "recording the mount of %s: %v", a.uri, err)
		}
		return nil
	})
	if err != nil {
		if _, ok := status.FromError(err); !ok {
			// The tree was evicted after the lookup: kubelet retries.
			return nil, status.Errorf(codes.Unavailable, "model %s was evicted while being mounted: %v; kubelet will retry", a.uri, err)
		}
		return nil, err
	}
	klog.InfoS("published", "volume", a.volumeID, "target", a.target, "model", a.uri,
		"tree", tree.Digest, "cacheHit", hit, "took", time.Since(start))
	return &csi.NodePublishVolumeResponse{}, nil
}

// alreadyPublished applies the CSI idempotency rules: the same volume with
// the same arguments at a live target is OK; anything else there is
// ALREADY_EXISTS. A recorded target whose mount is gone is published again.
func (n *Node) alreadyPublished(a publishArgs) (bool, error) {
	ref, ok, err := n.State.Ref(a.target)
	if err != nil {
		return false, status.Errorf(codes.Internal, "reading state for %s: %v", a.target, err)
	}
	if !ok {
		return false, nil
	}
	live, err := n.Mounter.MountedFrom(a.target, n.Store.TreePath(ref.Tree))
	if err != nil {
		return false, status.Errorf(codes.Internal, "checking mount at %s: %v", a.target, err)
	}
	if !live {
		return false, nil
	}
	if ref.VolumeID != a.volumeID || ref.ArgsHash != a.hash {
		return false, status.Errorf(codes.AlreadyExists, "target %s already has volume %s published with other arguments; unpublish it first", a.target, ref.VolumeID)
	}
	return true, nil
}

// resolveTree finds or fetches the tree for a model according to its pull policy.
func (n *Node) resolveTree(ctx context.Context, a publishArgs, remote source.Remote) (tree store.Tree, sourceKey string, hit bool, err error) {
	sourceKey = source.SourceKey(remote)
	if a.policy != PullAlways {
		t, ok := n.cachedTree(sourceKey)
		switch {
		case ok && (a.digest == "" || a.digest == t.Digest):
			n.Events.CacheHit(kube.PodRef{Namespace: a.podNS, Name: a.podName, UID: a.podUID}, a.uri, t.Digest)
			// These credentials were checked for this tree before; the
			// record keeps the time of that check, not of this use.
			return t, "", true, nil
		case ok && a.policy == PullNever:
			return store.Tree{}, "", false, mismatch(a.digest, t.Digest)
		case a.policy == PullNever:
			return store.Tree{}, "", false, errNotCached
		}
	}
	m, err := remote.List(ctx)
	if err != nil {
		return store.Tree{}, "", false, err
	}
	key := source.ContentKey(remote.Identity(), m)
	_, cached := n.Store.Cached(key)
	_, joining := n.Store.Downloading(key)
	pod := kube.PodRef{Namespace: a.podNS, Name: a.podName, UID: a.podUID}
	if !cached && !joining {
		// A drained node serves what it has and starts no download; one
		// already running may still be joined.
		if drained, err := n.State.Drained(); err != nil || drained {
			return store.Tree{}, "", false, errors.Join(errDrained, err)
		}
		n.Events.DownloadStarted(pod, a.uri, m.Size())
	}
	stop := n.reportProgress(pod, a.uri, key)
	start := time.Now()
	t, fetched, err := n.Store.Ensure(waitContext(ctx), key, m, remote)
	stop()
	switch {
	case store.IsInProgress(err):
		// Not a failure: the retry joins and reports on.
	case err != nil:
		n.Events.DownloadFailed(pod, a.uri, status.Convert(publishError(a.uri, err)).Message())
	case fetched:
		n.Events.DownloadFinished(pod, a.uri, t.Size, time.Since(start))
	}
	if err != nil {
		return store.Tree{}, "", false, err
	}
	if !fetched && n.VerifyCredentials != VerifyNever {
		// The "authorized cache hits" invariant: the tree came from the cache or from another
		// request's download, so these credentials have read nothing yet.
		// Stat every object with them before anything is mounted.
		if err := remote.Verify(ctx, m); err != nil {
			return store.Tree{}, "", false, fmt.Errorf("checking this request's credentials against the cached model: %w", err)
		}
	}
	return t, sourceKey, !fetched, nil
}

// cachedTree returns the tree these credentials were checked for before, if
// it is still on disk and the check is recent enough for the policy.
func (n *Node) cachedTree(sourceKey string) (store.Tree, bool) {
	if n.VerifyCredentials == VerifyAlways {
		return store.Tree{}, false
	}
	src, ok, err := n.State.SourceTree(sourceKey)
	if err != nil {
		// A record that cannot be read counts as absent: the credentials
		// are checked again.
		klog.ErrorS(err, "reading source index; treating as not cached")
		return store.Tree{}, false
	}
	if !ok || !n.Store.HasTree(src.Tree) {
		return store.Tree{}, false
	}
	if n.ReverifyAfter > 0 && time.Since(src.Checked) > n.ReverifyAfter {
		return store.Tree{}, false
	}
	rec, ok, err := n.State.Tree(src.Tree)
	if err != nil || !ok {
		return store.Tree{}, false
	}
	return rec.Tree, true
}

// progressEvery is how often a waiting publish reports download progress
// on its pod; kube.Events limits it further.
const progressEvery = 10 * time.Second

// reportProgress records progress events on pod while the download of key
// runs, until the returned stop is called.
func (n *Node) reportProgress(pod kube.PodRef, uri, key string) (stop func()) {
	if n.Events == nil || pod.Name == "" {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(progressEvery)
		defer tick.Stop()
		var last int64
		lastAt := time.Now()
		for {
			select {
			case <-done:
				return
			case now := <-tick.C:
				p, ok := n.Store.Downloading(key)
				if !ok {
					continue
				}
				d := p.Done()
				rate := float64(d-last) / now.Sub(lastAt).Seconds()
				last, lastAt = d, now
				n.Events.DownloadProgress(pod, uri, d, p.Total, rate)
			}
		}
	}()
	return func() { close(done) }
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
	unlock := n.targets.Lock(target)
	defer unlock()
	ref, known, err := n.State.Ref(target)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "reading state for %s: %v", target, err)
	}
	if err := n.Mounter.Unpublish(target); err != nil {
		return nil, status.Errorf(codes.Internal, "unpublishing %s: %v", target, err)
	}
	if err := n.State.DeleteRef(target); err != nil {
		return nil, status.Errorf(codes.Internal, "forgetting %s after unmount: %v", target, err)
	}
	klog.InfoS("unpublished", "volume", id, "target", target)
	if known {
		// A tree a pod used until now is recently used, however long ago
		// it was published, when evictions are ordered.
		if err := n.State.Touch(ref.Tree, time.Now()); err != nil {
			klog.ErrorS(err, "recording the last use of a tree", "tree", ref.Tree)
		}
		n.releaseTree(ref.Tree)
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// releaseTree removes a tree whose last mount just went if an operator
// asked for that (evict --when-unused) or the node is drained. Failing here
// does not fail the unpublish: the next gc or drain finds the tree again.
func (n *Node) releaseTree(digest string) {
	c, ok, err := n.State.CachedTree(digest)
	if err != nil || !ok || len(c.Refs) > 0 {
		return
	}
	reason := c.Doomed
	if drained, err := n.State.Drained(); err == nil && drained {
		reason = "drain"
	}
	if reason == "" {
		return
	}
	// The operator named this tree (evict) or the whole node (drain):
	// that overrides a pin, as it does for trees no pod uses.
	if c.Pinned {
		if err := n.State.SetPinned(digest, false); err != nil {
			klog.ErrorS(err, "unpinning a tree to remove it after its last mount", "tree", digest)
			return
		}
	}
	if _, _, err := n.Store.Evict(digest, reason); err != nil {
		klog.ErrorS(err, "removing tree after its last mount", "tree", digest, "reason", reason)
	}
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
	ref, ok, err := n.State.Ref(filepath.Clean(p))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "reading state for %s: %v", p, err)
	}
	if !ok || ref.VolumeID != id {
		return nil, status.Errorf(codes.NotFound, "volume %s is not published at %s on this node", id, p)
	}
	rec, _, err := n.State.Tree(ref.Tree)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "reading tree %s: %v", ref.Tree, err)
	}
	cond := &csi.VolumeCondition{Message: fmt.Sprintf("model %s mounted read-only from %s", ref.URI, ref.Tree)}
	switch live, err := n.Mounter.MountedFrom(ref.TargetPath, n.Store.TreePath(ref.Tree)); {
	case !n.Store.HasTree(ref.Tree):
		cond.Abnormal, cond.Message = true, fmt.Sprintf("tree %s is missing from the cache; delete the pod to publish again", ref.Tree)
	case err != nil || !live:
		cond.Abnormal, cond.Message = true, fmt.Sprintf("%s is not mounted from tree %s; delete the pod to publish again", ref.TargetPath, ref.Tree)
	}
	return &csi.NodeGetVolumeStatsResponse{
		Usage: []*csi.VolumeUsage{
			{Unit: csi.VolumeUsage_BYTES, Total: rec.Size, Used: rec.Size},
			{Unit: csi.VolumeUsage_INODES, Total: int64(rec.Files), Used: int64(rec.Files)},
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

// Recover checks every recorded reference against the kernel's mounts after
// a restart (the "mounts survive restarts" invariant). Live mounts are kept as they are; references whose
// mount is gone are returned: they stay recorded, protecting their trees,
// until kubelet unpublishes them or ReleaseStale gives up on them.
func (n *Node) Recover() (live int, gone []state.Ref, err error) {
	refs, err := n.State.Refs()
	if err != nil {
		return 0, nil, fmt.Errorf("reading references: %w", err)
	}
	for _, r := range refs {
		ok, err := n.Mounter.MountedFrom(r.TargetPath, n.Store.TreePath(r.Tree))
		if err != nil {
			return live, gone, err
		}
		if ok {
			live++
			continue
		}
		gone = append(gone, r)
		klog.InfoS("reference without a mount; kept until kubelet unpublishes it or the grace period ends", "volume", r.VolumeID, "target", r.TargetPath, "tree", r.Tree)
	}
	return live, gone, nil
}
