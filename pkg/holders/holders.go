// Package holders records in Kubernetes which node plugins hold a model's
// tree, and which one fetches it from its origin: one coordination.k8s.io
// Lease per content key (docs/design.md "Peers").
//
// The Lease's holder is the node fetching the model from the origin; its
// holders annotation lists the nodes that committed the tree, newest
// first. A node writes once when it starts an origin fetch (Claim), every
// third of the lease while that fetch runs (Renew), once when its tree
// commits (Committed) and once when it is evicted (Evicted): never per
// file. Readers take what they find as a hint: a holder that has since
// lost the tree answers 404 and the reader moves on, and a fetcher that
// stopped renewing is taken over once its lease lapses.
package holders

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apimachinery/pkg/watch"
	coordinationclient "k8s.io/client-go/kubernetes/typed/coordination/v1"
	"k8s.io/utils/ptr"
)

// Names the Leases carry.
const (
	// HoldersAnnotation lists, as a JSON array, the nodes that hold the
	// Lease's tree, newest first.
	HoldersAnnotation = "modelcache.csi.dev/holders"
	// KeyAnnotation is the content key a Lease is for: its name is a
	// digest of it.
	KeyAnnotation = "modelcache.csi.dev/content-key"
	// ManagedByLabel marks the Leases this package writes, for
	// operators and for RBAC-free listing in tests.
	ManagedByLabel = "app.kubernetes.io/managed-by"
	managedBy      = "modelcache-peers"
)

// Defaults of Options.
const (
	// DefaultLeaseDuration is how long an origin fetch that stopped
	// renewing keeps others waiting before one takes it over.
	DefaultLeaseDuration = 30 * time.Second
	// DefaultMaxHolders bounds the list a Lease keeps: enough nodes to
	// spread a rollout's reads, and a Lease that stays small however many
	// nodes hold the tree.
	DefaultMaxHolders = 32
)

// Options configure a Registry.
type Options struct {
	Namespace     string // where the Leases live: the node plugin's own
	Node          string // this node's name, as its EndpointSlice endpoint names it
	LeaseDuration time.Duration
	MaxHolders    int
	Now           func() time.Time // for tests; time.Now by default
}

// Registry reads and writes the Leases of one node plugin.
type Registry struct {
	leases coordinationclient.LeasesGetter
	o      Options
}

