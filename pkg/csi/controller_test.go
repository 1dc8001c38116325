package csi

// Unit tests of the CSI Controller service (controller.go): parameter and
// claim annotation precedence, request validation, capacity, idempotency,
// DeleteVolume, ValidateVolumeCapabilities and capabilities. The state
// database is the real one in a temporary directory, the remote is
// fakeResolver and PVCs come from client-go's fake clientset.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/state"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// ctrlSecretValue is a provisioner secret value no message, log line or
// record may contain.
const ctrlSecretValue = "s3cr3t-value"

// Digest pins used as StorageClass parameters and claim annotations.
var (
	pinA = "sha256:" + strings.Repeat("a1", 32)
	pinB = "sha256:" + strings.Repeat("b2", 32)
)

const (
	claimNS   = "seldon"
	claimName = "iris-model"
)

// provisionerSecrets is a provisioner secret (CreateVolume's secrets) for
// the fake remote, with one more value to look for in outputs.
func provisionerSecrets() map[string]string {
	s := testSecrets()
	s["RCLONE_CONFIG_MYS3_SESSION_TOKEN"] = ctrlSecretValue
	return s
}

// countingClaims counts the claims the controller reads.
type countingClaims struct {
	inner ClaimReader
	mu    sync.Mutex
	reads []string
}

func (c *countingClaims) Annotations(ctx context.Context, namespace, name string) (map[string]string, error) {
	c.mu.Lock()
	c.reads = append(c.reads, namespace+"/"+name)
	c.mu.Unlock()
	return c.inner.Annotations(ctx, namespace, name)
}

func (c *countingClaims) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.reads)
}

// ctrlHarness is a Controller on a real state database in a temporary
// directory and the fake resolver holding testURI (irisFiles) and otherURI.
type ctrlHarness struct {
	ctrl *Controller
	db   *state.DB
	res  *sourcetest.Resolver
}

func newCtrlHarness(t *testing.T, claims ClaimReader) *ctrlHarness {
	t.Helper()
	db, err := state.Open(filepath.Join(t.TempDir(), "state", "modelcache.db"))
	if err != nil {
		t.Fatalf("state.Open: %v", err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("state.Close: %v", err)
		}
	})
	res := sourcetest.NewResolver()
	res.SetModel(testURI, irisFiles())
	res.SetModel(otherURI, map[string][]byte{"model.onnx": []byte("resnet weights")})
	return &ctrlHarness{ctrl: &Controller{Resolver: res, Volumes: db, Claims: claims}, db: db, res: res}
}

// claimsFor serves the given PVCs through kube.Claims and client-go's fake
// clientset, counting reads.
func claimsFor(pvcs ...*corev1.PersistentVolumeClaim) (*countingClaims, *fake.Clientset) {
	objs := make([]runtime.Object, len(pvcs))
	for i, p := range pvcs {
		objs[i] = p
	}
	cs := fake.NewClientset(objs...)
	return &countingClaims{inner: kube.NewClaims(cs)}, cs
}

// pvc is a claim with annotations.
func newPVC(ns, name string, ann map[string]string) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: ann}}
}

func mountCapability(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

func blockCapability(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

// createReq is a CreateVolume request as the external-provisioner sends it
// for a ReadOnlyMany claim, without secrets or claim metadata.
func createReq(name string, params map[string]string) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name:               name,
		VolumeCapabilities: []*csi.VolumeCapability{mountCapability(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)},
		Parameters:         params,
	}
}

// withClaim adds the claim metadata --extra-create-metadata passes.
func withClaim(params map[string]string, ns, name string) map[string]string {
	out := maps.Clone(params)
	if out == nil {
		out = map[string]string{}
	}
	out[pvcNameKey] = name
	out[pvcNamespaceKey] = ns
	out["csi.storage.k8s.io/pv/name"] = "pvc-6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b"
	return out
}

func ctrlCtx(t *testing.T) context.Context {
	t.Helper()
	c, cancel := context.WithTimeout(context.Background(), waitLimit)
	t.Cleanup(cancel)
	return c
}

// wantCtrlCode is wantCode that also looks for the provisioner secret.
func wantCtrlCode(t *testing.T, err error, want codes.Code, hints ...string) {
	t.Helper()
	wantCode(t, err, want, hints...)
	if strings.Contains(err.Error(), ctrlSecretValue) {
		t.Fatalf("message leaks the provisioner secret: %q", err)
	}
}

// mustCreate calls CreateVolume and fails the test on any error.
func (h *ctrlHarness) mustCreate(t *testing.T, req *csi.CreateVolumeRequest) *csi.Volume {
	t.Helper()
	resp, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
	if err != nil {
		t.Fatalf("CreateVolume(%s): %v", req.GetName(), err)
	}
	v := resp.GetVolume()
	if v.GetVolumeId() != volumeIDForName(req.GetName()) {
		t.Fatalf("CreateVolume(%s) volume ID = %q, want %q", req.GetName(), v.GetVolumeId(), volumeIDForName(req.GetName()))
	}
	return v
}

// wantNoVolume checks that nothing is recorded for name.
func (h *ctrlHarness) wantNoVolume(t *testing.T, name string) {
	t.Helper()
	if v, ok, err := h.db.Volume(volumeIDForName(name)); ok || err != nil {
		t.Errorf("volume %s is recorded after a failed CreateVolume: %+v (err %v)", name, v, err)
	}
}

// wantRemoteUnused checks that the resolver was never called.
func (h *ctrlHarness) wantRemoteUnused(t *testing.T) {
	t.Helper()
	if resolves, lists, opens := h.res.Counts(); resolves+lists+opens != 0 {
		t.Errorf("remote was used: %d resolves, %d lists, %d opens", resolves, lists, opens)
	}
}

