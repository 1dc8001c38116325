package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/test/testenv"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// publish sends a NodePublishVolume as kubelet does for an inline volume.
func (e *env) publish(ctx context.Context, volumeID, target string, attrs, secrets map[string]string) error {
	_, err := e.driver.Node.NodePublishVolume(ctx, testenv.PublishRequest(volumeID, target, attrs, secrets))
	return err
}

func (e *env) mustPublish(volumeID, target string, attrs map[string]string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := e.publish(ctx, volumeID, target, attrs, e.secret()); err != nil {
		e.t.Fatalf("publishing %s at %s: %v", volumeID, target, err)
	}
}

func (e *env) mustUnpublish(volumeID, target string) {
	e.t.Helper()
	_, err := e.driver.Node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target})
	if err != nil {
		e.t.Fatalf("unpublishing %s: %v", target, err)
	}
	if _, err := os.Lstat(target); !os.IsNotExist(err) {
		e.t.Fatalf("target %s still exists after unpublish (err=%v)", target, err)
	}
	if opts := mountInfo(e.t, target); opts != "" {
		e.t.Fatalf("target %s is still mounted (%s) after unpublish", target, opts)
	}
}

func (e *env) model(prefix string) map[string]string {
	return map[string]string{"modelUri": "mys3:" + e.bucket + "/" + prefix}
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("got %v, want code %v", err, code)
	}
}

// The "one download per key" invariant: one download per content key per node, however many
// publishes arrive at once.
func TestPublish_50ConcurrentPods_RemoteServesModelOnce_RealMinIO(t *testing.T) {
	e := newEnv(t)
	files := randomModel(1, map[string]int{"model.safetensors": 8 << 20, "config.json": 300, "tokenizer/vocab.json": 200 << 10})
	e.upload("llm", files)

	const pods = 50
	var wg sync.WaitGroup
	errs := make([]error, pods)
	for i := range pods {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			errs[i] = e.publish(ctx, fmt.Sprintf("vol-%d", i), e.target(fmt.Sprintf("pod-%d", i)), e.model("llm"), e.secret())
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	if got, want := e.proxy.ObjectBytes(), total(files); got != want {
		t.Fatalf("the remote served %d object bytes for %d publishes, want exactly one copy of the model (%d)", got, pods, want)
	}
	if got := e.proxy.ObjectGets(); got != int64(len(files)) {
		t.Fatalf("the remote served %d object GETs, want %d (one per file)", got, len(files))
	}
	if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 1 {
		t.Fatalf("store holds trees %v, want exactly one", trees)
	}
	for i := range pods {
		sameFiles(t, e.target(fmt.Sprintf("pod-%d", i)), files)
	}
	for i := range pods {
		e.mustUnpublish(fmt.Sprintf("vol-%d", i), e.target(fmt.Sprintf("pod-%d", i)))
	}
}

// The "no partial model" invariant: a crash mid-download leaves no partial tree; the next start
// cleans ingest and the next publish serves correct bytes.
func TestPublish_Kill9MidDownload_NoPartialTree_RealMinIO(t *testing.T) {
	e := newEnv(t)
	files := randomModel(2, map[string]int{"a.bin": 6 << 20, "b.bin": 6 << 20})
	e.upload("m", files)
	e.proxy.RateBytesPerSec.Store(2 << 20)

	// Kill only once bytes are on disk in ingest/, so the crash is really mid-download.
	ingest := filepath.Join(e.cacheDir(), "ingest")
	e.killMidPublish("vol", e.target("pod-a"), e.model("m"), "1 MiB in ingest/", func() bool { return ingestedBytes(ingest) >= 1<<20 })
	if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 0 {
		t.Fatalf("a tree %v is visible after a crash mid-download", trees)
	}
	if opts := mountInfo(t, e.target("pod-a")); opts != "" {
		t.Fatalf("target mounted (%s) although the download never finished", opts)
	}

	e.proxy.RateBytesPerSec.Store(0)
	e.start()
	if left := entries(t, ingest); len(left) != 0 {
		t.Fatalf("ingest/ still holds %v after restart; leftovers must be cleaned at start-up", left)
	}
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	sameFiles(t, e.target("pod-a"), files)
	e.mustUnpublish("vol", e.target("pod-a"))
}

func ingestedBytes(dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// The "mounts survive restarts" invariant: mounts survive a driver restart and stay unpublishable.
func TestRestart_ThreeLiveMounts_StayReadableAndUnpublish_RealMinIO(t *testing.T) {
	e := newEnv(t)
	m1 := randomModel(3, map[string]int{"w.bin": 1 << 20})
	m2 := randomModel(4, map[string]int{"w.bin": 512 << 10, "cfg/c.json": 100})
	e.upload("m1", m1)
	e.upload("m2", m2)
	pods := []struct {
		vol, pod, prefix string
		files            map[string][]byte
	}{
		{"vol-1", "pod-1", "m1", m1},
		{"vol-2", "pod-2", "m1", m1},
		{"vol-3", "pod-3", "m2", m2},
	}
	for _, p := range pods {
		e.mustPublish(p.vol, e.target(p.pod), e.model(p.prefix))
	}
	e.driver.Kill()
	e.start()
	if !strings.Contains(e.driver.Logs(), "liveMounts=3") {
		t.Fatalf("driver did not find the 3 live mounts on start:\n%s", e.driver.Logs())
	}
	for _, p := range pods {
		sameFiles(t, e.target(p.pod), p.files)
		resp, err := e.driver.Node.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: p.vol, VolumePath: e.target(p.pod)})
		if err != nil {
			t.Fatalf("volume stats of %s after restart: %v", p.vol, err)
		}
		if resp.GetVolumeCondition().GetAbnormal() {
			t.Fatalf("volume %s reported abnormal after restart: %s", p.vol, resp.GetVolumeCondition().GetMessage())
		}
	}
	// Kubelet retries a publish it already saw succeed: still OK, no download.
	e.proxy.Reset()
	e.mustPublish("vol-1", e.target("pod-1"), e.model("m1"))
	if n := e.proxy.ObjectBytes(); n != 0 {
		t.Fatalf("idempotent publish after restart downloaded %d bytes", n)
	}
	for _, p := range pods {
		e.mustUnpublish(p.vol, e.target(p.pod))
	}
}

