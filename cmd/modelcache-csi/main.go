// Command modelcache-csi is the modelcache CSI driver: flags, wiring and
// signals only; behaviour lives in pkg/.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/admin"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/csi"
	"github.com/modelcache/modelcache/pkg/egress"
	"github.com/modelcache/modelcache/pkg/fleet"
	"github.com/modelcache/modelcache/pkg/kube"
	"github.com/modelcache/modelcache/pkg/metrics"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type options struct {
	mode, endpoint, nodeID, cacheDir, kubeconfig string
	adminSocket, metricsAddress                  string
	cacheSize, minFree                           string
	transfers, maxConnections                    int
	multiThreadCutoff, resumeEvery               string
	multiThreadSpan                              string
	multiThreadStreams                           int
	minStreamRate                                string
	maxFiles                                     int
	minFreeInodes                                string
	stallWindow, stallTimeout, downloadGrace     time.Duration
	releaseGrace                                 time.Duration
	kubeletDir                                   string
	requirePodInfo                               bool
	verifyCredentials                            string
	reverifyAfter                                time.Duration
	allowEndpoints                               string
	plainHTTPRegistries                          string
	denyEndpoints                                string
	hostIPs                                      string
	holderImage                                  string
	fleetWorkers                                 int
	fleetPriorityClasses                         string
	peers                                        bool
	peerPort, peerMaxStreams                     int
	peerService, peerServiceAccount              string
	peerCASecret, peerTokenFile                  string
}

