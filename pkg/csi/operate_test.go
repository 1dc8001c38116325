package csi

// Unit tests of node operations on the publish path: drain, trees removed
// at their last unpublish, start-up reconciliation, stale references, pod
// events and metrics. Fake remote and mounter, real store and state.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/cache/cachetest"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/metrics"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"google.golang.org/grpc/codes"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// resnetFiles is a second model, with nothing in common with iris.
func resnetFiles() map[string][]byte {
	return map[string][]byte{
		"config.json": []byte(`{"arch":"resnet50"}`),
		"weights.bin": []byte(strings.Repeat("resnet weights ", 500)),
	}
}

// publishWithin publishes with an RPC deadline of d.
func (h *harness) publishWithin(d time.Duration, req *csi.NodePublishVolumeRequest) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	_, err := h.node.NodePublishVolume(ctx, req)
	return err
}

func (h *harness) unpublish(volumeID, target string) {
	h.t.Helper()
	if _, err := h.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: volumeID, TargetPath: target}); err != nil {
		h.t.Fatalf("NodeUnpublishVolume(%s): %v", target, err)
	}
}

func (h *harness) setDrained(on bool) {
	h.t.Helper()
	if err := h.state.SetDrained(on); err != nil {
		h.t.Fatal(err)
	}
}

// A drained node serves what it caches and starts no download.
func TestDrainedNodePublish(t *testing.T) {
	h := newHarness(t)
	h.res.SetModel(otherURI, resnetFiles())
	h.mustPublish(publishReq("vol-warm", h.target("warm"), testURI, nil))

	tests := []struct {
		name    string
		drained bool
		uri     string
		attrs   map[string]string
		secrets map[string]string
		code    codes.Code
	}{
		{name: "not cached", drained: true, uri: otherURI, code: codes.Unavailable},
		{name: "not cached, pull Always", drained: true, uri: otherURI, attrs: map[string]string{AttrPullPolicy: PullAlways}, code: codes.Unavailable},
		{name: "cached", drained: true, uri: testURI, code: codes.OK},
		{name: "cached, pull Always", drained: true, uri: testURI, attrs: map[string]string{AttrPullPolicy: PullAlways}, code: codes.OK},
		{name: "cached, other tenant's credentials", drained: true, uri: testURI, secrets: otherSecrets(), code: codes.OK},
		{name: "undrained", drained: false, uri: otherURI, code: codes.OK},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := h.in(t)
			h.setDrained(tt.drained)
			target := h.target(fmt.Sprintf("pod-%d", i))
			req := publishReq(fmt.Sprintf("vol-%d", i), target, tt.uri, tt.attrs)
			if tt.secrets != nil {
				req.Secrets = tt.secrets
			}
			opens := h.res.OpenTotal()
			err := h.publish(req)
			if tt.code != codes.OK {
				wantCode(t, err, tt.code, "drained", "undrain")
				h.wantNothingAt(target)
				if h.res.OpenTotal() != opens {
					t.Error("a drained node downloaded")
				}
				return
			}
			if err != nil {
				t.Fatalf("publish: %v", err)
			}
			h.wantMounted(target, sourcetest.TreeDigestOf(h.res.Files(tt.uri)))
			if tt.drained && h.res.OpenTotal() != opens {
				t.Error("a drained node downloaded")
			}
		})
	}
}

// A download that was running when the node was drained may still be
// joined: the retry reports progress, not "drained".
func TestDrainedNodeJoinsRunningDownload(t *testing.T) {
	h := newHarness(t)
	h.res.WithGate(10)
	target := h.target("pod-a")
	req := publishReq("vol-a", target, testURI, nil)
	wantCode(t, h.publishWithin(500*time.Millisecond, req), codes.Aborted, "still downloading")

	h.setDrained(true)
	// Other pods join the running download.
	wantCode(t, h.publishWithin(500*time.Millisecond, publishReq("vol-b", h.target("pod-b"), testURI, nil)), codes.Aborted, "still downloading")
	// The first pod's retry joins and, once it ends, mounts.
	done := make(chan error, 1)
	go func() { done <- h.publishWithin(waitLimit, req) }()
	h.res.Release()
	if err := recv(t, done, "publish joining the download"); err != nil {
		t.Fatalf("retry on a drained node after its download ended: %v", err)
	}
	h.wantMounted(target, sourcetest.TreeDigestOf(irisFiles()))
	for p := range irisFiles() {
		if n := h.res.OpenCount(testURI, p); n != 1 {
			t.Errorf("%s opened %d times, want 1", p, n)
		}
	}
}

