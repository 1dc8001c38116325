package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/modelcache/modelcache/pkg/holders"
	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/store"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"
)

// Peers is how the cache reads models from other nodes that hold them
// instead of their origin (docs/design.md "Peers"): who fetches and holds
// each content key, where each node plugin is, and the client of their
// peer endpoint. A nil *Peers, or any failure to reach Kubernetes or a
// peer, is a download from the origin as without peers.
type Peers struct {
	Registry PeerRegistry
	Members  PeerMembers
	Client   PeerClient
	// RenewEvery is how often an origin fetch renews its lease (default
	// a third of holders.DefaultLeaseDuration).
	RenewEvery time.Duration
	// PollEvery is how often a node waiting for an object another node
	// fetches from the origin asks it again (default 1 s).
	PollEvery time.Duration
	// BusyRetry is the first wait before a range a peer answered busy
	// (503: it serves its most streams) is asked of it again (default
	// 250 ms), doubled up to the second its Retry-After says, jittered.
	BusyRetry time.Duration
	// BusyWait bounds how long one range waits for a busy peer before it
	// is read from the origin, the peer not demoted (default 25 s: inside
	// the store's stall window of 30 s, first byte included; a peer
	// queues a body for 10 s, so this is two turns in its queue and
	// more). A wait that ends in the origin is paid in origin bytes: on a
	// loaded machine 15 s sent 11% of a model read by seven nodes from
	// the one that fetched it back to the origin.
	BusyWait time.Duration
}

// PeerRegistry records who fetches and holds each content key
// (*holders.Registry).
type PeerRegistry interface {
	Claim(ctx context.Context, key string) (bool, holders.State, error)
	Renew(ctx context.Context, key string) error
	Release(ctx context.Context, key string) error
	Committed(ctx context.Context, key string) error
	Evicted(ctx context.Context, key string) error
}

// PeerMembers resolves a node to its node plugin's peer address
// (*holders.Members).
type PeerMembers interface {
	Addr(node string) (string, bool)
}

// PeerClient reads another node's peer endpoint (*peer.Client). Lookup
// answers which committed blob holds an object, named by its
// source.ObjectKey: peer.ErrNotHeld when the peer does not hold it, any
// other error a peer that cannot help now.
type PeerClient interface {
	Lookup(ctx context.Context, addr, objectKey string) (sha256 string, size int64, err error)
	OpenRange(ctx context.Context, addr, sha256 string, off, n int64) (io.ReadCloser, error)
}

// The real ones.
var (
	_ PeerRegistry = (*holders.Registry)(nil)
	_ PeerMembers  = (*holders.Members)(nil)
	_ PeerClient   = (*peer.Client)(nil)
)

// peerFetch is one download's reader: a store.Router that reads each
// object the remote's checksum checks from a node that holds it, and
// everything else, and whatever a peer fails to send, from the remote. It
// forwards the remote's optional interfaces the store asks for.
type peerFetch struct {
	source.Remote
	peers *Peers
	key   string

	once      sync.Once
	origin    bool        // read everything from the origin (a retry after a peer's bad bytes)
	claimed   atomic.Bool // this node fetches from the origin
	fetcher   string      // the node that does, when another
	holders   []string    // nodes that hold the tree
	stopRenew func()

	mu        sync.Mutex
	demoted   map[string]bool // nodes that failed this download
	fromPeers atomic.Int64    // bytes read from peers
}

// evicted tells the registry this node no longer holds the keys' tree,
// beside the eviction: a registry slow to answer must not hold up the
// download that made room.
func (p *Peers) evicted(keys []string) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), registryTimeout)
		defer cancel()
		for _, k := range keys {
			if err := p.Registry.Evicted(ctx, k); err != nil {
				klog.InfoS("recording an eviction for peers; the next reader finds the tree gone", "key", k, "err", err)
			}
		}
	}()
}

// PeerContent is what this node serves its peers: committed blobs and the
// object index that names them (pkg/peer's Blobs and Objects).
func (c *Cache) PeerContent() (peer.Blobs, peer.Objects) { return c.store, c.state }

func (c *Cache) peerFetch(r source.Remote, key string) *peerFetch {
	if c.peers == nil {
		return nil
	}
	return &peerFetch{Remote: r, peers: c.peers, key: key, demoted: map[string]bool{}}
}

// prepare claims the origin fetch or learns who holds or fetches the tree,
// once per download, at its first object.
func (pf *peerFetch) prepare(ctx context.Context) {
	pf.once.Do(func() {
		if pf.origin {
			return
		}
		claimed, st, err := pf.peers.Registry.Claim(ctx, pf.key)
		if err != nil {
			klog.InfoS("peers unreachable; fetching from the origin", "key", pf.key, "err", err)
			return
		}
		pf.fetcher, pf.holders = st.Fetcher, st.Holders
		if claimed {
			pf.claim(ctx)
		}
	})
}

