package csi

// Unit tests of the Node service with a fake remote and a fake mounter over
// a real store and state database. No root, no network.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/cache/cachetest"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
	"google.golang.org/grpc/codes"
)

func TestNodePublishVolumeValidation(t *testing.T) {
	h := newHarness(t)
	target := h.target("pod-a")
	tests := []struct {
		name   string
		mutate func(r *csi.NodePublishVolumeRequest)
		hint   string
	}{
		{"missing volume_id", func(r *csi.NodePublishVolumeRequest) { r.VolumeId = "" }, "volume_id"},
		{"missing target_path", func(r *csi.NodePublishVolumeRequest) { r.TargetPath = "" }, "target_path"},
		{"relative target_path", func(r *csi.NodePublishVolumeRequest) { r.TargetPath = "pods/a/volumes/model/mount" }, "absolute"},
		{"target_path with ..", func(r *csi.NodePublishVolumeRequest) { r.TargetPath = target + "/../../escape" }, "clean"},
		{"target_path with trailing slash", func(r *csi.NodePublishVolumeRequest) { r.TargetPath = target + "/" }, "clean"},
		{"target_path with double slash", func(r *csi.NodePublishVolumeRequest) {
			r.TargetPath = strings.Replace(target, "/pods/", "/pods//", 1)
		}, "clean"},
		{"nil volume_capability", func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability = nil }, "volume_capability"},
		{"block access", func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
		}, "block"},
		{"no access type", func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.AccessType = nil }, "mount"},
		{"missing modelUri", func(r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, AttrModelURI) }, AttrModelURI},
		{"empty modelUri", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrModelURI] = "" }, AttrModelURI},
		{"unsupported scheme", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrModelURI] = "ftp://host/model" }, "valid forms"},
		{"modelUri escapes the bucket", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrModelURI] = "mys3:models/../secrets" }, "valid forms"},
		{"modelUri without remote", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrModelURI] = "iris" }, "valid forms"},
		{"rclone connection string", func(r *csi.NodePublishVolumeRequest) {
			r.VolumeContext[AttrModelURI] = ":s3,env_auth=true:bucket/model"
		}, "connection string"},
		{"token in https query", func(r *csi.NodePublishVolumeRequest) {
			r.VolumeContext[AttrModelURI] = "https://models.example.com/iris?token=abc"
		}, "secret"},
		{"unknown attribute", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["modelURI"] = testURI }, "unknown volume attribute"},
		{"misspelt policy attribute", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["pullpolicy"] = PullAlways }, "unknown volume attribute"},
		{"bad pullPolicy", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrPullPolicy] = "always" }, PullIfNotPresent},
		{"digest of another algorithm", func(r *csi.NodePublishVolumeRequest) {
			r.VolumeContext[AttrDigest] = "md5:0123456789abcdef0123456789abcdef"
		}, "sha256:"},
		{"digest in upper case", func(r *csi.NodePublishVolumeRequest) {
			r.VolumeContext[AttrDigest] = "sha256:" + strings.Repeat("AB", 32)
		}, "lowercase"},
		{"digest too short", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrDigest] = "sha256:abc" }, "64"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := publishReq("vol-a", target, testURI, nil)
			tc.mutate(req)
			_, err := h.node.NodePublishVolume(context.Background(), req)
			wantCode(t, err, codes.InvalidArgument, tc.hint)
			if resolves, lists, opens := h.res.Counts(); resolves+lists+opens != 0 {
				t.Errorf("remote was used for an invalid request: %d resolves, %d lists, %d opens", resolves, lists, opens)
			}
			if m := h.mnt.Mounts(); len(m) != 0 {
				t.Errorf("mounts after an invalid request: %v", m)
			}
			if refs, err := h.state.Refs(); err != nil || len(refs) != 0 {
				t.Errorf("references after an invalid request: %v (err %v)", refs, err)
			}
			// Nothing under the kubelet directory: no target was created.
			if _, err := os.Stat(filepath.Join(h.dir, "kubelet")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("an invalid request created directories (stat: %v)", err)
			}
		})
	}
}

