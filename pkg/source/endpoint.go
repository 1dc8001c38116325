package source

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/modelcache/modelcache/pkg/egress"
	"github.com/modelcache/modelcache/pkg/source/remotespec"
)

// The endpoint check refuses, when a model is resolved, an endpoint whose
// host is, or resolves to, an address the egress rules refuse (loopback,
// link-local and cloud metadata, the node's own addresses, the operator's
// --deny-endpoint ranges), unless an operator allowed it: bad input is
// refused before anything connects. It is the early half of the "tenant
// configuration cannot reach the node" invariant. The other half is
// pkg/egress: every connection made for the model, to this endpoint or
// wherever a redirect or a later DNS answer leads, is checked again when it
// is made.

// endpointLookupTimeout bounds the DNS lookups of one Resolve.
const endpointLookupTimeout = 10 * time.Second

// Option configures a Sources resolver.
type Option func(*Sources)

// WithEgress makes every connection of the resolver's remotes go through g
// (the node plugin passes its one Guard). Without it a resolver builds its
// own from WithAllowedEndpoints.
func WithEgress(g *egress.Guard) Option {
	return func(r *Sources) { r.guard = g }
}

// WithAllowedEndpoints lets endpoints through the egress rules when every
// address they resolve to that would otherwise be refused lies in one of
// prefixes (an in-cluster MinIO on the node's own address, say). It is
// ignored when WithEgress gives a Guard.
func WithAllowedEndpoints(prefixes []netip.Prefix) Option {
	return func(r *Sources) {
		r.allowed = append([]netip.Prefix(nil), prefixes...)
	}
}

// checkEndpoints refuses any endpoint of cfg that is, or resolves to, an
// address the node must not connect to for a tenant. It looks host names up
// in DNS but never contacts the endpoints themselves.
func (r *Sources) checkEndpoints(ctx context.Context, eps []remotespec.Endpoint) error {
	if len(eps) == 0 {
		return nil
	}
	g := r.egress()
	if err := g.NodeAddrsReadable(); err != nil {
		return fmt.Errorf("%w: cannot read the node's own addresses to check the endpoint: %v", ErrUnavailable, err)
	}
	ctx, cancel := context.WithTimeout(ctx, endpointLookupTimeout)
	defer cancel()
	for _, ep := range eps {
		_, err := g.Resolve(ctx, ep.URL.Hostname())
		var refused *egress.RefusedError
		var lookup *egress.LookupError
		switch {
		case errors.As(err, &refused):
			verb := "resolves to"
			if refused.Host == refused.Addr.String() {
				verb = "is"
			}
			return fmt.Errorf("%w: endpoint %s (%s) %s %s, which the rule %s refuses: %s; an operator can allow it with --allow-endpoint",
				ErrInvalid, ep.Display(), ep.Key, verb, refused.Addr, refused.Rule, refused.Why)
		case errors.As(err, &lookup):
			// Retryable: a Service created a moment later resolves.
			return fmt.Errorf("%w: cannot resolve endpoint %s (%s): %s", ErrUnavailable, ep.Display(), ep.Key, lookupText(lookup))
		case err != nil:
			return fmt.Errorf("%w: checking endpoint %s (%s): %v", ErrUnavailable, ep.Display(), ep.Key, err)
		}
	}
	return nil
}

// lookupText is a lookup error without the host, which the caller names
// with its secret key.
func lookupText(e *egress.LookupError) string {
	return strings.TrimPrefix(e.Error(), "cannot resolve "+e.Host+": ")
}