func main() {
	klog.InitFlags(nil)
	var o options
	flag.StringVar(&o.mode, "mode", "node", "which CSI services to serve: node, controller, or all (both on one socket); hold idles until stopped (CachedModel holder pods)")
	flag.StringVar(&o.endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint")
	flag.StringVar(&o.nodeID, "node-id", "", "this node's name (required in node and all modes)")
	flag.StringVar(&o.cacheDir, "cache-dir", "/var/lib/modelcache", "directory holding the model cache and the state database")
	flag.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for reading PVC annotations in controller mode; empty means the pod's service account when in a cluster")
	flag.IntVar(&o.transfers, "transfers", store.DefaultTransfers, "files of one model downloaded in parallel (higher than rclone's 4: many small files are bound by each request's first-byte latency)")
	flag.IntVar(&o.maxConnections, "max-connections", store.DefaultMaxConnections, "requests to remotes open at once on this node, over all downloads and ranged streams")
	flag.StringVar(&o.multiThreadCutoff, "multi-thread-cutoff", "256Mi", "files this large or larger download in parallel ranged chunks, as rclone's --multi-thread-cutoff (a quantity, e.g. 256Mi; 0 turns it off)")
	flag.StringVar(&o.multiThreadSpan, "multi-thread-span", "16Mi", "bytes of a large file one ranged request asks for, in whole 4Mi chunks: each request waits for the remote's first byte, and each GET may be billed (as rclone's --multi-thread-chunk-size)")
	flag.IntVar(&o.multiThreadStreams, "multi-thread-streams", store.DefaultRangeStreams, "ranged streams per large file, as rclone's --multi-thread-streams")
	flag.StringVar(&o.minStreamRate, "min-stream-rate", "64Ki", "a stream from a remote that delivers less than this many bytes a second over --stall-window is cut and retried (0 turns it off): a remote that trickles cannot hold the node's connections and chunk buffers")
	flag.IntVar(&o.maxFiles, "max-files", source.DefaultMaxFiles, "most files a model may have: a listing that finds more stops there and the publish (or provisioning) fails with RESOURCE_EXHAUSTED before anything is downloaded")
	flag.StringVar(&o.minFreeInodes, "min-free-inodes", "10%", "inodes the cache filesystem keeps free, a percentage of its inodes: a model whose files and directories would take more is RESOURCE_EXHAUSTED, after evicting what can be (above kubelet's nodefs.inodesFree<5% eviction threshold)")
	flag.DurationVar(&o.stallWindow, "stall-window", store.DefaultStallWindow, "the window --min-stream-rate is measured over, the first byte included")
	flag.DurationVar(&o.stallTimeout, "download-stall-timeout", store.DefaultStallTimeout, "a download that makes no progress for this long fails with UNAVAILABLE, and kubelet's retry starts it again (0: never)")
	flag.DurationVar(&o.downloadGrace, "download-grace", store.DefaultDownloadGrace, "a download that no publish has waited for within this long is cancelled; kubelet's retries keep a wanted one alive (0: never)")
	flag.StringVar(&o.resumeEvery, "resume-every", "16Mi", "bytes of a large file's download made durable at a time: a failure, restart or kill -9 loses at most this much of each file, and the next publish goes on from there")
	flag.StringVar(&o.adminSocket, "admin-socket", "", "operator API socket for modelcachectl (default <cache-dir>/admin.sock; \"none\" disables it)")
	flag.StringVar(&o.metricsAddress, "metrics-address", "", "host:port serving Prometheus metrics at /metrics (off when empty)")
	flag.StringVar(&o.cacheSize, "cache-size", "", "most the cache may hold: bytes (\"200Gi\", \"500G\") or a percentage of its filesystem (\"80%\"); empty is no limit besides --min-free")
	flag.DurationVar(&o.releaseGrace, "release-grace", 10*time.Minute, "after a restart, how long a reference whose mount is gone waits for kubelet before it is released")
	flag.StringVar(&o.kubeletDir, "kubelet-dir", "/var/lib/kubelet", "kubelet's root directory: every target path must be under it")
	flag.BoolVar(&o.requirePodInfo, "require-pod-info", true, "refuse publishes without kubelet's pod information (the CSIDriver's podInfoOnMount)")
	flag.StringVar(&o.verifyCredentials, "verify-credentials", cache.VerifyIfNotRecorded, "when a cache hit checks the request's credentials against the remote (metadata only): IfNotRecorded, Always or Never")
	flag.DurationVar(&o.reverifyAfter, "reverify-after", 0, "re-check recorded credentials after this long (0: never expire)")
	flag.StringVar(&o.allowEndpoints, "allow-endpoint", "", "comma-separated CIDRs or IPs the node may connect to for tenants although another rule refuses them (loopback, link-local, cloud metadata, the node's own, --deny-endpoint), e.g. an in-node MinIO")
	flag.StringVar(&o.plainHTTPRegistries, "plain-http-registry", "", "comma-separated registries (host[:port]) whose oci:// models are pulled over plain HTTP instead of HTTPS, e.g. an in-cluster registry without TLS: their credentials cross the network in clear")
	flag.StringVar(&o.denyEndpoints, "deny-endpoint", "", "comma-separated CIDRs or IPs the node never connects to for tenants, besides loopback, link-local, cloud metadata and its own addresses: e.g. the cluster's pod and service ranges")
	flag.StringVar(&o.hostIPs, "host-ip", os.Getenv("HOST_IP"), "comma-separated addresses of this node (status.hostIP through the downward API, the default reads $HOST_IP) that tenants may not reach")
	flag.StringVar(&o.minFree, "min-free", defaultMinFree, "space the cache filesystem keeps free: bytes or a percentage of its size; the default stays above kubelet's default eviction thresholds (nodefs.available<10%, imagefs.available<15%), so a full cache never puts the node into DiskPressure")
	flag.StringVar(&o.holderImage, "holder-image", "", "image of CachedModel holder pods (default: the controller's own, read from its pod through POD_NAMESPACE and POD_NAME)")
	flag.IntVar(&o.fleetWorkers, "cachedmodel-workers", 2, "CachedModels reconciled at once")
	flag.StringVar(&o.fleetPriorityClasses, "cachedmodel-priority-classes", "", "comma-separated priority classes a CachedModel's holders may run at, outside namespaces labelled modelcache.csi.dev/trusted=true (empty: none)")
	flag.BoolVar(&o.peers, "peers", false, "read models from other nodes that hold them and serve this node's to them (docs/design.md \"Peers\"); needs POD_NAMESPACE and POD_IP, the peer Service and a projected token")
	flag.IntVar(&o.peerPort, "peer-port", 9443, "port the peer endpoint serves on the pod's address, named \"peer\" in the peer Service")
	flag.IntVar(&o.peerMaxStreams, "peer-max-streams", peer.DefaultMaxStreams, "bodies served to peers at once; more get 503 and go to another node")
	flag.StringVar(&o.peerService, "peer-service", "modelcache-peers", "headless Service over the node plugins whose EndpointSlices say where peers are")
	flag.StringVar(&o.peerServiceAccount, "peer-service-account", "modelcache-node", "the node plugin's service account: the only one whose tokens the peer endpoint serves")
	flag.StringVar(&o.peerCASecret, "peer-ca-secret", "modelcache-peer-ca", "Secret in the plugin's namespace holding the CA of peer TLS (created by the first plugin that finds none)")
	flag.StringVar(&o.peerTokenFile, "peer-token-file", "/var/run/secrets/modelcache/peer/token", "projected service-account token with the audience modelcache-peer, presented to peers")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("modelcache-csi", version)
		return
	}
	if err := run(o); err != nil {
		klog.ErrorS(err, "modelcache-csi failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func run(o options) error {
	withNode, withController, err := modes(o)
	if err != nil || !withNode && !withController {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var m *metrics.Metrics
	if withNode && o.metricsAddress != "" {
		m = metrics.New()
	}
	var peers *peerSetup
	if withNode && o.peers {
		if peers, err = setupPeers(ctx, o); err != nil {
			return err
		}
		defer peers.stop()
	}
	records, closeRecords, err := openRecords(o, withNode, m, peers.cachePeers())
	if err != nil {
		return err
	}
	defer closeRecords()
	if peers != nil {
		if err := peers.serve(ctx, records.cache, m); err != nil {
			return err
		}
	}
	key, err := records.NodeKey()
	if err != nil {
		return err
	}
	guard, err := egressGuard(o)
	if err != nil {
		return err
	}
	// Everything this process dials through the default transport, it
	// dials for a tenant.
	egress.GuardDefaultTransport(guard)
	defer guard.Close()
	resolver := source.NewSources(key, source.WithEgress(guard), source.WithMaxFiles(o.maxFiles), source.WithPlainHTTPRegistries(listFlag(o.plainHTTPRegistries)...))

	var node *csi.Node
	if withNode {
		if node, err = startNode(ctx, o, records.cache, m, resolver); err != nil {
			return err
		}
		defer node.Events.Shutdown()
	}
	var ctrl *csi.Controller
	if withController {
		if ctrl, err = startController(ctx, o, records.volumes, resolver); err != nil {
			return err
		}
	}
	return serve(ctx, o, node, ctrl)
}

// modes reads --mode; hold (a CachedModel holder pod) only waits to be
// stopped, touching nothing, and serves neither.
func modes(o options) (withNode, withController bool, err error) {
	switch o.mode {
	case "hold":
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		<-ctx.Done()
		return false, false, nil
	case "node":
		withNode = true
	case "controller":
		withController = true
	case "all":
		withNode, withController = true, true
	default:
		return false, false, fmt.Errorf("--mode must be node, controller, all or hold, not %q", o.mode)
	}
	if withNode && o.nodeID == "" {
		return false, false, errors.New("--node-id is required in node and all modes (pass the node name, e.g. from spec.nodeName)")
	}
	switch o.verifyCredentials {
	case cache.VerifyAlways, cache.VerifyIfNotRecorded, cache.VerifyNever:
	default:
		return false, false, fmt.Errorf("--verify-credentials must be IfNotRecorded, Always or Never, not %q", o.verifyCredentials)
	}
	return withNode, withController, nil
}

// records is the state database as each mode needs it: the node's cache
// (which owns it) or, for the controller alone, the database itself.
type records struct {
	cache   *cache.Cache
	volumes cache.VolumeRecords
	NodeKey func() ([]byte, error)
}

// openRecords opens the node's cache, or only the state database when this
// process serves the controller alone.
func openRecords(o options, withNode bool, m *metrics.Metrics, peers *cache.Peers) (records, func(), error) {
	if !withNode {
		db, err := state.Open(filepath.Join(o.cacheDir, cache.StateFile))
		if err != nil {
			return records{}, nil, err
		}
		return records{volumes: db, NodeKey: db.NodeKey}, func() { db.Close() }, nil
	}
	c, err := openCache(o, m, peers)
	if err != nil {
		return records{}, nil, err
	}
	return records{cache: c, volumes: c.Volumes(), NodeKey: c.NodeKey}, func() { c.Close() }, nil
}

// startController builds the Controller service and, in a cluster, starts
// the CachedModel reconciler.
func startController(ctx context.Context, o options, volumes cache.VolumeRecords, resolver source.Resolver) (*csi.Controller, error) {
	ctrl := &csi.Controller{Resolver: resolver, Volumes: volumes}
	cfg, err := clusterConfig(o.kubeconfig)
	if err != nil || cfg == nil {
		return ctrl, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating Kubernetes client: %w", err)
	}
	ctrl.Claims = kube.NewClaims(client)
	if err := startFleet(ctx, o, cfg, client); err != nil {
		return nil, err
	}
	return ctrl, nil
}

// serve serves the CSI services until ctx ends.
func serve(ctx context.Context, o options, node *csi.Node, ctrl *csi.Controller) error {
	l, err := csi.Listen(o.endpoint)
	if err != nil {
		return err
	}
	// Typed nil pointers would register a service that panics; pass nil interfaces.
	var nodeSrv csipb.NodeServer
	if node != nil {
		nodeSrv = node
	}
	var ctrlSrv csipb.ControllerServer
	if ctrl != nil {
		ctrlSrv = ctrl
	}
	srv := csi.NewServer(&csi.Identity{Version: version, Controller: ctrl != nil}, nodeSrv, ctrlSrv)
	klog.InfoS("serving", "driver", csi.DriverName, "version", version, "mode", o.mode, "endpoint", o.endpoint, "cacheDir", o.cacheDir)
	// Mounts are left in place on exit: they are kernel bind mounts that
	// pods keep using, and the next start finds them again (the "mounts survive restarts" invariant).
	return csi.Serve(ctx, srv, l, 25*time.Second)
}

// egressGuard builds the rules every connection made for a tenant meets.
func egressGuard(o options) (*egress.Guard, error) {
	allow, err := egress.ParsePrefixes("--allow-endpoint", strings.Split(o.allowEndpoints, ","))
	if err != nil {
		return nil, err
	}
	deny, err := egress.ParsePrefixes("--deny-endpoint", strings.Split(o.denyEndpoints, ","))
	if err != nil {
		return nil, err
	}
	hosts, err := egress.ParseAddrs("--host-ip", strings.Split(o.hostIPs, ","))
	if err != nil {
		return nil, err
	}
	klog.InfoS("egress rules", "allow", allow, "deny", deny, "hostIPs", hosts)
	return egress.New(egress.Policy{Allow: allow, Deny: deny, HostIPs: hosts}), nil
}

// clusterConfig is the API server's client configuration, or nil outside
// a cluster without --kubeconfig: then the controller works from
// StorageClass parameters alone and reconciles no CachedModels.
func clusterConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" && os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		klog.InfoS("not in a cluster and no --kubeconfig: PVC annotations will not be read and CachedModels not reconciled; models come from StorageClass parameters")
		return nil, nil
	}
	return kube.RestConfig(kubeconfig)
}

// startFleet starts the CachedModel reconciler in the background.
func startFleet(ctx context.Context, o options, cfg *rest.Config, client kubernetes.Interface) error {
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("creating Kubernetes client: %w", err)
	}
	ns, name := os.Getenv("POD_NAMESPACE"), os.Getenv("POD_NAME")
	image := o.holderImage
	if image == "" {
		if ns == "" || name == "" {
			return errors.New("CachedModel holders need an image: pass --holder-image, or POD_NAMESPACE and POD_NAME (downward API) so the controller uses its own")
		}
		if image, err = fleet.OwnImage(ctx, client, ns, name, fleet.ControllerContainer); err != nil {
			return err
		}
	}
	var classes []string
	for _, c := range strings.Split(o.fleetPriorityClasses, ",") {
		if c = strings.TrimSpace(c); c != "" {
			classes = append(classes, c)
		}
	}
	r := &fleet.Reconciler{Kube: client, Dynamic: dyn, Image: image, Policy: fleet.Policy{PriorityClasses: classes}}
	workers := max(o.fleetWorkers, 1)
	go func() {
		var err error
		if ns != "" && name != "" {
			// In a Deployment: one replica at a time reconciles.
			err = r.RunElected(ctx, ns, name, workers)
		} else {
			err = r.Run(ctx, workers)
		}
		if err != nil {
			klog.ErrorS(err, "CachedModel reconciler stopped")
		}
	}()
	return nil
}

