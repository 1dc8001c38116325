package fleet_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/holders"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// Eight nodes that miss the same model at once, against a real
// kube-apiserver: exactly one claims the origin fetch, the others wait
// and see its commit through their watch, and each node's commit and
// eviction is one write that no other node's concurrent write loses.
func TestHolders_OneOriginFetchPerCluster(t *testing.T) {
	const nodes = 8
	ns := "holders-test"
	newNamespace(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	regs := make([]*holders.Registry, nodes)
	for i := range regs {
		r, err := holders.New(env.kube.CoordinationV1(), holders.Options{Namespace: ns, Node: fmt.Sprintf("node-%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		regs[i] = r
	}
	const key = "modelcache content v1\x00model-a"

	var mu sync.Mutex
	var fetchers []int
	var wg sync.WaitGroup
	for i, r := range regs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			claimed, _, err := r.Claim(ctx, key)
			if err != nil {
				t.Error(err)
				return
			}
			if claimed {
				mu.Lock()
				fetchers = append(fetchers, i)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(fetchers) != 1 {
		t.Fatalf("nodes %v claimed the origin fetch, want exactly one", fetchers)
	}
	fetcher := fetchers[0]

	// The others wait for the fetcher's commit, then commit themselves
	// (as if they had fetched from it), all at once.
	seen := make(chan []string, nodes)
	for i, r := range regs {
		if i == fetcher {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := r.Wait(ctx, key, func(st holders.State) bool { return len(st.Holders) > 0 })
			if err != nil {
				t.Error(err)
				return
			}
			seen <- st.Holders
			if err := r.Committed(ctx, key); err != nil {
				t.Error(err)
			}
		}()
	}
	if err := regs[fetcher].Renew(ctx, key); err != nil {
		t.Fatal(err)
	}
	if err := regs[fetcher].Committed(ctx, key); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(seen)
	for h := range seen {
		if !slices.Contains(h, fmt.Sprintf("node-%d", fetcher)) {
			t.Errorf("a waiting node saw holders %v, without the fetcher", h)
		}
	}
	st, err := regs[(fetcher+1)%nodes].Look(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Holders) != nodes-1 || st.Fetcher != "" {
		t.Fatalf("Look = %+v, want the %d other nodes holding and no fetch running", st, nodes-1)
	}

	// Every node evicts at once; the last one out deletes the Lease.
	for _, r := range regs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.Evicted(ctx, key); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if _, err := env.kube.CoordinationV1().Leases(ns).Get(ctx, holders.LeaseName(key), metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("the Lease outlived every holder: %v", err)
	}
}

// Members reads the node plugins' addresses from the EndpointSlices of the
// peer Service, as the endpoint slice controller writes them: only ready
// endpoints, by node, on the named port, and it follows changes.
func TestHolders_MembersFromEndpointSlices(t *testing.T) {
	ns := "members-test"
	newNamespace(t, ns)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "modelcache-peers-x1", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: "modelcache-peers"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("metrics"), Port: ptr.To[int32](9090)}, {Name: ptr.To("peer"), Port: ptr.To[int32](9443)}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.0.0.1"}, NodeName: ptr.To("node-a"), Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}},
			{Addresses: []string{"10.0.0.2"}, NodeName: ptr.To("node-b"), Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(false)}},
		},
	}
	other := slice.DeepCopy()
	other.Name, other.Labels = "another-service-x1", map[string]string{discoveryv1.LabelServiceName: "another"}
	other.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.9"}, NodeName: ptr.To("node-c"), Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}}
	for _, s := range []*discoveryv1.EndpointSlice{slice, other} {
		if _, err := env.kube.DiscoveryV1().EndpointSlices(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	m, err := holders.WatchMembers(ctx, env.kube, ns, "modelcache-peers", "peer")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Stop()
	for node, want := range map[string]string{"node-a": "10.0.0.1:9443", "node-b": "", "node-c": ""} {
		if got, _ := m.Addr(node); got != want {
			t.Errorf("Addr(%s) = %q, want %q", node, got, want)
		}
	}
	slice.Endpoints[1].Conditions.Ready = ptr.To(true)
	if _, err := env.kube.DiscoveryV1().EndpointSlices(ns).Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		if got, _ := m.Addr("node-b"); got == "10.0.0.2:9443" {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("node-b never became a member after its endpoint turned ready")
		case <-time.After(20 * time.Millisecond):
		}
	}
}