func TestNodePublishVolumeColdThenCacheHit(t *testing.T) {
	h := newHarness(t)
	files := irisFiles()
	digest := storetest.TreeDigestOf(files)

	a := h.target("pod-a")
	h.mustPublish(publishReq("vol-a", a, testURI, nil))
	h.wantMounted(a, digest)
	ref := h.wantRef(a, "vol-a", digest)
	if ref.URI != testURI || ref.PodName != "model-server-0" || ref.PodNS != "seldon" || ref.PodUID == "" {
		t.Errorf("reference does not name the model and pod: %+v", ref)
	}
	if n := h.res.ListCount(); n != 1 {
		t.Errorf("cold publish listed the remote %d times, want 1", n)
	}
	for p := range files {
		if n := h.res.OpenCount(testURI, p); n != 1 {
			t.Errorf("cold publish opened %s %d times, want 1", p, n)
		}
	}
	// The content key node.go computes points at the tree.
	key := source.ContentKey(sourcetest.IdentityOf(testURI), h.res.Manifest(testURI))
	tree, ok, err := h.state.TreeForKey(key)
	if err != nil || !ok || tree.Digest != digest || tree.Size != sourcetest.SizeOf(files) || tree.Files != len(files) {
		t.Errorf("TreeForKey(content key) = %+v, %v, %v; want tree %s of %d bytes, %d files", tree, ok, err, digest, sourcetest.SizeOf(files), len(files))
	}
	// What is mounted is the model's bytes.
	for p, want := range files {
		got, err := os.ReadFile(filepath.Join(h.store.TreePath(digest), p))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("tree file %s = %q, %v; want the remote's bytes", p, got, err)
		}
	}

	// A second pod on the node: same model, same secret, no remote call.
	b := h.target("pod-b")
	h.mustPublish(publishReq("vol-b", b, testURI, nil))
	h.wantMounted(b, digest)
	h.wantRef(b, "vol-b", digest)
	h.wantMounted(a, digest)
	if n := h.res.ListCount(); n != 1 {
		t.Errorf("cache hit listed the remote: %d lists in all, want 1", n)
	}
	if n := h.res.OpenTotal(); n != len(files) {
		t.Errorf("cache hit downloaded: %d opens in all, want %d", n, len(files))
	}
}

// The "authorized cache hits" invariant: a cached model is served to new credentials only after the
// remote accepted them, and without downloading it again.
func TestNodePublishVolumeOtherCredentials(t *testing.T) {
	h := newHarness(t)
	files := irisFiles()
	digest := storetest.TreeDigestOf(files)
	h.mustPublish(publishReq("vol-a", h.target("pod-a"), testURI, nil))

	b := h.target("pod-b")
	req := publishReq("vol-b", b, testURI, nil)
	req.Secrets = otherSecrets()
	h.mustPublish(req)
	h.wantMounted(b, digest)
	if n := h.res.ListCount(); n != 2 {
		t.Errorf("new credentials were not checked against the remote: %d lists, want 2", n)
	}
	if n := h.res.OpenTotal(); n != len(files) {
		t.Errorf("new credentials downloaded the cached model again: %d opens, want %d", n, len(files))
	}

	// Once accepted, those credentials hit the cache like the first ones.
	c := h.target("pod-c")
	req = publishReq("vol-c", c, testURI, nil)
	req.Secrets = otherSecrets()
	h.mustPublish(req)
	if n := h.res.ListCount(); n != 2 {
		t.Errorf("accepted credentials listed again: %d lists, want 2", n)
	}

	// Credentials the remote refuses never get the cached model, while
	// credentials already seen still do without a remote call.
	h.res.Set(func(r *sourcetest.Resolver) {
		r.ListErr = fmt.Errorf("listing %s: 403 Forbidden: %w", testURI, source.ErrDenied)
	})
	d := h.target("pod-d")
	req = publishReq("vol-d", d, testURI, nil)
	req.Secrets = map[string]string{"RCLONE_CONFIG_MYS3_TYPE": "s3", "RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": "wrong-key-for-this-bucket"}
	err := h.publish(req)
	wantCode(t, err, codes.PermissionDenied, testURI)
	h.wantNothingAt(d)

	e := h.target("pod-e")
	h.mustPublish(publishReq("vol-e", e, testURI, nil))
	h.wantMounted(e, digest)
}