// A tree marked to go (evict --when-unused) or on a drained node goes with
// its last mount, and not before.
func TestTreeReleasedAtLastUnpublish(t *testing.T) {
	tests := []struct {
		name     string
		doom     bool
		drain    bool
		pin      bool
		wantGone bool
		bug      string
	}{
		{name: "neither doomed nor drained"},
		{name: "doomed", doom: true, wantGone: true},
		{name: "drained", drain: true, wantGone: true},
		{name: "pinned", pin: true},
		{name: "doomed and pinned", doom: true, pin: true, wantGone: true},
		{name: "drained and pinned", drain: true, pin: true, wantGone: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.bug != "" {
				t.Skip("BUG: " + tt.bug)
			}
			h := newHarness(t)
			h.res.SetModel(otherURI, resnetFiles())
			digest := sourcetest.TreeDigestOf(irisFiles())
			other := sourcetest.TreeDigestOf(resnetFiles())
			a, b := h.target("pod-a"), h.target("pod-b")
			h.mustPublish(publishReq("vol-a", a, testURI, nil))
			h.mustPublish(publishReq("vol-b", b, testURI, nil))
			h.mustPublish(publishReq("vol-o", h.target("pod-o"), otherURI, nil))
			if tt.pin {
				if err := h.state.SetPinned(digest, true); err != nil {
					t.Fatal(err)
				}
			}
			if tt.doom {
				if err := h.state.Doom(digest, "operator"); err != nil {
					t.Fatal(err)
				}
			}
			if tt.drain {
				h.setDrained(true)
			}

			h.unpublish("vol-a", a)
			if !h.store.HasTree(digest) {
				t.Fatal("the tree was removed while another pod still mounts it")
			}
			h.wantMounted(b, digest)
			h.unpublish("vol-b", b)
			if gone := !h.store.HasTree(digest); gone != tt.wantGone {
				t.Fatalf("tree removed at its last unpublish = %v, want %v", gone, tt.wantGone)
			}
			_, recorded, err := h.state.CachedTree(digest)
			if err != nil || recorded == tt.wantGone {
				t.Errorf("tree still recorded = %v (%v), want %v", recorded, err, !tt.wantGone)
			}
			if !h.store.HasTree(other) {
				t.Error("a tree still mounted elsewhere was removed")
			}
			// An unpublish of an unknown target releases nothing.
			h.unpublish("vol-x", h.target("pod-x"))
			if !h.store.HasTree(other) {
				t.Error("unpublishing an unknown target removed a tree")
			}
		})
	}
}