func TestCreateVolumeModelFromClassAndClaim(t *testing.T) {
	ifNotPresent := map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullIfNotPresent}
	tests := []struct {
		name   string
		class  map[string]string
		ann    map[string]string // nil: the claim has no annotations
		noPVC  bool              // the claim does not exist
		noMeta bool              // no claim name and namespace in the parameters
		want   map[string]string // volume_context
	}{
		{
			name:   "class only, no claim metadata",
			class:  map[string]string{AttrModelURI: testURI},
			noMeta: true,
			want:   ifNotPresent,
		},
		{
			name:  "class only, claim without annotations",
			class: map[string]string{AttrModelURI: testURI},
			want:  ifNotPresent,
		},
		{
			name:  "class with every parameter",
			class: map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullAlways, AttrDigest: pinA},
			want:  map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullAlways, AttrDigest: pinA},
		},
		{
			name:  "annotation overrides the class model under an allowed prefix",
			class: map[string]string{AttrModelURI: testURI, ParamAllowedModelURIPrefixes: "mys3:models"},
			ann:   map[string]string{kube.AnnotationModelURI: otherURI},
			want:  map[string]string{AttrModelURI: otherURI, AttrPullPolicy: PullIfNotPresent},
		},
		{
			name:  "annotation names a model equal to an allowed prefix, among several",
			class: map[string]string{AttrModelURI: testURI, ParamAllowedModelURIPrefixes: "s3://public, mys3:models/resnet ,gs://x"},
			ann:   map[string]string{kube.AnnotationModelURI: otherURI},
			want:  map[string]string{AttrModelURI: otherURI, AttrPullPolicy: PullIfNotPresent},
		},
		{
			name:  "annotation naming another model with the class's pin keeps it",
			class: map[string]string{AttrModelURI: testURI, AttrDigest: pinA, ParamAllowedModelURIPrefixes: "mys3:models"},
			ann:   map[string]string{kube.AnnotationModelURI: otherURI, kube.AnnotationDigest: pinA},
			want:  map[string]string{AttrModelURI: otherURI, AttrPullPolicy: PullIfNotPresent, AttrDigest: pinA},
		},
		{
			name:  "annotation naming the class model keeps the class digest",
			class: map[string]string{AttrModelURI: testURI, AttrDigest: pinA},
			ann:   map[string]string{kube.AnnotationModelURI: testURI},
			want:  map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullIfNotPresent, AttrDigest: pinA},
		},
		{
			name:  "annotation naming the class model in another spelling needs no prefix",
			class: map[string]string{AttrModelURI: testURI},
			ann:   map[string]string{kube.AnnotationModelURI: "mys3:/" + strings.TrimPrefix(testURI, "mys3:") + "/"},
			want:  map[string]string{AttrModelURI: "mys3:/" + strings.TrimPrefix(testURI, "mys3:") + "/", AttrPullPolicy: PullIfNotPresent},
		},
		{
			name:  "annotation digest alone pins the class model",
			class: map[string]string{AttrModelURI: testURI},
			ann:   map[string]string{kube.AnnotationDigest: pinB},
			want:  map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullIfNotPresent, AttrDigest: pinB},
		},
		{
			name:  "annotation digest equal to the class digest",
			class: map[string]string{AttrModelURI: testURI, AttrDigest: pinA},
			ann:   map[string]string{kube.AnnotationDigest: pinA},
			want:  map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullIfNotPresent, AttrDigest: pinA},
		},
		{
			name:  "pull-policy annotation overrides the class",
			class: map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullAlways},
			ann:   map[string]string{kube.AnnotationPullPolicy: PullNever},
			want:  map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullNever},
		},
		{
			name:  "class pull policy kept without the annotation",
			class: map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullNever, ParamAllowedModelURIPrefixes: "mys3:models"},
			ann:   map[string]string{kube.AnnotationModelURI: otherURI},
			want:  map[string]string{AttrModelURI: otherURI, AttrPullPolicy: PullNever},
		},
		{
			name:  "no class model, annotation names it under an allowed prefix",
			class: map[string]string{ParamAllowedModelURIPrefixes: "mys3:models"},
			ann:   map[string]string{kube.AnnotationModelURI: otherURI, kube.AnnotationPullPolicy: PullAlways, kube.AnnotationDigest: pinB},
			want:  map[string]string{AttrModelURI: otherURI, AttrPullPolicy: PullAlways, AttrDigest: pinB},
		},
		{
			name:  "empty annotations are ignored",
			class: map[string]string{AttrModelURI: testURI, AttrDigest: pinA},
			ann:   map[string]string{kube.AnnotationModelURI: "", kube.AnnotationPullPolicy: "", kube.AnnotationDigest: ""},
			want:  map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullIfNotPresent, AttrDigest: pinA},
		},
		{
			name:  "annotations of other owners are ignored",
			class: map[string]string{AttrModelURI: testURI},
			ann: map[string]string{
				"example.com/model-uri":          otherURI,
				AttrModelURI:                     otherURI,
				"modelcache.csi.dev/pullPolicy":  PullNever,
				"volume.kubernetes.io/storage-x": "y",
			},
			want: ifNotPresent,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var pvcs []*corev1.PersistentVolumeClaim
			if !tc.noPVC {
				pvcs = append(pvcs, newPVC(claimNS, claimName, tc.ann))
			}
			claims, _ := claimsFor(pvcs...)
			h := newCtrlHarness(t, claims)
			params := tc.class
			if !tc.noMeta {
				params = withClaim(tc.class, claimNS, claimName)
			}
			classBefore := maps.Clone(params)
			v := h.mustCreate(t, createReq("pvc-precedence", params))
			if !maps.Equal(v.GetVolumeContext(), tc.want) {
				t.Errorf("volume_context = %v, want %v", v.GetVolumeContext(), tc.want)
			}
			if !maps.Equal(params, classBefore) {
				t.Errorf("CreateVolume changed the request's parameters: %v, was %v", params, classBefore)
			}
			wantReads := 1
			if tc.noMeta {
				wantReads = 0
			}
			if n := claims.count(); n != wantReads {
				t.Errorf("claim read %d times, want %d", n, wantReads)
			}
			// The record holds what the response said.
			rec, ok, err := h.db.Volume(v.GetVolumeId())
			if err != nil || !ok {
				t.Fatalf("no record of volume %s: %v", v.GetVolumeId(), err)
			}
			if !maps.Equal(rec.Context, tc.want) || rec.Name != "pvc-precedence" {
				t.Errorf("record = %+v, want context %v", rec, tc.want)
			}
		})
	}
}

// A claim chooses its model only under the prefixes its StorageClass lists,
// and never drops the class's digest pin; everything else is
// INVALID_ARGUMENT before the remote is contacted, saying what to change.
func TestCreateVolumeClaimOverrideRefused(t *testing.T) {
	tests := []struct {
		name  string
		class map[string]string
		ann   map[string]string
		hints []string
	}{
		{"class without allowed prefixes",
			map[string]string{AttrModelURI: testURI},
			map[string]string{kube.AnnotationModelURI: otherURI},
			[]string{claimNS + "/" + claimName, kube.AnnotationModelURI, otherURI, "does not let claims choose", ParamAllowedModelURIPrefixes}},
		{"class without model or allowed prefixes",
			map[string]string{},
			map[string]string{kube.AnnotationModelURI: otherURI},
			[]string{"does not let claims choose", ParamAllowedModelURIPrefixes}},
		{"class with a pull policy only",
			map[string]string{AttrPullPolicy: PullAlways},
			map[string]string{kube.AnnotationModelURI: otherURI},
			[]string{"does not let claims choose", ParamAllowedModelURIPrefixes}},
		{"model beside the prefix, not under it",
			map[string]string{AttrModelURI: testURI, ParamAllowedModelURIPrefixes: "mys3:models/res"},
			map[string]string{kube.AnnotationModelURI: otherURI},
			[]string{otherURI, "not under the prefixes", "mys3:models/res"}},
		{"model above the prefix",
			map[string]string{AttrModelURI: otherURI, ParamAllowedModelURIPrefixes: "mys3:models/iris/v1"},
			map[string]string{kube.AnnotationModelURI: testURI},
			[]string{"not under the prefixes"}},
		{"model on another remote",
			map[string]string{AttrModelURI: testURI, ParamAllowedModelURIPrefixes: "mys3:models"},
			map[string]string{kube.AnnotationModelURI: "platform:models/resnet"},
			[]string{"not under the prefixes"}},
		{"model on another scheme",
			map[string]string{AttrModelURI: testURI, ParamAllowedModelURIPrefixes: "mys3:models"},
			map[string]string{kube.AnnotationModelURI: "s3://models/resnet"},
			[]string{"not under the prefixes"}},
		{"model of another bucket sharing the name's start",
			map[string]string{AttrModelURI: "s3://models/iris", ParamAllowedModelURIPrefixes: "s3://models"},
			map[string]string{kube.AnnotationModelURI: "s3://models-private/keys"},
			[]string{"not under the prefixes"}},
		{"another model of a pinned class",
			map[string]string{AttrModelURI: testURI, AttrDigest: pinA, ParamAllowedModelURIPrefixes: "mys3:models"},
			map[string]string{kube.AnnotationModelURI: otherURI},
			[]string{"pins digest " + pinA, kube.AnnotationDigest}},
		{"another model and another pin of a pinned class",
			map[string]string{AttrModelURI: testURI, AttrDigest: pinA, ParamAllowedModelURIPrefixes: "mys3:models"},
			map[string]string{kube.AnnotationModelURI: otherURI, kube.AnnotationDigest: pinB},
			[]string{kube.AnnotationDigest, pinB, "pins " + pinA}},
		{"another pin of a pinned class",
			map[string]string{AttrModelURI: testURI, AttrDigest: pinA},
			map[string]string{kube.AnnotationDigest: pinB},
			[]string{kube.AnnotationDigest, pinB, "pins " + pinA}},
		{"allowed prefix that is not a modelUri",
			map[string]string{AttrModelURI: testURI, ParamAllowedModelURIPrefixes: "mys3:models/../secrets"},
			map[string]string{kube.AnnotationModelURI: otherURI},
			[]string{"StorageClass parameter " + ParamAllowedModelURIPrefixes, ".."}},
		{"allowed prefixes empty",
			map[string]string{AttrModelURI: testURI, ParamAllowedModelURIPrefixes: " , "},
			map[string]string{kube.AnnotationModelURI: otherURI},
			[]string{ParamAllowedModelURIPrefixes, "is empty"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			claims, _ := claimsFor(newPVC(claimNS, claimName, tc.ann))
			h := newCtrlHarness(t, claims)
			req := createReq("pvc-override", withClaim(tc.class, claimNS, claimName))
			req.Secrets = provisionerSecrets()
			_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
			wantCtrlCode(t, err, codes.InvalidArgument, tc.hints...)
			h.wantNoVolume(t, "pvc-override")
			h.wantRemoteUnused(t)
		})
	}
}