func TestNodePublishVolumePullAlways(t *testing.T) {
	h := newHarness(t)
	v1 := irisFiles()
	d1 := storetest.TreeDigestOf(v1)
	always := map[string]string{AttrPullPolicy: PullAlways}

	a, b := h.target("pod-a"), h.target("pod-b")
	h.mustPublish(publishReq("vol-a", a, testURI, always))
	h.mustPublish(publishReq("vol-b", b, testURI, always))
	if n := h.res.ListCount(); n != 2 {
		t.Errorf("pullPolicy Always: %d lists for 2 publishes, want 2", n)
	}
	if n := h.res.OpenTotal(); n != len(v1) {
		t.Errorf("unchanged model downloaded again: %d opens, want %d", n, len(v1))
	}
	h.wantMounted(b, d1)

	// The model changes at the remote.
	v2 := irisFiles()
	v2["model.joblib"] = bytes.Repeat([]byte("retrained weights "), 300)
	d2 := storetest.TreeDigestOf(v2)
	if d1 == d2 {
		t.Fatal("test models have equal digests")
	}
	h.res.SetModel(testURI, v2)
	c := h.target("pod-c")
	h.mustPublish(publishReq("vol-c", c, testURI, always))
	if n := h.res.ListCount(); n != 3 {
		t.Errorf("pullPolicy Always: %d lists for 3 publishes, want 3", n)
	}
	h.wantMounted(c, d2)
	h.wantRef(c, "vol-c", d2)
	// Running pods keep the model they started with.
	h.wantMounted(a, d1)
	h.wantMounted(b, d1)
	h.wantRef(a, "vol-a", d1)

	// IfNotPresent now finds the newest tree this source resolved to.
	d := h.target("pod-d")
	h.mustPublish(publishReq("vol-d", d, testURI, nil))
	h.wantMounted(d, d2)
	if n := h.res.ListCount(); n != 3 {
		t.Errorf("IfNotPresent after Always listed the remote: %d lists, want 3", n)
	}
}

func TestNodePublishVolumePullNever(t *testing.T) {
	h := newHarness(t)
	never := map[string]string{AttrPullPolicy: PullNever}
	digest := storetest.TreeDigestOf(irisFiles())

	a := h.target("pod-a")
	err := h.publish(publishReq("vol-a", a, testURI, never))
	wantCode(t, err, codes.FailedPrecondition, testURI, "pullPolicy")
	h.wantNothingAt(a)
	if resolves, lists, opens := h.res.Counts(); lists+opens != 0 {
		t.Errorf("pullPolicy Never reached the remote: %d resolves, %d lists, %d opens", resolves, lists, opens)
	}

	h.mustPublish(publishReq("vol-b", h.target("pod-b"), testURI, nil))
	lists := h.res.ListCount()
	c := h.target("pod-c")
	h.mustPublish(publishReq("vol-c", c, testURI, never))
	h.wantMounted(c, digest)
	h.wantRef(c, "vol-c", digest)
	if n := h.res.ListCount(); n != lists {
		t.Errorf("pullPolicy Never on a cached model listed the remote (%d → %d lists)", lists, n)
	}
}

func TestNodePublishVolumeDigestPin(t *testing.T) {
	digest := storetest.TreeDigestOf(irisFiles())
	wrong := "sha256:" + strings.Repeat("0", 64)
	tests := []struct {
		name      string
		cached    bool // published once without a pin first
		pin       string
		policy    string
		want      codes.Code
		wantLists int // lists by the pinned publish
	}{
		{"cold, matching", false, digest, "", codes.OK, 1},
		{"cold, mismatching", false, wrong, "", codes.FailedPrecondition, 1},
		{"cached, matching", true, digest, "", codes.OK, 0},
		{"cached, mismatching", true, wrong, "", codes.FailedPrecondition, 1},
		// Never must not blame a missing cache when the cached model is there
		// but pinned wrong: the operator fixes the pin, not the cache.
		{"cached, mismatching, Never", true, wrong, PullNever, codes.FailedPrecondition, 0},
		{"cached, matching, Never", true, digest, PullNever, codes.OK, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			if tc.cached {
				h.mustPublish(publishReq("vol-0", h.target("pod-0"), testURI, nil))
			}
			lists := h.res.ListCount()
			target := h.target("pod-a")
			attrs := map[string]string{AttrDigest: tc.pin}
			if tc.policy != "" {
				attrs[AttrPullPolicy] = tc.policy
			}
			err := h.publish(publishReq("vol-a", target, testURI, attrs))
			if n := h.res.ListCount() - lists; n != tc.wantLists {
				t.Errorf("pinned publish listed the remote %d times, want %d", n, tc.wantLists)
			}
			if tc.want == codes.OK {
				if err != nil {
					t.Fatalf("NodePublishVolume: %v", err)
				}
				h.wantMounted(target, digest)
				h.wantRef(target, "vol-a", digest)
				return
			}
			// The message names both digests so the operator can fix the pin.
			wantCode(t, err, tc.want, tc.pin, digest)
			h.wantNothingAt(target)
		})
	}
}

