package cache_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/holders"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"k8s.io/client-go/kubernetes/fake"
)

// A node plugin that starts with peers on makes the Leases agree with its
// cache: a tree fetched while peers were off gets listed, a Lease naming a
// tree the node lost gets it taken off, a second start writes nothing, and
// a full list of holders is left alone. The registry is the real one, on
// a fake API server.
func TestRegisterHeld(t *testing.T) {
	ctx := context.Background()
	res := sourcetest.NewResolver()
	res.SetModel(modelURI, peerFiles())
	dir := t.TempDir()
	off := newHarnessWith(t, dir, res, cache.Options{})
	if _, err := off.fetch(nil); err != nil {
		t.Fatal(err)
	}
	off.close()

	kube := fake.NewClientset()
	registry := func(node string) *holders.Registry {
		r, err := holders.New(kube.CoordinationV1(), holders.Options{Namespace: "modelcache", Node: node, MaxHolders: 2})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if err := registry("node-a").Committed(ctx, "a tree node-a lost"); err != nil {
		t.Fatal(err)
	}
	h := newHarnessWith(t, dir, res, cache.Options{
		Peers: &cache.Peers{Registry: registry("node-a"), Members: nodeAddrs{}, Client: &peerClient{}, PollEvery: time.Millisecond},
	})
	keys, err := h.state.HeldContentKeys()
	if err != nil || len(keys) != 1 {
		t.Fatalf("HeldContentKeys = %q, %v; want the model's key", keys, err)
	}
	holdersOf := func(key string) []string {
		st, err := registry("node-z").Look(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return st.Holders
	}
	writes := func() (n int) {
		for _, a := range kube.Actions() {
			if v := a.GetVerb(); v == "create" || v == "update" || v == "delete" {
				n++
			}
		}
		return n
	}

	steps := []struct {
		name    string
		before  func()
		want    cache.Registered
		holders []string // of the model's key afterwards
	}{
		{name: "first start with peers", want: cache.Registered{Listed: 1, Unlisted: 1}, holders: []string{"node-a"}},
		{name: "second start", holders: []string{"node-a"}},
		{name: "full list without this node", before: func() {
			for _, n := range []string{"node-a", "node-b", "node-c"} {
				r := registry(n)
				change := r.Committed
				if n == "node-a" {
					change = r.Evicted
				}
				if err := change(ctx, keys[0]); err != nil {
					t.Fatal(err)
				}
			}
		}, holders: []string{"node-c", "node-b"}},
	}
	for _, s := range steps {
		if s.before != nil {
			s.before()
		}
		kube.ClearActions()
		got, err := h.cache.RegisterHeld(ctx)
		if err != nil || got != s.want {
			t.Fatalf("%s: RegisterHeld = %+v, %v; want %+v", s.name, got, err, s.want)
		}
		if n, want := writes(), s.want.Listed+s.want.Unlisted; n != want {
			t.Errorf("%s: %d writes, want %d", s.name, n, want)
		}
		if got := holdersOf(keys[0]); !slices.Equal(got, s.holders) {
			t.Errorf("%s: holders %q, want %q", s.name, got, s.holders)
		}
		if got := holdersOf("a tree node-a lost"); len(got) != 0 {
			t.Errorf("%s: the lost tree's holders %q, want none", s.name, got)
		}
	}
}