// openCache opens the node's cache with the budget and download options
// of the flags.
func openCache(o options, m *metrics.Metrics, peers *cache.Peers) (*cache.Cache, error) {
	// Remote checksums depend on finding rclone's API clients: a build
	// whose rclone moved them must not start and check nothing silently.
	if err := source.CheckClients(); err != nil {
		return nil, err
	}
	budget, err := parseBudget(o.cacheSize, o.minFree)
	if err != nil {
		return nil, err
	}
	if budget.MinFreeInodes, err = parsePercent("--min-free-inodes", o.minFreeInodes); err != nil {
		return nil, err
	}
	downloads, err := downloadOptions(o)
	if err != nil {
		return nil, err
	}
	downloads.OnDownload, downloads.OnUnchecked, downloads.OnBytes = m.DownloadStarted, m.UncheckedObjects, m.DownloadBytes
	c, err := cache.Open(o.cacheDir, cache.Options{
		Store: downloads, Budget: budget, OnEvict: m.Evicted,
		VerifyCredentials: o.verifyCredentials, ReverifyAfter: o.reverifyAfter, Peers: peers,
	})
	if err != nil {
		return nil, err
	}
	// Checked on the cache directory, which Open made.
	if err := mount.CheckSupport(o.cacheDir); err != nil {
		c.Close()
		return nil, fmt.Errorf("this node cannot publish read-only mounts: %w", err)
	}
	return c, nil
}

