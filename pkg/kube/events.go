package kube

import (
	"context"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/modelcache/modelcache/pkg/units"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
)

// Event reasons, as shown in the REASON column of `kubectl get events` and in
// `kubectl describe pod`.
const (
	ReasonDownloading      = "ModelDownloading"
	ReasonDownloadProgress = "ModelDownloadProgress"
	ReasonDownloaded       = "ModelDownloaded"
	ReasonCached           = "ModelCached"
	ReasonDownloadFailed   = "ModelDownloadFailed"
)

const (
	// defaultProgressInterval is the least time between two progress events
	// for one download on one pod.
	defaultProgressInterval = 10 * time.Second
	// defaultFlushTimeout bounds how long Shutdown waits for queued events.
	defaultFlushTimeout = 2 * time.Second
	// maxPendingEvents bounds the events queued and not yet written; beyond it
	// new events are dropped. It is well below the broadcaster's own queue
	// (1000), so the broadcaster never drops silently and the count is exact.
	maxPendingEvents = 256
	// writeTimeout bounds one write to the API server.
	writeTimeout = 5 * time.Second
	// maxEventAge drops events that waited this long in the queue (API server
	// slow or down): a stale "35% done" misleads more than a missing one.
	maxEventAge = time.Minute
	// maxMessageBytes is the longest message written; events.k8s.io limits
	// notes to 1 kB and longer texts only make `kubectl describe` unreadable.
	maxMessageBytes = 1024
	// maxTrackedProgress bounds the progress rate-limit state; past it,
	// entries idle for several intervals are forgotten.
	maxTrackedProgress = 1024
)

// Annotations on ModelDownloaded and ModelCached events: the tree the pod
// got and its size in bytes, for readers that must not parse messages
// (the CachedModel reconciler).
const (
	AnnotationTree = "modelcache.csi.dev/tree"
	AnnotationSize = "modelcache.csi.dev/size"
	// AnnotationRevision is the Hub commit or OCI manifest digest the
	// modelUri resolved to, on models from those sources.
	AnnotationRevision = "modelcache.csi.dev/revision"
)

// PodRef identifies the pod a publish is for (from podInfoOnMount volume context keys).
type PodRef struct{ Namespace, Name, UID string }

// Events records download events on pods.
//
// Events are best effort. They go through client-go's tools/record
// EventBroadcaster as core/v1 Events: that is the API kubelet's own
// FailedMount events use, so ours interleave with them in `kubectl describe
// pod`, and it needs only the usual RBAC rule (core "events": create, patch).
// tools/events (events.k8s.io/v1) would need a second rule and buys nothing
// here. The recorder hands events to the broadcaster with ActionOrDrop, so a
// caller never blocks.
//
// Writing is our own watcher on the broadcaster (StartEventWatcher) with
// client-go's EventCorrelator (aggregation, counting, spam filter), rather
// than StartRecordingToSink: the stock writer retries a failed write up to 12
// times with 10-second sleeps and no request timeout, so during an API outage
// events pile up and arrive minutes late, and it cannot tell when its queue
// is empty. Ours makes one attempt per event with a timeout, drops events
// that went stale, and counts what is queued so Shutdown can flush.
type Events struct {
	client     kubernetes.Interface
	hostName   string
	recorder   record.EventRecorder
	broadcast  record.EventBroadcaster
	correlator *record.EventCorrelator

	ctx    context.Context // canceled by Shutdown; aborts writes in flight
	cancel context.CancelFunc

	// mu guards closed; enqueueing holds it shared so Shutdown (exclusive)
	// never races an enqueue into a stopped broadcaster.
	mu      sync.RWMutex
	closed  bool
	pending atomic.Int64 // events handed to the broadcaster and not yet written or dropped

	progressMu   sync.Mutex
	lastProgress map[progressKey]time.Time

	// Injectable in tests.
	now              func() time.Time
	progressInterval time.Duration
	flushTimeout     time.Duration
}

type progressKey struct{ namespace, name, uid, uri string }

