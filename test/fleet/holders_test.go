package fleet_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/holders"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
