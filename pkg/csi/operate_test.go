package csi

// Unit tests of node operations on the publish path: drain, pod events and
// metrics. Fake remote and mounter, real store and state. What the cache
// does at a last release, at start-up and with stale references is tested
// in pkg/cache.

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/metrics"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store/storetest"
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
			h.wantMounted(target, storetest.TreeDigestOf(h.res.Files(tt.uri)))
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
	h.wantMounted(target, storetest.TreeDigestOf(irisFiles()))
	for p := range irisFiles() {
		if n := h.res.OpenCount(testURI, p); n != 1 {
			t.Errorf("%s opened %d times, want 1", p, n)
		}
	}
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
	iris, resnet := storetest.TreeDigestOf(irisFiles()), storetest.TreeDigestOf(resnetFiles())
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

// The ModelDownloaded event says where the bytes came from when peers
// sent any, before how they were checked; without peers it reads as before.
func TestDownloadedEventSaysWhereBytesCameFrom(t *testing.T) {
	const mib = 1 << 20
	tree := cache.ModelTree{Digest: storetest.TreeDigestOf(irisFiles()), Size: 4 * mib, Files: 2}
	for _, tt := range []struct {
		name string
		from cache.BytesFrom
		want string
	}{
		{"origin only", cache.BytesFrom{Origin: 4 * mib},
			"; 2 objects checked against the remote's MD5"},
		{"peers and the origin", cache.BytesFrom{Origin: mib, Peers: 3 * mib, Nodes: []cache.NodeBytes{{Node: "node-a", Bytes: 3 * mib}}},
			"; 1.0 MiB from the origin, 3.0 MiB from peers (node-a 3.0 MiB); 2 objects checked against the remote's MD5"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cs := fake.NewClientset()
			ev := kube.NewEvents(cs, "modelcache-node", "node-1")
			t.Cleanup(ev.Shutdown)
			p := &podEvents{events: ev, pod: kube.PodRef{Namespace: "seldon", Name: "model-server-0", UID: "u"}, uri: testURI}
			p.Finished(tree, time.Second, cache.Checks{MD5: 2}, tt.from)
			if got := waitPodEvent(t, cs, kube.ReasonDownloaded); !strings.HasSuffix(got.Message, tt.want) {
				t.Errorf("event %q, want it to end %q", got.Message, tt.want)
			}
		})
	}
}
