package cache

import (
	"context"
	"errors"
	"fmt"

	"github.com/modelcache/modelcache/pkg/holders"
)

// PeerLister is a PeerRegistry that can also read, in one request, what
// the Leases say of this node (*holders.Registry): RegisterHeld needs it.
type PeerLister interface {
	List(ctx context.Context) (holders.Listing, error)
}

var _ PeerLister = (*holders.Registry)(nil)

// Registered is what RegisterHeld changed.
type Registered struct {
	Listed   int // trees this node holds that the Leases now list
	Unlisted int // trees the Leases listed that this node no longer holds
}

// RegisterHeld makes the peers' Leases agree with what this node holds,
// once, when the node plugin starts: a node registers its trees as each
// commits, so the trees it committed while peers were off, or before a
// Lease was lost, would otherwise never be read by another node; and a
// cache wiped under a running registration would be asked for trees it
// lost (each answered 404, at a cost to every reader). It reads the
// Leases once and writes only where they are wrong, and never to a full
// list of holders: readers have enough nodes there, so a rollout of a
// thousand nodes writes each popular tree's Lease a few dozen times, not a
// thousand.
func (c *Cache) RegisterHeld(ctx context.Context) (Registered, error) {
	if c.peers == nil {
		return Registered{}, nil
	}
	lister, ok := c.peers.Registry.(PeerLister)
	if !ok {
		return Registered{}, errors.New("the peer registry cannot list its Leases")
	}
	held, err := c.state.HeldContentKeys()
	if err != nil {
		return Registered{}, fmt.Errorf("reading the trees this node holds: %w", err)
	}
	listing, err := lister.List(ctx)
	if err != nil {
		return Registered{}, err
	}
	var r Registered
	var errs []error
	isHeld := map[string]bool{}
	for _, key := range held {
		isHeld[key] = true
		if listing.Mine[key] || listing.Full[key] {
			continue
		}
		if err := c.peers.Registry.Committed(ctx, key); err != nil {
			errs = append(errs, err)
			continue
		}
		r.Listed++
	}
	for key := range listing.Mine {
		if isHeld[key] {
			continue
		}
		if err := c.peers.Registry.Evicted(ctx, key); err != nil {
			errs = append(errs, err)
			continue
		}
		r.Unlisted++
	}
	return r, errors.Join(errs...)
}
