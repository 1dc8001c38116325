package kube

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// Unit tests with the client-go fake clientset. The broadcaster writes
// asynchronously, so tests poll with a deadline.

const (
	testNode = "node-1"
	mib      = int64(1) << 20
)

var (
	podA = PodRef{Namespace: "serving", Name: "bert-0", UID: "uid-a"}
	podB = PodRef{Namespace: "serving", Name: "bert-1", UID: "uid-b"}
)

// fakeClock is an injectable clock for the progress rate limit.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newTestEvents(t *testing.T, client *fake.Clientset) *Events {
	t.Helper()
	e := NewEvents(client, "modelcache-node", testNode)
	if e == nil {
		t.Fatal("NewEvents returned nil for a non-nil client")
	}
	t.Cleanup(e.Shutdown)
	return e
}

// waitEvents polls until namespace holds at least n events, and returns them.
func waitEvents(t *testing.T, client *fake.Clientset, namespace string, n int) []corev1.Event {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		list, err := client.CoreV1().Events(namespace).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatalf("listing events: %v", err)
		}
		if len(list.Items) >= n {
			return list.Items
		}
		if time.Now().After(deadline) {
			t.Fatalf("got %d events in %q, want at least %d: %+v", len(list.Items), namespace, n, list.Items)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// sentinel records a marker event on its own pod and waits for it; events
// are written in order, so everything recorded before has been handled.
func sentinel(t *testing.T, e *Events, client *fake.Clientset) {
	t.Helper()
	name := fmt.Sprintf("marker-%d", sentinels.Add(1))
	e.CacheHit(PodRef{Namespace: "sentinel", Name: name, UID: name}, "x:y", "", "", 0)
	deadline := time.Now().Add(5 * time.Second)
	for {
		for _, ev := range waitEvents(t, client, "sentinel", 0) {
			if ev.InvolvedObject.Name == name {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("sentinel event %s did not arrive", name)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var sentinels atomic.Int64

func byReason(events []corev1.Event, reason, pod string) []corev1.Event {
	var out []corev1.Event
	for _, ev := range events {
		if ev.Reason == reason && (pod == "" || ev.InvolvedObject.Name == pod) {
			out = append(out, ev)
		}
	}
	return out
}

func TestEventsRecorded(t *testing.T) {
	tests := []struct {
		name     string
		record   func(e *Events)
		wantType string
		reason   string
		wantMsg  []string
		wantAnn  map[string]string
	}{
		{
			name:     "download started",
			record:   func(e *Events) { e.DownloadStarted(podA, "mys3:bucket/m", 1200*mib) },
			wantType: corev1.EventTypeNormal,
			reason:   "ModelDownloading",
			wantMsg:  []string{"downloading model mys3:bucket/m (1.2 GiB) to node node-1"},
		},
		{
			name:     "download started, size unknown",
			record:   func(e *Events) { e.DownloadStarted(podA, "mys3:bucket/m", 0) },
			wantType: corev1.EventTypeNormal,
			reason:   "ModelDownloading",
			wantMsg:  []string{"downloading model mys3:bucket/m to node node-1"},
		},
		{
			name: "download progress",
			record: func(e *Events) {
				e.DownloadProgress(podA, "mys3:bucket/m", 420*mib, 1200*mib, float64(85*mib))
			},
			wantType: corev1.EventTypeNormal,
			reason:   "ModelDownloadProgress",
			wantMsg:  []string{"mys3:bucket/m", "35% (420.0 MiB of 1.2 GiB, 85.0 MiB/s, about 9s left)"},
		},
		{
			name: "download finished",
			record: func(e *Events) {
				e.DownloadFinished(podA, "mys3:bucket/m", "", "sha256:"+strings.Repeat("cd", 32), 1200*mib, 14*time.Second, "3 objects checked against the remote's MD5")
			},
			wantType: corev1.EventTypeNormal,
			reason:   "ModelDownloaded",
			wantMsg:  []string{"downloaded model mys3:bucket/m (1.2 GiB) in 14s (85.7 MiB/s); 3 objects checked against the remote's MD5"},
			wantAnn:  map[string]string{AnnotationTree: "sha256:" + strings.Repeat("cd", 32), AnnotationSize: "1258291200"},
		},
		{
			name:     "cache hit",
			record:   func(e *Events) { e.CacheHit(podA, "mys3:bucket/m", "", "sha256:"+strings.Repeat("ab", 32), 1200*mib) },
			wantType: corev1.EventTypeNormal,
			reason:   "ModelCached",
			wantMsg:  []string{"model mys3:bucket/m served from this node's cache (tree sha256:" + strings.Repeat("ab", 32) + ")"},
			wantAnn:  map[string]string{AnnotationTree: "sha256:" + strings.Repeat("ab", 32), AnnotationSize: "1258291200"},
		},
		{
			name: "download of a Hub model names its commit",
			record: func(e *Events) {
				e.DownloadFinished(podA, "hf://org/m@main", strings.Repeat("1f", 20), "sha256:"+strings.Repeat("cd", 32), 1200*mib, 14*time.Second, "")
			},
			wantType: corev1.EventTypeNormal,
			reason:   "ModelDownloaded",
			wantMsg:  []string{"downloaded model hf://org/m@main at commit " + strings.Repeat("1f", 20) + " (1.2 GiB)"},
			wantAnn: map[string]string{AnnotationTree: "sha256:" + strings.Repeat("cd", 32), AnnotationSize: "1258291200",
				AnnotationRevision: strings.Repeat("1f", 20)},
		},
		{
			name: "cache hit of an OCI model names its manifest",
			record: func(e *Events) {
				e.CacheHit(podA, "oci://r.example.com/m:v1", "sha256:"+strings.Repeat("ef", 32), "sha256:"+strings.Repeat("ab", 32), 1200*mib)
			},
			wantType: corev1.EventTypeNormal,
			reason:   "ModelCached",
			wantMsg:  []string{"model oci://r.example.com/m:v1 at manifest sha256:" + strings.Repeat("ef", 32) + " served from this node's cache"},
			wantAnn: map[string]string{AnnotationTree: "sha256:" + strings.Repeat("ab", 32), AnnotationSize: "1258291200",
				AnnotationRevision: "sha256:" + strings.Repeat("ef", 32)},
		},
		{
			name:     "download failed",
			record:   func(e *Events) { e.DownloadFailed(podA, "mys3:bucket/m", "remote refused the credentials") },
			wantType: corev1.EventTypeWarning,
			reason:   "ModelDownloadFailed",
			wantMsg:  []string{"downloading model mys3:bucket/m failed: remote refused the credentials"},
		},
		{
			name: "credentials in a URL are left out",
			record: func(e *Events) {
				e.DownloadFailed(podA, "https://user:hunter2@models.example.com/m.tar?X-Amz-Signature=s3cr3t", "not found")
			},
			wantType: corev1.EventTypeWarning,
			reason:   "ModelDownloadFailed",
			wantMsg:  []string{"downloading model https://models.example.com/m.tar failed: not found"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			client := fake.NewClientset()
			e := newTestEvents(t, client)
			tt.record(e)
			events := waitEvents(t, client, podA.Namespace, 1)
			if len(events) != 1 {
				t.Fatalf("got %d events, want 1: %+v", len(events), events)
			}
			ev := events[0]
			if ev.Type != tt.wantType || ev.Reason != tt.reason {
				t.Errorf("type, reason = %q, %q; want %q, %q", ev.Type, ev.Reason, tt.wantType, tt.reason)
			}
			wantObj := corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: podA.Namespace, Name: podA.Name, UID: types.UID(podA.UID)}
			if ev.InvolvedObject != wantObj {
				t.Errorf("involvedObject = %+v, want %+v", ev.InvolvedObject, wantObj)
			}
			if ev.Source.Component != "modelcache-node" || ev.Source.Host != testNode {
				t.Errorf("source = %+v, want modelcache-node on %s", ev.Source, testNode)
			}
			if !maps.Equal(ev.Annotations, tt.wantAnn) {
				t.Errorf("annotations = %v, want %v", ev.Annotations, tt.wantAnn)
			}
			for _, want := range tt.wantMsg {
				if !strings.Contains(ev.Message, want) {
					t.Errorf("message %q does not contain %q", ev.Message, want)
				}
			}
			for _, secret := range []string{"hunter2", "s3cr3t", "X-Amz"} {
				if strings.Contains(ev.Message, secret) {
					t.Errorf("message %q leaks %q", ev.Message, secret)
				}
			}
		})
	}
}

func TestProgressRateLimited(t *testing.T) {
	client := fake.NewClientset()
	e := newTestEvents(t, client)
	clock := &fakeClock{t: time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)}
	e.now = clock.Now

	const uri = "mys3:bucket/m"
	progress := func(pod PodRef, uri string, done int64) {
		e.DownloadProgress(pod, uri, done*mib, 100*mib, float64(10*mib))
	}
	count := func(reason, pod string) int {
		t.Helper()
		sentinel(t, e, client)
		return len(byReason(waitEvents(t, client, podA.Namespace, 0), reason, pod))
	}

	progress(podA, uri, 1)
	clock.Advance(5 * time.Second)
	progress(podA, uri, 2) // within 10 s of the first: dropped
	if got := count("ModelDownloadProgress", podA.Name); got != 1 {
		t.Fatalf("two calls within 10s: %d progress events, want 1", got)
	}

	progress(podB, uri, 3)             // another pod: independent
	progress(podA, "mys3:bucket/n", 4) // another model on the same pod: independent
	if got := count("ModelDownloadProgress", podB.Name); got != 1 {
		t.Errorf("other pod: %d progress events, want 1", got)
	}
	if got := count("ModelDownloadProgress", podA.Name); got != 2 {
		t.Errorf("other model: %d progress events on pod A, want 2", got)
	}

	clock.Advance(5 * time.Second) // 10 s after the first
	progress(podA, uri, 5)
	if got := count("ModelDownloadProgress", podA.Name); got != 3 {
		t.Errorf("after 10s: %d progress events on pod A, want 3", got)
	}

	// DownloadStarted holds the first progress event back one interval.
	e.DownloadStarted(podB, "mys3:bucket/z", 100*mib)
	progress(podB, "mys3:bucket/z", 6)
	if got := count("ModelDownloadProgress", podB.Name); got != 1 {
		t.Errorf("progress right after start: %d progress events on pod B, want 1", got)
	}

	// Finished and failed forget the state: the next download of the same
	// model reports progress at once, and the map does not grow.
	e.DownloadFinished(podA, uri, "", "", 100*mib, time.Second, "")
	e.DownloadFailed(podA, "mys3:bucket/n", "gone")
	e.DownloadFailed(podB, uri, "gone")
	e.DownloadFinished(podB, "mys3:bucket/z", "", "", 100*mib, time.Second, "")
	e.progressMu.Lock()
	left := len(e.lastProgress)
	e.progressMu.Unlock()
	if left != 0 {
		t.Errorf("rate-limit state after downloads ended: %d entries, want 0", left)
	}
	progress(podA, uri, 7)
	if got := count("ModelDownloadProgress", podA.Name); got != 4 {
		t.Errorf("after finish: %d progress events on pod A, want 4", got)
	}
}

func TestProgressIntervalInjectable(t *testing.T) {
	client := fake.NewClientset()
	e := newTestEvents(t, client)
	clock := &fakeClock{t: time.Unix(0, 0)}
	e.now = clock.Now
	e.progressInterval = time.Minute
	e.DownloadProgress(podA, "u:v", 1, 4, 0)
	clock.Advance(30 * time.Second)
	e.DownloadProgress(podA, "u:v", 2, 4, 0)
	clock.Advance(30 * time.Second)
	e.DownloadProgress(podA, "u:v", 3, 4, 0)
	sentinel(t, e, client)
	if got := len(waitEvents(t, client, podA.Namespace, 0)); got != 2 {
		t.Errorf("got %d events with a 1-minute interval, want 2", got)
	}
}

func TestNoPodNoEvent(t *testing.T) {
	tests := []struct {
		name string
		pod  PodRef
	}{
		{"empty", PodRef{}},
		{"no namespace", PodRef{Name: "p", UID: "u"}},
		{"no name", PodRef{Namespace: "serving", UID: "u"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client := fake.NewClientset()
			e := newTestEvents(t, client)
			e.DownloadStarted(tt.pod, "u:v", 1)
			e.DownloadProgress(tt.pod, "u:v", 1, 2, 3)
			e.DownloadFinished(tt.pod, "u:v", "", "", 1, time.Second, "")
			e.CacheHit(tt.pod, "u:v", "", "sha256:00", 1)
			e.DownloadFailed(tt.pod, "u:v", "r")
			sentinel(t, e, client)
			list, err := client.CoreV1().Events("").List(context.Background(), metav1.ListOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(list.Items) != 1 || list.Items[0].Namespace != "sentinel" {
				t.Errorf("want only the sentinel event, got %+v", list.Items)
			}
		})
	}
}

func TestNilEventsIsNoOp(t *testing.T) {
	if e := NewEvents(nil, "modelcache-node", testNode); e != nil {
		t.Fatalf("NewEvents(nil client) = %v, want nil", e)
	}
	var e *Events
	e.DownloadStarted(podA, "u:v", 1)
	e.DownloadProgress(podA, "u:v", 1, 2, 3)
	e.DownloadFinished(podA, "u:v", "", "", 1, time.Second, "")
	e.CacheHit(podA, "u:v", "", "sha256:00", 1)
	e.DownloadFailed(podA, "u:v", "r")
	e.Shutdown()
}

// failingClient returns a clientset whose every event write fails as if the
// API server were unreachable, and a counter of attempted writes.
func failingClient() (*fake.Clientset, *int64Counter) {
	client := fake.NewClientset()
	var calls int64Counter
	client.PrependReactor("*", "events", func(k8stesting.Action) (bool, runtime.Object, error) {
		calls.add()
		return true, nil, errors.New("dial tcp 10.96.0.1:443: connect: connection refused")
	})
	return client, &calls
}

type int64Counter struct {
	mu sync.Mutex
	n  int64
}

func (c *int64Counter) add() { c.mu.Lock(); c.n++; c.mu.Unlock() }
func (c *int64Counter) get() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func TestUnreachableAPIServerDoesNotBlock(t *testing.T) {
	client, calls := failingClient()
	e := NewEvents(client, "modelcache-node", testNode)

	start := time.Now()
	for i := range 100 {
		pod := PodRef{Namespace: "serving", Name: "p", UID: string(rune('a' + i%26))}
		switch i % 5 {
		case 0:
			e.DownloadStarted(pod, "u:v", 1)
		case 1:
			e.DownloadProgress(pod, "u:v", 1, 2, 3)
		case 2:
			e.CacheHit(pod, "u:v", "", "sha256:00", 1)
		case 3:
			e.DownloadFailed(pod, "u:v", "r")
		case 4:
			e.DownloadFinished(pod, "u:v", "", "", 1, time.Second, "")
		}
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("100 calls took %v with a failing API server, want well under 1s", took)
	}

	// Writes are attempted (and dropped), not queued forever.
	deadline := time.Now().Add(5 * time.Second)
	for calls.get() == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if calls.get() == 0 {
		t.Error("no event write was attempted")
	}

	start = time.Now()
	e.Shutdown()
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("Shutdown took %v, want at most ~2s", took)
	}
	e.Shutdown()                                    // twice is fine
	e.DownloadFailed(podA, "u:v", "after shutdown") // dropped, no panic
}

func TestHungAPIServer(t *testing.T) {
	// Every write hangs until the test ends: callers must not block, the
	// queue must stay bounded, and Shutdown must give up after its bound.
	client := fake.NewClientset()
	release := make(chan struct{})
	defer close(release)
	client.PrependReactor("*", "events", func(k8stesting.Action) (bool, runtime.Object, error) {
		<-release
		return true, nil, errors.New("timeout")
	})
	e := NewEvents(client, "modelcache-node", testNode)

	start := time.Now()
	for i := range 2000 {
		e.DownloadFailed(PodRef{Namespace: "serving", Name: "p", UID: string(rune(i))}, "u:v", "r")
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("2000 calls took %v with a hung API server, want well under 1s", took)
	}
	if n := e.pending.Load(); n > maxPendingEvents {
		t.Errorf("%d events queued, want at most %d", n, maxPendingEvents)
	}

	start = time.Now()
	e.Shutdown()
	took := time.Since(start)
	if took > 3*time.Second {
		t.Errorf("Shutdown took %v, want at most ~2s", took)
	}
	if took < defaultFlushTimeout/2 {
		t.Errorf("Shutdown took %v: it did not wait for the queued events", took)
	}
}

func TestShutdownFlushes(t *testing.T) {
	client := fake.NewClientset()
	e := NewEvents(client, "modelcache-node", testNode)
	for i := range 50 {
		e.CacheHit(PodRef{Namespace: "serving", Name: "p", UID: string(rune('A' + i))}, "u:v", "", "", 0)
	}
	e.Shutdown()
	list, err := client.CoreV1().Events("serving").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 50 {
		t.Errorf("after Shutdown: %d events written, want 50", len(list.Items))
	}
}

func TestConcurrentUse(t *testing.T) {
	client := fake.NewClientset()
	e := NewEvents(client, "modelcache-node", testNode)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			pod := PodRef{Namespace: "serving", Name: "p", UID: string(rune('a' + g))}
			for range 50 {
				e.DownloadStarted(pod, "u:v", 10)
				e.DownloadProgress(pod, "u:v", 5, 10, 1)
				e.CacheHit(pod, "u:v", "", "sha256:00", 1)
				e.DownloadFinished(pod, "u:v", "", "", 10, time.Second, "")
				e.DownloadFailed(pod, "u:w", "r")
			}
		})
	}
	wg.Go(func() {
		time.Sleep(5 * time.Millisecond)
		e.Shutdown()
	})
	wg.Wait()
}

