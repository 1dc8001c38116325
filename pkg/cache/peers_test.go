package cache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/holders"
	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
)

// Peers with fakes: the registry and the members in memory, and a client
// that reads the other node's real cache directory as its peer endpoint
// would. test/fleet runs the real ones.

// fakeLeases is the holders registry of a whole cluster.
type fakeLeases struct {
	mu      sync.Mutex
	fetcher map[string]string
	holders map[string][]string
	evicted []string
}

func newLeases() *fakeLeases {
	return &fakeLeases{fetcher: map[string]string{}, holders: map[string][]string{}}
}

// nodeRegistry is one node's view of fakeLeases (holders.Registry).
type nodeRegistry struct {
	l    *fakeLeases
	node string
}

func (r nodeRegistry) state(key string) holders.State {
	st := holders.State{Fetcher: r.l.fetcher[key], Mine: r.l.fetcher[key] == r.node}
	for _, h := range r.l.holders[key] {
		if h != r.node {
			st.Holders = append(st.Holders, h)
		}
	}
	return st
}

func (r nodeRegistry) Claim(_ context.Context, key string) (bool, holders.State, error) {
	r.l.mu.Lock()
	defer r.l.mu.Unlock()
	if st := r.state(key); st.Fetcher != "" || len(st.Holders) > 0 {
		return st.Mine, st, nil
	}
	r.l.fetcher[key] = r.node
	return true, r.state(key), nil
}

func (r nodeRegistry) Renew(context.Context, string) error { return nil }

func (r nodeRegistry) Release(_ context.Context, key string) error {
	r.l.mu.Lock()
	defer r.l.mu.Unlock()
	if r.l.fetcher[key] == r.node {
		delete(r.l.fetcher, key)
	}
	return nil
}

func (r nodeRegistry) Committed(_ context.Context, key string) error {
	r.l.mu.Lock()
	defer r.l.mu.Unlock()
	r.l.holders[key] = append([]string{r.node}, slices.DeleteFunc(r.l.holders[key], func(n string) bool { return n == r.node })...)
	if r.l.fetcher[key] == r.node {
		delete(r.l.fetcher, key)
	}
	return nil
}

func (r nodeRegistry) Evicted(_ context.Context, key string) error {
	r.l.mu.Lock()
	defer r.l.mu.Unlock()
	r.l.holders[key] = slices.DeleteFunc(r.l.holders[key], func(n string) bool { return n == r.node })
	r.l.evicted = append(r.l.evicted, r.node+" "+key)
	return nil
}

func (l *fakeLeases) holdersOf(key string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.holders[key])
}

// nodeAddrs resolves a node to its name, as if that were its address.
type nodeAddrs struct{}

func (nodeAddrs) Addr(node string) (string, bool) { return node, true }

// peerClient reads the caches of the nodes it knows, from disk, as their
// peer endpoints serve them; it can flip a byte or cut a read.
type peerClient struct {
	nodes   map[string]*harness
	flip    bool         // flip the first byte of every range
	killAt  int64        // when positive, the peer dies once it served this many bytes
	busy    atomic.Int64 // this many more ranges are answered 503, as by a peer serving its most streams
	served  atomic.Int64
	lookups atomic.Int64
}

func (c *peerClient) Lookup(_ context.Context, addr, object string) (string, int64, error) {
	c.lookups.Add(1)
	h, ok := c.nodes[addr]
	if !ok {
		return "", 0, fmt.Errorf("dial %s: connection refused", addr)
	}
	_, _, blobs, err := h.state.LookupObjects("", []string{object})
	if err != nil {
		return "", 0, err
	}
	sum, ok := blobs[object]
	if !ok {
		return "", 0, peer.ErrNotHeld
	}
	fi, err := os.Stat(filepath.Join(h.dir, store.BlobsDir, sum))
	if err != nil {
		return "", 0, peer.ErrNotHeld
	}
	return sum, fi.Size(), nil
}

func (c *peerClient) OpenRange(_ context.Context, addr, sum string, off, n int64) (io.ReadCloser, error) {
	b, err := os.ReadFile(filepath.Join(c.nodes[addr].dir, store.BlobsDir, sum))
	if err != nil {
		return nil, err
	}
	b = b[off : off+n]
	if c.flip {
		b = append([]byte{b[0] ^ 1}, b[1:]...)
	}
	if c.killAt > 0 && c.served.Load() >= c.killAt {
		return nil, fmt.Errorf("dial %s: connection refused", addr)
	}
	if c.busy.Add(-1) >= 0 {
		return nil, &peer.StatusError{Addr: addr, Status: 503}
	}
	return io.NopCloser(&servedReader{bytes.NewReader(b), c}), nil
}