// The "read-only everywhere" invariant: read-only for real.
func TestPublish_TargetIsReadOnly_EROFS_RealMounts(t *testing.T) {
	e := newEnv(t)
	files := randomModel(5, map[string]int{"config.json": 100, "sub/w.bin": 4096})
	e.upload("m", files)
	target := e.target("pod")
	e.mustPublish("vol", target, e.model("m"))

	opts := mountInfo(t, target)
	for _, o := range []string{"ro", "nosuid", "nodev"} {
		if !contains(strings.Split(opts, ","), o) {
			t.Fatalf("mount options of %s are %q, want %s among them", target, opts, o)
		}
	}
	writes := map[string]func() error{
		"overwrite a file": func() error { return os.WriteFile(filepath.Join(target, "config.json"), []byte("{}"), 0o644) },
		"create a file":    func() error { return os.WriteFile(filepath.Join(target, "new"), []byte("x"), 0o644) },
		"make a directory": func() error { return os.Mkdir(filepath.Join(target, "d"), 0o755) },
		"remove a file":    func() error { return os.Remove(filepath.Join(target, "sub/w.bin")) },
		"chmod a file":     func() error { return os.Chmod(filepath.Join(target, "config.json"), 0o666) },
	}
	for name, write := range writes {
		if err := write(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s in the published target: got %v, want EROFS", name, err)
		}
	}
	sameFiles(t, target, files)
	fi, err := os.Stat(filepath.Join(target, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o444 {
		t.Fatalf("published file mode %v, want 0444", fi.Mode().Perm())
	}
	e.mustUnpublish("vol", target)
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

// The "no remote input becomes a path unchecked" invariant: no remote input becomes a path unchecked.
func TestPublish_EscapingObjectKey_InvalidArgument_RealMinIO(t *testing.T) {
	for _, evil := range []string{"../escape", "a/../../x", "/abs", "a//b"} {
		t.Run(strings.NewReplacer("/", "_", ".", "d").Replace(evil), func(t *testing.T) {
			e := newEnv(t)
			e.upload("m", map[string][]byte{"config.json": []byte("{}"), "evil": []byte("payload")})
			e.proxy.RewriteListings(testenv.RenameKey("m/evil", "m/"+evil))
			target := e.target("pod")
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			err := e.publish(ctx, "vol", target, e.model("m"), e.secret())
			wantCode(t, err, codes.InvalidArgument)
			if !strings.Contains(status.Convert(err).Message(), "rename or remove that object") {
				t.Fatalf("message does not tell the operator what to fix: %q", status.Convert(err).Message())
			}
			if n := e.proxy.ObjectBytes(); n != 0 {
				t.Fatalf("%d object bytes were downloaded for a model with an unsafe key", n)
			}
			if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 0 {
				t.Fatalf("a tree %v was committed for a model with an unsafe key", trees)
			}
			if _, err := os.Lstat(target); !os.IsNotExist(err) {
				t.Fatalf("target %s was created for a failed publish", target)
			}
			_ = filepath.Walk(e.dir, func(p string, fi os.FileInfo, err error) error {
				if err == nil && (fi.Name() == "escape" || fi.Name() == "x" || fi.Name() == "payload") {
					t.Errorf("%s was created from a hostile object key", p)
				}
				return nil
			})
		})
	}
}

// pullPolicy Always: a changed model lands in a new tree; a pod already
// running keeps the content it started with.
func TestPublish_PullAlways_ChangedModel_NewTreeOldMountUnchanged_RealMinIO(t *testing.T) {
	e := newEnv(t)
	v1 := randomModel(6, map[string]int{"w.bin": 256 << 10, "config.json": 50})
	e.upload("m", v1)
	attrs := e.model("m")
	attrs["pullPolicy"] = "Always"
	e.mustPublish("vol-a", e.target("pod-a"), attrs)

	v2 := randomModel(7, map[string]int{"w.bin": 300 << 10})
	v2["config.json"] = v1["config.json"]
	e.upload("m", v2)
	e.proxy.Reset()
	e.mustPublish("vol-b", e.target("pod-b"), attrs)

	sameFiles(t, e.target("pod-a"), v1)
	sameFiles(t, e.target("pod-b"), v2)
	if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 2 {
		t.Fatalf("store holds trees %v, want the old and the new one", trees)
	}
	// Only the changed file crosses the network; both versions share config.json's blob.
	if got, want := e.proxy.ObjectBytes(), int64(len(v2["w.bin"])+len(v2["config.json"])); got != want {
		t.Fatalf("second publish downloaded %d bytes, want %d (the model as listed now)", got, want)
	}
	blobs := entries(t, filepath.Join(e.cacheDir(), "blobs/sha256"))
	if len(blobs) != 3 {
		t.Fatalf("store holds %d blobs, want 3 (two weights, one shared config)", len(blobs))
	}

	// Always with an unchanged remote lists again but downloads nothing.
	e.proxy.Reset()
	e.mustPublish("vol-c", e.target("pod-c"), attrs)
	if n := e.proxy.ObjectBytes(); n != 0 {
		t.Fatalf("pullPolicy Always on an unchanged model downloaded %d bytes", n)
	}
	for _, p := range []string{"a", "b", "c"} {
		e.mustUnpublish("vol-"+p, e.target("pod-"+p))
	}
}

// The "downloads outlive the RPC" invariant: a publish that outlasts its deadline gets a non-final code
// with progress, and the retry joins the same download.
func TestPublish_SlowDownload_AbortedWithProgress_RetryJoins_RealMinIO(t *testing.T) {
	e := newEnv(t)
	files := randomModel(8, map[string]int{"w.bin": 6 << 20})
	e.upload("m", files)
	e.proxy.RateBytesPerSec.Store(1 << 20)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	err := e.publish(ctx, "vol", e.target("pod"), e.model("m"), e.secret())
	cancel()
	wantCode(t, err, codes.Aborted)
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "%") || !strings.Contains(msg, "still downloading") {
		t.Fatalf("ABORTED message carries no progress: %q", msg)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "kubelet")); err == nil {
		if opts := mountInfo(t, e.target("pod")); opts != "" {
			t.Fatalf("target mounted before the download finished")
		}
	}
	e.proxy.RateBytesPerSec.Store(64 << 20)
	e.mustPublish("vol", e.target("pod"), e.model("m"))
	sameFiles(t, e.target("pod"), files)
	if got, want := e.proxy.ObjectBytes(), total(files); got != want {
		t.Fatalf("the remote served %d bytes, want %d: the retry must join the running download", got, want)
	}
	e.mustUnpublish("vol", e.target("pod"))
}

// The CSI idempotency rules and the unpublish edge cases (the "idempotent publish" invariant).
func TestPublish_IdempotencyAndAlreadyExists_RealMounts(t *testing.T) {
	e := newEnv(t)
	e.upload("m1", randomModel(9, map[string]int{"w": 1000}))
	e.upload("m2", randomModel(10, map[string]int{"w": 1000}))
	target := e.target("pod")
	e.mustPublish("vol", target, e.model("m1"))
	e.mustPublish("vol", target, e.model("m1"))

	ctx := context.Background()
	wantCode(t, e.publish(ctx, "vol", target, e.model("m2"), e.secret()), codes.AlreadyExists)
	wantCode(t, e.publish(ctx, "other-vol", target, e.model("m1"), e.secret()), codes.AlreadyExists)
	pinned := e.model("m1")
	pinned["pullPolicy"] = "Never"
	wantCode(t, e.publish(ctx, "vol", target, pinned, e.secret()), codes.AlreadyExists)

	e.mustUnpublish("vol", target)
	e.mustUnpublish("vol", target) // already unpublished: OK
	e.mustUnpublish("never-published", e.target("nobody"))

	// A target directory kubelet left without a mount is removed too.
	stale := e.target("stale")
	if err := os.MkdirAll(stale, 0o750); err != nil {
		t.Fatal(err)
	}
	e.mustUnpublish("stale-vol", stale)
}

// The error table of docs/design.md, each against the real remote, and no secret
// in any message or log line even at the highest verbosity (the "secrets stay in memory" invariant).
func TestPublish_ErrorCodes_NoSecretsInMessagesOrLogs_RealMinIO(t *testing.T) {
	e := newEnv(t)
	e.driver.Stop()
	e.start("-v=10")
	files := randomModel(11, map[string]int{"w.bin": 2048})
	e.upload("m", files)

	port, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	wrongKey := e.secret()
	wrongKey["RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY"] = "wrong-secret-KxQ93jdlA0"
	unknownUser := e.secret()
	unknownUser["RCLONE_CONFIG_MYS3_ACCESS_KEY_ID"] = "nobody-AKIA7TESTKEY"
	unreachable := testenv.RcloneSecret("mys3", fmt.Sprintf("http://127.0.0.1:%d", port))
	localType := e.secret()
	localType["RCLONE_CONFIG_MYS3_TYPE"] = "local"
	envAuth := e.secret()
	envAuth["RCLONE_CONFIG_MYS3_ENV_AUTH"] = "true"
	cases := []struct {
		name    string
		attrs   map[string]string
		secrets map[string]string
		code    codes.Code
		hint    string
	}{
		{"wrong secret key", e.model("m"), wrongKey, codes.PermissionDenied, "check the node-publish secret"},
		{"unknown access key", e.model("m"), unknownUser, codes.PermissionDenied, "check the node-publish secret"},
		{"no such bucket", map[string]string{"modelUri": "mys3:no-such-bucket-xyz/m"}, e.secret(), codes.NotFound, "check the modelUri"},
		{"no such prefix", e.model("nothing-here"), e.secret(), codes.NotFound, "check the modelUri"},
		{"remote unreachable", e.model("m"), unreachable, codes.Unavailable, "kubelet will retry"},
		{"remote not in secret", map[string]string{"modelUri": "other:" + e.bucket + "/m"}, e.secret(), codes.InvalidArgument, "RCLONE_CONFIG_OTHER_"},
		{"local backend", e.model("m"), localType, codes.InvalidArgument, "not supported"},
		{"env_auth true", e.model("m"), envAuth, codes.InvalidArgument, "node's own credentials"},
		{"bad modelUri", map[string]string{"modelUri": "ftp://host/x"}, e.secret(), codes.InvalidArgument, "valid forms are"},
		{"missing modelUri", map[string]string{}, e.secret(), codes.InvalidArgument, "modelUri"},
		{"bad pullPolicy", map[string]string{"modelUri": "mys3:b/m", "pullPolicy": "Sometimes"}, e.secret(), codes.InvalidArgument, "IfNotPresent"},
		{"bad digest", map[string]string{"modelUri": "mys3:b/m", "digest": "md5:abc"}, e.secret(), codes.InvalidArgument, "sha256:"},
		{"unknown attribute", map[string]string{"modelUri": "mys3:b/m", "modeluri": "x"}, e.secret(), codes.InvalidArgument, "unknown volume attribute"},
		{"Never and not cached", map[string]string{"modelUri": "mys3:" + e.bucket + "/m", "pullPolicy": "Never"}, e.secret(), codes.FailedPrecondition, "prefetch"},
		{"digest pin mismatch", map[string]string{"modelUri": "mys3:" + e.bucket + "/m", "digest": "sha256:" + strings.Repeat("0", 64)}, e.secret(), codes.FailedPrecondition, "digest"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			target := e.target(fmt.Sprintf("err-%d", i))
			err := e.publish(ctx, "vol", target, c.attrs, c.secrets)
			wantCode(t, err, c.code)
			msg := status.Convert(err).Message()
			if !strings.Contains(msg, c.hint) {
				t.Fatalf("message %q does not say %q", msg, c.hint)
			}
			for k, v := range c.secrets {
				if strings.Contains(k, "KEY") && strings.Contains(msg, v) {
					t.Fatalf("message leaks secret %s: %q", k, msg)
				}
			}
			if _, err := os.Lstat(target); !os.IsNotExist(err) && c.code == codes.InvalidArgument {
				t.Fatalf("target %s was created for an invalid request", target)
			}
		})
	}
	if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 1 {
		// Only the digest-mismatch case downloads (to learn the digest).
		t.Fatalf("store holds trees %v after the error cases, want only the mismatched model's", trees)
	}
	logs := e.driver.Logs()
	for _, v := range []string{testenv.SecretKey, "wrong-secret-KxQ93jdlA0", "nobody-AKIA7TESTKEY"} {
		if strings.Contains(logs, v) {
			t.Fatalf("driver logs at -v=10 contain a secret value %q", v)
		}
	}
	if !strings.Contains(logs, "***stripped***") {
		t.Fatalf("requests were not logged through the sanitizer at -v=10; the log check above proves nothing")
	}
	for _, p := range []string{"state", "blobs", "trees"} {
		assertNotInFiles(t, filepath.Join(e.cacheDir(), p), testenv.SecretKey)
	}
}