func TestAggregatedProgressIsPatched(t *testing.T) {
	// After 10 progress messages client-go aggregates them into one event
	// that later ones update; the patch path must work against the API.
	client := fake.NewClientset()
	e := newTestEvents(t, client)
	clock := &fakeClock{t: time.Unix(0, 0)}
	e.now = clock.Now
	for i := range 15 {
		e.DownloadProgress(podA, "u:v", int64(i), 100, 0)
		clock.Advance(10 * time.Second)
	}
	sentinel(t, e, client)
	events := byReason(waitEvents(t, client, podA.Namespace, 0), "ModelDownloadProgress", podA.Name)
	var aggregated *corev1.Event
	for i := range events {
		if strings.HasPrefix(events[i].Message, "(combined from similar events)") {
			aggregated = &events[i]
		}
	}
	if aggregated == nil {
		t.Fatalf("no aggregated progress event among %d", len(events))
	}
	if aggregated.Count < 2 || !strings.Contains(aggregated.Message, "14% (14 B of 100 B)") {
		t.Errorf("aggregated event count %d, message %q: want it updated to the latest progress", aggregated.Count, aggregated.Message)
	}
}

func TestProgressText(t *testing.T) {
	tests := []struct {
		done, total int64
		rate        float64
		want        string
	}{
		{420 * mib, 1200 * mib, float64(85 * mib), "35% (420.0 MiB of 1.2 GiB, 85.0 MiB/s, about 9s left)"},
		{420 * mib, 1200 * mib, 0, "35% (420.0 MiB of 1.2 GiB)"},
		{420 * mib, 0, float64(85 * mib), "420.0 MiB so far (85.0 MiB/s)"},
		{0, 0, 0, "0 B so far"},
		{1200 * mib, 1200 * mib, float64(mib), "100% (1.2 GiB of 1.2 GiB, 1.0 MiB/s)"},
	}
	for _, tt := range tests {
		if got := progressText(tt.done, tt.total, tt.rate); got != tt.want {
			t.Errorf("progressText(%d, %d, %v) = %q, want %q", tt.done, tt.total, tt.rate, got, tt.want)
		}
	}
}

func TestLongReasonTruncated(t *testing.T) {
	client := fake.NewClientset()
	e := newTestEvents(t, client)
	e.DownloadFailed(podA, "u:v", strings.Repeat("é", 2000))
	ev := waitEvents(t, client, podA.Namespace, 1)[0]
	if len(ev.Message) > maxMessageBytes || !utf8.ValidString(ev.Message) {
		t.Errorf("message of %d bytes (valid UTF-8: %v), want at most %d", len(ev.Message), utf8.ValidString(ev.Message), maxMessageBytes)
	}
}