// servedReader counts what the peer sent, and fails once it died.
type servedReader struct {
	r io.Reader
	c *peerClient
}

func (s *servedReader) Read(p []byte) (int, error) {
	if s.c.killAt > 0 {
		left := s.c.killAt - s.c.served.Load()
		if left <= 0 {
			return 0, errors.New("connection reset by peer")
		}
		p = p[:min(int64(len(p)), left)]
	}
	k, err := s.r.Read(p)
	s.c.served.Add(int64(k))
	return k, err
}

// peerFiles is a model whose weights download in ranges.
func peerFiles() map[string][]byte {
	return map[string][]byte{
		"config.json": []byte(`{"name":"big"}`),
		"model.bin":   sourcetest.Bytes("big", 3<<20),
	}
}

// twoNodes opens node-a and node-b over one origin and one registry.
func twoNodes(t *testing.T, client *peerClient) (a, b *harness, leases *fakeLeases) {
	t.Helper()
	res := sourcetest.NewResolver()
	res.SetModel(modelURI, peerFiles())
	leases = newLeases()
	open := func(node string) *harness {
		return newHarnessWith(t, t.TempDir(), res, cache.Options{
			Store: store.Options{RangeCutoff: 1 << 20, RangeChunk: 256 << 10, RangeSpan: 512 << 10},
			Peers: &cache.Peers{Registry: nodeRegistry{leases, node}, Members: nodeAddrs{}, Client: client, PollEvery: 5 * time.Millisecond, BusyRetry: time.Millisecond},
		})
	}
	a, b = open("node-a"), open("node-b")
	client.nodes = map[string]*harness{"node-a": a, "node-b": b}
	return a, b, leases
}

func (h *harness) fetch(sec map[string]string) (cache.Fetched, error) {
	return h.cache.Fetch(context.Background(), cache.FetchRequest{URI: modelURI, Remote: h.remote(modelURI, sec)})
}

func (h *harness) checkModel(tr store.Tree) {
	h.t.Helper()
	for p, want := range peerFiles() {
		got, err := os.ReadFile(filepath.Join(h.TreePath(tr.Digest), p))
		if err != nil || !bytes.Equal(got, want) {
			h.t.Fatalf("%s in the tree: %d bytes, %v; want the model's %d", p, len(got), err, len(want))
		}
	}
}

// rangedBytes is what the origin served in ranged reads so far.
func rangedBytes(res *sourcetest.Resolver) (n int64) {
	res.Set(func(r *sourcetest.Resolver) { n = r.RangeBytes })
	return n
}

// The first node fetches from the origin and says it holds the tree; the
// second lists the origin with its own credentials and reads every byte
// from the first; both hold it then, and an eviction takes a node off.
func TestPeers_SecondNodeReadsFromTheFirst(t *testing.T) {
	client := &peerClient{}
	a, b, leases := twoNodes(t, client)
	fa, err := a.fetch(secrets())
	if err != nil {
		t.Fatal(err)
	}
	a.checkModel(fa.Tree)
	if client.served.Load() != 0 {
		t.Fatal("the first node read from a peer")
	}
	opens := a.res.OpenTotal()
	lists := a.res.ListCount()
	fb, err := b.fetch(secrets())
	if err != nil {
		t.Fatal(err)
	}
	b.checkModel(fb.Tree)
	if fb.Tree.Digest != fa.Tree.Digest {
		t.Fatalf("node-b's tree %s, node-a's %s", fb.Tree.Digest, fa.Tree.Digest)
	}
	if got := a.res.OpenTotal() - opens; got != 0 {
		t.Errorf("node-b opened %d objects at the origin, want none", got)
	}
	if a.res.ListCount() != lists+1 {
		t.Error("node-b did not list the origin with its own credentials")
	}
	if want := sourcetest.SizeOf(peerFiles()); client.served.Load() != want {
		t.Errorf("peers served %d bytes, want the model's %d", client.served.Load(), want)
	}
	key := source.ContentKey(b.remote(modelURI, secrets()).Identity(), a.res.Manifest(modelURI))
	if got := leases.holdersOf(key); !slices.Equal(got, []string{"node-b", "node-a"}) {
		t.Fatalf("holders %v, want both nodes, newest first", got)
	}
}

