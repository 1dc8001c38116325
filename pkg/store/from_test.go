package store_test

import (
	"context"
	"fmt"
	"io"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

func TestBytesFrom_Add(t *testing.T) {
	many := func(n int, prefix string, each int64) []store.NodeBytes {
		var out []store.NodeBytes
		for i := range n {
			out = append(out, store.NodeBytes{Node: fmt.Sprintf("%s%02d", prefix, i), Bytes: each})
		}
		return out
	}
	for _, tt := range []struct {
		name string
		a, b store.BytesFrom
		want store.BytesFrom
	}{
		{name: "zero and zero", want: store.BytesFrom{}},
		{name: "origin adds up",
			a: store.BytesFrom{Origin: 10}, b: store.BytesFrom{Origin: 5},
			want: store.BytesFrom{Origin: 15}},
		{name: "a node in both adds up, most first",
			a:    store.BytesFrom{Peers: 30, Nodes: []store.NodeBytes{{"node-a", 10}, {"node-b", 20}}},
			b:    store.BytesFrom{Origin: 1, Peers: 15, Nodes: []store.NodeBytes{{"node-a", 15}}},
			want: store.BytesFrom{Origin: 1, Peers: 45, Nodes: []store.NodeBytes{{"node-a", 25}, {"node-b", 20}}}},
		{name: "equals sort by name",
			a:    store.BytesFrom{Peers: 2, Nodes: []store.NodeBytes{{"node-b", 1}, {"node-a", 1}}},
			want: store.BytesFrom{Peers: 2, Nodes: []store.NodeBytes{{"node-a", 1}, {"node-b", 1}}}},
		{name: "nodes bounded, the total kept",
			a:    store.BytesFrom{Peers: 6 * 100, Nodes: many(6, "small", 100)},
			b:    store.BytesFrom{Peers: 6 * 200, Nodes: many(6, "big", 200)},
			want: store.BytesFrom{Peers: 1800, Nodes: append(many(6, "big", 200), many(2, "small", 100)...)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.a.Add(tt.b)
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Add = %+v\nwant %+v", got, tt.want)
			}
			if len(got.Nodes) > store.MaxFromNodes {
				t.Fatalf("%d nodes named, at most %d", len(got.Nodes), store.MaxFromNodes)
			}
		})
	}
}

// sendingFetcher is a peer's fetcher: its bodies name the node.
type sendingFetcher struct {
	*sourcetest.Remote
	node string
}

func (f sendingFetcher) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	return f.OpenRange(ctx, e, 0, e.Size)
}

func (f sendingFetcher) OpenRange(ctx context.Context, e source.Entry, off, n int64) (io.ReadCloser, error) {
	rc, err := f.Remote.OpenRange(ctx, e, off, n)
	if err != nil || f.node == "" {
		return rc, err
	}
	return sentBody{rc, f.node}, nil
}

type sentBody struct {
	io.ReadCloser
	node string
}

func (b sentBody) Sender() string { return b.node }

// hookTotals records what OnBytes was told.
type hookTotals struct {
	mu sync.Mutex
	by map[string]int64
}

func (h *hookTotals) add(source string, n int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.by[source] += n
}

// A download counts every byte where it reaches the store, by the node
// that sent it (a body that names none is the origin's), in one stream
// and in ranges, in Ensured and in the OnBytes hook alike.
func TestEnsure_CountsBytesBySender(t *testing.T) {
	for _, size := range []int{300, 3 * rangeCutoff} {
		w := sourcetest.Bytes(fmt.Sprint("w", size), size)
		files := map[string][]byte{"w.bin": w, "config.json": []byte(`{"a":1}`)}
		all, cfg := int64(size+len(files["config.json"])), int64(len(files["config.json"]))
		for _, tt := range []struct {
			name   string
			route  string // the node w.bin is routed to; "-" for no router
			sender string // the node its bodies name
			want   store.BytesFrom
			hook   map[string]int64
		}{
			{name: "no router", route: "-",
				want: store.BytesFrom{Origin: all}, hook: map[string]int64{store.FromOrigin: all}},
			{name: "w.bin from node-b", route: "node-b", sender: "node-b",
				want: store.BytesFrom{Origin: cfg, Peers: int64(size), Nodes: []store.NodeBytes{{"node-b", int64(size)}}},
				hook: map[string]int64{store.FromOrigin: cfg, store.FromPeer: int64(size)}},
			{name: "a body that names no node is the origin's", route: "node-b",
				want: store.BytesFrom{Origin: all}, hook: map[string]int64{store.FromOrigin: all}},
		} {
			t.Run(fmt.Sprintf("%d bytes, %s", size, tt.name), func(t *testing.T) {
				dir := t.TempDir()
				hook := &hookTotals{by: map[string]int64{}}
				s, err := store.Open(dir, newIndex(), store.Options{RangeCutoff: rangeCutoff, RangeChunk: rangeChunk, RangeSpan: rangeSpan, RangeStreams: rangeStreams, OnBytes: hook.add})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = s.Close(); storetest.MakeWritable(dir) })
				var f store.Fetcher = sourcetest.NewFetcher(files)
				if tt.route != "-" {
					peer := sendingFetcher{sourcetest.NewFetcher(map[string][]byte{"w.bin": w}), tt.sender}
					f = &router{Remote: f.(*sourcetest.Remote), peer: peer.Remote, named: sha256Hex(w), asked: map[string]bool{}, sending: &peer}
				}
				ens, err := s.EnsureGated(context.Background(), "key", sourcetest.ManifestOf(files, time.Unix(1700000000, 0)), f, nil)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(ens.From, tt.want) {
					t.Errorf("Ensured.From = %+v, want %+v", ens.From, tt.want)
				}
				if !reflect.DeepEqual(hook.by, tt.hook) {
					t.Errorf("OnBytes totals %v, want %v", hook.by, tt.hook)
				}
			})
		}
	}
}