// downloadOptions reads the flags that tune downloads.
func downloadOptions(o options) (store.Options, error) {
	cutoff, err := resource.ParseQuantity(o.multiThreadCutoff)
	if err != nil || cutoff.Value() < 0 {
		return store.Options{}, fmt.Errorf("--multi-thread-cutoff %q is not a size such as 256Mi (or 0 to turn ranged downloads off)", o.multiThreadCutoff)
	}
	span, err := resource.ParseQuantity(o.multiThreadSpan)
	if err != nil || span.Value() < store.DefaultRangeChunk || span.Value()%store.DefaultRangeChunk != 0 {
		return store.Options{}, fmt.Errorf("--multi-thread-span %q is not a whole number of 4Mi chunks such as 16Mi", o.multiThreadSpan)
	}
	resumeEvery, err := resource.ParseQuantity(o.resumeEvery)
	if err != nil || resumeEvery.Value() <= 0 {
		return store.Options{}, fmt.Errorf("--resume-every %q is not a size such as 64Mi", o.resumeEvery)
	}
	minRate, err := resource.ParseQuantity(o.minStreamRate)
	if err != nil || minRate.Value() < 0 {
		return store.Options{}, fmt.Errorf("--min-stream-rate %q is not a rate in bytes a second such as 64Ki (or 0 to turn it off)", o.minStreamRate)
	}
	return store.Options{
		Transfers: o.transfers, MaxConnections: o.maxConnections,
		RangeCutoff: offIfZero(cutoff.Value()), RangeStreams: o.multiThreadStreams, RangeSpan: span.Value(), RangeCheckpoint: resumeEvery.Value(),
		MinStreamRate: offIfZero(minRate.Value()), StallWindow: offIfZero(o.stallWindow), StallTimeout: offIfZero(o.stallTimeout), DownloadGrace: offIfZero(o.downloadGrace),
	}, nil
}