func TestNodePublishVolumeIdempotent(t *testing.T) {
	h := newHarness(t)
	h.res.SetModel(otherURI, map[string][]byte{"model.onnx": []byte("resnet")})
	digest := storetest.TreeDigestOf(irisFiles())
	a := h.target("pod-a")
	req := publishReq("vol-a", a, testURI, nil)
	h.mustPublish(req)
	h.mustPublish(req)
	if m := h.mnt.Mounts(); len(m) != 1 {
		t.Errorf("mounts after publishing twice: %v, want one", m)
	}
	if resolves, lists, opens := h.res.Counts(); resolves != 1 || lists != 1 || opens != len(irisFiles()) {
		t.Errorf("repeated publish did remote work: %d resolves, %d lists, %d opens", resolves, lists, opens)
	}
	h.wantMounted(a, digest)

	conflicts := []struct {
		name   string
		mutate func(r *csi.NodePublishVolumeRequest)
	}{
		{"other modelUri", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrModelURI] = otherURI }},
		{"other volume_id", func(r *csi.NodePublishVolumeRequest) { r.VolumeId = "vol-b" }},
		{"other pullPolicy", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrPullPolicy] = PullAlways }},
		{"other digest pin", func(r *csi.NodePublishVolumeRequest) { r.VolumeContext[AttrDigest] = digest }},
		{"writable", func(r *csi.NodePublishVolumeRequest) { r.Readonly = false }},
	}
	for _, tc := range conflicts {
		t.Run(tc.name, func(t *testing.T) {
			h := h.in(t)
			r := publishReq("vol-a", a, testURI, nil)
			tc.mutate(r)
			wantCode(t, h.publish(r), codes.AlreadyExists, a, "unpublish")
			h.wantMounted(a, digest)
			h.wantRef(a, "vol-a", digest)
		})
	}

	t.Run("mount gone", func(t *testing.T) {
		h := h.in(t)
		h.mnt.Forget(a)
		lists := h.res.ListCount()
		h.mustPublish(req)
		h.wantMounted(a, digest)
		h.wantRef(a, "vol-a", digest)
		if n := h.res.ListCount(); n != lists {
			t.Errorf("re-publish of a cached model listed the remote (%d → %d)", lists, n)
		}
	})
}

