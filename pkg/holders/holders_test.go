package holders_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/holders"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

const ns = "modelcache"

// clock is a settable time shared by the registries of one test.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func registry(t *testing.T, kube *fake.Clientset, c *clock, node string, max int) *holders.Registry {
	t.Helper()
	r, err := holders.New(kube.CoordinationV1(), holders.Options{Namespace: ns, Node: node, LeaseDuration: 30 * time.Second, MaxHolders: max, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// writes counts the create, update and delete calls the fake saw.
func writes(kube *fake.Clientset) int {
	n := 0
	for _, a := range kube.Actions() {
		switch a.GetVerb() {
		case "create", "update", "delete":
			n++
		}
	}
	return n
}

// One node claims the origin fetch; the others see it until its lease
// lapses, and then one takes it over and the first has lost it.
func TestClaimRenewAndTakeOver(t *testing.T) {
	ctx := context.Background()
	kube, c := fake.NewClientset(), &clock{t: time.Unix(1800000000, 0)}
	a, b := registry(t, kube, c, "node-a", 0), registry(t, kube, c, "node-b", 0)

	claimed, st, err := a.Claim(ctx, "key")
	if err != nil || !claimed || !st.Mine {
		t.Fatalf("first Claim = %v, %+v, %v; want this node's", claimed, st, err)
	}
	if claimed, st, err = b.Claim(ctx, "key"); err != nil || claimed || st.Fetcher != "node-a" {
		t.Fatalf("second node's Claim = %v, %+v, %v; want node-a fetching", claimed, st, err)
	}
	c.add(20 * time.Second)
	if err := a.Renew(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	c.add(20 * time.Second) // 40 s after the claim, 20 after the renewal
	if claimed, _, _ = b.Claim(ctx, "key"); claimed {
		t.Fatal("a renewed lease was taken over")
	}
	c.add(11 * time.Second)
	if claimed, st, err = b.Claim(ctx, "key"); err != nil || !claimed || st.Fetcher != "node-b" {
		t.Fatalf("Claim after the lease lapsed = %v, %+v, %v; want node-b's", claimed, st, err)
	}
	if err := a.Renew(ctx, "key"); !errors.Is(err, holders.ErrLost) {
		t.Fatalf("Renew of a lost fetch = %v, want ErrLost", err)
	}
	l, err := kube.CoordinationV1().Leases(ns).Get(ctx, holders.LeaseName("key"), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := *l.Spec.LeaseTransitions; got != 2 {
		t.Errorf("lease transitions %d, want 2", got)
	}
	if l.Annotations[holders.KeyAnnotation] != "key" {
		t.Errorf("annotations %v do not name the content key", l.Annotations)
	}
}

// A node that commits ends its fetch and heads the holders; nobody
// claims an origin fetch of a tree a node holds; the list keeps the
// newest MaxHolders; a failed fetch released is claimed at once.
func TestCommittedReleaseAndHolders(t *testing.T) {
	ctx := context.Background()
	kube, c := fake.NewClientset(), &clock{t: time.Unix(1800000000, 0)}
	a, b := registry(t, kube, c, "node-a", 3), registry(t, kube, c, "node-b", 3)

	if _, _, err := a.Claim(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	if claimed, _, err := b.Claim(ctx, "key"); err != nil || !claimed {
		t.Fatalf("Claim after a release = %v, %v; want it at once", claimed, err)
	}
	if err := b.Committed(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	st, err := a.Look(ctx, "key")
	if err != nil || st.Fetcher != "" || !slices.Equal(st.Holders, []string{"node-b"}) {
		t.Fatalf("Look = %+v, %v; want node-b holding and no fetch", st, err)
	}
	if claimed, _, _ := a.Claim(ctx, "key"); claimed {
		t.Fatal("an origin fetch was claimed of a tree node-b holds")
	}
	for i := range 5 {
		if err := registry(t, kube, c, fmt.Sprintf("node-%d", i), 3).Committed(ctx, "key"); err != nil {
			t.Fatal(err)
		}
	}
	if st, _ = a.Look(ctx, "key"); !slices.Equal(st.Holders, []string{"node-4", "node-3", "node-2"}) {
		t.Fatalf("holders %v, want the newest three", st.Holders)
	}
	before := writes(kube)
	if err := registry(t, kube, c, "node-4", 3).Committed(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	if writes(kube) != before {
		t.Error("a node already first in the list wrote the Lease again")
	}
}

// Evictions take the node off the list, write nothing for a node not on
// it, and delete the Lease its last holder leaves.
func TestEvicted(t *testing.T) {
	ctx := context.Background()
	kube, c := fake.NewClientset(), &clock{t: time.Unix(1800000000, 0)}
	a, b := registry(t, kube, c, "node-a", 0), registry(t, kube, c, "node-b", 0)
	for _, r := range []*holders.Registry{a, b} {
		if err := r.Committed(ctx, "key"); err != nil {
			t.Fatal(err)
		}
	}
	before := writes(kube)
	if err := registry(t, kube, c, "node-c", 0).Evicted(ctx, "key"); err != nil || writes(kube) != before {
		t.Fatalf("eviction by a node not listed: %v, %d writes", err, writes(kube)-before)
	}
	if err := a.Evicted(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	if st, _ := b.Look(ctx, "key"); len(st.Holders) != 0 {
		t.Fatalf("holders %v after node-a left, want none but this node", st.Holders)
	}
	if err := b.Evicted(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoordinationV1().Leases(ns).Get(ctx, holders.LeaseName("key"), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("the Lease outlived its last holder: %v", err)
	}
	if err := b.Evicted(ctx, "key"); err != nil {
		t.Fatalf("eviction of a key without a Lease: %v", err)
	}
}

// A write another node made first is read again and the change applied
// to what it wrote.
func TestConflictReadAgain(t *testing.T) {
	ctx := context.Background()
	kube, c := fake.NewClientset(), &clock{t: time.Unix(1800000000, 0)}
	a, b := registry(t, kube, c, "node-a", 0), registry(t, kube, c, "node-b", 0)
	if err := a.Committed(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	conflicts := 1
	kube.PrependReactor("update", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		if conflicts > 0 {
			conflicts--
			return true, nil, apierrors.NewConflict(coordinationv1.Resource("leases"), holders.LeaseName("key"), errors.New("modified"))
		}
		return false, nil, nil
	})
	if err := b.Committed(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	if st, _ := registry(t, kube, c, "node-c", 0).Look(ctx, "key"); !slices.Equal(st.Holders, []string{"node-b", "node-a"}) {
		t.Fatalf("holders %v after a conflict, want both", st.Holders)
	}
}

// Wait returns once another node's commit is seen, and on a lapse that no
// write announces.
func TestWait(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kube, c := fake.NewClientset(), &clock{t: time.Unix(1800000000, 0)}
	a, b := registry(t, kube, c, "node-a", 0), registry(t, kube, c, "node-b", 0)
	if _, _, err := a.Claim(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	got := make(chan holders.State, 1)
	go func() {
		st, err := b.Wait(ctx, "key", func(st holders.State) bool { return len(st.Holders) > 0 })
		if err != nil {
			t.Error(err)
		}
		got <- st
	}()
	if err := a.Committed(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	if st := <-got; !slices.Equal(st.Holders, []string{"node-a"}) {
		t.Fatalf("Wait = %+v, want node-a holding", st)
	}
}

// A holders annotation written by hand that is not a JSON list reads as
// no holders: an origin fetch, nothing worse.
func TestUnreadableHolders(t *testing.T) {
	ctx := context.Background()
	kube := fake.NewClientset(&coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: holders.LeaseName("key"), Namespace: ns,
		Annotations: map[string]string{holders.HoldersAnnotation: "node-a,node-b"}}})
	c := &clock{t: time.Unix(1800000000, 0)}
	if claimed, st, err := registry(t, kube, c, "node-c", 0).Claim(ctx, "key"); err != nil || !claimed || len(st.Holders) != 0 {
		t.Fatalf("Claim = %v, %+v, %v; want this node's, no holders", claimed, st, err)
	}
}

// A fetch whose node stopped renewing lapses with no write to announce
// it: a waiting node looks again within its own lease duration.
func TestWaitSeesALapse(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kube, c := fake.NewClientset(), &clock{t: time.Unix(1800000000, 0)}
	if _, _, err := registry(t, kube, c, "node-a", 0).Claim(ctx, "key"); err != nil {
		t.Fatal(err)
	}
	b, err := holders.New(kube.CoordinationV1(), holders.Options{Namespace: ns, Node: "node-b", LeaseDuration: 100 * time.Millisecond, Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	// The clock moves once Wait has seen node-a fetching: only the
	// wait's own timer can find the lapse.
	var once sync.Once
	st, err := b.Wait(ctx, "key", func(st holders.State) bool {
		once.Do(func() {
			if st.Fetcher != "node-a" {
				t.Errorf("Wait first saw %+v, want node-a fetching", st)
			}
			c.add(31 * time.Second)
		})
		return st.Fetcher == ""
	})
	if err != nil || st.Fetcher != "" {
		t.Fatalf("Wait = %+v, %v; want the lapsed fetch seen", st, err)
	}
}

// List reads, in one request, which trees the Leases list a node as
// holding and which lists are full without it; Leases written by anyone
// else are not read as ours.
func TestList(t *testing.T) {
	ctx := context.Background()
	kube, c := fake.NewClientset(), &clock{t: time.Unix(1800000000, 0)}
	for _, nk := range [][2]string{{"node-a", "one"}, {"node-b", "two"}, {"node-c", "two"}, {"node-a", "three"}} {
		if err := registry(t, kube, c, nk[0], 2).Committed(ctx, nk[1]); err != nil {
			t.Fatal(err)
		}
	}
	other := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: "someone-else", Namespace: ns,
		Annotations: map[string]string{holders.KeyAnnotation: "four", holders.HoldersAnnotation: `["node-a"]`}}}
	if _, err := kube.CoordinationV1().Leases(ns).Create(ctx, other, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		node       string
		mine, full []string
	}{
		{node: "node-a", mine: []string{"one", "three"}, full: []string{"two"}},
		{node: "node-b", mine: []string{"two"}},
		{node: "node-d", full: []string{"two"}},
	} {
		t.Run(tt.node, func(t *testing.T) {
			kube.ClearActions()
			got, err := registry(t, kube, c, tt.node, 2).List(ctx)
			if err != nil {
				t.Fatal(err)
			}
			keys := func(m map[string]bool) []string { return slices.Sorted(maps.Keys(m)) }
			if !slices.Equal(keys(got.Mine), tt.mine) || !slices.Equal(keys(got.Full), tt.full) {
				t.Errorf("List = mine %q, full %q; want %q, %q", keys(got.Mine), keys(got.Full), tt.mine, tt.full)
			}
			if n := len(kube.Actions()); n != 1 {
				t.Errorf("%d requests, want one list", n)
			}
		})
	}
}