// NewEvents records events through client as component (e.g. "modelcache-node") on host (node name, for the event source).
// A nil client returns a nil *Events, on which every method is a no-op.
func NewEvents(client kubernetes.Interface, component, host string) *Events {
	if client == nil {
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &Events{
		client:   client,
		hostName: host,
		correlator: record.NewEventCorrelatorWithOptions(record.CorrelatorOptions{
			// Our own limiter already holds progress to one event per
			// download and pod every 10 s; the filter only catches misuse.
			// Keyed by reason as well, so a long download's progress can
			// never use up the budget its ModelDownloaded event needs.
			QPS:         float32(time.Second) / float32(defaultProgressInterval),
			SpamKeyFunc: spamKeyByReason,
		}),
		ctx:              ctx,
		cancel:           cancel,
		lastProgress:     map[progressKey]time.Time{},
		now:              time.Now,
		progressInterval: defaultProgressInterval,
		flushTimeout:     defaultFlushTimeout,
	}
	e.broadcast = record.NewBroadcaster()
	e.broadcast.StartEventWatcher(e.write)
	e.recorder = e.broadcast.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: host})
	return e
}

// Shutdown flushes what it can (bounded wait, at most ~2s) and stops the broadcaster.
// Events recorded afterwards are dropped. It is safe to call more than once.
func (e *Events) Shutdown() {
	if e == nil {
		return
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return
	}
	e.closed = true
	e.mu.Unlock()

	deadline := time.Now().Add(e.flushTimeout)
	for e.pending.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := e.pending.Load(); n > 0 {
		klog.V(2).InfoS("Dropping pod events not yet written at shutdown", "count", n)
	}
	e.cancel()
	e.broadcast.Shutdown()
}

// DownloadStarted records that a download for pod began. total <= 0 means
// the size is not known yet.
func (e *Events) DownloadStarted(pod PodRef, uri string, total int64) {
	if e == nil || !hasPod(pod) {
		return
	}
	// The first progress event comes one interval after the start, so a
	// short download shows "downloading" and "downloaded" and nothing else.
	e.progressMu.Lock()
	e.lastProgress[newProgressKey(pod, uri)] = e.now()
	e.progressMu.Unlock()

	msg := fmt.Sprintf("downloading model %s", displayURI(uri))
	if total > 0 {
		msg += fmt.Sprintf(" (%s)", units.Bytes(total))
	}
	e.emit(pod, corev1.EventTypeNormal, ReasonDownloading, msg+" to node "+e.hostName)
}

// DownloadProgress records how far a download for pod got, at most once per
// pod and uri every 10 seconds; calls in between are dropped. rate is in
// bytes per second; total <= 0 or rate <= 0 mean unknown.
func (e *Events) DownloadProgress(pod PodRef, uri string, done, total int64, rate float64) {
	if e == nil || !hasPod(pod) || !e.allowProgress(newProgressKey(pod, uri)) {
		return
	}
	e.emit(pod, corev1.EventTypeNormal, ReasonDownloadProgress,
		fmt.Sprintf("downloading model %s: %s", displayURI(uri), progressText(done, total, rate)))
}

// DownloadFinished records a completed download of the tree (digest) of
// size bytes that took took.
func (e *Events) DownloadFinished(pod PodRef, uri, revision, tree string, size int64, took time.Duration, checks string) {
	if e == nil || !hasPod(pod) {
		return
	}
	e.forgetProgress(newProgressKey(pod, uri))
	msg := fmt.Sprintf("downloaded model %s%s (%s) in %s", displayURI(uri), atRevision(revision), units.Bytes(size), formatDuration(took))
	if took > 0 && size > 0 {
		msg += fmt.Sprintf(" (%s/s)", units.Bytes(int64(float64(size)/took.Seconds())))
	}
	if checks != "" {
		msg += "; " + checks
	}
	e.emitTree(pod, ReasonDownloaded, msg, revision, tree, size)
}