func TestNodePublishVolumeRemoteErrors(t *testing.T) {
	tests := []struct {
		name    string
		uri     string
		setup   func(r *sourcetest.Resolver)
		timeout time.Duration // of the RPC; 0 means waitLimit
		want    codes.Code
		hints   []string
		retryOK bool // a publish after the fault clears succeeds
	}{
		{name: "model missing at the remote", uri: "mys3:models/missing",
			want: codes.NotFound, hints: []string{"mys3:models/missing", "check the modelUri"}},
		{name: "list not found", setup: func(r *sourcetest.Resolver) {
			r.ListErr = fmt.Errorf("listing %s: bucket does not exist: %w", testURI, source.ErrNotFound)
		}, want: codes.NotFound, hints: []string{testURI}, retryOK: true},
		{name: "list denied", setup: func(r *sourcetest.Resolver) {
			r.ListErr = fmt.Errorf("listing %s: AccessDenied: %w", testURI, source.ErrDenied)
		}, want: codes.PermissionDenied, hints: []string{testURI, "node-publish secret"}, retryOK: true},
		{name: "list unavailable", setup: func(r *sourcetest.Resolver) {
			r.ListErr = fmt.Errorf("listing %s: connection refused: %w", testURI, source.ErrUnavailable)
		}, want: codes.Unavailable, hints: []string{testURI, "retry"}, retryOK: true},
		{name: "list unsafe key", setup: func(r *sourcetest.Resolver) {
			r.ListErr = fmt.Errorf("%w: %q has a \"..\" segment", source.ErrUnsafePath, "../etc/passwd")
		}, want: codes.InvalidArgument, hints: []string{testURI, "rename or remove"}, retryOK: true},
		{name: "list invalid", setup: func(r *sourcetest.Resolver) {
			r.ListErr = fmt.Errorf("%w: endpoint is not an http(s) URL", source.ErrInvalid)
		}, want: codes.InvalidArgument, hints: []string{"endpoint"}, retryOK: true},
		{name: "resolve invalid secret", setup: func(r *sourcetest.Resolver) {
			r.ResolveErr = fmt.Errorf("%w: secret key RCLONE_CONFIG_MYS3_ENV_AUTH is not accepted", source.ErrInvalid)
		}, want: codes.InvalidArgument, hints: []string{"ENV_AUTH"}, retryOK: true},
		{name: "open denied", setup: func(r *sourcetest.Resolver) {
			r.OpenErr = fmt.Errorf("opening %s/model.joblib: %w", testURI, source.ErrDenied)
		}, want: codes.PermissionDenied, hints: []string{testURI}, retryOK: true},
		{name: "open unavailable", setup: func(r *sourcetest.Resolver) {
			r.OpenErr = fmt.Errorf("opening %s/model.joblib: reset: %w", testURI, source.ErrUnavailable)
		}, want: codes.Unavailable, hints: []string{testURI}, retryOK: true},
		{name: "object changed", setup: func(r *sourcetest.Resolver) {
			r.OpenErr = fmt.Errorf("%w: model.joblib", source.ErrChanged)
		}, want: codes.Unavailable, hints: []string{testURI}, retryOK: true},
		{name: "cache full", setup: func(r *sourcetest.Resolver) {
			r.OpenErr = fmt.Errorf("writing model.joblib: %w: %w", store.ErrNoSpace, syscall.ENOSPC)
		}, want: codes.ResourceExhausted, hints: []string{testURI, "free space"}, retryOK: true},
		{name: "object key escaping the tree", setup: func(r *sourcetest.Resolver) {
			r.Put(testURI, map[string][]byte{"../../escape": []byte("x")}, time.Time{})
		}, want: codes.InvalidArgument, hints: []string{testURI, "rename or remove"}},
		{name: "remote never answers", setup: func(r *sourcetest.Resolver) {
			r.ListWaitsForCtx = true
		}, timeout: 100 * time.Millisecond, want: codes.DeadlineExceeded, hints: []string{testURI, "retry"}, retryOK: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			uri := testURI
			if tc.uri != "" {
				uri = tc.uri
			}
			if tc.setup != nil {
				h.res.Set(tc.setup)
			}
			timeout := tc.timeout
			if timeout == 0 {
				timeout = waitLimit
			}
			target := h.target("pod-a")
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			_, err := h.node.NodePublishVolume(ctx, publishReq("vol-a", target, uri, nil))
			wantCode(t, err, tc.want, tc.hints...)
			h.wantNothingAt(target)
			if !tc.retryOK {
				return
			}
			// A failure is not cached: once the remote behaves, the same
			// publish succeeds.
			h.res.Set(func(r *sourcetest.Resolver) {
				r.ResolveErr, r.ListErr, r.OpenErr, r.ListWaitsForCtx = nil, nil, nil, false
			})
			h.mustPublish(publishReq("vol-a", target, uri, nil))
			h.wantMounted(target, storetest.TreeDigestOf(irisFiles()))
		})
	}
}

