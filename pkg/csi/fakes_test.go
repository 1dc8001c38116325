package csi

// Fakes and helpers shared by the unit tests of this package. They need no
// root and no network: the remote serves bytes from memory, the mounter is
// mount.Fake, and the store and state database are the real ones in a
// temporary directory.

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// TestMain keeps klog's per-publish lines out of test output; tests that
// check logging capture it themselves.
func TestMain(m *testing.M) {
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	os.Exit(m.Run())
}

// waitLimit bounds every wait on another goroutine. Correctness never
// depends on it; it only turns a hang into a failure on a loaded machine.
const waitLimit = 60 * time.Second

// Test models and credentials.
const (
	testURI   = "mys3:models/iris"
	otherURI  = "mys3:models/resnet"
	secretKey = "s3cr3t-Secret-Access-Key-0123456789abcdef"
	accessKey = "AKIAFAKEACCESSKEY9876"
	otherKey  = "an0ther-Tenants-Secret-Key-fedcba9876543210"
)

// testSecrets is a node-publish secret in rclone's environment form, as
// Seldon's seldon-rclone-secret carries it.
func testSecrets() map[string]string {
	return map[string]string{
		"RCLONE_CONFIG_MYS3_TYPE":              "s3",
		"RCLONE_CONFIG_MYS3_PROVIDER":          "Minio",
		"RCLONE_CONFIG_MYS3_ENDPOINT":          "http://minio.minio-system.svc.cluster.local:9000",
		"RCLONE_CONFIG_MYS3_ACCESS_KEY_ID":     accessKey,
		"RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": secretKey,
	}
}

// otherSecrets is another tenant's secret for the same remote.
func otherSecrets() map[string]string {
	s := testSecrets()
	s["RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY"] = otherKey
	return s
}

// secretValues are the values no message or log line may contain.
var secretValues = []string{secretKey, accessKey, otherKey}

// irisFiles is a small model.
func irisFiles() map[string][]byte {
	return map[string][]byte{
		"model-settings.json": []byte(`{"name":"iris","implementation":"mlserver_sklearn.SKLearnModel"}`),
		"model.joblib":        bytes.Repeat([]byte("iris weights "), 300),
		"tokenizer/vocab.txt": []byte("setosa\nversicolor\nvirginica\n"),
	}
}

// fakeModel is one model at the fake remote.
type fakeModel struct {
	files   map[string][]byte
	modTime time.Time
}

// fakeResolver resolves every modelUri to a fakeRemote backed by an
// in-memory map. It counts calls and can be told to fail or to hold
// downloads.
type fakeResolver struct {
	mu     sync.Mutex
	models map[string]*fakeModel // canonical modelUri → model

	resolves int
	lists    int
	verifies int
	opens    map[string]int // "uri|path" → Open calls

	// verifyDenied holds credential IDs whose Verify is refused.
	verifyDenied map[string]bool

	// Errors injected at each step; nil means succeed.
	resolveErr error
	listErr    error
	openErr    error

	// listWaitsForCtx makes List block until its context ends and return
	// the context's error, like a remote that never answers.
	listWaitsForCtx bool
	// listed receives the modelUri of every List call, when non-nil.
	listed chan string

	// gate, when non-nil, stops every reader once it has delivered
	// gateAfter bytes, until gate is closed or the download's context
	// ends; the reader sends its path on blocked first.
	gate      chan struct{}
	gateAfter int
	blocked   chan string
}

func newFakeResolver() *fakeResolver {
	return &fakeResolver{models: map[string]*fakeModel{}, opens: map[string]int{}}
}

