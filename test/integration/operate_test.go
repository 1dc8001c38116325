package integration

// Node-operator features against the real binary: the cache budget and its
// LRU eviction, pins, drain, verify with quarantine and repair, a full
// filesystem, metrics, start-up reconciliation, prefetch and the admin
// socket. Budgets use --min-free=0 and an explicit --cache-size so the host
// disk never decides a result.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/units"
	"github.com/modelcache/modelcache/test/testenv"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const opMiB = 1 << 20

// newOperateEnv is newEnv with the driver restarted as restartWith does.
func newOperateEnv(t *testing.T, args ...string) *env {
	t.Helper()
	e := newEnv(t)
	e.restartWith(args...)
	return e
}

// restartWith stops the driver and starts it again with --min-free=0 and
// args, then waits for its admin API. Mounts stay, as on a rolling update.
func (e *env) restartWith(args ...string) {
	e.t.Helper()
	e.driver.Stop()
	e.start(append([]string{"--min-free=0"}, args...)...)
	if err := testenv.WaitAdmin(e.adminSocket(), 30*time.Second); err != nil {
		e.t.Fatalf("%v\ndriver logs:\n%s", err, e.driver.Logs())
	}
}

func (e *env) adminClient() *adminapi.Client { return testenv.NewAdmin(e.adminSocket()) }

func (e *env) adminSocket() string { return filepath.Join(e.cacheDir(), "admin.sock") }

// uri is the model URI publishes of e.model(prefix) are recorded under.
func (e *env) uri(prefix string) string { return e.model(prefix)["modelUri"] }

// treeDigest asks the admin API which tree a model URI resolved to.
func (e *env) treeDigest(prefix string) string {
	e.t.Helper()
	in, err := e.adminClient().Tree(e.t.Context(), e.uri(prefix))
	if err != nil {
		e.t.Fatalf("inspecting %s: %v", e.uri(prefix), err)
	}
	return in.Digest
}

// treesOnDisk lists trees/sha256 as digests, sorted.
func (e *env) treesOnDisk() []string {
	var out []string
	for _, n := range entries(e.t, filepath.Join(e.cacheDir(), store.TreesDir)) {
		out = append(out, "sha256:"+n)
	}
	slices.Sort(out)
	return out
}

// wantTrees checks that the admin API lists exactly the named trees, all
// present, and that trees/ holds exactly them. digests maps names to digests.
func (e *env) wantTrees(digests map[string]string, names ...string) {
	e.t.Helper()
	name := func(d string) string {
		for n, v := range digests {
			if v == d {
				return n
			}
		}
		return d
	}
	trees, err := e.adminClient().Trees(e.t.Context())
	if err != nil {
		e.t.Fatal(err)
	}
	var listed, onDisk []string
	for _, t := range trees {
		if !t.Present {
			e.t.Fatalf("admin lists tree %s as not present on disk", name(t.Digest))
		}
		listed = append(listed, name(t.Digest))
	}
	for _, d := range e.treesOnDisk() {
		onDisk = append(onDisk, name(d))
	}
	slices.Sort(listed)
	slices.Sort(onDisk)
	want := slices.Sorted(slices.Values(names))
	if !slices.Equal(listed, want) || !slices.Equal(onDisk, want) {
		e.t.Fatalf("admin lists trees %v and trees/ holds %v, want %v", listed, onDisk, want)
	}
}

