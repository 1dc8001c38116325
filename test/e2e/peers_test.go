package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/holders"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// peerLeases returns the names of the Leases the node plugin keeps for
// peers (those with a content key), checking that each lists this node
// alone as a holder, is named for its key and has no fetch running.
func peerLeases(ctx context.Context) (map[string]bool, error) {
	list, err := suite.cluster.Client.CoordinationV1().Leases(pluginNS).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, l := range list.Items {
		key, ok := l.Annotations[holders.KeyAnnotation]
		if !ok {
			continue // the controller's leader election
		}
		var held []string
		if err := json.Unmarshal([]byte(l.Annotations[holders.HoldersAnnotation]), &held); err != nil {
			return nil, fmt.Errorf("Lease %s: holders %q: %v", l.Name, l.Annotations[holders.HoldersAnnotation], err)
		}
		if l.Name != holders.LeaseName(key) || !slices.Equal(held, []string{nodeName}) || deref(l.Spec.HolderIdentity, "") != "" {
			return nil, fmt.Errorf("Lease %s (for %s): holders %v, fetcher %q; want named for its key, %s alone holding, no fetch running",
				l.Name, key, held, deref(l.Spec.HolderIdentity, ""), nodeName)
		}
		out[l.Name] = true
	}
	return out, nil
}

// pluginNS is where deploy/ runs the node plugin.
const pluginNS = "modelcache"

// leasesAtStart waits until the freshly installed node plugin has listed
// for peers the trees its cache kept from earlier installs (the cache
// directory is the node's), and returns their Leases.
func leasesAtStart(t *testing.T) map[string]bool {
	t.Helper()
	plugin := pluginPod(t)
	waitFor(t, "the plugin registering the trees it holds", time.Minute, func() error {
		if !strings.Contains(podLog(plugin, "modelcache"), "registered the trees this node holds for peers") {
			return fmt.Errorf("not in its log yet")
		}
		return nil
	})
	before, err := peerLeases(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return before
}

// wantPeerRecords checks what the node plugin, with peers on as deploy/
// installs it, recorded in the cluster for the one model the node
// downloaded since its Leases were before: one new Lease, naming this
// node as the holder with no fetch running; the peer Service's
// EndpointSlice lists the plugin pod ready on the port named peer; the
// peers' CA Secret exists.
func wantPeerRecords(t *testing.T, before map[string]bool) {
	t.Helper()
	ctx := context.Background()
	const ns = pluginNS
	c := suite.cluster.Client
	plugin := pluginPod(t)
	if log := podLog(plugin, "modelcache"); !strings.Contains(log, "serving peers") {
		t.Errorf("the node plugin does not serve peers; its log:\n%s", log)
	}
	waitFor(t, "the model's Lease with this node as its holder", 30*time.Second, func() error {
		now, err := peerLeases(ctx)
		if err != nil {
			return err
		}
		var added []string
		for name := range now {
			if !before[name] {
				added = append(added, name)
			}
		}
		if len(added) != 1 {
			return fmt.Errorf("new peer Leases %v (before the publish: %d), want one for the model downloaded", added, len(before))
		}
		return nil
	})
	waitFor(t, "the plugin pod in the peer Service's EndpointSlice", time.Minute, func() error {
		list, err := c.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=modelcache-peers"})
		if err != nil {
			return err
		}
		for _, s := range list.Items {
			peerPort := false
			for _, p := range s.Ports {
				peerPort = peerPort || deref(p.Name, "") == "peer" && deref(p.Port, 0) == 9443
			}
			for _, e := range s.Endpoints {
				if peerPort && e.TargetRef != nil && e.TargetRef.Name == plugin.Name && deref(e.NodeName, "") == nodeName && deref(e.Conditions.Ready, false) {
					return nil
				}
			}
		}
		return fmt.Errorf("no ready endpoint of pod %s on port peer 9443 in %d slices: %+v", plugin.Name, len(list.Items), list.Items)
	})
	s, err := c.CoreV1().Secrets(ns).Get(ctx, "modelcache-peer-ca", metav1.GetOptions{})
	if err != nil {
		t.Errorf("the peers' CA Secret: %v", err)
	} else if s.Type != corev1.SecretTypeTLS {
		t.Errorf("the peers' CA Secret is of type %s, want kubernetes.io/tls", s.Type)
	}
}

// deref is *p, or def when p is nil.
func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}