// The "downloads outlive the RPC" invariant: a download outlives the RPC; retries get ABORTED with
// progress and then join it; the files are fetched once.
func TestNodePublishVolumeInProgress(t *testing.T) {
	h := newHarness(t)
	files := map[string][]byte{"model.safetensors": bytes.Repeat([]byte{0x5a}, 8192)}
	h.res.SetModel(testURI, files)
	h.res.WithGate(4096)
	listed := make(chan string, 16)
	h.res.Set(func(r *sourcetest.Resolver) { r.Listed = listed })
	a := h.target("pod-a")
	req := publishReq("vol-a", a, testURI, nil)

	// shortPublish is a publish whose RPC deadline ends long before the
	// download; run aside so a publish that ignores its deadline fails
	// the test instead of hanging it.
	shortPublish := func() error {
		errc := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			_, err := h.node.NodePublishVolume(ctx, req)
			errc <- err
		}()
		err := recv(t, errc, "a publish with a 300ms deadline to return")
		recv(t, listed, "List")
		return err
	}

	err := shortPublish()
	wantCode(t, err, codes.Aborted, "still downloading", "%")
	h.wantNothingAt(a)

	// The download goes on without the RPC and reaches the gate.
	recv(t, h.res.Blocked(), "the download to reach the gate")
	err = shortPublish()
	wantCode(t, err, codes.Aborted, "4.0 KiB of 8.0 KiB (50%)")
	h.wantNothingAt(a)

	done := make(chan error, 1)
	go func() { done <- h.publish(req) }()
	recv(t, listed, "the third publish to list the remote")
	h.res.Release()
	if err := recv(t, done, "the publish to finish"); err != nil {
		t.Fatalf("publish after the download finished: %v", err)
	}
	digest := storetest.TreeDigestOf(files)
	h.wantMounted(a, digest)
	h.wantRef(a, "vol-a", digest)
	if n := h.res.OpenCount(testURI, "model.safetensors"); n != 1 {
		t.Errorf("file opened %d times over three publishes, want 1", n)
	}
}

// The "one download per key" invariant: parallel publishes of one model share one download.
func TestNodePublishVolumeConcurrent(t *testing.T) {
	h := newHarness(t)
	files := irisFiles()
	h.res.WithGate(100)
	const n = 6
	listed := make(chan string, n)
	h.res.Set(func(r *sourcetest.Resolver) { r.Listed = listed })
	errs := make(chan error, n)
	for i := range n {
		req := publishReq(fmt.Sprintf("vol-%d", i), h.target(fmt.Sprintf("pod-%d", i)), testURI, nil)
		go func() { errs <- h.publish(req) }()
	}
	for range n {
		recv(t, listed, "every publish to list the remote")
	}
	h.res.Release()
	for range n {
		if err := recv(t, errs, "publishes"); err != nil {
			t.Errorf("parallel publish: %v", err)
		}
	}
	digest := storetest.TreeDigestOf(files)
	for i := range n {
		h.wantMounted(h.target(fmt.Sprintf("pod-%d", i)), digest)
	}
	for p := range files {
		if c := h.res.OpenCount(testURI, p); c != 1 {
			t.Errorf("%s opened %d times by %d parallel publishes, want 1", p, c, n)
		}
	}
}

func TestNodePublishVolumeMountFailure(t *testing.T) {
	h := newHarness(t)
	h.mnt.FailBind = errors.New("fake: mount failed")
	a := h.target("pod-a")
	err := h.publish(publishReq("vol-a", a, testURI, nil))
	wantCode(t, err, codes.Internal, testURI, "fake: mount failed")
	h.wantNothingAt(a)

	// The model stayed in the cache: the retry mounts without downloading.
	opens := h.res.OpenTotal()
	h.mustPublish(publishReq("vol-a", a, testURI, nil))
	h.wantMounted(a, storetest.TreeDigestOf(irisFiles()))
	if n := h.res.OpenTotal(); n != opens {
		t.Errorf("retry after a mount failure downloaded again (%d → %d opens)", opens, n)
	}
}