// claim makes this node the download's origin fetcher, once, and keeps
// its lease renewed until the download finishes.
func (pf *peerFetch) claim(ctx context.Context) {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	if !pf.claimed.Swap(true) {
		pf.stopRenew = pf.renew(ctx)
	}
}

// renew keeps this node's origin fetch claimed until stop.
func (pf *peerFetch) renew(ctx context.Context) (stop func()) {
	every := pf.peers.RenewEvery
	if every <= 0 {
		every = holders.DefaultLeaseDuration / 3
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if err := pf.peers.Registry.Renew(ctx, pf.key); err != nil && ctx.Err() == nil {
					klog.InfoS("renewing the origin fetch", "key", pf.key, "err", err)
				}
			}
		}
	}()
	return func() { cancel(); <-done }
}

// DownloadFinished implements store.Finisher: this node now holds the
// tree, or the origin fetch it claimed is free for another node at once.
// The writes run even when the download's context ended.
func (pf *peerFetch) DownloadFinished(committed bool) {
	pf.mu.Lock()
	stop := pf.stopRenew
	pf.mu.Unlock()
	if stop != nil {
		stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), registryTimeout)
	defer cancel()
	var err error
	switch {
	case committed:
		err = pf.peers.Registry.Committed(ctx, pf.key)
	case pf.claimed.Load():
		err = pf.peers.Registry.Release(ctx, pf.key)
	}
	if err != nil {
		klog.InfoS("recording the download for peers", "key", pf.key, "err", err)
	}
}

// registryTimeout bounds one write to the holders registry made outside
// any request.
const registryTimeout = 30 * time.Second

// Route implements store.Router: an object the store checks against the
// remote is read from the first node that holds it; the node fetching
// from the origin is asked until the object commits there or its fetch
// ends.
func (pf *peerFetch) Route(ctx context.Context, e source.Entry, checked bool) (store.Fetcher, string) {
	pf.prepare(ctx)
	if !checked || pf.claimed.Load() || pf.origin {
		return pf.Remote, ""
	}
	object := source.ObjectKey(pf.Identity(), e)
	if object == "" {
		return pf.Remote, ""
	}
	for _, node := range pf.candidates() {
		if r, sum, ok := pf.lookup(ctx, node, object, e); ok {
			return r, sum
		}
	}
	if pf.fetcher == "" {
		return pf.Remote, ""
	}
	return pf.await(ctx, object, e)
}

// candidates are the holders, then the fetching node, not demoted.
func (pf *peerFetch) candidates() []string {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	var out []string
	for _, n := range append(append([]string{}, pf.holders...), pf.fetcher) {
		if n != "" && !pf.demoted[n] {
			out = append(out, n)
		}
	}
	return out
}

// await asks the fetching node (and any holder learnt meanwhile) for an
// object until one has it; when the fetch fails or lapses, this node
// claims it and reads the object from the origin.
func (pf *peerFetch) await(ctx context.Context, object string, e source.Entry) (store.Fetcher, string) {
	every := pf.peers.PollEvery
	if every <= 0 {
		every = time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	polls := 0
	for {
		select {
		case <-ctx.Done():
			return pf.Remote, ""
		case <-t.C:
		}
		nodes := pf.candidates()
		if len(nodes) == 0 || pf.claimed.Load() {
			return pf.Remote, ""
		}
		for _, node := range nodes {
			if r, sum, ok := pf.lookup(ctx, node, object, e); ok {
				return r, sum
			}
		}
		// A fetch that failed, or whose node stopped renewing, leaves the
		// object to this node: it claims the fetch, or learns of a node
		// that holds the tree now.
		if polls++; polls%claimEvery == 0 && pf.reclaim(ctx) {
			return pf.Remote, ""
		}
	}
}

// claimEvery is how many polls of the fetching node go by between two
// looks at the Lease.
const claimEvery = 5

// reclaim asks for the origin fetch again; it reports whether this node
// now holds it. Holders it learns of join the candidates.
func (pf *peerFetch) reclaim(ctx context.Context) bool {
	claimed, st, err := pf.peers.Registry.Claim(ctx, pf.key)
	if err != nil {
		return false
	}
	if claimed {
		pf.claim(ctx)
		return true
	}
	pf.mu.Lock()
	for _, h := range st.Holders {
		if !slices.Contains(pf.holders, h) {
			pf.holders = append(pf.holders, h)
		}
	}
	pf.mu.Unlock()
	return false
}

// lookup asks node for an object; a node that cannot answer is demoted
// for the rest of the download, one that does not hold it is not.
func (pf *peerFetch) lookup(ctx context.Context, node, object string, e source.Entry) (store.Fetcher, string, bool) {
	addr, ok := pf.peers.Members.Addr(node)
	if !ok {
		pf.demote(node, "not a ready member")
		return nil, "", false
	}
	sum, size, err := pf.peers.Client.Lookup(ctx, addr, object)
	switch {
	case errors.Is(err, peer.ErrNotHeld):
		return nil, "", false
	case err != nil:
		pf.demote(node, err.Error())
		return nil, "", false
	case size != e.Size:
		pf.demote(node, "named a blob of another size")
		return nil, "", false
	}
	return &peerObject{pf: pf, node: node, addr: addr, sum: sum}, sum, true
}

func (pf *peerFetch) demote(node, why string) {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	if !pf.demoted[node] {
		pf.demoted[node] = true
		klog.InfoS("peer demoted for this download", "key", pf.key, "node", node, "reason", why)
	}
}

// servedByPeers reports whether any byte came from a peer.
func (pf *peerFetch) servedByPeers() bool { return pf.fromPeers.Load() > 0 }

// The remote's optional interfaces, forwarded: the store asks the
// download's fetcher for them, and a wrapper would hide them.

func (pf *peerFetch) Checksum(ctx context.Context, e source.Entry) (source.Checksum, error) {
	if c, ok := pf.Remote.(source.Checksummer); ok {
		return c.Checksum(ctx, e)
	}
	return source.Checksum{}, nil
}

func (pf *peerFetch) CanRange(e source.Entry) bool {
	if _, ok := pf.Remote.(store.RangeFetcher); !ok {
		return false
	}
	c, ok := pf.Remote.(source.RangeChecker)
	return !ok || c.CanRange(e)
}

func (pf *peerFetch) ChecksWhileStreaming(e source.Entry) bool {
	c, ok := pf.Remote.(store.StreamChecker)
	return ok && c.ChecksWhileStreaming(e)
}

// peerObject reads one object's blob from a peer, and from the remote
// once that peer fails: a retried range goes on from where it stopped,
// not from the start.
type peerObject struct {
	pf   *peerFetch
	node string
	addr string
	sum  string
}

func (o *peerObject) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	return o.OpenRange(ctx, e, 0, e.Size)
}