// startNode builds the Node service over the cache, recovers references,
// and starts the operator API and metrics endpoint that belong to the node.
func startNode(ctx context.Context, o options, c *cache.Cache, m *metrics.Metrics, resolver source.Resolver) (*csi.Node, error) {
	node := &csi.Node{NodeID: o.nodeID, Resolver: resolver, Cache: c, Metrics: m,
		KubeletDir: o.kubeletDir, RequirePodInfo: o.requirePodInfo}
	if client, err := eventClient(o.kubeconfig); err != nil {
		klog.InfoS("pod events are off", "reason", err)
	} else {
		node.Events = kube.NewEvents(client, "modelcache-node", o.nodeID)
	}
	live, gone, err := c.Recover()
	if err != nil {
		return nil, fmt.Errorf("recovering references: %w", err)
	}
	forgotten, removed, err := c.Reconcile()
	if err != nil {
		return nil, fmt.Errorf("reconciling state and store: %w", err)
	}
	klog.InfoS("state recovered", "liveMounts", live, "missingMounts", len(gone), "recordsDropped", forgotten, "orphanTreesRemoved", removed)
	go c.ReleaseStale(ctx, o.releaseGrace, gone)
	go func() {
		if _, err := c.PruneObjects(); err != nil {
			klog.ErrorS(err, "the object index keeps entries of removed blobs until the next start")
		}
	}()

	if m != nil {
		m.SetCacheStats(func() (metrics.CacheStats, error) {
			u, err := c.Usage()
			return metrics.CacheStats{BlobBytes: u.BlobBytes, TreeBytes: u.TreeBytes, IngestBytes: u.IngestBytes, Trees: u.Trees, Blobs: u.Blobs}, err
		})
		go func() {
			if err := metrics.Serve(ctx, o.metricsAddress, m.Handler()); err != nil {
				klog.ErrorS(err, "metrics endpoint stopped", "address", o.metricsAddress)
			}
		}()
	}
	if sock := adminSocket(o); sock != "" {
		srv := &admin.Server{Cache: c, Resolver: resolver}
		go func() {
			if err := admin.Serve(ctx, sock, srv.Handler()); err != nil {
				klog.ErrorS(err, "admin API stopped", "socket", sock)
			}
		}()
	}
	return node, nil
}