// Reconcile makes records and tree directories agree after a start.
func TestReconcile(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	// Four trees: recorded and on disk; recorded, not on disk; on disk
	// without a record; on disk without a record but mounted.
	models := map[string]map[string][]byte{
		"kept":     irisFiles(),
		"lost":     resnetFiles(),
		"orphan":   {"orphan.bin": []byte(strings.Repeat("orphan ", 100))},
		"attached": {"attached.bin": []byte(strings.Repeat("attached ", 100))},
	}
	digests := map[string]string{}
	for name, files := range models {
		tr, _, err := h.store.Ensure(ctx, "key-"+name, sourcetest.ManifestOf(files, time.Time{}), memFiles(files))
		if err != nil {
			t.Fatal(err)
		}
		digests[name] = tr.Digest
	}
	lost := h.store.TreePath(digests["lost"])
	cachetest.MakeWritable(lost)
	if err := os.RemoveAll(lost); err != nil {
		t.Fatal(err)
	}
	if err := h.state.AddRef(state.Ref{VolumeID: "vol-att", TargetPath: h.target("att"), Tree: digests["attached"], URI: testURI, Published: time.Now()}, ""); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"orphan", "attached"} {
		if err := h.state.ForgetTree(digests[name]); err != nil {
			t.Fatal(err)
		}
	}

	forgotten, removed, err := h.cache.Reconcile()
	if err != nil || forgotten != 1 || removed != 1 {
		t.Fatalf("Reconcile = %d forgotten, %d removed, %v; want 1, 1", forgotten, removed, err)
	}
	tests := []struct {
		name                 string
		onDisk, wantRecorded bool
	}{
		{"kept", true, true},
		{"lost", false, false},
		{"orphan", false, false},
		{"attached", true, false},
	}
	for _, tt := range tests {
		if got := h.store.HasTree(digests[tt.name]); got != tt.onDisk {
			t.Errorf("%s: on disk = %v, want %v", tt.name, got, tt.onDisk)
		}
		_, rec, err := h.state.CachedTree(digests[tt.name])
		if err != nil || rec != tt.wantRecorded {
			t.Errorf("%s: recorded = %v (%v), want %v", tt.name, rec, err, tt.wantRecorded)
		}
	}
	if _, ok, _ := h.state.TreeForKey("key-lost"); ok {
		t.Error("the content key of a lost tree still leads to it")
	}
	// The orphan's blob went with it.
	if _, err := os.Stat(filepath.Join(h.store.Dir(), store.BlobsDir, sha256Hex(models["orphan"]["orphan.bin"]))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("orphan tree's blob still there (%v)", err)
	}
	if f, r, err := h.cache.Reconcile(); err != nil || f != 0 || r != 0 {
		t.Errorf("second Reconcile = %d, %d, %v; want nothing to do", f, r, err)
	}
}

// memFiles is a store.Fetcher over files in memory.
type memFiles map[string][]byte

