package csi

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
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

// The "authorized cache hits" invariant: a model cached with one tenant's credentials reaches another
// tenant only after the other tenant's credentials read its metadata.
func TestCacheHitIsAuthorized(t *testing.T) {
	tenantA := testSecrets()
	tenantB := map[string]string{"RCLONE_CONFIG_MYS3_TYPE": "s3", "RCLONE_CONFIG_MYS3_ACCESS_KEY_ID": "tenant-b", "RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": "b-secret"}
	tests := []struct {
		name       string
		policy     string
		denyB      bool
		wantCode   codes.Code
		wantVerify int
	}{
		{"B allowed: served from cache after one check", "", false, codes.OK, 1},
		{"B denied: refused, nothing mounted", "", true, codes.PermissionDenied, 1},
		{"policy Never: B served unchecked", cache.VerifyNever, true, codes.OK, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarnessWith(t, cache.Options{VerifyCredentials: tt.policy})
			a := publishReq("vol-a", h.target("pod-a"), testURI, nil)
			a.Secrets = tenantA
			h.mustPublish(a)
			opens := h.res.OpenTotal()
			if tt.denyB {
				h.res.Set(func(r *sourcetest.Resolver) { r.VerifyDenied = map[string]bool{sourcetest.Fingerprint(tenantB): true} })
			}
			b := publishReq("vol-b", h.target("pod-b"), testURI, nil)
			b.Secrets = tenantB
			_, err := h.node.NodePublishVolume(context.Background(), b)
			if status.Code(err) != tt.wantCode {
				t.Fatalf("tenant B's publish = %v, want %v", err, tt.wantCode)
			}
			h.res.Set(func(r *sourcetest.Resolver) {
				if r.Verifies != tt.wantVerify {
					t.Errorf("Verify ran %d times, want %d", r.Verifies, tt.wantVerify)
				}
			})
			if n := h.res.OpenTotal(); n != opens {
				t.Errorf("tenant B's publish downloaded %d objects; a cache hit downloads none", n-opens)
			}
			if mounted := len(h.mnt.Mounts()); (tt.wantCode == codes.OK) != (mounted == 2) {
				t.Errorf("%d mounts after tenant B's publish (code %v)", mounted, tt.wantCode)
			}
			if tt.wantCode != codes.OK {
				return
			}
			// Recorded: B's next publish needs no check (IfNotRecorded).
			b2 := publishReq("vol-b2", h.target("pod-b2"), testURI, nil)
			b2.Secrets = tenantB
			h.mustPublish(b2)
			h.res.Set(func(r *sourcetest.Resolver) {
				if r.Verifies != tt.wantVerify {
					t.Errorf("a recorded credential was checked again: %d checks", r.Verifies)
				}
			})
		})
	}

	t.Run("policy Always checks every publish", func(t *testing.T) {
		h := newHarnessWith(t, cache.Options{VerifyCredentials: cache.VerifyAlways})
		for i, pod := range []string{"pod-a", "pod-b", "pod-c"} {
			h.mustPublish(publishReq("vol-"+pod, h.target(pod), testURI, nil))
			h.res.Set(func(r *sourcetest.Resolver) {
				if r.Verifies != i {
					t.Errorf("after publish %d: %d checks, want %d (the first publish downloads)", i+1, r.Verifies, i)
				}
			})
		}
	})
}