// offIfZero maps a flag's 0 ("off") to the store's negative off.
func offIfZero[T int64 | time.Duration](v T) T {
	if v == 0 {
		return -1
	}
	return v
}

func adminSocket(o options) string {
	switch o.adminSocket {
	case "none":
		return ""
	case "":
		return filepath.Join(o.cacheDir, "admin.sock")
	default:
		return o.adminSocket
	}
}

// eventClient connects for pod events; without a cluster the node works on.
func eventClient(kubeconfig string) (kubernetes.Interface, error) {
	if kubeconfig == "" && os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		return nil, errors.New("not in a cluster and no --kubeconfig")
	}
	return kube.NewClient(kubeconfig)
}

// parseBudget reads --cache-size and --min-free: a Kubernetes quantity of
// bytes ("200Gi", "500G", "1073741824") or a percentage ("80%").
func parseBudget(cacheSize, minFree string) (cache.Budget, error) {
	var b cache.Budget
	var err error
	if b.MaxBytes, b.MaxFraction, err = parseSize("--cache-size", cacheSize); err != nil {
		return b, err
	}
	if b.MinFreeBytes, b.MinFreeFraction, err = parseSize("--min-free", minFree); err != nil {
		return b, err
	}
	return b, nil
}

// parsePercent reads a percentage flag ("10%") as a fraction; "" is 0.
func parsePercent(flagName, v string) (float64, error) {
	n, f, err := parseSize(flagName, v)
	if err != nil || n != 0 {
		return 0, fmt.Errorf("%s %q: use a percentage such as 10%%", flagName, v)
	}
	return f, nil
}

func parseSize(flagName, v string) (int64, float64, error) {
	if v == "" {
		return 0, 0, nil
	}
	if pct, ok := strings.CutSuffix(v, "%"); ok {
		f, err := strconv.ParseFloat(pct, 64)
		if err != nil || f < 0 || f > 100 {
			return 0, 0, fmt.Errorf("%s %q: a percentage must be between 0%% and 100%%", flagName, v)
		}
		return 0, f / 100, nil
	}
	q, err := resource.ParseQuantity(v)
	if err != nil || q.Sign() < 0 {
		return 0, 0, fmt.Errorf("%s %q: use bytes such as 200Gi or 500G, or a percentage such as 80%%", flagName, v)
	}
	return q.Value(), 0, nil
}

// listFlag splits a comma-separated flag, dropping empty items.
func listFlag(v string) []string {
	var out []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}