func (m memFiles) Open(_ context.Context, e source.Entry) (io.ReadCloser, error) {
	b, ok := m[e.Path]
	if !ok {
		return nil, fmt.Errorf("no %s: %w", e.Path, os.ErrNotExist)
	}
	return io.NopCloser(strings.NewReader(string(b))), nil
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// ReleaseStale drops references whose mount stayed gone, and only those.
func TestReleaseStale(t *testing.T) {
	tests := []struct {
		name      string
		grace     time.Duration
		cancelled bool
		drained   bool
		wantRefs  []string // pods still referenced afterwards
	}{
		{name: "grace 0", wantRefs: []string{"a", "c"}},
		{name: "context ended first", grace: time.Hour, cancelled: true, wantRefs: []string{"a", "b", "c"}},
		{name: "drained node", drained: true, wantRefs: []string{"a", "c"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			for _, p := range []string{"a", "b", "c"} {
				h.mustPublish(publishReq("vol-"+p, h.target("pod-"+p), testURI, nil))
			}
			// A reboot loses b's and c's mounts; kubelet publishes c again.
			h.mnt.Forget(h.target("pod-b"))
			h.mnt.Forget(h.target("pod-c"))
			live, gone, err := h.cache.Recover()
			if err != nil || live != 1 || len(gone) != 2 {
				t.Fatalf("Recover = %d live, %d gone, %v", live, len(gone), err)
			}
			h.mustPublish(publishReq("vol-c", h.target("pod-c"), testURI, nil))
			h.setDrained(tt.drained)

			ctx, cancel := context.WithCancel(context.Background())
			if tt.cancelled {
				cancel()
			}
			defer cancel()
			returned := make(chan struct{})
			go func() {
				h.cache.ReleaseStale(ctx, tt.grace, gone)
				close(returned)
			}()
			recv(t, returned, "ReleaseStale")

			var pods []string
			refs, err := h.state.Refs()
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range refs {
				pods = append(pods, strings.TrimPrefix(r.VolumeID, "vol-"))
			}
			slices.Sort(pods)
			if !slices.Equal(pods, tt.wantRefs) {
				t.Errorf("references after ReleaseStale: %v, want %v", pods, tt.wantRefs)
			}
			if !h.store.HasTree(sourcetest.TreeDigestOf(irisFiles())) {
				t.Error("a tree still mounted was removed")
			}
			h.wantMounted(h.target("pod-a"), sourcetest.TreeDigestOf(irisFiles()))
			h.wantMounted(h.target("pod-c"), sourcetest.TreeDigestOf(irisFiles()))
		})
	}
	t.Run("drained node, last reference", func(t *testing.T) {
		h := newHarness(t)
		target := h.target("pod-a")
		h.mustPublish(publishReq("vol-a", target, testURI, nil))
		h.mnt.Forget(target)
		_, gone, err := h.cache.Recover()
		if err != nil || len(gone) != 1 {
			t.Fatalf("Recover = %d gone, %v", len(gone), err)
		}
		h.setDrained(true)
		h.cache.ReleaseStale(context.Background(), 0, gone)
		if _, ok, _ := h.state.Ref(target); ok {
			t.Error("stale reference kept")
		}
		if h.store.HasTree(sourcetest.TreeDigestOf(irisFiles())) {
			t.Error("a drained node kept a tree whose last reference was released")
		}
	})
}

// waitPodEvent polls the fake API server until an event with reason is on
// the pod, and returns it.
func waitPodEvent(t *testing.T, cs *fake.Clientset, reason string) (found struct {
	Type, Message, Component, Host, Name, UID string
}) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		list, err := cs.CoreV1().Events("seldon").List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range list.Items {
			if ev.Reason == reason {
				found.Type, found.Message = ev.Type, ev.Message
				found.Component, found.Host = ev.Source.Component, ev.Source.Host
				found.Name, found.UID = ev.InvolvedObject.Name, string(ev.InvolvedObject.UID)
				if ev.InvolvedObject.Kind != "Pod" {
					t.Errorf("event %s is on a %s", reason, ev.InvolvedObject.Kind)
				}
				return found
			}
		}
		if time.Now().After(deadline) {
			var got []string
			for _, ev := range list.Items {
				got = append(got, ev.Reason)
			}
			t.Fatalf("no %s event on the pod; events: %v", reason, got)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Publishes tell the pod what the node did with its model.
func TestPublishEvents(t *testing.T) {
	h := newHarness(t)
	cs := fake.NewClientset()
	ev := kube.NewEvents(cs, "modelcache-node", "node-1")
	t.Cleanup(ev.Shutdown)
	h.node.Events = ev
	h.res.SetModel(otherURI, resnetFiles())

	steps := []struct {
		name    string
		uri     string
		setup   func()
		wantErr bool
		reasons []string
		typ     string
	}{
		{"cold", testURI, nil, false, []string{kube.ReasonDownloading, kube.ReasonDownloaded}, "Normal"},
		{"warm", testURI, nil, false, []string{kube.ReasonCached}, "Normal"},
		{"failed download", otherURI, func() {
			h.res.Set(func(r *sourcetest.Resolver) {
				r.OpenErr = fmt.Errorf("%w: 403 Forbidden", source.ErrDenied)
			})
		}, true, []string{kube.ReasonDownloadFailed}, "Warning"},
	}
	for i, st := range steps {
		if st.setup != nil {
			st.setup()
		}
		err := h.publish(publishReq(fmt.Sprintf("vol-%d", i), h.target(fmt.Sprintf("pod-%d", i)), st.uri, nil))
		if (err != nil) != st.wantErr {
			t.Fatalf("%s: publish err = %v", st.name, err)
		}
		for _, reason := range st.reasons {
			got := waitPodEvent(t, cs, reason)
			if got.Type != st.typ || got.Name != "model-server-0" || got.UID != "0f3c2b1a-5d6e-4f70-8a9b-0c1d2e3f4a5b" ||
				got.Component != "modelcache-node" || got.Host != "node-1" || !strings.Contains(got.Message, st.uri) {
				t.Errorf("%s: %s event = %+v; want a %s event about %s on the pod from modelcache-node on node-1", st.name, reason, got, st.typ, st.uri)
			}
			for _, s := range secretValues {
				if strings.Contains(got.Message, s) {
					t.Errorf("%s: event leaks a secret: %q", st.name, got.Message)
				}
			}
		}
	}
	// No download was recorded for the warm publish.
	list, err := cs.CoreV1().Events("seldon").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range list.Items {
		if e.Reason == kube.ReasonDownloading {
			n += int(max(e.Count, 1))
		}
	}
	// The failed download of the other model started one too.
	if n != 2 {
		t.Errorf("%d %s events, want 2 (iris cold, resnet failed)", n, kube.ReasonDownloading)
	}
}

// scrapeMetrics returns the value of each sample line, keyed by name{labels}.
func scrapeMetrics(t *testing.T, h http.Handler) map[string]string {
	t.Helper()
	ts := httptest.NewServer(h)
	defer ts.Close()
	resp, err := http.Get(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		out[line[:i]] = line[i+1:]
	}
	return out
}

func TestPublishMetrics(t *testing.T) {
	h := newHarness(t)
	m := metrics.New()
	h.node.Metrics = m
	h.res.SetModel(otherURI, resnetFiles())

	h.mustPublish(publishReq("vol-a", h.target("pod-a"), testURI, nil)) // miss
	h.mustPublish(publishReq("vol-b", h.target("pod-b"), testURI, nil)) // hit
	h.mustPublish(publishReq("vol-b", h.target("pod-b"), testURI, nil)) // already published
	wantCode(t, h.publish(publishReq("vol-c", h.target("pod-c"), "mys3:models/none", nil)), codes.NotFound)
	wantCode(t, h.publish(publishReq("", h.target("pod-d"), testURI, nil)), codes.InvalidArgument)
	h.setDrained(true)
	wantCode(t, h.publish(publishReq("vol-e", h.target("pod-e"), otherURI, nil)), codes.Unavailable)

	got := scrapeMetrics(t, m.Handler())
	tests := []struct{ series, want string }{
		{`modelcache_publishes_total{code="OK"}`, "3"},
		{`modelcache_publishes_total{code="NotFound"}`, "1"},
		{`modelcache_publishes_total{code="InvalidArgument"}`, "1"},
		{`modelcache_publishes_total{code="Unavailable"}`, "1"},
		{`modelcache_cache_lookups_total{result="hit"}`, "1"},
		{`modelcache_cache_lookups_total{result="miss"}`, "1"},
	}
	for _, tt := range tests {
		if v := got[tt.series]; v != tt.want {
			t.Errorf("%s = %q, want %s", tt.series, v, tt.want)
		}
	}
	for k := range got {
		for _, s := range append(secretValues, testURI, "model-server-0") {
			if strings.Contains(k, s) {
				t.Errorf("metric %s carries %q in a label", k, s)
			}
		}
	}
}

// Eviction is least recently used first; a tree mounted until a moment ago
// was used more recently than one whose pods went away earlier.
func TestUnpublishCountsAsUse(t *testing.T) {
	h := newHarness(t)
	h.res.SetModel(otherURI, resnetFiles())
	iris, resnet := sourcetest.TreeDigestOf(irisFiles()), sourcetest.TreeDigestOf(resnetFiles())
	a, b := h.target("pod-a"), h.target("pod-b")
	h.mustPublish(publishReq("vol-a", a, testURI, nil)) // iris, mounted first
	time.Sleep(10 * time.Millisecond)
	h.mustPublish(publishReq("vol-b", b, otherURI, nil)) // resnet, mounted later
	h.unpublish("vol-b", b)                              // resnet unused from here
	time.Sleep(10 * time.Millisecond)
	h.unpublish("vol-a", a) // iris in use until now
	// Neither is in use or pinned: the eviction order is the order of
	// last use the cache lists.
	trees, err := h.cache.Trees()
	if err != nil {
		t.Fatal(err)
	}
	if len(trees) != 2 || trees[0].Digest != resnet || trees[1].Digest != iris {
		t.Errorf("eviction order %v; want resnet (unused longer) before iris (mounted until now)", trees)
	}
}