func digestsOf(cands []adminapi.Candidate) []string {
	out := []string{}
	for _, c := range cands {
		out = append(out, c.Digest)
	}
	return out
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// The budget evicts exactly the least recently used tree that is neither
// mounted nor pinned, even when a mounted and a pinned tree are older; gc
// --dry-run reports what a smaller budget would remove without removing it,
// and gc then removes exactly that.
func TestBudget_EvictsLeastRecentlyUsed_KeepsMountedAndPinned_RealMinIO(t *testing.T) {
	e := newOperateEnv(t, "--cache-size=9Mi")
	a := e.adminClient()
	models := map[string]map[string][]byte{}
	for i, n := range []string{"a", "b", "c", "d", "e"} {
		models[n] = randomModel(byte(40+i), map[string]int{"weights.bin": 2 * opMiB})
		e.upload(n, models[n])
	}
	dig := map[string]string{}
	publishOnce := func(n string) {
		e.mustPublish("vol-"+n, e.target("pod-"+n), e.model(n))
		dig[n] = e.treeDigest(n)
		e.mustUnpublish("vol-"+n, e.target("pod-"+n))
	}
	// a: the oldest, and stays mounted.
	e.mustPublish("vol-a", e.target("pod-a"), e.model("a"))
	dig["a"] = e.treeDigest("a")
	// b: next oldest, pinned.
	publishOnce("b")
	if p, err := a.Pin(t.Context(), e.uri("b")); err != nil || !p.Pinned {
		t.Fatalf("pin b: %+v, %v", p, err)
	}
	// c, d, then c again: d is now the least recently used candidate.
	publishOnce("c")
	publishOnce("d")
	publishOnce("c")

	trees, err := a.Trees(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	for _, tr := range trees {
		order = append(order, tr.Digest)
	}
	if want := []string{dig["a"], dig["b"], dig["d"], dig["c"]}; !slices.Equal(order, want) {
		t.Fatalf("admin lists trees in order %v, want least recently used first a, b, d, c = %v", order, want)
	}

	// 8 MiB held; e's 2 MiB exceed 9 MiB by 1 MiB: exactly one tree must go,
	// and only d may.
	e.proxy.Reset()
	e.mustPublish("vol-e", e.target("pod-e"), e.model("e"))
	if got, want := e.proxy.ObjectBytes(), total(models["e"]); got != want {
		t.Fatalf("publishing e fetched %d bytes, want %d", got, want)
	}
	dig["e"] = e.treeDigest("e")
	e.wantTrees(dig, "a", "b", "c", "e")
	sameFiles(t, e.target("pod-a"), models["a"])
	sameFiles(t, e.target("pod-e"), models["e"])
	e.mustUnpublish("vol-e", e.target("pod-e"))

	// Within the budget gc has nothing to do.
	if res, err := a.GC(t.Context(), true); err != nil || len(res.Evicted) != 0 || res.Over != 0 || res.Warning != "" {
		t.Fatalf("gc --dry-run within budget = %+v, %v; want nothing evicted", res, err)
	}

	// The operator shrinks the budget to 5 MiB: 8 MiB held, a mounted and b
	// pinned, so c then e (least recently used first) would go.
	e.restartWith("--cache-size=5Mi")
	dry, err := a.GC(t.Context(), true)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := digestsOf(dry.Evicted), []string{dig["c"], dig["e"]}; !slices.Equal(got, want) {
		t.Fatalf("gc --dry-run would evict %v, want c, e = %v", got, want)
	}
	if !dry.DryRun || dry.Freed != 4*opMiB || dry.Over != 0 || dry.Warning != "" {
		t.Fatalf("gc --dry-run = %+v, want dryRun, freed %d, over 0, no warning", dry, 4*opMiB)
	}
	e.wantTrees(dig, "a", "b", "c", "e")

	res, err := a.GC(t.Context(), false)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := digestsOf(res.Evicted), []string{dig["c"], dig["e"]}; !slices.Equal(got, want) || res.DryRun || res.Freed != 4*opMiB {
		t.Fatalf("gc = %+v (evicted %v), want c, e = %v evicted and %d bytes freed", res, got, want, 4*opMiB)
	}
	e.wantTrees(dig, "a", "b")
	sameFiles(t, e.target("pod-a"), models["a"])
	if in, err := a.Tree(t.Context(), dig["b"]); err != nil || !in.Pinned {
		t.Fatalf("b after gc: %+v, %v; want still pinned", in, err)
	}
	e.mustUnpublish("vol-a", e.target("pod-a"))
}

// With the budget full of mounted and pinned trees a new model is refused
// with RESOURCE_EXHAUSTED before any object byte is fetched, and the
// message says what is needed and what holds the space. Unpinning lets it in.
func TestBudget_InUseAndPinnedFillIt_ResourceExhaustedBeforeDownload_RealMinIO(t *testing.T) {
	e := newOperateEnv(t, "--cache-size=5Mi")
	a := e.adminClient()
	models := map[string]map[string][]byte{}
	for i, n := range []string{"a", "b", "c"} {
		models[n] = randomModel(byte(50+i), map[string]int{"weights.bin": 2 * opMiB})
		e.upload(n, models[n])
	}
	dig := map[string]string{}
	e.mustPublish("vol-a", e.target("pod-a"), e.model("a"))
	dig["a"] = e.treeDigest("a")
	e.mustPublish("vol-b", e.target("pod-b"), e.model("b"))
	dig["b"] = e.treeDigest("b")
	e.mustUnpublish("vol-b", e.target("pod-b"))
	if _, err := a.Pin(t.Context(), dig["b"]); err != nil {
		t.Fatal(err)
	}

	e.proxy.Reset()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := e.publish(ctx, "vol-c", e.target("pod-c"), e.model("c"), e.secret())
	wantCode(t, err, codes.ResourceExhausted)
	msg := status.Convert(err).Message()
	two := units.Bytes(2 * opMiB)
	for _, s := range []string{"needs " + two, "1 in-use trees hold " + two, "1 pinned trees hold " + two, units.Bytes(5 * opMiB)} {
		if !strings.Contains(msg, s) {
			t.Errorf("RESOURCE_EXHAUSTED message %q does not mention %q", msg, s)
		}
	}
	if got := e.proxy.ObjectBytes(); got != 0 {
		t.Errorf("a refused publish fetched %d object bytes, want 0", got)
	}
	if left := entries(t, filepath.Join(e.cacheDir(), store.IngestDir)); len(left) != 0 {
		t.Errorf("ingest/ holds %v after a refused publish", left)
	}
	if opts := mountInfo(t, e.target("pod-c")); opts != "" {
		t.Errorf("refused target is mounted (%s)", opts)
	}
	e.wantTrees(dig, "a", "b")
	sameFiles(t, e.target("pod-a"), models["a"])

	// Unpinning b makes it the one candidate: c now fits.
	if p, err := a.Unpin(t.Context(), e.uri("b")); err != nil || p.Pinned {
		t.Fatalf("unpin b: %+v, %v", p, err)
	}
	e.mustPublish("vol-c", e.target("pod-c"), e.model("c"))
	dig["c"] = e.treeDigest("c")
	if got, want := e.proxy.ObjectBytes(), total(models["c"]); got != want {
		t.Fatalf("publishing c fetched %d bytes, want %d", got, want)
	}
	e.wantTrees(dig, "a", "c")
	sameFiles(t, e.target("pod-c"), models["c"])
	e.mustUnpublish("vol-c", e.target("pod-c"))
	e.mustUnpublish("vol-a", e.target("pod-a"))
}

// Drain removes unused trees at once and mounted ones at their last
// unpublish, serves what it still has without fetching, refuses downloads
// with UNAVAILABLE, is idempotent, and undrain lets downloads start again.
func TestDrain_RemovesUnusedKeepsMounted_RefusesDownloads_RealMounts(t *testing.T) {
	e := newOperateEnv(t)
	a := e.adminClient()
	models := map[string]map[string][]byte{}
	for i, n := range []string{"a", "b", "c"} {
		models[n] = randomModel(byte(60+i), map[string]int{"weights.bin": 1 * opMiB, "config.json": 300 + i})
		e.upload(n, models[n])
	}
	dig := map[string]string{}
	e.mustPublish("vol-a", e.target("pod-a"), e.model("a"))
	dig["a"] = e.treeDigest("a")
	e.mustPublish("vol-b", e.target("pod-b"), e.model("b"))
	dig["b"] = e.treeDigest("b")
	e.mustUnpublish("vol-b", e.target("pod-b"))

	res, err := a.Drain(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !res.Drained || !slices.Equal(res.Removed, []string{dig["b"]}) || !slices.Equal(res.Pending, []string{dig["a"]}) || res.Freed != total(models["b"]) {
		t.Fatalf("drain = %+v, want b (%s) removed with %d bytes freed and a (%s) pending", res, dig["b"], total(models["b"]), dig["a"])
	}
	e.wantTrees(dig, "a")
	if du, err := a.DU(t.Context()); err != nil || !du.Drained {
		t.Fatalf("du after drain = %+v, %v; want drained", du, err)
	}

	// What the node still holds is served, without a byte from the remote.
	e.proxy.Reset()
	e.mustPublish("vol-a2", e.target("pod-a2"), e.model("a"))
	sameFiles(t, e.target("pod-a2"), models["a"])
	if got := e.proxy.ObjectBytes(); got != 0 {
		t.Fatalf("a cached publish on a drained node fetched %d bytes", got)
	}
	// Anything else would need a download: refused, retryable.
	for _, n := range []string{"b", "c"} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err := e.publish(ctx, "vol-"+n, e.target("pod-"+n), e.model(n), e.secret())
		cancel()
		wantCode(t, err, codes.Unavailable)
		if msg := status.Convert(err).Message(); !strings.Contains(msg, "drained") {
			t.Fatalf("publish of uncached %s on a drained node: %q does not mention \"drained\"", n, msg)
		}
		if opts := mountInfo(t, e.target("pod-"+n)); opts != "" {
			t.Fatalf("refused target mounted (%s)", opts)
		}
	}
	if _, err := a.Prefetch(t.Context(), adminapi.PrefetchRequest{URI: e.uri("c"), Secrets: e.secret()}, nil); adminapi.StatusCode(err) != http.StatusConflict || !strings.Contains(err.Error(), "drained") {
		t.Fatalf("prefetch of an uncached model on a drained node: %v; want 409 mentioning \"drained\"", err)
	}
	if got := e.proxy.ObjectBytes(); got != 0 {
		t.Fatalf("refused publishes on a drained node fetched %d bytes", got)
	}

	// Draining again changes nothing.
	res, err = a.Drain(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !res.Drained || len(res.Removed) != 0 || !slices.Equal(res.Pending, []string{dig["a"]}) || res.Freed != 0 {
		t.Fatalf("second drain = %+v, want nothing removed and a pending", res)
	}
	e.wantTrees(dig, "a")

	// The pending tree goes with its last mount, not before.
	e.mustUnpublish("vol-a2", e.target("pod-a2"))
	e.wantTrees(dig, "a")
	sameFiles(t, e.target("pod-a"), models["a"])
	e.mustUnpublish("vol-a", e.target("pod-a"))
	e.wantTrees(dig)
	if blobs := entries(t, filepath.Join(e.cacheDir(), store.BlobsDir)); len(blobs) != 0 {
		t.Fatalf("blobs/ still holds %v on a drained node with no mounts", blobs)
	}

	if res, err := a.Undrain(t.Context()); err != nil || res.Drained {
		t.Fatalf("undrain = %+v, %v", res, err)
	}
	e.proxy.Reset()
	e.mustPublish("vol-c", e.target("pod-c"), e.model("c"))
	if got, want := e.proxy.ObjectBytes(), total(models["c"]); got != want {
		t.Fatalf("publish after undrain fetched %d bytes, want %d", got, want)
	}
	sameFiles(t, e.target("pod-c"), models["c"])
	e.mustUnpublish("vol-c", e.target("pod-c"))
}

// flipByte inverts one byte of a committed (0444) blob, as bit rot would.
func flipByte(t *testing.T, p string, off int64) {
	t.Helper()
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o444); err != nil {
		t.Fatal(err)
	}
}

// checkQuarantined checks a failed verify: exactly the flipped blob is
// reported and moved from blobs/ to quarantine/.
func checkQuarantined(t *testing.T, e *env, rep adminapi.VerifyReport, blob, tree string) {
	t.Helper()
	if rep.OK || !slices.Equal(rep.Corrupt, []string{blob}) || !slices.Equal(rep.Damaged, []string{tree}) || len(rep.Quarantined) != 1 {
		t.Fatalf("verify = %+v, want not OK, corrupt [%s], damaged [%s], one quarantined file", rep, blob, tree)
	}
	if _, err := os.Lstat(filepath.Join(e.cacheDir(), store.BlobsDir, blob)); !os.IsNotExist(err) {
		t.Fatalf("corrupt blob still in blobs/ (err=%v)", err)
	}
	q := entries(t, filepath.Join(e.cacheDir(), store.QuarantineDir))
	if !slices.Equal(q, rep.Quarantined) || !strings.HasPrefix(q[0], blob) {
		t.Fatalf("quarantine/ holds %v, want %v (named after blob %s)", q, rep.Quarantined, blob)
	}
}

// A flipped byte in a blob no pod uses: verify quarantines the blob and
// removes the tree, the next publish downloads it again and serves correct
// bytes, and verify is clean again.
func TestVerify_FlippedByte_QuarantinedAndRedownloaded_RealMinIO(t *testing.T) {
	e := newOperateEnv(t)
	a := e.adminClient()
	files := randomModel(70, map[string]int{"weights.bin": 2 * opMiB, "config.json": 700})
	e.upload("m", files)
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	tree := e.treeDigest("m")
	e.mustUnpublish("vol", e.target("pod-a"))

	blob := sha256Hex(files["weights.bin"])
	flipByte(t, filepath.Join(e.cacheDir(), store.BlobsDir, blob), 12345)
	rep, err := a.Verify(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	checkQuarantined(t, e, rep, blob, tree)
	if !slices.Equal(rep.Removed, []string{tree}) || len(rep.Invalidated) != 0 {
		t.Fatalf("verify = %+v, want the unused damaged tree removed", rep)
	}
	e.wantTrees(map[string]string{"m": tree})

	e.proxy.Reset()
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	if got, want := e.proxy.ObjectBytes(), total(files); got != want {
		t.Fatalf("publish after quarantine fetched %d bytes, want the whole model (%d)", got, want)
	}
	sameFiles(t, e.target("pod-a"), files)
	if got := e.treeDigest("m"); got != tree {
		t.Fatalf("re-downloaded tree is %s, want %s", got, tree)
	}
	rep, err = a.Verify(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK || len(rep.Corrupt) != 0 || rep.Blobs != 2 || rep.Bytes != total(files) {
		t.Fatalf("second verify = %+v, want OK over 2 blobs of %d bytes", rep, total(files))
	}
	e.mustUnpublish("vol", e.target("pod-a"))
}

// A flipped byte under a running pod: verify quarantines the blob and stops
// serving the tree, the next publish downloads and repairs the tree in place,
// and the running pod's mount reads correct bytes again.
func TestVerify_FlippedByteUnderRunningMount_RepairedInPlace_RealMounts(t *testing.T) {
	e := newOperateEnv(t)
	a := e.adminClient()
	files := randomModel(71, map[string]int{"weights.bin": 2 * opMiB, "config.json": 700})
	e.upload("m", files)
	e.mustPublish("vol-a", e.target("pod-a"), e.model("m"))
	tree := e.treeDigest("m")

	blob := sha256Hex(files["weights.bin"])
	flipByte(t, filepath.Join(e.cacheDir(), store.BlobsDir, blob), 54321)
	served, err := os.ReadFile(filepath.Join(e.target("pod-a"), "weights.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if sha256Hex(served) == blob {
		t.Fatal("the flipped byte is not visible through the mount; the test corrupted the wrong file")
	}

	rep, err := a.Verify(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	checkQuarantined(t, e, rep, blob, tree)
	if !slices.Equal(rep.Invalidated, []string{tree}) || len(rep.Removed) != 0 {
		t.Fatalf("verify = %+v, want the mounted damaged tree invalidated, not removed", rep)
	}
	if in, err := a.Tree(t.Context(), tree); err != nil || len(in.Refs) != 1 {
		t.Fatalf("the damaged tree under a running pod: %+v, %v; want it still listed with its mount", in, err)
	}

	e.proxy.Reset()
	e.mustPublish("vol-b", e.target("pod-b"), e.model("m"))
	if got := e.proxy.ObjectBytes(); got <= 0 {
		t.Fatalf("publish after verify fetched %d bytes; a damaged tree must not be served", got)
	}
	sameFiles(t, e.target("pod-b"), files)
	sameFiles(t, e.target("pod-a"), files)
	rep, err = a.Verify(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK || len(rep.Corrupt) != 0 {
		t.Fatalf("verify after repair = %+v, want OK", rep)
	}
	if in, err := a.Tree(t.Context(), tree); err != nil || len(in.Refs) != 2 {
		t.Fatalf("repaired tree: %+v, %v; want both mounts listed", in, err)
	}
	e.mustUnpublish("vol-a", e.target("pod-a"))
	e.mustUnpublish("vol-b", e.target("pod-b"))
}

// mountTmpfsCache mounts a tmpfs of size over the env's cache directory and
// restarts the driver on it. newEnv's cleanup unmounts it after stopping
// the driver.
func (e *env) mountTmpfsCache(size string) {
	e.t.Helper()
	e.driver.Stop()
	if err := syscall.Mount("tmpfs", e.cacheDir(), "tmpfs", 0, "size="+size+",mode=0700"); err != nil {
		e.t.Fatalf("mounting a %s tmpfs at %s: %v", size, e.cacheDir(), err)
	}
	e.restartWith()
}

// A model larger than the whole cache filesystem is refused with
// RESOURCE_EXHAUSTED before anything is fetched, and the driver goes on
// serving models that fit.
func TestFull_ModelLargerThanFilesystem_ResourceExhausted_RealMounts(t *testing.T) {
	e := newEnv(t)
	e.mountTmpfsCache("3m")
	big := randomModel(80, map[string]int{"part-1.bin": 3 * opMiB, "part-2.bin": 3 * opMiB})
	small := randomModel(81, map[string]int{"weights.bin": 1 * opMiB})
	e.upload("big", big)
	e.upload("small", small)

	e.proxy.Reset()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := e.publish(ctx, "vol-big", e.target("pod-big"), e.model("big"), e.secret())
	wantCode(t, err, codes.ResourceExhausted)
	if got := e.proxy.ObjectBytes(); got != 0 {
		t.Errorf("a model that cannot fit fetched %d bytes", got)
	}
	if left := entries(t, filepath.Join(e.cacheDir(), store.IngestDir)); len(left) != 0 {
		t.Errorf("ingest/ holds %v after a refused publish", left)
	}
	if trees := e.treesOnDisk(); len(trees) != 0 {
		t.Errorf("trees/ holds %v after a refused publish", trees)
	}

	e.mustPublish("vol-small", e.target("pod-small"), e.model("small"))
	sameFiles(t, e.target("pod-small"), small)
	e.mustUnpublish("vol-small", e.target("pod-small"))
}

// gate is a proxy in front of the counting proxy that lets the first limit
// bytes of every object through and holds the rest until Open: a download
// that is certainly running, at a point the test chooses.
type gate struct {
	URL   string
	limit int64
	open  chan struct{}
	once  sync.Once
}

func startGate(t *testing.T, target string, limit int64) *gate {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{URL: "http://" + l.Addr().String(), limit: limit, open: make(chan struct{})}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1
	rp.ModifyResponse = func(resp *http.Response) error {
		r := resp.Request
		if r.Method == http.MethodGet && strings.Contains(strings.Trim(r.URL.Path, "/"), "/") {
			resp.Body = &heldBody{ReadCloser: resp.Body, g: g}
		}
		return nil
	}
	srv := &http.Server{Handler: rp}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { g.Open(); _ = srv.Close() })
	return g
}

// Open lets every held byte through.
func (g *gate) Open() { g.once.Do(func() { close(g.open) }) }

type heldBody struct {
	io.ReadCloser
	g *gate
	n int64
}

func (b *heldBody) Read(p []byte) (int, error) {
	if rest := b.g.limit - b.n; rest <= 0 {
		<-b.g.open
	} else if int64(len(p)) > rest {
		p = p[:rest]
	}
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	return n, err
}

// fillUp writes a file into dir until its filesystem is full.
func fillUp(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "filler")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, opMiB)
	for size := len(buf); size >= 4096; {
		if _, err := f.Write(buf[:size]); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			size /= 2
		}
	}
	return p
}

// The filesystem fills up while a download runs (it fit when it started):
// the publish fails with RESOURCE_EXHAUSTED, the partial download is
// removed, nothing is visible as a tree, and once space is back the driver
// serves models again.
func TestFull_FilesystemFillsMidDownload_ResourceExhaustedAndCleaned_RealMounts(t *testing.T) {
	e := newEnv(t)
	e.mountTmpfsCache("8m")
	files := randomModel(82, map[string]int{"part-1.bin": 2 * opMiB, "part-2.bin": 2 * opMiB})
	small := randomModel(83, map[string]int{"weights.bin": 1 * opMiB})
	e.upload("m", files)
	e.upload("small", small)
	g := startGate(t, e.proxy.URL, 512<<10)
	e.proxy.Reset()

	errc := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		errc <- e.publish(ctx, "vol", e.target("pod-a"), e.model("m"), testenv.RcloneSecret("mys3", g.URL))
	}()
	// Bytes in ingest/ mean the download passed its budget check.
	ingest := filepath.Join(e.cacheDir(), store.IngestDir)
	deadline := time.Now().Add(time.Minute)
	for ingestedBytes(ingest) < 256<<10 {
		if time.Now().After(deadline) {
			t.Fatalf("no download started within a minute; driver logs:\n%s", e.driver.Logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
	filler := fillUp(t, e.cacheDir())
	g.Open()
	err := <-errc
	wantCode(t, err, codes.ResourceExhausted)
	if got := e.proxy.ObjectBytes(); got <= 0 {
		t.Errorf("the remote served %d bytes: the download did not fail midway", got)
	}
	if left := entries(t, ingest); len(left) != 0 {
		t.Errorf("ingest/ holds %v after the failed download", left)
	}
	if trees := e.treesOnDisk(); len(trees) != 0 {
		t.Errorf("trees/ holds %v after the failed download", trees)
	}
	if opts := mountInfo(t, e.target("pod-a")); opts != "" {
		t.Errorf("target mounted (%s) after a failed download", opts)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	e.mustPublish("vol-small", e.target("pod-small"), e.model("small"))
	sameFiles(t, e.target("pod-small"), small)
	e.mustUnpublish("vol-small", e.target("pod-small"))
	// And the model that failed fits now.
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	sameFiles(t, e.target("pod-a"), files)
	e.mustUnpublish("vol", e.target("pod-a"))
}

// scrape reads the driver's /metrics.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return mfs
}

// metricValue returns the value of the series of name with the given label
// pairs (a histogram's sample count), and whether it exists.
func metricValue(mfs map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	mf, ok := mfs[name]
	if !ok {
		return 0, false
	}
next:
	for _, m := range mf.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		case m.Untyped != nil:
			return m.GetUntyped().GetValue(), true
		}
	}
	return 0, false
}

// wantMetrics checks exact values; each key is a name and label pairs
// joined by spaces.
func wantMetrics(t *testing.T, mfs map[string]*dto.MetricFamily, want map[string]float64) {
	t.Helper()
	for _, k := range slices.Sorted(maps.Keys(want)) {
		f := strings.Fields(k)
		got, ok := metricValue(mfs, f[0], f[1:]...)
		if !ok {
			t.Errorf("metric %s is missing", k)
			continue
		}
		if got != want[k] {
			t.Errorf("metric %s = %v, want %v", k, got, want[k])
		}
	}
}

// seriesSum adds every series of a counter family.
func seriesSum(mfs map[string]*dto.MetricFamily, name string) float64 {
	var s float64
	for _, m := range mfs[name].GetMetric() {
		s += m.GetCounter().GetValue()
	}
	return s
}

// After one cold publish, two warm ones and one bad one, /metrics says
// exactly that; an operator eviction is counted by reason.
func TestMetrics_KnownSequence_ExactValues_RealMinIO(t *testing.T) {
	port, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	e := newOperateEnv(t, "--metrics-address="+addr)
	e.waitMetrics(addr)

	files := randomModel(90, map[string]int{"weights.bin": 1 * opMiB, "config.json": 512, "tokenizer.json": 2048})
	e.upload("m", files)
	for _, pod := range []string{"pod-1", "pod-2", "pod-3"} {
		e.mustPublish("vol-"+pod, e.target(pod), e.model("m"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err = e.publish(ctx, "vol-bad", e.target("pod-bad"), map[string]string{}, e.secret())
	wantCode(t, err, codes.InvalidArgument)

	size := float64(total(files))
	mfs := scrape(t, addr)
	wantMetrics(t, mfs, map[string]float64{
		"modelcache_publishes_total code OK":                3,
		"modelcache_publishes_total code InvalidArgument":   1,
		"modelcache_cache_lookups_total result hit":         2,
		"modelcache_cache_lookups_total result miss":        1,
		"modelcache_downloaded_bytes_total":                 size,
		"modelcache_download_bytes_total source origin":     size,
		"modelcache_download_bytes_total source peer":       0,
		"modelcache_download_duration_seconds result ok":    1,
		"modelcache_download_duration_seconds result error": 0,
		"modelcache_downloads_in_flight":                    0,
		"modelcache_cache_trees":                            1,
		"modelcache_cache_blobs":                            float64(len(files)),
		"modelcache_cache_bytes kind blobs":                 size,
		"modelcache_cache_bytes kind trees":                 size,
		"modelcache_cache_bytes kind ingest":                0,
		"modelcache_evictions_total reason budget":          0,
	})
	if got := seriesSum(mfs, "modelcache_publishes_total"); got != 4 {
		t.Errorf("publishes_total sums to %v over all codes, want 4", got)
	}
	if got := seriesSum(mfs, "modelcache_evictions_total"); got != 0 {
		t.Errorf("evictions_total sums to %v, want 0", got)
	}

	for _, pod := range []string{"pod-1", "pod-2", "pod-3"} {
		e.mustUnpublish("vol-"+pod, e.target(pod))
	}
	if res, err := e.adminClient().Evict(t.Context(), e.uri("m"), false); err != nil || !res.Removed {
		t.Fatalf("evict = %+v, %v", res, err)
	}
	mfs = scrape(t, addr)
	wantMetrics(t, mfs, map[string]float64{
		"modelcache_evictions_total reason operator":     1,
		"modelcache_evicted_bytes_total reason operator": size,
		"modelcache_cache_trees":                         0,
		"modelcache_cache_blobs":                         0,
		"modelcache_cache_bytes kind blobs":              0,
	})
	if got := seriesSum(mfs, "modelcache_evictions_total"); got != 1 {
		t.Errorf("evictions_total sums to %v, want 1", got)
	}
}

// At start-up a tree directory no record leads to (a crash between commit
// and record) is removed with its blobs, and a record whose tree is gone
// from disk is dropped, so the model is downloaded again.
func TestReconcile_OrphanTreeRemoved_MissingTreeForgotten_RealMinIO(t *testing.T) {
	e := newOperateEnv(t)
	files := randomModel(100, map[string]int{"weights.bin": 1 * opMiB})
	e.upload("m", files)
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	lost := e.treeDigest("m")
	e.mustUnpublish("vol", e.target("pod-a"))
	e.driver.Stop()

	// The tree of m vanishes from disk; its record stays.
	lostDir := filepath.Join(e.cacheDir(), store.TreesDir, strings.TrimPrefix(lost, "sha256:"))
	if err := os.Chmod(lostDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(lostDir); err != nil {
		t.Fatal(err)
	}
	// An orphan: a committed blob and a sealed tree linking it, no record.
	content := randomModel(101, map[string]int{"x": 300 << 10})["x"]
	blob := filepath.Join(e.cacheDir(), store.BlobsDir, sha256Hex(content))
	if err := os.WriteFile(blob, content, 0o444); err != nil {
		t.Fatal(err)
	}
	orphan := filepath.Join(e.cacheDir(), store.TreesDir, sha256Hex([]byte("orphan tree")))
	if err := os.MkdirAll(filepath.Join(orphan, "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(blob, filepath.Join(orphan, "sub", "model.bin")); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{filepath.Join(orphan, "sub"), orphan} {
		if err := os.Chmod(d, 0o555); err != nil {
			t.Fatal(err)
		}
	}

	e.restartWith()
	if _, err := os.Lstat(orphan); !os.IsNotExist(err) {
		t.Fatalf("orphan tree still on disk after start (err=%v)", err)
	}
	if _, err := os.Lstat(blob); !os.IsNotExist(err) {
		t.Fatalf("the orphan's blob still on disk after start (err=%v)", err)
	}
	e.wantTrees(map[string]string{"m": lost})

	e.proxy.Reset()
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	if got, want := e.proxy.ObjectBytes(), total(files); got != want {
		t.Fatalf("publish after the tree vanished fetched %d bytes, want %d", got, want)
	}
	sameFiles(t, e.target("pod-a"), files)
	e.wantTrees(map[string]string{"m": lost}, "m")
	e.mustUnpublish("vol", e.target("pod-a"))
}

// A mount that went away while the driver was down keeps protecting its
// tree through --release-grace, and is released after it: the tree becomes
// evictable. kubelet's late unpublish is still OK.
func TestReconcile_ReferenceWithoutMount_ReleasedAfterGrace_RealMounts(t *testing.T) {
	e := newOperateEnv(t)
	a := e.adminClient()
	files := randomModel(110, map[string]int{"weights.bin": 1 * opMiB})
	e.upload("m", files)
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	tree := e.treeDigest("m")
	e.driver.Stop()
	if err := syscall.Unmount(e.target("pod-a"), 0); err != nil {
		t.Fatalf("unmounting %s behind the driver's back: %v", e.target("pod-a"), err)
	}

	// Default grace (10m): the reference stays and protects the tree.
	e.restartWith()
	_, err := a.Evict(t.Context(), tree, false)
	if adminapi.StatusCode(err) != http.StatusConflict || !strings.Contains(err.Error(), "default/model-server-0") {
		t.Fatalf("evicting a tree whose reference is within its grace: %v; want 409 naming the pod", err)
	}

	e.restartWith("--release-grace=1s")
	deadline := time.Now().Add(30 * time.Second)
	for {
		in, err := a.Tree(t.Context(), tree)
		if err != nil {
			t.Fatal(err)
		}
		if len(in.Refs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("reference %+v not released 30s after a 1s grace; driver logs:\n%s", in.Refs, e.driver.Logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if res, err := a.Evict(t.Context(), tree, false); err != nil || !res.Removed {
		t.Fatalf("evict after release = %+v, %v; want removed", res, err)
	}
	e.wantTrees(map[string]string{"m": tree})
	e.mustUnpublish("vol", e.target("pod-a"))
}

// Prefetch with the node-publish secret downloads the model once; a publish
// with the same secret then fetches nothing. A wrong key is refused with
// 403 for a cached and an uncached model alike, and the message does not
// carry the secret.
func TestPrefetch_WarmsCache_PublishFetchesNothing_WrongKeyRefused_RealMinIO(t *testing.T) {
	e := newOperateEnv(t)
	a := e.adminClient()
	files := randomModel(120, map[string]int{"weights.bin": 2 * opMiB, "config.json": 900})
	other := randomModel(121, map[string]int{"weights.bin": 1 * opMiB})
	e.upload("m", files)
	e.upload("other", other)

	ev, err := a.Prefetch(t.Context(), adminapi.PrefetchRequest{URI: e.uri("m"), Secrets: e.secret()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ev.Event != "done" || !ev.Fetched || ev.Done != total(files) || ev.Total != total(files) || ev.Files != len(files) || !store.ValidDigest(ev.Tree) {
		t.Fatalf("prefetch ended with %+v, want done, fetched, %d bytes in %d files", ev, total(files), len(files))
	}
	if got := e.proxy.ObjectBytes(); got != total(files) {
		t.Fatalf("prefetch fetched %d bytes, want %d", got, total(files))
	}
	in, err := a.Tree(t.Context(), e.uri("m"))
	if err != nil {
		t.Fatal(err)
	}
	if in.Digest != ev.Tree || !in.Present || len(in.Refs) != 0 || len(in.Contents) != len(files) {
		t.Fatalf("prefetched tree = %+v, want %s present with no mounts and %d files", in, ev.Tree, len(files))
	}
	e.wantTrees(map[string]string{"m": ev.Tree}, "m")

	// Again: already cached, nothing fetched.
	e.proxy.Reset()
	if ev2, err := a.Prefetch(t.Context(), adminapi.PrefetchRequest{URI: e.uri("m"), Secrets: e.secret()}, nil); err != nil || ev2.Fetched || ev2.Tree != ev.Tree {
		t.Fatalf("second prefetch = %+v, %v; want the same tree, not fetched", ev2, err)
	}
	e.mustPublish("vol", e.target("pod-a"), e.model("m"))
	if b, n := e.proxy.ObjectBytes(), e.proxy.ObjectGets(); b != 0 || n != 0 {
		t.Fatalf("publish after prefetch fetched %d bytes in %d GETs, want none", b, n)
	}
	sameFiles(t, e.target("pod-a"), files)

	wrong := maps.Clone(e.secret())
	const leaked = "wrong-secret-value-5f3a9c"
	wrong["RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY"] = leaked
	for _, prefix := range []string{"m", "other"} {
		_, err := a.Prefetch(t.Context(), adminapi.PrefetchRequest{URI: e.uri(prefix), Secrets: wrong}, nil)
		if adminapi.StatusCode(err) != http.StatusForbidden {
			t.Fatalf("prefetch of %s with a wrong key: %v; want 403", prefix, err)
		}
		if strings.Contains(err.Error(), leaked) {
			t.Fatalf("prefetch error carries the secret: %v", err)
		}
	}
	if got := e.proxy.ObjectBytes(); got != 0 {
		t.Fatalf("refused prefetches fetched %d bytes", got)
	}
	if strings.Contains(e.driver.Logs(), leaked) {
		t.Fatal("the driver logged the secret of a refused prefetch")
	}
	e.wantTrees(map[string]string{"m": ev.Tree}, "m")
	e.mustUnpublish("vol", e.target("pod-a"))
}

// The admin socket, default or configured, is a socket only root may open.
func TestAdmin_SocketIsRootOnly0600_RealMinIO(t *testing.T) {
	e := newEnv(t)
	check := func(sock string) {
		t.Helper()
		fi, err := os.Stat(sock)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 || st.Uid != 0 {
			t.Fatalf("%s is %v owned by uid %d, want a 0600 socket owned by root", sock, fi.Mode(), st.Uid)
		}
		if err := testenv.WaitAdmin(sock, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	def := filepath.Join(e.cacheDir(), "admin.sock")
	if err := testenv.WaitAdmin(def, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	check(def)

	custom := filepath.Join(e.dir, "adm", "a.sock")
	e.driver.Stop()
	e.start("--admin-socket=" + custom)
	if err := testenv.WaitAdmin(custom, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	check(custom)
	if fi, err := os.Stat(filepath.Dir(custom)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("admin socket directory: %v, %v; want 0700", fi.Mode(), err)
	}
}

// Evict refuses a mounted tree, marks it with whenUnused and removes it at
// its last unpublish; names that match nothing are 404.
func TestAdmin_EvictMountedTree_RefusedThenRemovedAtLastUnpublish_RealMounts(t *testing.T) {
	e := newOperateEnv(t)
	a := e.adminClient()
	files := randomModel(130, map[string]int{"weights.bin": 1 * opMiB})
	e.upload("m", files)
	e.mustPublish("vol-a", e.target("pod-a"), e.model("m"))
	e.mustPublish("vol-b", e.target("pod-b"), e.model("m"))
	tree := e.treeDigest("m")
	dig := map[string]string{"m": tree}

	for _, ref := range []string{"sha256:000000000000", "mys3:no-such/model", ""} {
		if _, err := a.Tree(t.Context(), ref); adminapi.StatusCode(err) != http.StatusNotFound {
			t.Errorf("inspect %q: %v; want 404", ref, err)
		}
		if _, err := a.Evict(t.Context(), ref, false); adminapi.StatusCode(err) != http.StatusNotFound {
			t.Errorf("evict %q: %v; want 404", ref, err)
		}
	}
	if _, err := a.Evict(t.Context(), tree, false); adminapi.StatusCode(err) != http.StatusConflict {
		t.Fatalf("evicting a mounted tree: %v; want 409", err)
	}
	res, err := a.Evict(t.Context(), tree[:len("sha256:")+12], true)
	if err != nil || !res.Pending || res.Removed || res.Tree != tree {
		t.Fatalf("evict --when-unused by digest prefix = %+v, %v; want %s pending", res, err, tree)
	}
	if in, err := a.Tree(t.Context(), tree); err != nil || in.Doomed != "operator" {
		t.Fatalf("tree after evict --when-unused: %+v, %v; want doomed by operator", in, err)
	}
	e.mustUnpublish("vol-a", e.target("pod-a"))
	e.wantTrees(dig, "m")
	sameFiles(t, e.target("pod-b"), files)
	e.mustUnpublish("vol-b", e.target("pod-b"))
	e.wantTrees(dig)
}

// Models that share a blob (a tokenizer) free less than their sizes when
// one goes: gc --dry-run must still report what gc then removes.
func TestBudget_GCDryRunWithSharedBlobs_MatchesRealRun_RealMinIO(t *testing.T) {
	e := newOperateEnv(t)
	a := e.adminClient()
	shared := randomModel(140, map[string]int{"tokenizer.json": 2 * opMiB})["tokenizer.json"]
	models := map[string]map[string][]byte{}
	for i, n := range []string{"x", "y"} {
		models[n] = randomModel(byte(141+i), map[string]int{"weights.bin": 1 * opMiB})
		models[n]["tokenizer.json"] = shared
		e.upload(n, models[n])
	}
	dig := map[string]string{}
	for _, n := range []string{"x", "y"} {
		e.mustPublish("vol-"+n, e.target("pod-"+n), e.model(n))
		dig[n] = e.treeDigest(n)
		e.mustUnpublish("vol-"+n, e.target("pod-"+n))
	}
	// 4 MiB of blobs for 6 MiB of trees. At 2.5 MiB, evicting x frees only
	// its own 1 MiB, so y must go too.
	e.restartWith("--cache-size=2560Ki")
	dry, err := a.GC(t.Context(), true)
	if err != nil {
		t.Fatal(err)
	}
	e.wantTrees(dig, "x", "y")
	res, err := a.GC(t.Context(), false)
	if err != nil {
		t.Fatal(err)
	}
	e.wantTrees(dig)
	if want := []string{dig["x"], dig["y"]}; !slices.Equal(digestsOf(res.Evicted), want) || res.Freed != 4*opMiB {
		t.Fatalf("gc = %+v, want x, y evicted and %d bytes freed", res, 4*opMiB)
	}
	if !slices.Equal(digestsOf(dry.Evicted), digestsOf(res.Evicted)) || dry.Freed != res.Freed || dry.Over != res.Over {
		t.Fatalf("gc --dry-run said %+v but gc did %+v", dry, res)
	}
}
