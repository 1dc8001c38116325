package csi

import (
	"context"
	"errors"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/source"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// publishError maps an error from resolving, downloading or mounting a model
// onto the CSI code kubelet acts on, with a sentence saying what to do next.
// This is the only place that chooses codes for the publish path.
func publishError(uri string, err error) error {
	if err == nil {
		return nil
	}
	var inProgress *cache.InProgressError
	switch {
	case errors.As(err, &inProgress):
		// Non-final: kubelet keeps the target directory and retries, and the
		// retry joins the running download (the "downloads outlive the RPC" invariant).
		return status.Errorf(codes.Aborted, "model %s is still downloading to this node: %v; kubelet retries and the retry joins the same download", uri, inProgress)
	case errors.Is(err, source.ErrUnsafePath):
		return status.Errorf(codes.InvalidArgument, "model %s cannot be cached: %v; rename or remove that object at the remote", uri, err)
	case errors.Is(err, source.ErrInvalid):
		return status.Errorf(codes.InvalidArgument, "%v", err)
	case errors.Is(err, source.ErrNotFound):
		return status.Errorf(codes.NotFound, "model %s was not found: %v; check the modelUri's bucket and path", uri, err)
	case errors.Is(err, source.ErrRefused):
		return status.Errorf(codes.PermissionDenied, "model %s: %v; nothing was kept. The node never connects for a tenant to itself, its cloud metadata service or ranges the operator denied, wherever a redirect or DNS answer leads", uri, err)
	case errors.Is(err, source.ErrDenied):
		return status.Errorf(codes.PermissionDenied, "the remote refused the credentials for %s: %v; check the node-publish secret grants read and list access", uri, err)
	case errors.Is(err, source.ErrCorrupt):
		return status.Errorf(codes.Unavailable, "model %s arrived corrupted: %v; nothing was kept, and kubelet retries the download", uri, err)
	case errors.Is(err, source.ErrChanged):
		return status.Errorf(codes.Unavailable, "model %s changed at the remote while downloading: %v", uri, err)
	case errors.Is(err, source.ErrUnavailable):
		return status.Errorf(codes.Unavailable, "the remote for %s could not be reached: %v; kubelet will retry", uri, err)
	case errors.Is(err, source.ErrTooLarge):
		return status.Errorf(codes.ResourceExhausted, "model %s cannot be cached on this node: %v", uri, err)
	case errors.Is(err, cache.ErrNoSpace):
		return status.Errorf(codes.ResourceExhausted, "no room in this node's model cache for %s: %v; unpin or evict models (modelcachectl ls), free space on the disk, or raise --cache-size", uri, err)
	case errors.Is(err, cache.ErrConflict):
		return status.Errorf(codes.AlreadyExists, "%v; unpublish it first", err)
	case errors.Is(err, cache.ErrEvictedMeanwhile):
		return status.Errorf(codes.Unavailable, "model %s was evicted while being mounted: %v; kubelet will retry", uri, err)
	case errors.Is(err, cache.ErrDrained):
		return status.Errorf(codes.Unavailable, "model %s is not cached on this node and the node is drained, so it starts no downloads; run modelcachectl undrain on the node, or let the pod schedule elsewhere", uri)
	case errors.Is(err, cache.ErrNotCached):
		return status.Errorf(codes.FailedPrecondition, "model %s is not cached on this node and pullPolicy is Never; prefetch it or use pullPolicy IfNotPresent", uri)
	case errors.Is(err, cache.ErrDigestMismatch):
		return status.Errorf(codes.FailedPrecondition, "model %s: %v; update the digest attribute or restore the pinned model at the remote", uri, err)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return status.Errorf(codes.DeadlineExceeded, "publishing %s: %v; kubelet will retry", uri, err)
	default:
		return status.Errorf(codes.Internal, "publishing %s: %v", uri, err)
	}
}

// provisionError maps an error from listing a model with the provisioner
// secret onto the CSI code the external-provisioner acts on. Final codes
// become events on the claim; UNAVAILABLE is retried.
func provisionError(uri string, err error) error {
	switch {
	case errors.Is(err, source.ErrInvalid), errors.Is(err, source.ErrUnsafePath):
		return status.Errorf(codes.InvalidArgument, "model %s: %v", uri, err)
	case errors.Is(err, source.ErrNotFound):
		return status.Errorf(codes.NotFound, "model %s was not found with the provisioner secret: %v; check the StorageClass modelUri or the claim's %s annotation", uri, err, kube.AnnotationModelURI)
	case errors.Is(err, source.ErrRefused):
		return status.Errorf(codes.PermissionDenied, "model %s: %v", uri, err)
	case errors.Is(err, source.ErrDenied):
		return status.Errorf(codes.PermissionDenied, "the remote refused the provisioner secret for %s: %v; check the secret named by csi.storage.k8s.io/provisioner-secret-name grants list access, or remove it to skip the check", uri, err)
	case errors.Is(err, source.ErrTooLarge):
		return status.Errorf(codes.ResourceExhausted, "model %s cannot be provisioned: %v", uri, err)
	case errors.Is(err, source.ErrUnavailable), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return status.Errorf(codes.Unavailable, "the remote for %s could not be listed: %v; the provisioner will retry", uri, err)
	default:
		return status.Errorf(codes.Internal, "listing model %s: %v", uri, err)
	}
}
