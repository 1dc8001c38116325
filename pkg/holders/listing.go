package holders

import (
	"context"
	"fmt"
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Listing is what the Leases say of this node, for a node plugin that
// starts: which trees they list it as holding, and which lists are full
// without it.
type Listing struct {
	// Mine are the content keys whose Lease lists this node.
	Mine map[string]bool
	// Full are the content keys whose Lease lists MaxHolders other nodes:
	// readers have enough of them, and adding this node would only push
	// another off.
	Full map[string]bool
}

// List reads every Lease of this package in one request, from the API
// server's cache (resourceVersion 0): a node plugin makes it once at
// start-up, so a rollout of N nodes costs N reads of the Leases, not N
// per tree.
func (r *Registry) List(ctx context.Context) (Listing, error) {
	list, err := r.leases.Leases(r.o.Namespace).List(ctx, metav1.ListOptions{
		LabelSelector: ManagedByLabel + "=" + managedBy, ResourceVersion: "0"})
	if err != nil {
		return Listing{}, fmt.Errorf("listing the peers' Leases: %w", err)
	}
	out := Listing{Mine: map[string]bool{}, Full: map[string]bool{}}
	for i := range list.Items {
		l := &list.Items[i]
		key := l.Annotations[KeyAnnotation]
		if key == "" || LeaseName(key) != l.Name {
			continue // not one this package wrote
		}
		h := r.holders(l)
		switch {
		case slices.Contains(h, r.o.Node):
			out.Mine[key] = true
		case len(h) >= r.o.MaxHolders:
			out.Full[key] = true
		}
	}
	return out, nil
}
