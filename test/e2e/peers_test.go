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

// wantPeerRecords checks what the node plugin, with peers on as deploy/
// installs it, recorded in the cluster for the one model the node has
// published: its Lease names this node as the holder and no fetch runs,
// the peer Service's EndpointSlice lists the plugin pod ready on the port
// named peer, and the peers' CA Secret exists.
func wantPeerRecords(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	const ns = "modelcache"
	c := suite.cluster.Client
	plugin := pluginPod(t)
	if log := podLog(plugin, "modelcache"); !strings.Contains(log, "serving peers") {
		t.Errorf("the node plugin does not serve peers; its log:\n%s", log)
	}
	waitFor(t, "the model's Lease with this node as its holder", 30*time.Second, func() error {
		list, err := c.CoordinationV1().Leases(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		var found []string
		for _, l := range list.Items {
			key, ok := l.Annotations[holders.KeyAnnotation]
			if !ok {
				continue // the controller's leader election
			}
			var held []string
			if err := json.Unmarshal([]byte(l.Annotations[holders.HoldersAnnotation]), &held); err != nil {
				return fmt.Errorf("Lease %s: holders %q: %v", l.Name, l.Annotations[holders.HoldersAnnotation], err)
			}
			if l.Name != holders.LeaseName(key) || !slices.Equal(held, []string{nodeName}) || deref(l.Spec.HolderIdentity, "") != "" {
				return fmt.Errorf("Lease %s (for %s): holders %v, fetcher %q; want named for its key, %s alone holding, no fetch running",
					l.Name, key, held, deref(l.Spec.HolderIdentity, ""), nodeName)
			}
			found = append(found, l.Name)
		}
		if len(found) != 1 {
			return fmt.Errorf("%d peer Leases %v, want one for the one model published", len(found), found)
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

// deref is *p, or the zero value for nil.
func deref[T any](p *T, zero T) T {
	if p == nil {
		return zero
	}
	return *p
}