// New returns the registry of node o.Node.
func New(leases coordinationclient.LeasesGetter, o Options) (*Registry, error) {
	if o.Namespace == "" || o.Node == "" {
		return nil, fmt.Errorf("holders: a namespace and a node name are required")
	}
	if o.LeaseDuration <= 0 {
		o.LeaseDuration = DefaultLeaseDuration
	}
	if o.MaxHolders <= 0 {
		o.MaxHolders = DefaultMaxHolders
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Registry{leases: leases, o: o}, nil
}

// State is what a Lease says of one content key.
type State struct {
	// Holders are the nodes that committed the tree, newest first; this
	// node is never among them.
	Holders []string
	// Fetcher is the node fetching the tree from the origin while its
	// lease runs; "" when none does or its lease lapsed.
	Fetcher string
	// Mine: this node holds the origin fetch.
	Mine bool
}

// LeaseName is the name of a content key's Lease: a digest, since content
// keys are longer than a name may be and hold characters one may not.
func LeaseName(contentKey string) string {
	h := sha256.Sum256([]byte(contentKey))
	return "modelcache-" + hex.EncodeToString(h[:20])
}

// Look returns what the Lease of key says. A key nobody wrote is the zero
// State.
func (r *Registry) Look(ctx context.Context, key string) (State, error) {
	l, err := r.leases.Leases(r.o.Namespace).Get(ctx, LeaseName(key), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return State{}, nil
	}
	if err != nil {
		return State{}, fmt.Errorf("reading the holders of %s: %w", key, err)
	}
	return r.state(l), nil
}

// Claim takes the origin fetch of key for this node unless another node
// holds a live lease on it or a node holds the tree already: claimed says
// whether this node should fetch from the origin, and st what the Lease
// says either way.
func (r *Registry) Claim(ctx context.Context, key string) (claimed bool, st State, err error) {
	err = r.update(ctx, key, func(l *coordinationv1.Lease) bool {
		st = r.state(l)
		if st.Mine || st.Fetcher != "" || len(st.Holders) > 0 {
			claimed = st.Mine
			return false
		}
		now := metav1.NewMicroTime(r.o.Now())
		l.Spec.HolderIdentity = ptr.To(r.o.Node)
		l.Spec.AcquireTime, l.Spec.RenewTime = &now, &now
		l.Spec.LeaseDurationSeconds = ptr.To(int32(r.o.LeaseDuration / time.Second))
		l.Spec.LeaseTransitions = ptr.To(ptr.Deref(l.Spec.LeaseTransitions, 0) + 1)
		claimed, st = true, r.state(l)
		return true
	})
	if err != nil {
		return false, State{}, fmt.Errorf("claiming the origin fetch of %s: %w", key, err)
	}
	return claimed, st, nil
}

// Renew extends this node's origin fetch of key. It fails with ErrLost
// when another node took the fetch over (this one's lease lapsed).
func (r *Registry) Renew(ctx context.Context, key string) error {
	lost := false
	err := r.update(ctx, key, func(l *coordinationv1.Lease) bool {
		if ptr.Deref(l.Spec.HolderIdentity, "") != r.o.Node {
			lost = true
			return false
		}
		now := metav1.NewMicroTime(r.o.Now())
		l.Spec.RenewTime = &now
		return true
	})
	if err != nil {
		return fmt.Errorf("renewing the origin fetch of %s: %w", key, err)
	}
	if lost {
		return fmt.Errorf("renewing the origin fetch of %s: %w", key, ErrLost)
	}
	return nil
}

// Wait returns the first state of key's Lease for which done is true,
// watching the one Lease: a node waiting for another's origin fetch learns
// at once that the tree committed or that the fetch lapsed. A lapse is
// seen by no write at all, so the wait also looks again when the fetcher's
// lease would end.
func (r *Registry) Wait(ctx context.Context, key string, done func(State) bool) (State, error) {
	leases := r.leases.Leases(r.o.Namespace)
	sel := fields.OneTermEqualSelector("metadata.name", LeaseName(key)).String()
	for {
		list, err := leases.List(ctx, metav1.ListOptions{FieldSelector: sel})
		if err != nil {
			return State{}, fmt.Errorf("waiting for the holders of %s: %w", key, err)
		}
		st := State{}
		if len(list.Items) > 0 {
			st = r.state(&list.Items[0])
		}
		if done(st) {
			return st, nil
		}
		w, err := leases.Watch(ctx, metav1.ListOptions{FieldSelector: sel, ResourceVersion: list.ResourceVersion})
		if err != nil {
			return State{}, fmt.Errorf("waiting for the holders of %s: %w", key, err)
		}
		st, ok, err := r.watch(ctx, w, done)
		if ok || err != nil {
			return st, err
		}
	}
}

// watch follows one watch until done, the next time a lease could lapse,
// or the watch ends; ok says done was met.
func (r *Registry) watch(ctx context.Context, w watch.Interface, done func(State) bool) (State, bool, error) {
	defer w.Stop()
	t := time.NewTimer(r.o.LeaseDuration)
	defer t.Stop()
	for {
		select {
		case ev, open := <-w.ResultChan():
			if !open {
				return State{}, false, nil
			}
			l, isLease := ev.Object.(*coordinationv1.Lease)
			if !isLease {
				return State{}, false, nil // an error event: list again
			}
			st := r.state(l)
			if ev.Type == watch.Deleted {
				st = State{}
			}
			if done(st) {
				return st, true, nil
			}
		case <-t.C:
			return State{}, false, nil
		case <-ctx.Done():
			return State{}, false, ctx.Err()
		}
	}
}

// ErrLost is Renew's error when another node holds the origin fetch.
var ErrLost = fmt.Errorf("the lease lapsed and another node took the fetch over")

// Release gives up this node's origin fetch of key (it failed), so that
// another node takes it at once rather than after the lease lapses.
func (r *Registry) Release(ctx context.Context, key string) error {
	err := r.update(ctx, key, func(l *coordinationv1.Lease) bool {
		if ptr.Deref(l.Spec.HolderIdentity, "") != r.o.Node {
			return false
		}
		l.Spec.HolderIdentity, l.Spec.RenewTime = nil, nil
		return true
	})
	if err != nil {
		return fmt.Errorf("releasing the origin fetch of %s: %w", key, err)
	}
	return nil
}

// Committed records that this node holds key's tree, first in the list,
// and ends its origin fetch of it if it held one: one write.
func (r *Registry) Committed(ctx context.Context, key string) error {
	err := r.update(ctx, key, func(l *coordinationv1.Lease) bool {
		holders := r.holders(l)
		if len(holders) > 0 && holders[0] == r.o.Node && ptr.Deref(l.Spec.HolderIdentity, "") != r.o.Node {
			return false
		}
		holders = slices.DeleteFunc(holders, func(n string) bool { return n == r.o.Node })
		holders = append([]string{r.o.Node}, holders...)
		r.setHolders(l, holders[:min(len(holders), r.o.MaxHolders)])
		if ptr.Deref(l.Spec.HolderIdentity, "") == r.o.Node {
			l.Spec.HolderIdentity, l.Spec.RenewTime = nil, nil
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("recording this node as a holder of %s: %w", key, err)
	}
	return nil
}

// Evicted records that this node no longer holds key's tree: one write,
// none when it was not listed. A Lease nobody holds or fetches is deleted.
func (r *Registry) Evicted(ctx context.Context, key string) error {
	name := LeaseName(key)
	for attempt := 0; ; attempt++ {
		if err := backOff(ctx, attempt); err != nil {
			return err
		}
		l, err := r.leases.Leases(r.o.Namespace).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("recording the eviction of %s: %w", key, err)
		}
		holders := r.holders(l)
		if !slices.Contains(holders, r.o.Node) {
			return nil
		}
		holders = slices.DeleteFunc(holders, func(n string) bool { return n == r.o.Node })
		if len(holders) == 0 && r.state(l).Fetcher == "" {
			err = r.leases.Leases(r.o.Namespace).Delete(ctx, name, metav1.DeleteOptions{
				Preconditions: &metav1.Preconditions{ResourceVersion: ptr.To(l.ResourceVersion)}})
		} else {
			r.setHolders(l, holders)
			_, err = r.leases.Leases(r.o.Namespace).Update(ctx, l, metav1.UpdateOptions{})
		}
		switch {
		case err == nil, apierrors.IsNotFound(err):
			return nil
		case apierrors.IsConflict(err):
			continue
		default:
			return fmt.Errorf("recording the eviction of %s: %w", key, err)
		}
	}
}

// update applies change to key's Lease, creating it when there is none,
// and starts again from a fresh read when another node wrote it first.
// change returns whether it changed the Lease.
func (r *Registry) update(ctx context.Context, key string, change func(*coordinationv1.Lease) bool) error {
	leases := r.leases.Leases(r.o.Namespace)
	name := LeaseName(key)
	for attempt := 0; ; attempt++ {
		if err := backOff(ctx, attempt); err != nil {
			return err
		}
		l, err := leases.Get(ctx, name, metav1.GetOptions{})
		create := apierrors.IsNotFound(err)
		switch {
		case create:
			l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: r.o.Namespace,
				Labels: map[string]string{ManagedByLabel: managedBy}, Annotations: map[string]string{KeyAnnotation: key}}}
		case err != nil:
			return err
		}
		if !change(l) {
			return nil
		}
		if create {
			_, err = leases.Create(ctx, l, metav1.CreateOptions{})
		} else {
			_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		}
		if err == nil {
			return nil
		}
		if !apierrors.IsConflict(err) && !apierrors.IsAlreadyExists(err) {
			return err
		}
	}
}