// setModel puts (or replaces) a model at uri. A new modTime makes the
// listing change, as an upload would.
func (r *fakeResolver) setModel(uri string, files map[string][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	prev := r.models[uri]
	mt := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	if prev != nil {
		mt = prev.modTime.Add(time.Hour)
	}
	r.models[uri] = &fakeModel{files: files, modTime: mt}
}

// withGate makes readers stop after n bytes until release.
func (r *fakeResolver) withGate(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.gate = make(chan struct{})
	r.gateAfter = n
	r.blocked = make(chan string, 64)
}

func (r *fakeResolver) release() { close(r.gate) }

// set runs f with the resolver locked, to change its fields safely.
func (r *fakeResolver) set(f func(r *fakeResolver)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(r)
}

func (r *fakeResolver) counts() (resolves, lists, opens int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, n := range r.opens {
		opens += n
	}
	return r.resolves, r.lists, opens
}

func (r *fakeResolver) openCount(uri, path string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.opens[uri+"|"+path]
}

func (r *fakeResolver) listCount() int {
	_, l, _ := r.counts()
	return l
}

func (r *fakeResolver) openTotal() int {
	_, _, o := r.counts()
	return o
}

// Resolve implements source.Resolver.
func (r *fakeResolver) Resolve(_ context.Context, uri string, secrets map[string]string) (source.Remote, error) {
	r.mu.Lock()
	r.resolves++
	err := r.resolveErr
	r.mu.Unlock()
	if err != nil {
		return nil, err
	}
	u, err := source.ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return &fakeRemote{r: r, uri: u, credID: fingerprint(secrets)}, nil
}

// fingerprint stands in for the HMAC of the credentials: equal secrets give
// equal IDs, and the ID does not contain them.
func fingerprint(secrets map[string]string) string {
	keys := make([]string, 0, len(secrets))
	for k := range secrets {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	fmt.Fprint(h, "fake node key\x00")
	for _, k := range keys {
		fmt.Fprintf(h, "%s=%s\x00", k, secrets[k])
	}
	return "cred:" + hex.EncodeToString(h.Sum(nil))[:16]
}

// fakeRemote is one model reached with one request's credentials.
type fakeRemote struct {
	r      *fakeResolver
	uri    source.URI
	credID string
}

func (f *fakeRemote) URI() source.URI      { return f.uri }
func (f *fakeRemote) Identity() string     { return identityOf(f.uri.String()) }
func (f *fakeRemote) CredentialID() string { return f.credID }

// identityOf is the fake's backend identity for a modelUri.
func identityOf(uri string) string { return "fake-s3|minio.example|" + uri }

// Verify implements source.Remote: credentials listed in verifyDenied are
// refused, as the remote's HEAD would refuse them.
func (f *fakeRemote) Verify(_ context.Context, _ source.Manifest) error {
	r := f.r
	r.mu.Lock()
	defer r.mu.Unlock()
	r.verifies++
	if r.verifyDenied[f.credID] {
		return fmt.Errorf("HEAD %s: %w", f.uri, source.ErrDenied)
	}
	return nil
}

func (f *fakeRemote) List(ctx context.Context) (source.Manifest, error) {
	r := f.r
	r.mu.Lock()
	r.lists++
	err, wait, listed := r.listErr, r.listWaitsForCtx, r.listed
	m := r.models[f.uri.String()]
	var man source.Manifest
	if m != nil {
		man = manifestOf(m.files, m.modTime)
	}
	r.mu.Unlock()
	if listed != nil {
		listed <- f.uri.String()
	}
	if wait {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, err
	}
	if m == nil {
		return nil, fmt.Errorf("listing %s: %w", f.uri, source.ErrNotFound)
	}
	return man, nil
}

func (f *fakeRemote) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	r := f.r
	r.mu.Lock()
	defer r.mu.Unlock()
	r.opens[f.uri.String()+"|"+e.Path]++
	if r.openErr != nil {
		return nil, r.openErr
	}
	m := r.models[f.uri.String()]
	if m == nil {
		return nil, fmt.Errorf("opening %s/%s: %w", f.uri, e.Path, source.ErrNotFound)
	}
	data, ok := m.files[e.Path]
	if !ok {
		return nil, fmt.Errorf("opening %s/%s: %w", f.uri, e.Path, source.ErrNotFound)
	}
	return &gatedReader{ctx: ctx, data: data, path: e.Path, gate: r.gate, after: r.gateAfter, blocked: r.blocked}, nil
}

// gatedReader serves data, stopping once at after bytes while gate is open.
type gatedReader struct {
	ctx     context.Context
	data    []byte
	off     int
	path    string
	gate    chan struct{}
	after   int
	blocked chan string
	passed  bool
}

func (g *gatedReader) Read(p []byte) (int, error) {
	if g.gate != nil && !g.passed && g.off >= g.after && g.after < len(g.data) {
		g.blocked <- g.path
		select {
		case <-g.gate:
			g.passed = true
		case <-g.ctx.Done():
			return 0, g.ctx.Err()
		}
	}
	if g.off >= len(g.data) {
		return 0, io.EOF
	}
	end := len(g.data)
	if g.gate != nil && !g.passed && g.after < end {
		end = g.after
	}
	n := copy(p, g.data[g.off:end])
	g.off += n
	return n, nil
}

func (g *gatedReader) Close() error { return nil }

// manifestOf lists files the way a Remote does: sorted, with size, an
// ETag-like checksum and the upload time.
func manifestOf(files map[string][]byte, modTime time.Time) source.Manifest {
	var m source.Manifest
	for p, b := range files {
		sum := md5.Sum(b)
		m = append(m, source.Entry{Path: p, Size: int64(len(b)), Hash: hex.EncodeToString(sum[:]), ModTime: modTime})
	}
	slices.SortFunc(m, func(a, b source.Entry) int { return strings.Compare(a.Path, b.Path) })
	return m
}

// treeDigestOf is the digest the store must give a model's files.
func treeDigestOf(files map[string][]byte) string {
	m := manifestOf(files, time.Time{})
	sums := make([]string, len(m))
	for i, e := range m {
		s := sha256.Sum256(files[e.Path])
		sums[i] = hex.EncodeToString(s[:])
	}
	return store.TreeDigest(m, sums)
}

func sizeOf(files map[string][]byte) int64 {
	var n int64
	for _, b := range files {
		n += int64(len(b))
	}
	return n
}

// harness is a Node wired to a real store and state database in a
// temporary directory, the fake mounter and the fake resolver.
type harness struct {
	t     *testing.T
	dir   string
	node  *Node
	store *store.Store
	state *state.DB
	mnt   *mount.Fake
	res   *fakeResolver
	cache *cache.Cache
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	return newHarnessWith(t, func(*state.DB) store.Options { return store.Options{} })
}

// newHarnessWith builds the harness with store options that may depend on
// the state database (e.g. as the store's Evictor).
func newHarnessWith(t *testing.T, opts func(db *state.DB) store.Options) *harness {
	t.Helper()
	dir := t.TempDir()
	db, err := state.Open(filepath.Join(dir, "cache", "state", "modelcache.db"))
	if err != nil {
		t.Fatalf("state.Open: %v", err)
	}
	st, err := store.Open(filepath.Join(dir, "cache"), db, opts(db))
	if err != nil {
		db.Close()
		t.Fatalf("store.Open: %v", err)
	}
	// Runs before t.TempDir's removal: stop downloads, close the database
	// and give sealed directories their write bits back for non-root runs.
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("store.Close: %v", err)
		}
		if err := db.Close(); err != nil {
			t.Errorf("state.Close: %v", err)
		}
		makeWritable(dir)
	})
	res := newFakeResolver()
	res.setModel(testURI, irisFiles())
	mnt := mount.NewFake()
	c := &cache.Cache{Store: st, State: db, Mounter: mnt}
	return &harness{
		t: t, dir: dir, store: st, state: db, mnt: mnt, res: res, cache: c,
		node: &Node{NodeID: "node-a", Resolver: res, Cache: c},
	}
}

