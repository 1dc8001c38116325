// Package cache is the one owner of a node's model cache: the lifecycle of
// a cached model from fetch to removal. It sits over the content store
// (pkg/store, which knows files) and the state database (pkg/state, which
// knows references, pins and sources) the way containerd's metadata layer
// sits over its content store, and it alone decides what is fetched,
// mounted, kept, pinned, evicted and drained. The CSI node service and the
// admin API are adapters: they validate, call a Cache method and map its
// errors.
package cache

import (
	"errors"
	"fmt"
	"time"

	"github.com/modelcache/modelcache/pkg/keymutex"
	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
)

// Pull policies (the pullPolicy volume attribute).
const (
	PullIfNotPresent = "IfNotPresent"
	PullAlways       = "Always"
	PullNever        = "Never"
)

// Credential verification policies for cache hits (--verify-credentials).
const (
	VerifyIfNotRecorded = "IfNotRecorded"
	VerifyAlways        = "Always"
	VerifyNever         = "Never"
)

// Domain errors callers map to their own codes with errors.Is.
var (
	// ErrNotCached: pullPolicy Never and the node lacks the model.
	ErrNotCached = errors.New("not cached")
	// ErrDrained: the node is drained and the model would need a download.
	ErrDrained = errors.New("node is drained")
	// ErrDigestMismatch: a digest pin does not match the model's content.
	ErrDigestMismatch = errors.New("digest mismatch")
	// ErrEvictedMeanwhile: the tree was removed between lookup and mount.
	ErrEvictedMeanwhile = errors.New("tree was evicted while being mounted")
	// ErrInUse: an operator asked to remove a tree pods still mount.
	ErrInUse = errors.New("tree is in use")
	// ErrNoTree: no cached tree matches an operator's reference.
	ErrNoTree = errors.New("no cached tree matches")
	// ErrAmbiguous: more than one cached tree matches an operator's reference.
	ErrAmbiguous = errors.New("more than one cached tree matches")
	// ErrConflict: the target has another volume, or other arguments, published.
	ErrConflict = errors.New("published with other arguments")
)

// Cache owns the node's store, state and mounts.
type Cache struct {
	Store   *store.Store
	State   *state.DB
	Mounter mount.Mounter
	// VerifyCredentials is when a cache hit checks the request's credentials against
	// the remote: VerifyIfNotRecorded ("" too) once per credential and
	// tree, VerifyAlways on every fetch, VerifyNever not at all.
	VerifyCredentials string
	// ReverifyAfter, when positive, expires recorded credential checks.
	ReverifyAfter time.Duration
	// ProgressEvery is how often Fetch reports progress (default 1 s).
	ProgressEvery time.Duration

	targets keymutex.Map
}

// mismatch formats a digest pin failure.
func mismatch(want, got string) error {
	return fmt.Errorf("%w: the digest attribute pins %s but the model's content digest is %s", ErrDigestMismatch, want, got)
}