// backOff waits before another attempt at a write another node won: many
// nodes that miss the same model at once write the same Lease, and
// retrying at once would have them collide again.
func backOff(ctx context.Context, attempt int) error {
	if attempt == 0 {
		return ctx.Err()
	}
	d := wait.Jitter(min(10*time.Millisecond<<min(attempt, 7), time.Second), 1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// state reads a Lease as this node sees it.
func (r *Registry) state(l *coordinationv1.Lease) State {
	st := State{Holders: slices.DeleteFunc(r.holders(l), func(n string) bool { return n == r.o.Node })}
	holder := ptr.Deref(l.Spec.HolderIdentity, "")
	if holder == "" || l.Spec.RenewTime == nil {
		return st
	}
	d := time.Duration(ptr.Deref(l.Spec.LeaseDurationSeconds, int32(r.o.LeaseDuration/time.Second))) * time.Second
	if r.o.Now().Before(l.Spec.RenewTime.Add(d)) {
		st.Fetcher, st.Mine = holder, holder == r.o.Node
	}
	return st
}

// holders is a Lease's list; an unreadable one (written by hand) is empty,
// which costs an origin fetch and nothing else.
func (r *Registry) holders(l *coordinationv1.Lease) []string {
	var h []string
	if v := l.Annotations[HoldersAnnotation]; v != "" {
		if json.Unmarshal([]byte(v), &h) != nil {
			return nil
		}
	}
	return h
}

func (r *Registry) setHolders(l *coordinationv1.Lease, h []string) {
	b, _ := json.Marshal(h) // a []string always marshals
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	l.Annotations[HoldersAnnotation] = string(b)
}