func TestNodeUnpublishVolume(t *testing.T) {
	h := newHarness(t)
	digest := storetest.TreeDigestOf(irisFiles())
	a, b := h.target("pod-a"), h.target("pod-b")
	h.mustPublish(publishReq("vol-a", a, testURI, nil))
	h.mustPublish(publishReq("vol-b", b, testURI, nil))

	unpublish := func(id, target string) error {
		_, err := h.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
		return err
	}
	gone := func(t *testing.T, target string) {
		t.Helper()
		if src, ok := h.mnt.Mounts()[target]; ok {
			t.Errorf("%s still mounted from %s", target, src)
		}
		if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("target directory %s not removed (stat: %v)", target, err)
		}
		if _, ok, err := h.state.Ref(target); ok || err != nil {
			t.Errorf("reference for %s not deleted (err %v)", target, err)
		}
	}

	t.Run("invalid", func(t *testing.T) {
		h := h.in(t)
		for _, tc := range []struct{ id, target, hint string }{
			{"", a, "volume_id"},
			{"vol-a", "", "target_path"},
			{"vol-a", "pods/a/mount", "absolute"},
		} {
			wantCode(t, unpublish(tc.id, tc.target), codes.InvalidArgument, tc.hint)
		}
		h.wantMounted(a, digest)
	})
	t.Run("unknown target", func(t *testing.T) {
		if err := unpublish("vol-x", h.target("pod-x")); err != nil {
			t.Fatalf("unpublish of an unknown target: %v", err)
		}
	})
	t.Run("unknown target with a leftover directory", func(t *testing.T) {
		y := h.target("pod-y")
		if err := os.MkdirAll(y, 0o750); err != nil {
			t.Fatal(err)
		}
		if err := unpublish("vol-y", y); err != nil {
			t.Fatalf("unpublish: %v", err)
		}
		gone(t, y)
	})
	t.Run("published", func(t *testing.T) {
		h := h.in(t)
		if err := unpublish("vol-a", a); err != nil {
			t.Fatalf("unpublish: %v", err)
		}
		gone(t, a)
		h.wantMounted(b, digest)
		h.wantRef(b, "vol-b", digest)
	})
	t.Run("twice", func(t *testing.T) {
		if err := unpublish("vol-a", a); err != nil {
			t.Fatalf("second unpublish: %v", err)
		}
		gone(t, a)
	})
	t.Run("unclean target path", func(t *testing.T) {
		c := h.target("pod-c")
		h.mustPublish(publishReq("vol-c", c, testURI, nil))
		if err := unpublish("vol-c", c+"/"); err != nil {
			t.Fatalf("unpublish with a trailing slash: %v", err)
		}
		gone(t, c)
	})
	t.Run("mount already gone", func(t *testing.T) {
		h.mnt.Forget(b)
		if err := unpublish("vol-b", b); err != nil {
			t.Fatalf("unpublish: %v", err)
		}
		gone(t, b)
	})
}

func TestNodeGetVolumeStats(t *testing.T) {
	h := newHarness(t)
	files := irisFiles()
	digest := storetest.TreeDigestOf(files)
	a := h.target("pod-a")
	stats := func(id, p string) (*csi.NodeGetVolumeStatsResponse, error) {
		return h.node.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: p})
	}

	_, err := stats("vol-a", a)
	wantCode(t, err, codes.NotFound, "vol-a")
	_, err = stats("", a)
	wantCode(t, err, codes.InvalidArgument, "volume_id")
	_, err = stats("vol-a", "")
	wantCode(t, err, codes.InvalidArgument, "volume_path")

	h.mustPublish(publishReq("vol-a", a, testURI, nil))
	_, err = stats("vol-other", a)
	wantCode(t, err, codes.NotFound, "vol-other")

	for _, p := range []string{a, a + "/"} {
		resp, err := stats("vol-a", p)
		if err != nil {
			t.Fatalf("NodeGetVolumeStats(%q): %v", p, err)
		}
		usage := map[csi.VolumeUsage_Unit]*csi.VolumeUsage{}
		for _, u := range resp.GetUsage() {
			usage[u.GetUnit()] = u
		}
		if u := usage[csi.VolumeUsage_BYTES]; u.GetUsed() != sourcetest.SizeOf(files) || u.GetTotal() != sourcetest.SizeOf(files) {
			t.Errorf("bytes usage = %v, want %d used of %d", u, sourcetest.SizeOf(files), sourcetest.SizeOf(files))
		}
		if u := usage[csi.VolumeUsage_INODES]; u.GetUsed() != int64(len(files)) || u.GetTotal() != int64(len(files)) {
			t.Errorf("inodes usage = %v, want %d", u, len(files))
		}
		if c := resp.GetVolumeCondition(); c == nil || c.GetAbnormal() || c.GetMessage() == "" {
			t.Errorf("condition of a healthy mount = %v, want normal with a message", c)
		}
	}

	condition := func(t *testing.T, hints ...string) {
		t.Helper()
		resp, err := stats("vol-a", a)
		if err != nil {
			t.Fatalf("NodeGetVolumeStats: %v", err)
		}
		c := resp.GetVolumeCondition()
		if !c.GetAbnormal() {
			t.Fatalf("condition = %v, want abnormal", c)
		}
		for _, s := range append(hints, "delete the pod") {
			if !strings.Contains(c.GetMessage(), s) {
				t.Errorf("condition message %q does not contain %q", c.GetMessage(), s)
			}
		}
	}
	h.mnt.Forget(a)
	condition(t, "not mounted", digest)

	treePath := h.store.TreePath(digest)
	cachetest.MakeWritable(treePath)
	if err := os.RemoveAll(treePath); err != nil {
		t.Fatal(err)
	}
	condition(t, "missing", digest)
}