func assertNotInFiles(t *testing.T, dir, secret string) {
	t.Helper()
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), secret) {
			t.Errorf("%s holds a secret value", p)
		}
		return nil
	})
}

// The storage-initializer form s3://bucket/prefix with AWS_* keys reaches the
// same bytes as the rclone remote form: it shares the tree after its own
// credentials were checked by a listing (the "authorized cache hits" invariant), downloading nothing.
func TestPublish_S3URIForm_SharesTreeWithRemoteForm_RealMinIO(t *testing.T) {
	e := newEnv(t)
	files := randomModel(12, map[string]int{"w.bin": 1 << 20})
	e.upload("m", files)
	e.mustPublish("vol-a", e.target("pod-a"), e.model("m"))

	e.proxy.Reset()
	aws := map[string]string{
		"AWS_ACCESS_KEY_ID":     testenv.AccessKey,
		"AWS_SECRET_ACCESS_KEY": testenv.SecretKey,
		"AWS_ENDPOINT_URL":      e.proxy.URL,
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.publish(ctx, "vol-b", e.target("pod-b"), map[string]string{"modelUri": "s3://" + e.bucket + "/m"}, aws); err != nil {
		t.Fatal(err)
	}
	sameFiles(t, e.target("pod-b"), files)
	if n := e.proxy.ObjectBytes(); n != 0 {
		t.Fatalf("the s3:// form downloaded %d bytes of a model already cached", n)
	}

	bad := map[string]string{"AWS_ACCESS_KEY_ID": testenv.AccessKey, "AWS_SECRET_ACCESS_KEY": "not-the-key-123", "AWS_ENDPOINT_URL": e.proxy.URL}
	err := e.publish(ctx, "vol-c", e.target("pod-c"), map[string]string{"modelUri": "s3://" + e.bucket + "/m"}, bad)
	wantCode(t, err, codes.PermissionDenied)
	e.mustUnpublish("vol-a", e.target("pod-a"))
	e.mustUnpublish("vol-b", e.target("pod-b"))
}

// The read-only-everywhere invariant, where kubelet sees it. In the
// DaemonSet the plugin runs in its own mount namespace and kubelet's pods
// directory is Bidirectional: its mounts propagate to the host, but a
// remount's per-mount flags never do. This runs the driver the same way
// (unshare, kubelet dir an rshared mount shared with this namespace) and
// checks the target in this test's — the host's — namespace.
func TestPublish_PluginInOwnMountNamespace_TargetReadOnlyOnHost_RealMounts(t *testing.T) {
	e := newEnv(t)
	e.driver.Stop()
	e.driver = nil

	kubelet := filepath.Join(e.dir, "kubelet")
	if err := os.MkdirAll(kubelet, 0o750); err != nil {
		t.Fatal(err)
	}
	// As the node must have it for Bidirectional propagation: kubelet's
	// root dir on a shared mount (here / is private, so bind it onto itself).
	if err := syscall.Mount(kubelet, kubelet, "", syscall.MS_BIND, ""); err != nil {
		t.Fatalf("binding the kubelet dir onto itself: %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(kubelet, syscall.MNT_DETACH) })
	if err := syscall.Mount("", kubelet, "", syscall.MS_SHARED|syscall.MS_REC, ""); err != nil {
		t.Fatalf("making the kubelet dir rshared: %v", err)
	}
	// --propagation unchanged: the driver's copy of the kubelet dir stays a
	// peer of the host's, as the container runtime's rshared bind is.
	d, err := testenv.StartDriverWrapped([]string{"unshare", "--mount", "--propagation", "unchanged"},
		driverBin, e.dir, e.cacheDir(), "-v=10")
	if err != nil {
		t.Fatal(err)
	}
	e.driver = d
	e.drivers = append(e.drivers, d)
	pid := d.Pid()
	if self, plugin := mountNamespace(t, os.Getpid()), mountNamespace(t, pid); self == plugin {
		t.Fatalf("the driver shares this test's mount namespace (%s); the test proves nothing", self)
	}

	files := randomModel(9, map[string]int{"config.json": 100, "w.bin": 4096})
	e.upload("m", files)
	for _, readonly := range []bool{true, false} {
		t.Run(fmt.Sprintf("readonly=%v", readonly), func(t *testing.T) {
			target := e.target(fmt.Sprintf("pod-ro-%v", readonly))
			req := testenv.PublishRequest(fmt.Sprintf("vol-ro-%v", readonly), target, e.model("m"), e.secret())
			req.Readonly = readonly
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if _, err := e.driver.Node.NodePublishVolume(ctx, req); err != nil {
				t.Fatalf("publish: %v", err)
			}
			for _, ns := range []struct {
				name string
				info string
			}{
				{"host", mountInfoOf(t, "/proc/self/mountinfo", target)},
				{"plugin", mountInfoOf(t, fmt.Sprintf("/proc/%d/mountinfo", pid), target)},
			} {
				if ns.info == "" {
					t.Fatalf("target is not mounted in the %s's mount namespace", ns.name)
				}
				for _, o := range []string{"ro", "nosuid", "nodev"} {
					if !contains(strings.Split(ns.info, ","), o) {
						t.Errorf("in the %s's mount namespace the target's options are %q, want %s among them", ns.name, ns.info, o)
					}
				}
			}
			err := os.WriteFile(filepath.Join(target, "config.json"), []byte("changed"), 0o644)
			if !errors.Is(err, syscall.EROFS) {
				t.Fatalf("writing config.json through the host's view of the target: got %v, want EROFS", err)
			}
			sameFiles(t, target, files)
			e.mustUnpublish(req.VolumeId, target)
		})
	}
}

// mountNamespace returns the mount namespace of a process, e.g. "mnt:[4026531841]".
func mountNamespace(t *testing.T, pid int) string {
	t.Helper()
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

// The "bytes checked against the remote" invariant against a remote that
// misbehaves: a proxy flips one byte in the middle of an 8 MiB object,
// size intact, as a broken middlebox on plain http would. The publish must
// fail with a retryable code naming the object and both checksums, keep
// nothing, and succeed with the right bytes once the remote behaves.
func TestPublish_ByteFlippedInTransfer_RefusedNothingKept_RealMinIO(t *testing.T) {
	e := newEnv(t)
	files := randomModel(11, map[string]int{"config.json": 200, "w.bin": 8 << 20})
	e.upload("m", files)
	e.proxy.FlipByte("w.bin", 4<<20)
	target := e.target("pod")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := e.publish(ctx, "vol", target, e.model("m"), e.secret())
	wantCode(t, err, codes.Unavailable)
	for _, want := range []string{"corrupted", "w.bin", "MD5"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if trees, _ := os.ReadDir(filepath.Join(e.cacheDir(), "trees", "sha256")); len(trees) != 0 {
		t.Fatalf("a tree was committed from corrupted bytes: %v", trees)
	}
	if opts := mountInfo(t, target); opts != "" {
		t.Fatalf("the target was mounted (%s) although the publish failed", opts)
	}

	e.proxy.FlipByte("", 0)
	e.mustPublish("vol", target, e.model("m"))
	sameFiles(t, target, files)
	e.mustUnpublish("vol", target)
}

// A new version at the same URI that changes only its config fetches only
// that file: the weights this node downloaded before, unchanged at the
// remote (same key, size, ETag and upload time), are linked from blobs/.
func TestPublish_NewVersionChangesConfig_OnlyConfigFetched_RealMinIO(t *testing.T) {
	e := newEnv(t)
	v1 := randomModel(12, map[string]int{"w.bin": 4 << 20, "tokenizer.json": 64 << 10, "config.json": 100})
	e.upload("m", v1)
	attrs := e.model("m")
	attrs["pullPolicy"] = "Always"
	e.mustPublish("vol-a", e.target("pod-a"), attrs)

	config := []byte(`{"version": 2}`)
	e.upload("m", map[string][]byte{"config.json": config})
	e.proxy.Reset()
	e.mustPublish("vol-b", e.target("pod-b"), attrs)
	v2 := map[string][]byte{"w.bin": v1["w.bin"], "tokenizer.json": v1["tokenizer.json"], "config.json": config}
	sameFiles(t, e.target("pod-a"), v1)
	sameFiles(t, e.target("pod-b"), v2)
	if got, want := e.proxy.ObjectBytes(), int64(len(config)); got != want {
		t.Fatalf("the new version downloaded %d object bytes, want %d (its config only)", got, want)
	}
	if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 2 {
		t.Fatalf("store holds trees %v, want the old and the new one", trees)
	}
	e.mustUnpublish("vol-a", e.target("pod-a"))
	e.mustUnpublish("vol-b", e.target("pod-b"))
}

// A large file is fetched in ranged chunks by rclone against real MinIO,
// byte for byte, and a byte flipped in one chunk is still caught by the
// object's MD5 before anything is committed.
func TestPublish_LargeFileInRangedChunks_RealMinIO(t *testing.T) {
	e := newEnv(t)
	e.driver.Stop()
	e.start("--multi-thread-cutoff=2Mi", "--multi-thread-streams=3")
	files := randomModel(13, map[string]int{"w.bin": 20 << 20, "config.json": 300})
	e.upload("m", files)

	e.proxy.FlipByte("w.bin", 100)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := e.publish(ctx, "vol", e.target("bad"), e.model("m"), e.secret())
	wantCode(t, err, codes.Unavailable)
	if !strings.Contains(err.Error(), "MD5") {
		t.Fatalf("error %q does not name the checksum", err)
	}
	e.proxy.FlipByte("", 0)

	e.proxy.Reset()
	target := e.target("pod")
	e.mustPublish("vol", target, e.model("m"))
	sameFiles(t, target, files)
	// One ranged GET per 16 MiB span of the 20 MiB (the default
	// --multi-thread-span), and one for the config.
	spans := int64((20<<20 + store.DefaultRangeSpan - 1) / store.DefaultRangeSpan)
	if gets, bytes := e.proxy.ObjectGets(), e.proxy.ObjectBytes(); gets != spans+1 || bytes != total(files) {
		t.Fatalf("the remote served %d GETs and %d bytes, want %d GETs (%d ranged) and %d bytes", gets, bytes, spans+1, spans, total(files))
	}
	e.mustUnpublish("vol", target)
}

// A download killed after its first large object was committed resumes
// without fetching that object again: the object index records a large
// object as soon as its blob is committed. Nothing partial is ever visible.
func TestPublish_Kill9AfterFirstObject_ResumeFetchesOnlyTheRest_RealMinIO(t *testing.T) {
	e := newEnv(t)
	e.driver.Stop()
	e.start("--transfers=1") // a.bin, then b.bin
	files := randomModel(14, map[string]int{"a.bin": 2 << 20, "b.bin": 6 << 20})
	e.upload("m", files)
	e.proxy.RateBytesPerSec.Store(2 << 20)

	// Kill once a.bin's blob is committed and b.bin is under way.
	blobs, ingest := filepath.Join(e.cacheDir(), "blobs/sha256"), filepath.Join(e.cacheDir(), "ingest")
	e.killMidPublish("vol", e.target("pod-a"), e.model("m"), "a.bin committed and b.bin under way", func() bool {
		return len(entries(t, blobs)) >= 1 && ingestedBytes(ingest) >= (2<<20)+(1<<20)
	})
	if trees := entries(t, filepath.Join(e.cacheDir(), "trees/sha256")); len(trees) != 0 {
		t.Fatalf("a tree %v is visible after a crash mid-download", trees)
	}

	e.proxy.RateBytesPerSec.Store(0)
	e.start()
	e.proxy.Reset()
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	sameFiles(t, e.target("pod-a"), files)
	if got, want := e.proxy.ObjectBytes(), int64(len(files["b.bin"])); got != want {
		t.Fatalf("the resumed download fetched %d bytes, want %d (b.bin only)", got, want)
	}
	e.mustUnpublish("vol", e.target("pod-a"))
}

// killMidPublish publishes in the background and kills the driver with
// SIGKILL once reached says the download got where the test wants it.
func (e *env) killMidPublish(volumeID, target string, attrs map[string]string, what string, reached func() bool) {
	e.t.Helper()
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = e.publish(ctx, volumeID, target, attrs, e.secret())
	}()
	deadline := time.Now().Add(time.Minute)
	for !reached() {
		if time.Now().After(deadline) {
			e.t.Fatalf("the download did not reach %s within a minute; driver logs:\n%s", what, e.driver.Logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.driver.Kill()
}

// A large file's ranged download killed with SIGKILL at several points
// goes on after the restart from its last checkpoint: the remote serves
// exactly the bytes after it, the tree is right, and no tree was visible
// in between (the "no partial model" invariant).
func TestPublish_Kill9DuringRangedDownload_ResumesFromCheckpoint_RealMinIO(t *testing.T) {
	const size = 48 << 20
	const chunk = store.DefaultRangeChunk
	flags := []string{"--multi-thread-cutoff=4Mi", "--multi-thread-span=4Mi", "--multi-thread-streams=2", "--resume-every=8Mi"}
	for i, at := range []float64{0.3, 0.6, 0.9} {
		t.Run(fmt.Sprintf("killed at %d%%", int(at*100)), func(t *testing.T) {
			e := newEnv(t)
			e.driver.Stop()
			e.start(flags...)
			files := randomModel(byte(20+i), map[string]int{"w.bin": size, "config.json": 300})
			e.upload("m", files)
			e.proxy.RateBytesPerSec.Store(12 << 20)
			e.proxy.Reset()
			killedAt := int64(at * size)
			e.killMidPublish("vol", e.target("pod"), e.model("m"), fmt.Sprintf("%d bytes served", killedAt), func() bool {
				return e.proxy.ObjectBytes() >= killedAt
			})
			if trees := entries(t, filepath.Join(e.cacheDir(), store.TreesDir)); len(trees) != 0 {
				t.Fatalf("a tree %v is visible after a kill mid-download", trees)
			}
			durable := checkpointOf(t, e.cacheDir(), size)
			// At most two chunks per stream are in flight past the checkpoint.
			if floor := killedAt - 2*2*chunk - chunk; durable < floor {
				t.Errorf("checkpoint at %d bytes after %d were served, want at least %d", durable, killedAt, floor)
			}

			e.proxy.RateBytesPerSec.Store(0)
			e.start(flags...)
			e.proxy.Reset()
			e.mustPublish("vol", e.target("pod"), e.model("m"))
			sameFiles(t, e.target("pod"), files)
			// config.json may have been committed before the kill (small
			// objects are not recorded one by one): count w.bin's bytes.
			got := e.proxy.ObjectBytes()
			if want := int64(size) - durable; got != want && got != want+300 {
				t.Errorf("after the restart the remote served %d bytes, want %d (w.bin less its %d durable bytes) or that plus config.json", got, want, durable)
			}
			t.Logf("killed at %d of %d bytes served; %d durable; %d bytes after the restart (%.0f%% of the file)", killedAt, size, durable, got, 100*float64(got)/size)
			if left := entries(t, filepath.Join(e.cacheDir(), store.PartialDir)); len(left) != 0 {
				t.Errorf("partial/ holds %v after the download finished", left)
			}
			e.mustUnpublish("vol", e.target("pod"))
		})
	}
}

// checkpointOf is the durable bytes the one partial download in the cache
// recorded (0 for none): its hashed prefix, and the chunks written past it.
func checkpointOf(t *testing.T, cacheDir string, size int64) int64 {
	t.Helper()
	dir := filepath.Join(cacheDir, store.PartialDir)
	for _, n := range entries(t, dir) {
		if !strings.HasSuffix(n, ".at") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		durable, err := strconv.ParseInt(lines[0], 10, 64)
		if err != nil {
			t.Fatalf("checkpoint %q: %v", b, err)
		}
		if len(lines) > 1 {
			fields := strings.Fields(lines[1])
			chunk, _ := strconv.ParseInt(fields[0], 10, 64)
			for _, f := range fields[1:] {
				i, _ := strconv.ParseInt(f, 10, 64)
				durable += min(chunk, size-i*chunk)
			}
		}
		return durable
	}
	return 0
}