// CacheHit records that the model for pod was served from the node's cache
// without a download; tree is its tree digest ("sha256:<hex>") of size
// bytes, revision what a Hub or OCI modelUri resolved to ("" for others).
func (e *Events) CacheHit(pod PodRef, uri, revision, tree string, size int64) {
	if e == nil || !hasPod(pod) {
		return
	}
	msg := fmt.Sprintf("model %s%s served from this node's cache", displayURI(uri), atRevision(revision))
	if tree != "" {
		msg += fmt.Sprintf(" (tree %s)", tree)
	}
	e.emitTree(pod, ReasonCached, msg, revision, tree, size)
}

// atRevision names, in a message, the commit or manifest digest a Hub or
// OCI modelUri resolved to.
func atRevision(revision string) string {
	switch {
	case revision == "":
		return ""
	case strings.HasPrefix(revision, "sha256:"):
		return " at manifest " + revision
	default:
		return " at commit " + revision
	}
}

// emitTree emits a Normal event annotated with the tree the pod got and
// the revision its modelUri resolved to.
func (e *Events) emitTree(pod PodRef, reason, message, revision, tree string, size int64) {
	var annotations map[string]string
	if tree != "" {
		annotations = map[string]string{AnnotationTree: tree, AnnotationSize: strconv.FormatInt(size, 10)}
		if revision != "" {
			annotations[AnnotationRevision] = revision
		}
	}
	e.emitAnnotated(pod, corev1.EventTypeNormal, reason, message, annotations)
}

// DownloadFailed records a failed download as a Warning. reason is shown as
// given; the caller guarantees it holds no secrets.
func (e *Events) DownloadFailed(pod PodRef, uri, reason string) {
	if e == nil || !hasPod(pod) {
		return
	}
	e.forgetProgress(newProgressKey(pod, uri))
	e.emit(pod, corev1.EventTypeWarning, ReasonDownloadFailed,
		fmt.Sprintf("downloading model %s failed: %s", displayURI(uri), reason))
}

// emit hands one event to the broadcaster without blocking, or drops it.
func (e *Events) emit(pod PodRef, eventType, reason, message string) {
	e.emitAnnotated(pod, eventType, reason, message, nil)
}

func (e *Events) emitAnnotated(pod PodRef, eventType, reason, message string, annotations map[string]string) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.closed {
		return
	}
	if e.pending.Add(1) > maxPendingEvents {
		e.pending.Add(-1)
		klog.V(4).InfoS("Dropped pod event: too many queued", "pod", klog.KRef(pod.Namespace, pod.Name), "reason", reason)
		return
	}
	ref := &corev1.ObjectReference{
		Kind:       "Pod",
		APIVersion: "v1",
		Namespace:  pod.Namespace,
		Name:       pod.Name,
		UID:        types.UID(pod.UID),
	}
	if annotations != nil {
		e.recorder.AnnotatedEventf(ref, annotations, eventType, reason, "%s", truncate(message, maxMessageBytes))
		return
	}
	e.recorder.Event(ref, eventType, reason, truncate(message, maxMessageBytes))
}

// write runs on the broadcaster's watcher goroutine, one event at a time.
func (e *Events) write(queued *corev1.Event) {
	defer e.pending.Add(-1)
	if e.ctx.Err() != nil {
		return
	}
	pod := klog.KRef(queued.InvolvedObject.Namespace, queued.InvolvedObject.Name)
	if age := time.Since(queued.LastTimestamp.Time); age > maxEventAge {
		klog.V(2).InfoS("Dropped pod event: queued too long", "pod", pod, "reason", queued.Reason, "age", age)
		return
	}
	ev := *queued // the broadcaster shares the pointer with any other watcher
	result, err := e.correlator.EventCorrelate(&ev)
	if err != nil {
		klog.V(4).InfoS("Correlating pod event failed", "pod", pod, "reason", ev.Reason, "err", err)
	}
	if result == nil || result.Skip {
		return
	}

	ctx, cancel := context.WithTimeout(e.ctx, writeTimeout)
	defer cancel()
	sink := e.client.CoreV1().Events(result.Event.Namespace)
	var written *corev1.Event
	update := result.Event.Count > 1
	if update {
		written, err = sink.PatchWithEventNamespaceWithContext(ctx, result.Event, result.Patch)
	}
	if !update || apierrors.IsNotFound(err) {
		result.Event.ResourceVersion = ""
		written, err = sink.CreateWithEventNamespaceWithContext(ctx, result.Event)
	}
	if err != nil {
		klog.V(2).InfoS("Dropped pod event: writing it failed", "pod", pod, "reason", ev.Reason, "err", err)
		return
	}
	e.correlator.UpdateState(written)
}