// Where the claim cannot be read, or is not consulted, CreateVolume says so.
func TestCreateVolumeClaimLookup(t *testing.T) {
	class := map[string]string{AttrModelURI: testURI}
	ifNotPresent := map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullIfNotPresent}

	t.Run("no claim reader uses the class parameters", func(t *testing.T) {
		h := newCtrlHarness(t, nil)
		v := h.mustCreate(t, createReq("pvc-nil-claims", withClaim(class, claimNS, claimName)))
		if !maps.Equal(v.GetVolumeContext(), ifNotPresent) {
			t.Errorf("volume_context = %v, want %v", v.GetVolumeContext(), ifNotPresent)
		}
	})
	t.Run("no claim reader and no class model", func(t *testing.T) {
		h := newCtrlHarness(t, nil)
		_, err := h.ctrl.CreateVolume(ctrlCtx(t), createReq("pvc-nil-claims", withClaim(nil, claimNS, claimName)))
		wantCtrlCode(t, err, codes.InvalidArgument, AttrModelURI, kube.AnnotationModelURI, "--extra-create-metadata")
		h.wantNoVolume(t, "pvc-nil-claims")
	})
	for _, tc := range []struct {
		name   string
		params map[string]string
	}{
		{"claim name only", map[string]string{AttrModelURI: testURI, pvcNameKey: claimName}},
		{"claim namespace only", map[string]string{AttrModelURI: testURI, pvcNamespaceKey: claimNS}},
		{"empty claim name", map[string]string{AttrModelURI: testURI, pvcNameKey: "", pvcNamespaceKey: claimNS}},
	} {
		t.Run(tc.name+" does not read the claim", func(t *testing.T) {
			claims, _ := claimsFor(newPVC(claimNS, claimName, map[string]string{kube.AnnotationModelURI: otherURI}))
			h := newCtrlHarness(t, claims)
			v := h.mustCreate(t, createReq("pvc-partial", tc.params))
			if !maps.Equal(v.GetVolumeContext(), ifNotPresent) {
				t.Errorf("volume_context = %v, want %v", v.GetVolumeContext(), ifNotPresent)
			}
			if n := claims.count(); n != 0 {
				t.Errorf("claim read %d times, want 0", n)
			}
		})
	}
	t.Run("missing claim is NotFound", func(t *testing.T) {
		claims, _ := claimsFor(newPVC(claimNS, "another-claim", map[string]string{kube.AnnotationModelURI: otherURI}))
		h := newCtrlHarness(t, claims)
		_, err := h.ctrl.CreateVolume(ctrlCtx(t), createReq("pvc-missing", withClaim(class, claimNS, claimName)))
		wantCtrlCode(t, err, codes.NotFound, claimNS+"/"+claimName, "deleted")
		h.wantNoVolume(t, "pvc-missing")
		h.wantRemoteUnused(t)
	})
	t.Run("claim in another namespace is NotFound", func(t *testing.T) {
		claims, _ := claimsFor(newPVC("default", claimName, nil))
		h := newCtrlHarness(t, claims)
		_, err := h.ctrl.CreateVolume(ctrlCtx(t), createReq("pvc-other-ns", withClaim(class, claimNS, claimName)))
		wantCtrlCode(t, err, codes.NotFound, claimNS+"/"+claimName)
	})
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"API server error", apierrors.NewInternalError(errors.New("etcdserver: request timed out"))},
		{"API server unavailable", apierrors.NewServiceUnavailable("the server is currently unable to handle the request")},
		{"RBAC forbids reading claims", apierrors.NewForbidden(schema.GroupResource{Resource: "persistentvolumeclaims"}, claimName, errors.New("no RBAC policy matched"))},
		{"connection refused", errors.New("dial tcp 10.96.0.1:443: connect: connection refused")},
	} {
		t.Run(tc.name+" is Unavailable", func(t *testing.T) {
			claims, cs := claimsFor(newPVC(claimNS, claimName, map[string]string{kube.AnnotationModelURI: otherURI}))
			cs.PrependReactor("get", "persistentvolumeclaims", func(k8stesting.Action) (bool, runtime.Object, error) {
				return true, nil, tc.err
			})
			h := newCtrlHarness(t, claims)
			req := createReq("pvc-api-error", withClaim(class, claimNS, claimName))
			req.Secrets = provisionerSecrets()
			_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
			wantCtrlCode(t, err, codes.Unavailable, claimNS+"/"+claimName, "retry")
			h.wantNoVolume(t, "pvc-api-error")
			h.wantRemoteUnused(t)
		})
	}
}

// Bad annotation values are refused like bad class parameters, and the
// secret in an annotation URI is not repeated.
func TestCreateVolumeInvalidAnnotations(t *testing.T) {
	class := map[string]string{AttrModelURI: testURI}
	tests := []struct {
		name  string
		ann   map[string]string
		hints []string
	}{
		{"short digest", map[string]string{kube.AnnotationDigest: "sha256:abc"}, []string{AttrDigest, `"sha256:abc"`}},
		{"uppercase digest", map[string]string{kube.AnnotationDigest: strings.ToUpper(pinA)}, []string{AttrDigest}},
		{"digest of another algorithm", map[string]string{kube.AnnotationDigest: "md5:" + strings.Repeat("a", 32)}, []string{AttrDigest}},
		{"unknown pull policy", map[string]string{kube.AnnotationPullPolicy: "Sometimes"}, []string{kube.AnnotationPullPolicy, `"Sometimes"`, PullIfNotPresent}},
		{"lowercase pull policy", map[string]string{kube.AnnotationPullPolicy: "always"}, []string{kube.AnnotationPullPolicy, `"always"`}},
		{"unsupported scheme", map[string]string{kube.AnnotationModelURI: "ftp://models.example/iris"}, []string{AttrModelURI, "ftp"}},
		{"no remote", map[string]string{kube.AnnotationModelURI: "models/iris"}, []string{AttrModelURI}},
		{"dot-dot path", map[string]string{kube.AnnotationModelURI: "mys3:models/../etc"}, []string{AttrModelURI, ".."}},
		{"connection string", map[string]string{kube.AnnotationModelURI: ":s3,secret_access_key=" + ctrlSecretValue + ":models/iris"}, []string{"connection string"}},
		{"https user info", map[string]string{kube.AnnotationModelURI: "https://admin:" + ctrlSecretValue + "@models.example/iris"}, []string{"user info"}},
		{"https query token", map[string]string{kube.AnnotationModelURI: "https://models.example/iris?token=" + ctrlSecretValue}, []string{"query"}},
		{"bad model drops nothing else", map[string]string{kube.AnnotationModelURI: "ftp://x/y", kube.AnnotationDigest: pinB}, []string{"ftp"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			claims, _ := claimsFor(newPVC(claimNS, claimName, tc.ann))
			h := newCtrlHarness(t, claims)
			req := createReq("pvc-bad-annotation", withClaim(class, claimNS, claimName))
			req.Secrets = provisionerSecrets()
			_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
			wantCtrlCode(t, err, codes.InvalidArgument, tc.hints...)
			h.wantNoVolume(t, "pvc-bad-annotation")
			h.wantRemoteUnused(t)
		})
	}
}

// An invalid annotation is the claim author's mistake; the message should
// send them to the annotation, not to a StorageClass they may not own.
func TestCreateVolumeInvalidAnnotationNamesTheAnnotation(t *testing.T) {
	for _, tc := range []struct{ key, value string }{
		{kube.AnnotationPullPolicy, "Sometimes"},
		{kube.AnnotationDigest, "sha256:abc"},
		{kube.AnnotationModelURI, "ftp://models.example/iris"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			claims, _ := claimsFor(newPVC(claimNS, claimName, map[string]string{tc.key: tc.value}))
			h := newCtrlHarness(t, claims)
			_, err := h.ctrl.CreateVolume(ctrlCtx(t), createReq("pvc-bad-annotation", withClaim(map[string]string{AttrModelURI: testURI}, claimNS, claimName)))
			wantCtrlCode(t, err, codes.InvalidArgument, tc.key)
		})
	}
}