func TestRecover(t *testing.T) {
	h := newHarness(t)
	if live, gone, err := h.cache.Recover(); live != 0 || len(gone) != 0 || err != nil {
		t.Fatalf("Recover on an empty node = %d, %d, %v", live, len(gone), err)
	}
	digest := storetest.TreeDigestOf(irisFiles())
	for _, pod := range []string{"a", "b", "c"} {
		h.mustPublish(publishReq("vol-"+pod, h.target("pod-"+pod), testURI, nil))
	}
	h.mnt.Forget(h.target("pod-b"))
	// A reference recorded just before a crash, never mounted.
	if err := h.state.AddRef(state.Ref{VolumeID: "vol-d", TargetPath: h.target("pod-d"), Tree: digest, URI: testURI, Published: time.Now()}, ""); err != nil {
		t.Fatal(err)
	}
	live, gone, err := h.cache.Recover()
	if err != nil || live != 2 || len(gone) != 2 {
		t.Fatalf("Recover = %d live, %d gone, %v; want 2, 2", live, len(gone), err)
	}
	// Gone references stay so kubelet's unpublish finds them.
	if refs, err := h.state.Refs(); err != nil || len(refs) != 4 {
		t.Errorf("references after Recover: %d (err %v), want 4", len(refs), err)
	}
	if m := h.mnt.Mounts(); len(m) != 2 {
		t.Errorf("mounts after Recover: %v, want the 2 live ones untouched", m)
	}
}

func TestNodeGetCapabilities(t *testing.T) {
	h := newHarness(t)
	resp, err := h.node.NodeGetCapabilities(context.Background(), &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[csi.NodeServiceCapability_RPC_Type]bool{}
	for _, c := range resp.GetCapabilities() {
		got[c.GetRpc().GetType()] = true
	}
	for _, want := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_VOLUME_CONDITION,
	} {
		if !got[want] {
			t.Errorf("capabilities %v lack %v", got, want)
		}
	}
	// NodeStageVolume is not implemented; advertising it would make kubelet call it.
	if got[csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME] {
		t.Error("STAGE_UNSTAGE_VOLUME advertised without NodeStageVolume")
	}
}

func TestNodeGetInfo(t *testing.T) {
	h := newHarness(t)
	resp, err := h.node.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil || resp.GetNodeId() != "node-a" {
		t.Fatalf("NodeGetInfo = %v, %v; want node ID node-a", resp, err)
	}
}

// A source whose tree was evicted from disk is fetched again, not mounted
// from a path that no longer exists.
func TestNodePublishVolumeEvictedTree(t *testing.T) {
	h := newHarness(t)
	files := irisFiles()
	digest := storetest.TreeDigestOf(files)
	h.mustPublish(publishReq("vol-a", h.target("pod-a"), testURI, nil))
	treePath := h.store.TreePath(digest)
	cachetest.MakeWritable(treePath)
	if err := os.RemoveAll(treePath); err != nil {
		t.Fatal(err)
	}
	b := h.target("pod-b")
	// No deadline on this call: the download is awaited without a margin.
	if _, err := h.node.NodePublishVolume(context.Background(), publishReq("vol-b", b, testURI, nil)); err != nil {
		t.Fatalf("publish after eviction: %v", err)
	}
	h.wantMounted(b, digest)
	if n := h.res.ListCount(); n != 2 {
		t.Errorf("publish after eviction listed %d times in all, want 2", n)
	}
	for p := range files {
		if n := h.res.OpenCount(testURI, p); n != 2 {
			t.Errorf("%s opened %d times in all, want 2 (once more after eviction)", p, n)
		}
	}
}