// in returns h reporting to t, for use inside a subtest.
func (h *harness) in(t *testing.T) *harness {
	c := *h
	c.t = t
	return &c
}

// makeWritable restores write bits on sealed directories.
func makeWritable(dir string) {
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o700)
		}
		return nil
	})
}

// target is a kubelet-like target path for a pod's inline volume.
func (h *harness) target(pod string) string {
	return filepath.Join(h.dir, "kubelet", "pods", pod, "volumes", "kubernetes.io~csi", "model", "mount")
}

// publishReq builds a NodePublishVolume request the way kubelet does for a
// CSI inline volume: mount access, read-only, pod info in the context and
// the node-publish secret.
func publishReq(volumeID, target, uri string, attrs map[string]string) *csi.NodePublishVolumeRequest {
	vc := map[string]string{
		podNameKey:                               "model-server-0",
		podNamespaceKey:                          "seldon",
		podUIDKey:                                "0f3c2b1a-5d6e-4f70-8a9b-0c1d2e3f4a5b",
		"csi.storage.k8s.io/serviceAccount.name": "default",
		"csi.storage.k8s.io/ephemeral":           "true",
		AttrModelURI:                             uri,
	}
	for k, v := range attrs {
		vc[k] = v
	}
	return &csi.NodePublishVolumeRequest{
		VolumeId:   volumeID,
		TargetPath: target,
		VolumeCapability: &csi.VolumeCapability{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		},
		Readonly:      true,
		VolumeContext: vc,
		Secrets:       testSecrets(),
	}
}