func TestCreateVolumeValidation(t *testing.T) {
	reader := csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
	valid := func() *csi.CreateVolumeRequest {
		r := createReq("pvc-invalid", map[string]string{AttrModelURI: testURI})
		r.Secrets = provisionerSecrets()
		return r
	}
	tests := []struct {
		name   string
		modify func(r *csi.CreateVolumeRequest)
		hints  []string
	}{
		{"missing name", func(r *csi.CreateVolumeRequest) { r.Name = "" }, []string{"name"}},
		{"missing capabilities", func(r *csi.CreateVolumeRequest) { r.VolumeCapabilities = nil }, []string{"volume_capabilities"}},
		{"empty capabilities", func(r *csi.CreateVolumeRequest) { r.VolumeCapabilities = []*csi.VolumeCapability{} }, []string{"volume_capabilities"}},
		{"nil capability", func(r *csi.CreateVolumeRequest) { r.VolumeCapabilities = []*csi.VolumeCapability{nil} }, []string{"mount access"}},
		{"no access type", func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csi.VolumeCapability{{AccessMode: &csi.VolumeCapability_AccessMode{Mode: reader}}}
		}, []string{"mount access"}},
		{"block access", func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csi.VolumeCapability{blockCapability(reader)}
		}, []string{"block", "Filesystem"}},
		{"block after a mount", func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = append(r.VolumeCapabilities, blockCapability(reader))
		}, []string{"block"}},
		{"no access mode", func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csi.VolumeCapability{{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}}}}
		}, []string{"UNKNOWN", "read-only model cache"}},
		{"writer after a reader", func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = append(r.VolumeCapabilities, mountCapability(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER))
		}, []string{"SINGLE_NODE_WRITER", "read-only model cache"}},
		{"snapshot content source", func(r *csi.CreateVolumeRequest) {
			r.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: "snap-1"}}}
		}, []string{"content source", "dataSource"}},
		{"volume content source", func(r *csi.CreateVolumeRequest) {
			r.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: volumeIDForName("pvc-src")}}}
		}, []string{"content source"}},
		{"required above limit", func(r *csi.CreateVolumeRequest) {
			r.CapacityRange = &csi.CapacityRange{RequiredBytes: 2 << 30, LimitBytes: 1 << 30}
		}, []string{"capacity range", fmt.Sprint(2 << 30), fmt.Sprint(1 << 30)}},
		{"negative required", func(r *csi.CreateVolumeRequest) { r.CapacityRange = &csi.CapacityRange{RequiredBytes: -1} }, []string{"capacity range", "-1"}},
		{"negative limit", func(r *csi.CreateVolumeRequest) { r.CapacityRange = &csi.CapacityRange{LimitBytes: -1} }, []string{"capacity range", "-1"}},
		{"negative limit above required", func(r *csi.CreateVolumeRequest) {
			r.CapacityRange = &csi.CapacityRange{RequiredBytes: -5, LimitBytes: -1}
		}, []string{"capacity range"}},
		{"no model", func(r *csi.CreateVolumeRequest) { r.Parameters = nil }, []string{AttrModelURI, kube.AnnotationModelURI}},
		{"empty model", func(r *csi.CreateVolumeRequest) { r.Parameters[AttrModelURI] = "" }, []string{AttrModelURI, kube.AnnotationModelURI}},
		{"unknown parameter", func(r *csi.CreateVolumeRequest) { r.Parameters["modelURI"] = testURI }, []string{"unknown StorageClass parameter", `"modelURI"`}},
		{"misspelt allowed prefixes", func(r *csi.CreateVolumeRequest) { r.Parameters["allowedModelURIPrefixes"] = "mys3:models" }, []string{`"allowedModelURIPrefixes"`, ParamAllowedModelURIPrefixes}},
		{"unknown parameter holding a secret", func(r *csi.CreateVolumeRequest) { r.Parameters["accessKey"] = ctrlSecretValue }, []string{`"accessKey"`}},
		{"bad class model", func(r *csi.CreateVolumeRequest) { r.Parameters[AttrModelURI] = "ftp://models.example/iris" }, []string{"StorageClass parameter", AttrModelURI, "ftp"}},
		{"bad class pull policy", func(r *csi.CreateVolumeRequest) { r.Parameters[AttrPullPolicy] = "Sometimes" }, []string{"StorageClass parameter", AttrPullPolicy, "Sometimes"}},
		{"bad class digest", func(r *csi.CreateVolumeRequest) { r.Parameters[AttrDigest] = "sha256:xyz" }, []string{"StorageClass parameter", AttrDigest}},
	}
	for _, mode := range []csi.VolumeCapability_AccessMode_Mode{
		csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER,
		csi.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER,
		csi.VolumeCapability_AccessMode_UNKNOWN,
	} {
		tests = append(tests, struct {
			name   string
			modify func(r *csi.CreateVolumeRequest)
			hints  []string
		}{"access mode " + mode.String(), func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csi.VolumeCapability{mountCapability(mode)}
		}, []string{mode.String(), "read-only model cache", "ReadOnlyMany"}})
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newCtrlHarness(t, nil)
			req := valid()
			tc.modify(req)
			_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
			wantCtrlCode(t, err, codes.InvalidArgument, tc.hints...)
			h.wantRemoteUnused(t)
			h.wantNoVolume(t, "pvc-invalid")
			h.wantNoVolume(t, "")
		})
	}
}

func TestCreateVolumeAccepts(t *testing.T) {
	tests := []struct {
		name   string
		caps   []*csi.VolumeCapability
		params map[string]string
		rng    *csi.CapacityRange
	}{
		{name: "MULTI_NODE_READER_ONLY", caps: []*csi.VolumeCapability{mountCapability(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)}},
		{name: "SINGLE_NODE_READER_ONLY", caps: []*csi.VolumeCapability{mountCapability(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)}},
		{name: "both reader modes", caps: []*csi.VolumeCapability{
			mountCapability(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY),
			mountCapability(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY),
		}},
		{name: "mount with fs type and flags", caps: []*csi.VolumeCapability{{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4", MountFlags: []string{"noatime"}}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY},
		}}},
		{name: "namespaced unknown parameters are ignored", params: map[string]string{
			"csi.storage.k8s.io/provisioner-secret-name":      "seldon-rclone-secret",
			"csi.storage.k8s.io/provisioner-secret-namespace": "seldon",
			"csi.storage.k8s.io/pv/name":                      "pvc-6f1a2b3c",
			"example.com/anything":                            "x",
		}},
		{name: "required equals limit", rng: &csi.CapacityRange{RequiredBytes: 1 << 30, LimitBytes: 1 << 30}},
		{name: "required without limit", rng: &csi.CapacityRange{RequiredBytes: 10 << 30}},
		{name: "limit without required", rng: &csi.CapacityRange{LimitBytes: 1 << 30}},
		{name: "empty range", rng: &csi.CapacityRange{}},
	}
	want := map[string]string{AttrModelURI: testURI, AttrPullPolicy: PullIfNotPresent}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newCtrlHarness(t, nil)
			req := createReq("pvc-ok", map[string]string{AttrModelURI: testURI})
			if tc.caps != nil {
				req.VolumeCapabilities = tc.caps
			}
			maps.Copy(req.Parameters, tc.params)
			req.CapacityRange = tc.rng
			v := h.mustCreate(t, req)
			if !maps.Equal(v.GetVolumeContext(), want) {
				t.Errorf("volume_context = %v, want exactly %v", v.GetVolumeContext(), want)
			}
			if v.GetCapacityBytes() != 0 {
				t.Errorf("capacity without a provisioner secret = %d, want 0 (unknown)", v.GetCapacityBytes())
			}
			if strings.Contains(v.GetVolumeId(), testURI) || strings.Contains(v.GetVolumeId(), "pvc-ok") {
				t.Errorf("volume ID %q carries the model or the name", v.GetVolumeId())
			}
			h.wantRemoteUnused(t)
		})
	}
}