func (e *Events) allowProgress(k progressKey) bool {
	e.progressMu.Lock()
	defer e.progressMu.Unlock()
	now := e.now()
	if last, ok := e.lastProgress[k]; ok && now.Sub(last) < e.progressInterval {
		return false
	}
	e.lastProgress[k] = now
	if len(e.lastProgress) > maxTrackedProgress {
		// Downloads whose end was never reported (caller bug, crash of a
		// goroutine): forget them once idle for a while.
		for key, last := range e.lastProgress {
			if now.Sub(last) > 10*e.progressInterval {
				delete(e.lastProgress, key)
			}
		}
	}
	return true
}

func (e *Events) forgetProgress(k progressKey) {
	e.progressMu.Lock()
	delete(e.lastProgress, k)
	e.progressMu.Unlock()
}

func newProgressKey(pod PodRef, uri string) progressKey {
	return progressKey{namespace: pod.Namespace, name: pod.Name, uid: pod.UID, uri: uri}
}

// hasPod reports whether pod names a pod; inline volumes published without
// podInfoOnMount do not, and get no events.
func hasPod(pod PodRef) bool {
	return pod.Namespace != "" && pod.Name != ""
}

// spamKeyByReason is client-go's default spam key (source, object, type)
// plus the reason.
func spamKeyByReason(ev *corev1.Event) string {
	return strings.Join([]string{
		ev.Source.Component,
		ev.Source.Host,
		ev.InvolvedObject.Kind,
		ev.InvolvedObject.Namespace,
		ev.InvolvedObject.Name,
		string(ev.InvolvedObject.UID),
		ev.InvolvedObject.APIVersion,
		ev.Type,
		ev.Reason,
	}, "\x00")
}

// progressText renders "35% (420 MiB of 1.2 GiB, 85 MiB/s, about 9s left)",
// leaving out what is unknown.
func progressText(done, total int64, rate float64) string {
	var details []string
	var head string
	if total > 0 {
		pct := min(max(done*100/total, 0), 100)
		head = fmt.Sprintf("%d%%", pct)
		details = append(details, fmt.Sprintf("%s of %s", units.Bytes(done), units.Bytes(total)))
	} else {
		head = units.Bytes(done) + " so far"
	}
	if rate > 0 {
		details = append(details, units.Bytes(int64(rate))+"/s")
		if total > done {
			left := time.Duration(float64(total-done) / rate * float64(time.Second))
			details = append(details, fmt.Sprintf("about %s left", left.Round(time.Second)))
		}
	}
	if len(details) == 0 {
		return head
	}
	return head + " (" + strings.Join(details, ", ") + ")"
}

// formatDuration rounds d for people: "850ms", "4.2s", "3m10s".
func formatDuration(d time.Duration) string {
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	default:
		return d.Round(time.Second).String()
	}
}

// displayURI leaves credentials that a URL-form modelUri might carry (user
// info, a presigned query string) out of event messages.
func displayURI(uri string) string {
	if !strings.Contains(uri, "://") {
		return uri
	}
	u, err := url.Parse(uri)
	if err != nil {
		return uri[:strings.Index(uri, "://")+3] + "…"
	}
	u.User = nil
	u.RawQuery = ""
	u.ForceQuery = false
	u.Fragment = ""
	u.RawFragment = ""
	return u.String()
}

// truncate cuts s to at most n bytes on a rune boundary, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	const mark = "…"
	cut := n - len(mark)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + mark
}
