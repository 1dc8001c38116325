package csi

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Requests kubelet would never send are refused before anything happens:
// targets outside kubelet's directory, publishes without pod information,
// and oversized volume contexts.
func TestNodePublishRefusesRequestsKubeletNeverSends(t *testing.T) {
	tests := []struct {
		name   string
		modify func(h *harness, r *csi.NodePublishVolumeRequest)
		hint   string
	}{
		{"target outside the kubelet directory", func(h *harness, r *csi.NodePublishVolumeRequest) {
			r.TargetPath = filepath.Join(h.dir, "etc", "cron.d")
		}, "outside the kubelet directory"},
		{"target beside the kubelet directory", func(h *harness, r *csi.NodePublishVolumeRequest) {
			r.TargetPath = filepath.Join(h.dir, "kubelet-other", "pods", "x")
		}, "outside the kubelet directory"},
		{"target is the kubelet directory itself", func(h *harness, r *csi.NodePublishVolumeRequest) {
			r.TargetPath = filepath.Join(h.dir, "kubelet")
		}, "outside the kubelet directory"},
		{"no pod name", func(_ *harness, r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, podNameKey) }, "podInfoOnMount"},
		{"no pod namespace", func(_ *harness, r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, podNamespaceKey) }, "podInfoOnMount"},
		{"no pod uid", func(_ *harness, r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, podUIDKey) }, "podInfoOnMount"},
		{"oversized volume context", func(_ *harness, r *csi.NodePublishVolumeRequest) {
			r.VolumeContext["example.com/padding"] = strings.Repeat("x", maxVolumeContext)
		}, "limit is 4096"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.node.KubeletDir = filepath.Join(h.dir, "kubelet")
			h.node.RequirePodInfo = true
			req := publishReq("vol-1", h.target("pod-a"), testURI, nil)
			tt.modify(h, req)
			_, err := h.node.NodePublishVolume(context.Background(), req)
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), tt.hint) {
				t.Fatalf("got %v, want InvalidArgument mentioning %q", err, tt.hint)
			}
			if m := h.mnt.Mounts(); len(m) != 0 {
				t.Fatalf("mounts after a refused publish: %v", m)
			}
		})
	}

	t.Run("a well-formed request under the kubelet directory is served", func(t *testing.T) {
		h := newHarness(t)
		h.node.KubeletDir = filepath.Join(h.dir, "kubelet") + "/"
		h.node.RequirePodInfo = true
		h.mustPublish(publishReq("vol-1", h.target("pod-a"), testURI, nil))
	})
}