func TestCreateVolumeCapacity(t *testing.T) {
	size := sourcetest.SizeOf(irisFiles())
	tests := []struct {
		name      string
		noSecrets bool
		rng       *csi.CapacityRange
		want      int64 // capacity; ignored when code is not OK
		code      codes.Code
	}{
		{name: "no secret: unknown size", noSecrets: true, want: 0},
		{name: "no secret, claim request: still unknown", noSecrets: true, rng: &csi.CapacityRange{RequiredBytes: 10 << 30}, want: 0},
		{name: "no secret, tiny limit: not checked", noSecrets: true, rng: &csi.CapacityRange{LimitBytes: 1}, want: 0},
		{name: "model size", want: size},
		{name: "model larger than required", rng: &csi.CapacityRange{RequiredBytes: size - 1}, want: size},
		{name: "model equal to required", rng: &csi.CapacityRange{RequiredBytes: size}, want: size},
		{name: "model smaller than required", rng: &csi.CapacityRange{RequiredBytes: 10 << 30}, want: 10 << 30},
		{name: "model equal to limit", rng: &csi.CapacityRange{LimitBytes: size}, want: size},
		{name: "model within range", rng: &csi.CapacityRange{RequiredBytes: 1, LimitBytes: 1 << 30}, want: size},
		{name: "model below a range", rng: &csi.CapacityRange{RequiredBytes: 1 << 20, LimitBytes: 1 << 30}, want: 1 << 20},
		{name: "model at exact range", rng: &csi.CapacityRange{RequiredBytes: size, LimitBytes: size}, want: size},
		{name: "model above limit", rng: &csi.CapacityRange{LimitBytes: size - 1}, code: codes.OutOfRange},
		{name: "model above required=limit", rng: &csi.CapacityRange{RequiredBytes: 100, LimitBytes: 100}, code: codes.OutOfRange},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newCtrlHarness(t, nil)
			req := createReq("pvc-capacity", map[string]string{AttrModelURI: testURI})
			req.CapacityRange = tc.rng
			if !tc.noSecrets {
				req.Secrets = provisionerSecrets()
			}
			resp, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
			resolves, lists, _ := h.res.Counts()
			if tc.noSecrets && resolves+lists != 0 {
				t.Errorf("no provisioner secret, yet the remote was used: %d resolves, %d lists", resolves, lists)
			}
			if !tc.noSecrets && (resolves != 1 || lists != 1) {
				t.Errorf("with a provisioner secret: %d resolves, %d lists, want 1 and 1", resolves, lists)
			}
			if tc.code != codes.OK {
				wantCtrlCode(t, err, tc.code, testURI, fmt.Sprint(size), fmt.Sprint(tc.rng.GetLimitBytes()), "limit")
				h.wantNoVolume(t, "pvc-capacity")
				return
			}
			if err != nil {
				t.Fatalf("CreateVolume: %v", err)
			}
			if got := resp.GetVolume().GetCapacityBytes(); got != tc.want {
				t.Errorf("capacity = %d, want %d (model is %d bytes)", got, tc.want, size)
			}
			rec, ok, err := h.db.Volume(resp.GetVolume().GetVolumeId())
			if err != nil || !ok || rec.Capacity != tc.want {
				t.Errorf("record = %+v, %v, %v; want capacity %d", rec, ok, err, tc.want)
			}
		})
	}
}

// Remote errors while sizing the model map through provisionError, leave
// no record, and a retry once the cause is fixed succeeds.
func TestCreateVolumeRemoteErrors(t *testing.T) {
	size := sourcetest.SizeOf(irisFiles())
	missing := "mys3:models/not-there"
	tests := []struct {
		name   string
		uri    string
		inject func(r *sourcetest.Resolver)
		fix    func(r *sourcetest.Resolver)
		code   codes.Code
		hints  []string
	}{
		{
			name: "resolve refuses the secret's config",
			inject: func(r *sourcetest.Resolver) {
				r.ResolveErr = fmt.Errorf("backend type %q is not allowed: %w", "local", source.ErrInvalid)
			},
			fix:   func(r *sourcetest.Resolver) { r.ResolveErr = nil },
			code:  codes.InvalidArgument,
			hints: []string{testURI, "not allowed"},
		},
		{
			name:   "unsafe object key",
			inject: func(r *sourcetest.Resolver) { r.ListErr = fmt.Errorf("object %q: %w", "../x", source.ErrUnsafePath) },
			fix:    func(r *sourcetest.Resolver) { r.ListErr = nil },
			code:   codes.InvalidArgument,
			hints:  []string{testURI},
		},
		{
			name: "model not at the remote",
			uri:  missing,
			fix: func(r *sourcetest.Resolver) {
				r.Put(missing, irisFiles(), time.Unix(0, 0))
			},
			code:  codes.NotFound,
			hints: []string{missing, "not found", kube.AnnotationModelURI},
		},
		{
			name: "credentials refused",
			inject: func(r *sourcetest.Resolver) {
				r.ListErr = fmt.Errorf("listing %s: 403 Forbidden: %w", testURI, source.ErrDenied)
			},
			fix:   func(r *sourcetest.Resolver) { r.ListErr = nil },
			code:  codes.PermissionDenied,
			hints: []string{testURI, "provisioner-secret-name"},
		},
		{
			name:   "resolve refuses credentials",
			inject: func(r *sourcetest.Resolver) { r.ResolveErr = fmt.Errorf("401 Unauthorized: %w", source.ErrDenied) },
			fix:    func(r *sourcetest.Resolver) { r.ResolveErr = nil },
			code:   codes.PermissionDenied,
			hints:  []string{testURI},
		},
		{
			name: "remote unreachable",
			inject: func(r *sourcetest.Resolver) {
				r.ListErr = fmt.Errorf("dial tcp: connection refused: %w", source.ErrUnavailable)
			},
			fix:   func(r *sourcetest.Resolver) { r.ListErr = nil },
			code:  codes.Unavailable,
			hints: []string{testURI, "retry"},
		},
		{
			name:   "listing times out",
			inject: func(r *sourcetest.Resolver) { r.ListErr = fmt.Errorf("listing: %w", context.DeadlineExceeded) },
			fix:    func(r *sourcetest.Resolver) { r.ListErr = nil },
			code:   codes.Unavailable,
			hints:  []string{testURI, "retry"},
		},
		{
			name:   "unclassified error",
			inject: func(r *sourcetest.Resolver) { r.ListErr = errors.New("unexpected EOF") },
			fix:    func(r *sourcetest.Resolver) { r.ListErr = nil },
			code:   codes.Internal,
			hints:  []string{testURI, "unexpected EOF"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newCtrlHarness(t, nil)
			uri := testURI
			if tc.uri != "" {
				uri = tc.uri
			}
			if tc.inject != nil {
				h.res.Set(tc.inject)
			}
			req := createReq("pvc-remote-error", map[string]string{AttrModelURI: uri})
			req.Secrets = provisionerSecrets()
			_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
			wantCtrlCode(t, err, tc.code, tc.hints...)
			h.wantNoVolume(t, "pvc-remote-error")

			h.res.Set(tc.fix)
			v := h.mustCreate(t, req)
			if v.GetCapacityBytes() != size {
				t.Errorf("capacity after the retry = %d, want %d", v.GetCapacityBytes(), size)
			}
		})
	}

	t.Run("remote that never answers", func(t *testing.T) {
		h := newCtrlHarness(t, nil)
		h.res.Set(func(r *sourcetest.Resolver) { r.ListWaitsForCtx = true })
		c, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		req := createReq("pvc-hang", map[string]string{AttrModelURI: testURI})
		req.Secrets = provisionerSecrets()
		_, err := h.ctrl.CreateVolume(c, req)
		wantCtrlCode(t, err, codes.Unavailable, testURI)
		h.wantNoVolume(t, "pvc-hang")
	})
}