// Bytes a peer changed fail the remote's checksum: the node downloads the
// model again from the origin and ends with the right bytes.
func TestPeers_WrongBytesRefusedThenFetchedFromTheOrigin(t *testing.T) {
	client := &peerClient{}
	a, b, _ := twoNodes(t, client)
	if _, err := a.fetch(secrets()); err != nil {
		t.Fatal(err)
	}
	client.flip = true
	opens := a.res.OpenTotal()
	fb, err := b.fetch(secrets())
	if err != nil {
		t.Fatal(err)
	}
	b.checkModel(fb.Tree)
	if client.served.Load() == 0 || a.res.OpenTotal() == opens {
		t.Fatalf("peers served %d bytes and the origin %d opens: want both", client.served.Load(), a.res.OpenTotal()-opens)
	}
}

// A peer that fails mid-file: the node goes on from the origin where the
// peer stopped, without fetching the file from its start.
func TestPeers_PeerFailsMidFile(t *testing.T) {
	client := &peerClient{}
	a, b, _ := twoNodes(t, client)
	if _, err := a.fetch(secrets()); err != nil {
		t.Fatal(err)
	}
	client.killAt = 1 << 20
	before := rangedBytes(a.res)
	fb, err := b.fetch(secrets())
	if err != nil {
		t.Fatal(err)
	}
	b.checkModel(fb.Tree)
	after := rangedBytes(a.res)
	size := int64(len(peerFiles()["model.bin"]))
	if got := after - before; got <= 0 || got >= size {
		t.Fatalf("the origin served %d bytes of model.bin in ranges, want some and less than its %d", got, size)
	}
}

// A peer that answers busy (503: it serves its most streams) is asked
// again, not demoted: every byte still comes from it, none from the
// origin. Eight nodes reading from the one node that fetched a model are
// busy answers more often than not.
func TestPeers_BusyPeerAskedAgain(t *testing.T) {
	client := &peerClient{}
	a, b, _ := twoNodes(t, client)
	if _, err := a.fetch(secrets()); err != nil {
		t.Fatal(err)
	}
	client.busy.Store(5)
	opens := a.res.OpenTotal()
	fb, err := b.fetch(secrets())
	if err != nil {
		t.Fatal(err)
	}
	b.checkModel(fb.Tree)
	if got := a.res.OpenTotal() - opens; got != 0 {
		t.Errorf("node-b opened %d objects at the origin after busy answers, want none", got)
	}
	if want := sourcetest.SizeOf(peerFiles()); client.served.Load() != want {
		t.Errorf("peers served %d bytes, want the model's %d", client.served.Load(), want)
	}
	if client.busy.Load() >= 0 {
		t.Errorf("the peer was not asked through its busy answers")
	}
}

// A tenant whose credentials the origin refuses gets PERMISSION_DENIED,
// and no peer is asked for anything, though one holds the model.
func TestPeers_RefusedTenantGetsNothingFromPeers(t *testing.T) {
	client := &peerClient{}
	a, b, _ := twoNodes(t, client)
	if _, err := a.fetch(secrets()); err != nil {
		t.Fatal(err)
	}
	a.res.Set(func(r *sourcetest.Resolver) { r.ListErr = fmt.Errorf("listing: %w", source.ErrDenied) })
	if _, err := b.fetch(secrets()); !errors.Is(err, source.ErrDenied) {
		t.Fatalf("Fetch = %v, want ErrDenied", err)
	}
	if client.lookups.Load() != 0 || client.served.Load() != 0 {
		t.Fatalf("peers were asked %d times and served %d bytes", client.lookups.Load(), client.served.Load())
	}
}

// A node that finds another fetching the model waits for it; when that
// fetch fails and gives its claim back, the waiting node claims the fetch
// and reads the model from the origin itself.
func TestPeers_FailedFetchTakenOver(t *testing.T) {
	client := &peerClient{}
	_, b, leases := twoNodes(t, client)
	key := source.ContentKey(b.remote(modelURI, secrets()).Identity(), b.res.Manifest(modelURI))
	a := nodeRegistry{leases, "node-a"}
	if claimed, _, _ := a.Claim(context.Background(), key); !claimed {
		t.Fatal("node-a could not claim the fetch")
	}
	go func() {
		// node-a answers "not held" a few times, then its fetch fails.
		for client.lookups.Load() < 10 {
			time.Sleep(time.Millisecond)
		}
		_ = a.Release(context.Background(), key)
	}()
	fb, err := b.fetch(secrets())
	if err != nil {
		t.Fatal(err)
	}
	b.checkModel(fb.Tree)
	if client.served.Load() != 0 {
		t.Errorf("peers served %d bytes; node-a held nothing", client.served.Load())
	}
	if got := leases.holdersOf(key); !slices.Equal(got, []string{"node-b"}) {
		t.Fatalf("holders %v, want node-b", got)
	}
}
