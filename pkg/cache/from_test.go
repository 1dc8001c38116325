package cache_test

import (
	"context"
	"reflect"
	"testing"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
)

// Where a download's bytes came from, with fake peers: the observer hears
// it when the download finishes, and the tree's record keeps it, for a
// download from the origin alone, one from a peer alone, and one whose
// peer dies mid-file so that the origin sends the rest.
func TestPeers_BytesFromOriginAndPeers(t *testing.T) {
	size := sourcetest.SizeOf(peerFiles())
	for _, tt := range []struct {
		name string
		// killAt, when positive, is where the peer dies (pkg/cache's fake).
		killAt int64
		// fromA: node-b's download is node-a's, from the origin alone.
		fromA bool
		want  func(served int64) cache.BytesFrom
	}{
		{name: "origin only", fromA: true,
			want: func(int64) cache.BytesFrom { return cache.BytesFrom{Origin: size} }},
		{name: "peer only",
			want: func(served int64) cache.BytesFrom {
				return cache.BytesFrom{Peers: size, Nodes: []cache.NodeBytes{{Node: "node-a", Bytes: size}}}
			}},
		{name: "peer killed mid-file, then the origin", killAt: 1 << 20,
			want: func(served int64) cache.BytesFrom {
				return cache.BytesFrom{Origin: size - served, Peers: served, Nodes: []cache.NodeBytes{{Node: "node-a", Bytes: served}}}
			}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			client := &peerClient{}
			a, b, _ := twoNodes(t, client)
			h := b
			if tt.fromA {
				h = a
			} else if _, err := a.fetch(secrets()); err != nil {
				t.Fatal(err)
			}
			client.killAt = tt.killAt
			obs := &recorder{}
			f, err := h.cache.Fetch(context.Background(), cache.FetchRequest{URI: modelURI, Remote: h.remote(modelURI, secrets()), Observer: obs})
			if err != nil {
				t.Fatal(err)
			}
			h.checkModel(f.Tree)
			served := client.served.Load()
			// The fake peer dies at about killAt: streams reading at once
			// may each get a little past it.
			if tt.killAt > 0 && (served < tt.killAt || served >= size) {
				t.Fatalf("the peer served %d bytes before it died, want from %d to less than the model's %d", served, tt.killAt, size)
			}
			want := tt.want(served)
			if _, _, finished := obs.counts(); finished != 1 || !reflect.DeepEqual(obs.from, want) {
				t.Errorf("observer heard %d finished downloads, the last from %+v; want one from %+v", finished, obs.from, want)
			}
			tr, err := h.cache.Find(f.Tree.Digest)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(tr.From, want) {
				t.Errorf("the tree's record says %+v, want %+v", tr.From, want)
			}
		})
	}
}

// A cache hit reads nothing: the observer hears of no download, and the
// record keeps what the download that brought the tree read.
func TestPeers_HitKeepsWhereTheTreeCameFrom(t *testing.T) {
	client := &peerClient{}
	a, _, _ := twoNodes(t, client)
	f, err := a.fetch(secrets())
	if err != nil {
		t.Fatal(err)
	}
	obs := &recorder{}
	if _, err := a.cache.Fetch(context.Background(), cache.FetchRequest{URI: modelURI, Remote: a.remote(modelURI, secrets()), Observer: obs}); err != nil {
		t.Fatal(err)
	}
	if hits, _, finished := obs.counts(); hits != 1 || finished != 0 {
		t.Errorf("second fetch: %d hits, %d downloads; want a hit", hits, finished)
	}
	tr, err := a.cache.Find(f.Tree.Digest)
	if err != nil || !reflect.DeepEqual(tr.From, cache.BytesFrom{Origin: sourcetest.SizeOf(peerFiles())}) {
		t.Errorf("record after a hit: %+v, %v", tr.From, err)
	}
}