func TestCreateVolumeIdempotent(t *testing.T) {
	size := sourcetest.SizeOf(irisFiles())
	claims, _ := claimsFor(newPVC(claimNS, claimName, map[string]string{kube.AnnotationModelURI: otherURI, kube.AnnotationDigest: pinA}))
	h := newCtrlHarness(t, claims)

	first := createReq("pvc-idem", map[string]string{AttrModelURI: testURI, AttrDigest: pinA})
	first.Secrets = provisionerSecrets()
	first.CapacityRange = &csi.CapacityRange{RequiredBytes: 1}
	v1 := h.mustCreate(t, first)
	if v1.GetCapacityBytes() != size {
		t.Fatalf("capacity = %d, want the model's %d bytes", v1.GetCapacityBytes(), size)
	}

	same := []struct {
		name   string
		modify func(r *csi.CreateVolumeRequest)
	}{
		{"identical request", func(*csi.CreateVolumeRequest) {}},
		{"without the secret", func(r *csi.CreateVolumeRequest) { r.Secrets = nil }},
		{"explicit default pull policy", func(r *csi.CreateVolumeRequest) { r.Parameters[AttrPullPolicy] = PullIfNotPresent }},
		{"range holding the recorded capacity", func(r *csi.CreateVolumeRequest) {
			r.CapacityRange = &csi.CapacityRange{RequiredBytes: size, LimitBytes: size}
		}},
		{"no range", func(r *csi.CreateVolumeRequest) { r.CapacityRange = nil }},
		{"other reader mode", func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csi.VolumeCapability{mountCapability(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)}
		}},
		{"namespaced parameters differ", func(r *csi.CreateVolumeRequest) { r.Parameters["csi.storage.k8s.io/pv/name"] = "pvc-x" }},
	}
	for _, tc := range same {
		t.Run("same: "+tc.name, func(t *testing.T) {
			req := proto.Clone(first).(*csi.CreateVolumeRequest)
			tc.modify(req)
			v := h.mustCreate(t, req)
			if !proto.Equal(v, v1) {
				t.Errorf("repeated CreateVolume = %v, want %v", v, v1)
			}
			if resolves, lists, _ := h.res.Counts(); resolves != 1 || lists != 1 {
				t.Errorf("repeated CreateVolume used the remote: %d resolves, %d lists in all, want 1 and 1", resolves, lists)
			}
		})
	}

	different := []struct {
		name   string
		modify func(r *csi.CreateVolumeRequest)
	}{
		{"other model", func(r *csi.CreateVolumeRequest) { r.Parameters[AttrModelURI] = otherURI }},
		{"other pull policy", func(r *csi.CreateVolumeRequest) { r.Parameters[AttrPullPolicy] = PullAlways }},
		{"other pin", func(r *csi.CreateVolumeRequest) { r.Parameters[AttrDigest] = pinB }},
		{"pin removed", func(r *csi.CreateVolumeRequest) { delete(r.Parameters, AttrDigest) }},
		{"claim annotation names another model", func(r *csi.CreateVolumeRequest) {
			r.Parameters = withClaim(r.Parameters, claimNS, claimName)
			r.Parameters[ParamAllowedModelURIPrefixes] = "mys3:models"
		}},
		{"recorded capacity above the new limit", func(r *csi.CreateVolumeRequest) {
			r.CapacityRange = &csi.CapacityRange{LimitBytes: size - 1}
		}},
		{"recorded capacity below the new request", func(r *csi.CreateVolumeRequest) {
			r.CapacityRange = &csi.CapacityRange{RequiredBytes: size + 1}
		}},
	}
	for _, tc := range different {
		t.Run("different: "+tc.name, func(t *testing.T) {
			req := proto.Clone(first).(*csi.CreateVolumeRequest)
			tc.modify(req)
			_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
			wantCtrlCode(t, err, codes.AlreadyExists, "pvc-idem", testURI, "delete the volume first")
			rec, ok, err := h.db.Volume(v1.GetVolumeId())
			if err != nil || !ok || !maps.Equal(rec.Context, v1.GetVolumeContext()) || rec.Capacity != size {
				t.Errorf("record after ALREADY_EXISTS = %+v, %v, %v; want it unchanged", rec, ok, err)
			}
		})
	}
	if resolves, lists, _ := h.res.Counts(); resolves != 1 || lists != 1 {
		t.Errorf("conflicting requests used the remote: %d resolves, %d lists in all, want 1 and 1", resolves, lists)
	}

	// Another name is another volume.
	other := proto.Clone(first).(*csi.CreateVolumeRequest)
	other.Name = "pvc-idem-2"
	other.Parameters[AttrModelURI] = otherURI
	delete(other.Parameters, AttrDigest)
	v2 := h.mustCreate(t, other)
	if v2.GetVolumeId() == v1.GetVolumeId() {
		t.Errorf("two names got one volume ID %s", v1.GetVolumeId())
	}
}

// csi-sanity's "already existing name and different capacity" spec, with
// the provisioner secret its test setup passes: the model is smaller than
// the request, so the volume is recorded with the requested size.
func TestCreateVolumeDifferentCapacitySanity(t *testing.T) {
	const gib = int64(1) << 30
	h := newCtrlHarness(t, nil)
	req := createReq("sanity-different-capacity", map[string]string{AttrModelURI: testURI})
	req.Secrets = provisionerSecrets()
	req.CapacityRange = &csi.CapacityRange{RequiredBytes: 10 * gib, LimitBytes: 10 * gib}
	v := h.mustCreate(t, req)
	if v.GetCapacityBytes() != 10*gib {
		t.Fatalf("capacity = %d, want %d", v.GetCapacityBytes(), 10*gib)
	}
	req.CapacityRange = &csi.CapacityRange{RequiredBytes: 20 * gib, LimitBytes: 20 * gib}
	_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
	wantCtrlCode(t, err, codes.AlreadyExists, "sanity-different-capacity")

	// A smaller range that still holds the recorded 10 GiB is the same volume.
	req.CapacityRange = &csi.CapacityRange{RequiredBytes: 5 * gib}
	if v2 := h.mustCreate(t, req); v2.GetCapacityBytes() != 10*gib {
		t.Errorf("capacity = %d, want the recorded %d", v2.GetCapacityBytes(), 10*gib)
	}
}

// Without a provisioner secret the size is unknown (0) and recorded as
// such; the controller then treats any valid range as compatible.
func TestCreateVolumeUnknownCapacityFitsAnyRange(t *testing.T) {
	h := newCtrlHarness(t, nil)
	req := createReq("pvc-unknown-size", map[string]string{AttrModelURI: testURI})
	req.CapacityRange = &csi.CapacityRange{RequiredBytes: 1 << 30}
	v := h.mustCreate(t, req)
	for _, rng := range []*csi.CapacityRange{{RequiredBytes: 2 << 30}, {LimitBytes: 1}, nil} {
		req.CapacityRange = rng
		if v2 := h.mustCreate(t, req); !proto.Equal(v2, v) {
			t.Errorf("range %v: %v, want %v", rng, v2, v)
		}
	}
	// A later request with a secret is answered from the record too.
	req.Secrets = provisionerSecrets()
	if v2 := h.mustCreate(t, req); v2.GetCapacityBytes() != 0 {
		t.Errorf("capacity = %d, want the recorded 0", v2.GetCapacityBytes())
	}
	h.wantRemoteUnused(t)
}