// publish calls NodePublishVolume with a hang guard.
func (h *harness) publish(req *csi.NodePublishVolumeRequest) error {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	_, err := h.node.NodePublishVolume(ctx, req)
	return err
}

// mustPublish publishes and fails the test on any error.
func (h *harness) mustPublish(req *csi.NodePublishVolumeRequest) {
	h.t.Helper()
	if err := h.publish(req); err != nil {
		h.t.Fatalf("NodePublishVolume(%s → %s): %v", req.GetVolumeContext()[AttrModelURI], req.GetTargetPath(), err)
	}
}

// wantMounted checks that target is mounted from the tree with digest.
func (h *harness) wantMounted(target, digest string) {
	h.t.Helper()
	got, ok := h.mnt.Mounts()[target]
	if !ok {
		h.t.Fatalf("%s is not mounted; mounts: %v", target, h.mnt.Mounts())
	}
	if want := h.store.TreePath(digest); got != want {
		h.t.Fatalf("%s is mounted from %s, want %s", target, got, want)
	}
}

// wantRef checks the recorded reference for target.
func (h *harness) wantRef(target, volumeID, digest string) state.Ref {
	h.t.Helper()
	ref, ok, err := h.state.Ref(target)
	if err != nil || !ok {
		h.t.Fatalf("state.Ref(%s) = %v, %v; want a reference", target, ok, err)
	}
	if ref.VolumeID != volumeID || ref.Tree != digest || ref.TargetPath != target {
		h.t.Fatalf("reference = %+v; want volume %s, tree %s", ref, volumeID, digest)
	}
	return ref
}

// wantNothingAt checks that a failed publish left no trace at target.
func (h *harness) wantNothingAt(target string) {
	h.t.Helper()
	if src, ok := h.mnt.Mounts()[target]; ok {
		h.t.Errorf("%s is mounted from %s after a failed publish", target, src)
	}
	if _, ok, err := h.state.Ref(target); ok || err != nil {
		h.t.Errorf("state has a reference for %s after a failed publish (err %v)", target, err)
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		h.t.Errorf("target %s exists after a failed publish (stat: %v)", target, err)
	}
}

// wantCode checks a gRPC status: its code, a message that is not empty and
// holds every hint, and no secret value anywhere in it.
func wantCode(t *testing.T, err error, want codes.Code, hints ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", want)
	}
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("error %v is not a gRPC status", err)
	}
	if st.Code() != want {
		t.Fatalf("code = %v (%s), want %v", st.Code(), st.Message(), want)
	}
	msg := st.Message()
	if strings.TrimSpace(msg) == "" {
		t.Fatalf("%v error has an empty message", want)
	}
	for _, s := range secretValues {
		if strings.Contains(msg, s) {
			t.Fatalf("message leaks a secret: %q", msg)
		}
	}
	for _, h := range hints {
		if !strings.Contains(msg, h) {
			t.Errorf("message %q does not contain %q", msg, h)
		}
	}
}

// recv waits for a value from ch with a hang guard.
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitLimit):
		t.Fatalf("timed out waiting for %s", what)
		var zero T
		return zero
	}
}

// manifest is the listing the fake currently gives for uri.
func (r *fakeResolver) manifest(uri string) source.Manifest {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.models[uri]
	return manifestOf(m.files, m.modTime)
}
