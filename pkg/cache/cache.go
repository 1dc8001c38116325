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
	"path/filepath"
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

// Cache owns the node's store, state and mounts. Its collaborators are
// its own: Open wires them, and only its methods reach them.
type Cache struct {
	store   *store.Store
	state   *state.DB
	mounter mount.Mounter
	budget  *budget

	verifyCredentials string
	reverifyAfter     time.Duration
	progressEvery     time.Duration

	targets keymutex.Map
	peers   *Peers
}

// Options configure a Cache.
type Options struct {
	// Store tunes downloads (transfers, connections, ranged chunks, stall
	// limits) and carries their metrics hooks.
	Store store.Options
	// Budget limits what the cache holds; the cache evicts to keep it.
	Budget Budget
	// OnEvict is told of every tree the cache removes (metrics).
	OnEvict func(reason EvictReason, freed int64)
	// Mounter publishes trees (default: the kernel's bind mounts; tests
	// pass mount.Fake).
	Mounter mount.Mounter
	// VerifyCredentials is when a cache hit checks the request's
	// credentials against the remote: VerifyIfNotRecorded ("" too) once
	// per credential and tree, VerifyAlways on every fetch, VerifyNever
	// not at all.
	VerifyCredentials string
	// ReverifyAfter, when positive, expires recorded credential checks.
	ReverifyAfter time.Duration
	// ProgressEvery is how often a fetch reports progress (default 1 s).
	ProgressEvery time.Duration
	// Peers, when set, reads models from other nodes that hold them
	// (docs/design.md "Peers").
	Peers *Peers
	// Inspect, when set, is handed the state database and the store Open
	// opened: for tests that arrange or check records the cache's methods
	// do not reach. Nothing else may hold them.
	Inspect func(*state.DB, *store.Store)
}

// StateFile is where under the cache directory the state database is.
const StateFile = "state/modelcache.db"

// Open opens the cache under dir: the state database, and the content
// store over it as its index. Close closes both.
func Open(dir string, opt Options) (*Cache, error) {
	switch opt.VerifyCredentials {
	case "", VerifyAlways, VerifyIfNotRecorded, VerifyNever:
	default:
		return nil, fmt.Errorf("credential verification must be IfNotRecorded, Always or Never, not %q", opt.VerifyCredentials)
	}
	db, err := state.Open(filepath.Join(dir, StateFile))
	if err != nil {
		return nil, err
	}
	st, err := store.Open(dir, db, opt.Store)
	if err != nil {
		db.Close()
		return nil, err
	}
	if opt.Mounter == nil {
		opt.Mounter = mount.NewKernel()
	}
	if opt.ProgressEvery <= 0 {
		opt.ProgressEvery = time.Second
	}
	if opt.Inspect != nil {
		opt.Inspect(db, st)
	}
	c := &Cache{
		store: st, state: db, mounter: opt.Mounter,
		verifyCredentials: opt.VerifyCredentials, reverifyAfter: opt.ReverifyAfter, progressEvery: opt.ProgressEvery,
		peers: opt.Peers,
	}
	c.budget = &budget{limits: opt.Budget, store: st, records: db, onEvict: opt.OnEvict, stat: st.FSStat}
	if opt.Peers != nil {
		c.budget.onForget = opt.Peers.evicted
	}
	return c, nil
}

// Close stops running downloads and closes the store and the state
// database. Mounts stay: pods keep using them, and the next Open finds
// them again.
func (c *Cache) Close() error {
	return errors.Join(c.store.Close(), c.state.Close())
}

// NodeKey is the node's own key, which fingerprints credentials.
func (c *Cache) NodeKey() ([]byte, error) { return c.state.NodeKey() }

// VolumeRecord is a volume the controller created.
type VolumeRecord = state.Volume

// VolumeRecords are the controller's records of the volumes it created,
// kept in the node's state database.
type VolumeRecords interface {
	Volume(id string) (VolumeRecord, bool, error)
	PutVolume(v VolumeRecord) error
	DeleteVolume(id string) error
}

// ValidDigest reports whether d is a tree digest, "sha256:<64 lowercase hex>".
func ValidDigest(d string) bool { return store.ValidDigest(d) }

// Volumes are the controller's volume records in this cache's database,
// for a process that serves both (--mode all).
func (c *Cache) Volumes() VolumeRecords { return c.state }

// Names of the lower layers' types, so that adapters need import neither.
type (
	// ModelTree is a committed model: its digest, size and file count.
	ModelTree = store.Tree
	// Checks says how a download's objects were checked.
	Checks = store.Checks
	// BytesFrom says where a download's bytes came from: the origin, and
	// peers by node.
	BytesFrom = store.BytesFrom
	// NodeBytes is what one peer node sent.
	NodeBytes = store.NodeBytes
	// Ref is a published volume's record.
	Ref = state.Ref
	// TreeFile is one file of a cached tree.
	TreeFile = store.TreeFile
	// Usage is what the cache holds on disk.
	Usage = store.Usage
	// VerifyResult is what re-hashing every blob found.
	VerifyResult = store.VerifyResult
	// InProgressError says a download goes on after the caller stopped
	// waiting: not a failure, asking again joins it.
	InProgressError = store.InProgressError
)

// Where a download's bytes came from, as store.Options.OnBytes names it
// (metrics label values).
const (
	FromOrigin = store.FromOrigin
	FromPeer   = store.FromPeer
)

// ByteSources lists every place OnBytes names.
var ByteSources = []string{FromOrigin, FromPeer}

// mismatch formats a digest pin failure.
func mismatch(want, got string) error {
	return fmt.Errorf("%w: the digest attribute pins %s but the model's content digest is %s", ErrDigestMismatch, want, got)
}