// Many CreateVolume calls for one name at once (the provisioner retrying
// while the first is still running) get one volume and one listing.
func TestCreateVolumeConcurrent(t *testing.T) {
	size := sourcetest.SizeOf(irisFiles())
	h := newCtrlHarness(t, nil)
	const n = 32
	var wg sync.WaitGroup
	ids := make([]string, n)
	caps := make([]int64, n)
	errs := make([]error, n)
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			req := createReq("pvc-concurrent", map[string]string{AttrModelURI: testURI})
			req.Secrets = provisionerSecrets()
			resp, err := h.ctrl.CreateVolume(context.Background(), req)
			ids[i], caps[i], errs[i] = resp.GetVolume().GetVolumeId(), resp.GetVolume().GetCapacityBytes(), err
		})
	}
	close(start)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Errorf("call %d: %v", i, errs[i])
			continue
		}
		if ids[i] != volumeIDForName("pvc-concurrent") || caps[i] != size {
			t.Errorf("call %d: volume %s of %d bytes, want %s of %d", i, ids[i], caps[i], volumeIDForName("pvc-concurrent"), size)
		}
	}
	if lists := h.res.ListCount(); lists != 1 {
		t.Errorf("%d concurrent CreateVolume calls listed the model %d times, want 1", n, lists)
	}
	if k := h.ctrl.names.Len(); k != 0 {
		t.Errorf("%d name locks left after all calls returned", k)
	}

	// Different names proceed in parallel and each gets its own volume.
	var wg2 sync.WaitGroup
	for i := range 8 {
		wg2.Go(func() {
			req := createReq(fmt.Sprintf("pvc-parallel-%d", i), map[string]string{AttrModelURI: testURI})
			if _, err := h.ctrl.CreateVolume(context.Background(), req); err != nil {
				t.Errorf("pvc-parallel-%d: %v", i, err)
			}
		})
	}
	wg2.Wait()
	for i := range 8 {
		if _, ok, err := h.db.Volume(volumeIDForName(fmt.Sprintf("pvc-parallel-%d", i))); !ok || err != nil {
			t.Errorf("pvc-parallel-%d not recorded (err %v)", i, err)
		}
	}
}

func TestDeleteVolume(t *testing.T) {
	t.Run("missing ID", func(t *testing.T) {
		h := newCtrlHarness(t, nil)
		_, err := h.ctrl.DeleteVolume(ctrlCtx(t), &csi.DeleteVolumeRequest{Secrets: provisionerSecrets()})
		wantCtrlCode(t, err, codes.InvalidArgument, "volume_id")
	})
	for _, id := range []string{
		"fake-vol-id",
		"6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b",
		volumeIDForName("never-created"),
		volumeIDForName("never-created")[:volumeIDLen-1],
		strings.Repeat("x", 4096),
	} {
		t.Run("unknown "+id[:min(len(id), 20)], func(t *testing.T) {
			h := newCtrlHarness(t, nil)
			for range 2 {
				if _, err := h.ctrl.DeleteVolume(ctrlCtx(t), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
					t.Fatalf("DeleteVolume(%q) = %v, want OK", id, err)
				}
			}
		})
	}
	t.Run("delete, validate, create again", func(t *testing.T) {
		h := newCtrlHarness(t, nil)
		req := createReq("pvc-delete", map[string]string{AttrModelURI: testURI})
		v := h.mustCreate(t, req)
		keep := h.mustCreate(t, createReq("pvc-keep", map[string]string{AttrModelURI: testURI}))

		if _, err := h.ctrl.DeleteVolume(ctrlCtx(t), &csi.DeleteVolumeRequest{VolumeId: v.GetVolumeId(), Secrets: provisionerSecrets()}); err != nil {
			t.Fatalf("DeleteVolume: %v", err)
		}
		h.wantNoVolume(t, "pvc-delete")
		if _, ok, err := h.db.Volume(keep.GetVolumeId()); !ok || err != nil {
			t.Errorf("deleting one volume forgot another (err %v)", err)
		}
		_, err := h.ctrl.ValidateVolumeCapabilities(ctrlCtx(t), &csi.ValidateVolumeCapabilitiesRequest{
			VolumeId:           v.GetVolumeId(),
			VolumeCapabilities: req.VolumeCapabilities,
		})
		wantCtrlCode(t, err, codes.NotFound, v.GetVolumeId(), "does not exist")
		if _, err := h.ctrl.DeleteVolume(ctrlCtx(t), &csi.DeleteVolumeRequest{VolumeId: v.GetVolumeId()}); err != nil {
			t.Errorf("second DeleteVolume = %v, want OK", err)
		}
		// After deletion the name is free, even for another model.
		req.Parameters[AttrModelURI] = otherURI
		v2 := h.mustCreate(t, req)
		if v2.GetVolumeContext()[AttrModelURI] != otherURI {
			t.Errorf("recreated volume_context = %v, want model %s", v2.GetVolumeContext(), otherURI)
		}
	})
}

func TestValidateVolumeCapabilities(t *testing.T) {
	h := newCtrlHarness(t, nil)
	params := map[string]string{AttrModelURI: testURI, "csi.storage.k8s.io/pv/name": "pvc-x"}
	v := h.mustCreate(t, createReq("pvc-validate", params))
	id := v.GetVolumeId()
	reader := mountCapability(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)

	errTests := []struct {
		name  string
		req   *csi.ValidateVolumeCapabilitiesRequest
		code  codes.Code
		hints []string
	}{
		{"missing ID", &csi.ValidateVolumeCapabilitiesRequest{VolumeCapabilities: []*csi.VolumeCapability{reader}}, codes.InvalidArgument, []string{"volume_id"}},
		{"missing capabilities", &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id}, codes.InvalidArgument, []string{"volume_capabilities"}},
		{"missing capabilities, unknown ID", &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "fake-vol-id"}, codes.InvalidArgument, []string{"volume_capabilities"}},
		{"foreign ID", &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "fake-vol-id", VolumeCapabilities: []*csi.VolumeCapability{reader}}, codes.NotFound, []string{"fake-vol-id", "does not exist"}},
		{"edited ID", &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id[:volumeIDLen-1] + "x", VolumeCapabilities: []*csi.VolumeCapability{reader}}, codes.NotFound, []string{"does not exist"}},
		{"unrecorded ID", &csi.ValidateVolumeCapabilitiesRequest{VolumeId: volumeIDForName("never-created"), VolumeCapabilities: []*csi.VolumeCapability{reader}}, codes.NotFound, []string{volumeIDForName("never-created"), "does not exist"}},
	}
	for _, tc := range errTests {
		t.Run(tc.name, func(t *testing.T) {
			tc.req.Secrets = provisionerSecrets()
			_, err := h.ctrl.ValidateVolumeCapabilities(ctrlCtx(t), tc.req)
			wantCtrlCode(t, err, tc.code, tc.hints...)
		})
	}

	notConfirmed := []struct {
		name   string
		caps   []*csi.VolumeCapability
		params map[string]string
		hint   string
	}{
		{name: "block", caps: []*csi.VolumeCapability{blockCapability(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)}, hint: "block"},
		{name: "reader then writer", caps: []*csi.VolumeCapability{reader, mountCapability(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}, hint: "MULTI_NODE_MULTI_WRITER"},
		{name: "bad model parameter", params: map[string]string{AttrModelURI: "ftp://models.example/iris"}, hint: "ftp"},
		{name: "bad pull policy parameter", params: map[string]string{AttrModelURI: testURI, AttrPullPolicy: "Sometimes"}, hint: "Sometimes"},
		{name: "bad digest parameter", params: map[string]string{AttrModelURI: testURI, AttrDigest: "sha256:abc"}, hint: AttrDigest},
		{name: "unknown parameter", params: map[string]string{AttrModelURI: testURI, "modelURI": testURI}, hint: `"modelURI"`},
		{name: "empty model parameter", params: map[string]string{AttrModelURI: ""}, hint: AttrModelURI},
	}
	for _, mode := range []csi.VolumeCapability_AccessMode_Mode{
		csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER,
		csi.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER,
	} {
		notConfirmed = append(notConfirmed, struct {
			name   string
			caps   []*csi.VolumeCapability
			params map[string]string
			hint   string
		}{name: mode.String(), caps: []*csi.VolumeCapability{mountCapability(mode)}, hint: "read-only model cache"})
	}
	for _, tc := range notConfirmed {
		t.Run("not confirmed: "+tc.name, func(t *testing.T) {
			caps := tc.caps
			if caps == nil {
				caps = []*csi.VolumeCapability{reader}
			}
			resp, err := h.ctrl.ValidateVolumeCapabilities(ctrlCtx(t), &csi.ValidateVolumeCapabilitiesRequest{
				VolumeId:           id,
				VolumeCapabilities: caps,
				VolumeContext:      v.GetVolumeContext(),
				Parameters:         tc.params,
				Secrets:            provisionerSecrets(),
			})
			if err != nil {
				t.Fatalf("ValidateVolumeCapabilities: %v, want a response that does not confirm", err)
			}
			if resp.GetConfirmed() != nil {
				t.Errorf("confirmed %v, want nil", resp.GetConfirmed())
			}
			if !strings.Contains(resp.GetMessage(), tc.hint) {
				t.Errorf("message %q does not contain %q", resp.GetMessage(), tc.hint)
			}
			if strings.Contains(resp.GetMessage(), ctrlSecretValue) {
				t.Errorf("message leaks the secret: %q", resp.GetMessage())
			}
		})
	}

	confirmed := []struct {
		name   string
		caps   []*csi.VolumeCapability
		vc     map[string]string
		params map[string]string
	}{
		{name: "MULTI_NODE_READER_ONLY", caps: []*csi.VolumeCapability{reader}, vc: v.GetVolumeContext(), params: params},
		{name: "SINGLE_NODE_READER_ONLY", caps: []*csi.VolumeCapability{mountCapability(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)}, vc: v.GetVolumeContext(), params: params},
		{name: "both reader modes", caps: []*csi.VolumeCapability{reader, mountCapability(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)}},
		{name: "no parameters", caps: []*csi.VolumeCapability{reader}, vc: v.GetVolumeContext()},
		{name: "full class parameters", caps: []*csi.VolumeCapability{reader}, params: map[string]string{AttrModelURI: otherURI, AttrPullPolicy: PullAlways, AttrDigest: pinA, "csi.storage.k8s.io/provisioner-secret-name": "s"}},
	}
	for _, tc := range confirmed {
		t.Run("confirmed: "+tc.name, func(t *testing.T) {
			resp, err := h.ctrl.ValidateVolumeCapabilities(ctrlCtx(t), &csi.ValidateVolumeCapabilitiesRequest{
				VolumeId:           id,
				VolumeCapabilities: tc.caps,
				VolumeContext:      tc.vc,
				Parameters:         tc.params,
				Secrets:            provisionerSecrets(),
			})
			if err != nil {
				t.Fatalf("ValidateVolumeCapabilities: %v", err)
			}
			c := resp.GetConfirmed()
			if c == nil {
				t.Fatalf("not confirmed: %q", resp.GetMessage())
			}
			if len(c.GetVolumeCapabilities()) != len(tc.caps) {
				t.Fatalf("confirmed %d capabilities, want %d", len(c.GetVolumeCapabilities()), len(tc.caps))
			}
			for i := range tc.caps {
				if !proto.Equal(c.GetVolumeCapabilities()[i], tc.caps[i]) {
					t.Errorf("confirmed capability %d = %v, want %v", i, c.GetVolumeCapabilities()[i], tc.caps[i])
				}
			}
			if !maps.Equal(c.GetVolumeContext(), tc.vc) {
				t.Errorf("confirmed volume_context = %v, want %v", c.GetVolumeContext(), tc.vc)
			}
			if !maps.Equal(c.GetParameters(), tc.params) {
				t.Errorf("confirmed parameters = %v, want %v", c.GetParameters(), tc.params)
			}
		})
	}
	h.wantRemoteUnused(t)
}