func (o *peerObject) OpenRange(ctx context.Context, e source.Entry, off, n int64) (io.ReadCloser, error) {
	rc, err := o.openFromPeer(ctx, off, n)
	if rc != nil || err != nil {
		return rc, err
	}
	if off == 0 && n == e.Size {
		return o.pf.Remote.Open(ctx, e)
	}
	rf, ok := o.pf.Remote.(store.RangeFetcher)
	if !ok {
		return nil, source.ErrNoRanges
	}
	return rf.OpenRange(ctx, e, off, n)
}

// openFromPeer opens a range at the peer unless it was demoted: nil and
// no error send the range to the origin. A peer that fails is demoted;
// one that is busy is asked again for a while, and then the range goes to
// the origin with the peer kept: every node reading a model from the node
// that fetched it finds that node busy more often than not, and giving
// up on it would read the model from the origin once per node.
func (o *peerObject) openFromPeer(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	retry, limit := o.pf.peers.busyTimes()
	deadline := time.Now().Add(limit)
	for {
		o.pf.mu.Lock()
		demoted := o.pf.demoted[o.node]
		o.pf.mu.Unlock()
		if demoted {
			return nil, nil
		}
		rc, err := o.pf.peers.Client.OpenRange(ctx, o.addr, o.sum, off, n)
		switch {
		case err == nil:
			return &peerReader{ReadCloser: rc, o: o}, nil
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case !errors.Is(err, peer.ErrBusy):
			o.pf.demote(o.node, err.Error())
			return nil, nil
		case time.Now().Add(retry).After(deadline):
			klog.V(2).InfoS("peer busy; reading a range from the origin", "key", o.pf.key, "node", o.node, "offset", off)
			return nil, nil
		}
		t := time.NewTimer(wait.Jitter(retry, 1))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		retry = min(2*retry, busyRetryMax)
	}
}

// busyRetryMax is the Retry-After of a busy peer.
const busyRetryMax = time.Second

// busyTimes are BusyRetry and BusyWait with their defaults.
func (p *Peers) busyTimes() (retry, limit time.Duration) {
	retry, limit = p.BusyRetry, p.BusyWait
	if retry <= 0 {
		retry = 250 * time.Millisecond
	}
	if limit <= 0 {
		limit = 25 * time.Second
	}
	return retry, limit
}

// CanRange: a peer serves ranges of any blob.
func (o *peerObject) CanRange(source.Entry) bool { return true }

// peerReader counts what a peer sends, and demotes it when its stream
// fails: the store's retry of the range then goes to the remote.
type peerReader struct {
	io.ReadCloser
	o *peerObject
}

func (r *peerReader) Read(p []byte) (int, error) {
	k, err := r.ReadCloser.Read(p)
	r.o.pf.fromPeers.Add(int64(k))
	if err != nil && err != io.EOF {
		r.o.pf.demote(r.o.node, err.Error())
		// Retryable, from the remote: the store goes on from here.
		err = fmt.Errorf("%w: reading from node %s: %w", source.ErrUnavailable, r.o.node, err)
	}
	return k, err
}

// Sender implements store.Sender: the store counts these bytes for the
// node, and a range the origin resumes for the origin.
func (r *peerReader) Sender() string { return r.o.node }
