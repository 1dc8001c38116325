package store

import (
	"cmp"
	"io"
	"slices"
	"sync"
	"sync/atomic"
)

// Where a download's bytes came from, as OnBytes names it.
const (
	// FromOrigin: the remote the model was listed at.
	FromOrigin = "origin"
	// FromPeer: another node that holds the model (docs/design.md "Peers").
	FromPeer = "peer"
)

// MaxFromNodes bounds the peers BytesFrom names: a cluster has any number
// of nodes, and a record of one tree must not grow with it.
const MaxFromNodes = 8

// BytesFrom says where a download's bytes came from, counted as they
// reached the store: a range read again after a cut stream counts again,
// and bytes linked from blobs/ or resumed from partial/ count nowhere, so
// the sum is what crossed the network, not the tree's size.
type BytesFrom struct {
	Origin int64 `json:"origin,omitempty"`
	// Peers is every byte from other nodes; Nodes the ones that sent most,
	// most first, at most MaxFromNodes of them.
	Peers int64       `json:"peers,omitempty"`
	Nodes []NodeBytes `json:"nodes,omitempty"`
}

// NodeBytes is what one peer node sent.
type NodeBytes struct {
	Node  string `json:"node"`
	Bytes int64  `json:"bytes"`
}

// IsZero reports whether nothing was counted.
func (b BytesFrom) IsZero() bool { return b.Origin == 0 && b.Peers == 0 }

// Add is b and o together (two downloads of one tree), their nodes
// merged and bounded again.
func (b BytesFrom) Add(o BytesFrom) BytesFrom {
	nodes := map[string]int64{}
	for _, n := range slices.Concat(b.Nodes, o.Nodes) {
		nodes[n.Node] += n.Bytes
	}
	return BytesFrom{Origin: b.Origin + o.Origin, Peers: b.Peers + o.Peers, Nodes: topNodes(nodes)}
}

// topNodes is the MaxFromNodes nodes that sent most, most first (by name
// among equals, so that a record does not change from one read to the next).
func topNodes(nodes map[string]int64) []NodeBytes {
	var out []NodeBytes
	for n, k := range nodes {
		if k > 0 {
			out = append(out, NodeBytes{Node: n, Bytes: k})
		}
	}
	slices.SortFunc(out, func(a, b NodeBytes) int {
		return cmp.Or(cmp.Compare(b.Bytes, a.Bytes), cmp.Compare(a.Node, b.Node))
	})
	return out[:min(len(out), MaxFromNodes)]
}

// Sender is a body a Router's fetcher opened at another node: it names
// that node. Any other body is the origin's, a peer's fetcher falling back
// to the remote included.
type Sender interface {
	Sender() string
}

// fromCounts counts one download's bytes by where they came from.
type fromCounts struct {
	origin atomic.Int64
	mu     sync.Mutex
	nodes  map[string]*atomic.Int64
}

// of is the counter of a body's sender: resolved once per body, so that
// a read costs one atomic add.
func (c *fromCounts) of(node string) *atomic.Int64 {
	if node == "" {
		return &c.origin
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nodes == nil {
		c.nodes = map[string]*atomic.Int64{}
	}
	n, ok := c.nodes[node]
	if !ok {
		n = new(atomic.Int64)
		c.nodes[node] = n
	}
	return n
}

// snapshot is what was counted so far.
func (c *fromCounts) snapshot() BytesFrom {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := BytesFrom{Origin: c.origin.Load()}
	nodes := map[string]int64{}
	for n, k := range c.nodes {
		nodes[n] = k.Load()
		b.Peers += nodes[n]
	}
	b.Nodes = topNodes(nodes)
	return b
}

// countFrom wraps a body a download opened so that what it reads counts
// for its sender, in the download's record and in the OnBytes hook.
func (s *Store) countFrom(d *download, rc io.ReadCloser) io.ReadCloser {
	node := ""
	if sn, ok := rc.(Sender); ok {
		node = sn.Sender()
	}
	source := FromOrigin
	if node != "" {
		source = FromPeer
	}
	cb := &sourcedBody{ReadCloser: rc, source: source, hook: s.onBytes}
	if d != nil {
		cb.n = d.from.of(node)
	}
	return cb
}

// sourcedBody is a body whose reads count for where it came from.
type sourcedBody struct {
	io.ReadCloser
	n      *atomic.Int64 // nil outside a download
	source string
	hook   func(source string, n int64)
}

func (b *sourcedBody) Read(p []byte) (int, error) {
	k, err := b.ReadCloser.Read(p)
	if k > 0 {
		if b.n != nil {
			b.n.Add(int64(k))
		}
		if b.hook != nil {
			b.hook(b.source, int64(k))
		}
	}
	return k, err
}