// Parameters CreateVolume would refuse must not be confirmed, whether or
// not they name a model (a class may leave the model to claim annotations).
func TestValidateVolumeCapabilitiesUnknownParameterWithoutModel(t *testing.T) {
	h := newCtrlHarness(t, nil)
	v := h.mustCreate(t, createReq("pvc-validate", map[string]string{AttrModelURI: testURI}))
	for _, params := range []map[string]string{
		{"modelURI": testURI},
		{AttrPullPolicy: "Sometimes"},
		{AttrDigest: "sha256:abc"},
		{ParamAllowedModelURIPrefixes: "mys3:models/../x"},
		{ParamAllowedModelURIPrefixes: ""},
	} {
		resp, err := h.ctrl.ValidateVolumeCapabilities(ctrlCtx(t), &csi.ValidateVolumeCapabilitiesRequest{
			VolumeId:           v.GetVolumeId(),
			VolumeCapabilities: []*csi.VolumeCapability{mountCapability(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)},
			Parameters:         params,
		})
		if err != nil {
			t.Fatalf("ValidateVolumeCapabilities(%v): %v", params, err)
		}
		if resp.GetConfirmed() != nil {
			t.Errorf("parameters %v confirmed; CreateVolume refuses them", params)
		}
	}
	params := map[string]string{ParamAllowedModelURIPrefixes: "mys3:models,s3://public"}
	resp, err := h.ctrl.ValidateVolumeCapabilities(ctrlCtx(t), &csi.ValidateVolumeCapabilitiesRequest{
		VolumeId:           v.GetVolumeId(),
		VolumeCapabilities: []*csi.VolumeCapability{mountCapability(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)},
		Parameters:         params,
	})
	if err != nil || resp.GetConfirmed() == nil {
		t.Errorf("parameters %v not confirmed: %v, %v; CreateVolume accepts them", params, resp.GetMessage(), err)
	}
}

func TestControllerGetCapabilities(t *testing.T) {
	h := newCtrlHarness(t, nil)
	resp, err := h.ctrl.ControllerGetCapabilities(ctrlCtx(t), &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatalf("ControllerGetCapabilities: %v", err)
	}
	caps := resp.GetCapabilities()
	if len(caps) != 1 {
		t.Fatalf("capabilities = %v, want exactly CREATE_DELETE_VOLUME", caps)
	}
	if got := caps[0].GetRpc().GetType(); got != csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME {
		t.Errorf("capability = %v, want CREATE_DELETE_VOLUME", got)
	}
}

// The "secrets stay in memory" invariant for the controller: provisioner secrets appear in no error,
// no record and no log line, at any verbosity.
func TestControllerSecretsStayInMemory(t *testing.T) {
	logs := captureKlog(t, 10)
	claims, _ := claimsFor(newPVC(claimNS, claimName, map[string]string{kube.AnnotationModelURI: otherURI}))
	h := newCtrlHarness(t, claims)
	secrets := provisionerSecrets()

	requests := []*csi.CreateVolumeRequest{
		createReq("pvc-ok", map[string]string{AttrModelURI: testURI}),
		createReq("pvc-claim", withClaim(map[string]string{AttrModelURI: testURI, ParamAllowedModelURIPrefixes: "mys3:models"}, claimNS, claimName)),
		createReq("pvc-missing-model", map[string]string{AttrModelURI: "mys3:models/missing"}),
		createReq("pvc-bad-param", map[string]string{AttrModelURI: testURI, "secretKey": ctrlSecretValue}),
		createReq("pvc-ok", map[string]string{AttrModelURI: otherURI}), // ALREADY_EXISTS
	}
	for _, req := range requests {
		req.Secrets = secrets
		_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
		if err != nil {
			wantCtrlCode(t, err, grpcstatus.Code(err))
		}
	}
	h.res.Set(func(r *sourcetest.Resolver) { r.ListErr = fmt.Errorf("listing: 403: %w", source.ErrDenied) })
	req := createReq("pvc-denied", map[string]string{AttrModelURI: testURI})
	req.Secrets = secrets
	_, err := h.ctrl.CreateVolume(ctrlCtx(t), req)
	wantCtrlCode(t, err, codes.PermissionDenied)

	for _, name := range []string{"pvc-ok", "pvc-claim"} {
		rec, ok, err := h.db.Volume(volumeIDForName(name))
		if !ok || err != nil {
			t.Fatalf("volume %s not recorded (err %v)", name, err)
		}
		dump := fmt.Sprintf("%+v", rec)
		for _, s := range append([]string{ctrlSecretValue}, secretValues...) {
			if strings.Contains(dump, s) {
				t.Errorf("record of %s holds a secret: %s", name, dump)
			}
		}
		for k := range secrets {
			if strings.Contains(dump, k) {
				t.Errorf("record of %s holds secret key %s: %s", name, k, dump)
			}
		}
	}
	out := logs.String()
	if !strings.Contains(out, "volume created") {
		t.Fatalf("captured no controller log line; the check below would prove nothing:\n%s", out)
	}
	wantNoSecrets(t, out)
	if strings.Contains(out, ctrlSecretValue) {
		t.Errorf("log output contains the provisioner secret:\n%s", out)
	}
}
