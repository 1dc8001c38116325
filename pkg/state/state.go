// Package state is the driver's embedded database (bbolt): which tree a
// content key produced, which tree a source last resolved to, which
// volumes reference which trees, and the volumes the controller created. It never stores a secret: sources are keyed
// by an HMAC fingerprint and URIs carry no credentials.
package state

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/modelcache/modelcache/pkg/store"
	bolt "go.etcd.io/bbolt"
)

var (
	bucketKeys    = []byte("content-keys") // content key → store.Tree
	bucketSources = []byte("sources")      // source key → Source
	bucketTrees   = []byte("trees")        // tree digest → TreeRecord
	bucketRefs    = []byte("refs")         // target path → Ref
	bucketUsers   = []byte("tree-refs")    // tree digest NUL target path → nothing: refs by tree
	bucketObjects = []byte("objects")      // source.ObjectKey → blob hex: what an object's bytes became
	bucketVolumes = []byte("volumes")      // volume ID → Volume (controller)
	bucketPins    = []byte("pins")         // tree digest → time pinned
	bucketDoomed  = []byte("doomed")       // tree digest → reason it goes when its last mount goes
	keyDrained    = []byte("drained")
	bucketMeta    = []byte("meta")
	keySchema     = []byte("schema-version")
	keyNodeKey    = []byte("fingerprint-key")
)

// Ref records that a volume is published at a target path from a tree.
type Ref struct {
	VolumeID   string `json:"volumeID"`
	TargetPath string `json:"targetPath"`
	Tree       string `json:"tree"`
	ArgsHash   string `json:"argsHash"` // digest of the publish arguments, for ALREADY_EXISTS
	URI        string `json:"uri"`
	// Revision is what the URI's movable version resolved to (a Hub
	// commit, an OCI manifest digest); "" for object stores.
	Revision  string    `json:"revision,omitempty"`
	PodName   string    `json:"podName,omitempty"`
	PodNS     string    `json:"podNamespace,omitempty"`
	PodUID    string    `json:"podUID,omitempty"`
	Published time.Time `json:"published"`
}

// Source records the tree a model reference last resolved to with one set of credentials.
type Source struct {
	Tree string `json:"tree"`
	URI  string `json:"uri"`
	// Revision is what the URI resolved to when it was checked (a Hub
	// commit, an OCI manifest digest); "" for object stores.
	Revision string `json:"revision,omitempty"`
	// Checked is when these credentials last read or verified the model.
	Checked time.Time `json:"checked,omitzero"`
}

// TreeRecord is what the node knows about a committed tree.
type TreeRecord struct {
	store.Tree
	URIs []string `json:"uris"`
	// Revisions are the Hub commits and OCI manifest digests the URIs
	// resolved to for this tree.
	Revisions []string  `json:"revisions,omitempty"`
	LastUsed  time.Time `json:"lastUsed"`
	// From is where this node's downloads of the tree read its bytes: the
	// origin, and peers by node (at most store.MaxFromNodes named). Zero
	// for a tree recorded before it was kept, or whose every object was
	// linked from earlier downloads. A new field of a JSON record: older
	// records read as zero, and no migration is needed.
	From store.BytesFrom `json:"from,omitzero"`
}

// note adds a use's URI and revision to the record's lists.
func (rec *TreeRecord) note(uri, revision string) {
	if !slices.Contains(rec.URIs, uri) {
		rec.URIs = append(rec.URIs, uri)
	}
	if revision != "" && !slices.Contains(rec.Revisions, revision) {
		rec.Revisions = append(rec.Revisions, revision)
	}
}

// DB is the state database.
type DB struct {
	db *bolt.DB
	// reads and writes count transactions, for the per-call costs that
	// benchmarks and tests report.
	reads, writes atomic.Int64
}

// Transactions returns how many read and write transactions the database
// has run since it was opened.
func (d *DB) Transactions() (reads, writes int64) { return d.reads.Load(), d.writes.Load() }

func (d *DB) view(fn func(*bolt.Tx) error) error {
	d.reads.Add(1)
	return d.db.View(fn)
}

func (d *DB) update(fn func(*bolt.Tx) error) error {
	d.writes.Add(1)
	return d.db.Update(fn)
}

// Open opens (creating if needed) the database file at path.
func Open(path string) (*DB, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("state database %s is locked: is another modelcache-csi running on this cache directory? %w", path, err)
		}
		return nil, fmt.Errorf("opening state database %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketKeys, bucketSources, bucketTrees, bucketRefs, bucketUsers, bucketObjects, bucketVolumes, bucketPins, bucketDoomed, bucketMeta, bucketTreeKeys, bucketTreeSources} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return migrate(tx)
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising state database %s: %w", path, err)
	}
	return &DB{db: db}, nil
}

// SchemaVersion is the layout of the buckets and records this package
// writes. Databases written before the version key existed are version 1.
const SchemaVersion = 4

// ErrNewerSchema means the database was written by a newer modelcache.
var ErrNewerSchema = errors.New("state database is newer than this modelcache-csi")

// migrations[n] moves a database from version n to n+1, in the opening
// transaction: a crash in the middle leaves the old version.
var migrations = map[int]func(tx *bolt.Tx) error{
	// 1 → 2: the version key itself; records are unchanged.
	1: func(*bolt.Tx) error { return nil },
	// 2 → 3: the tree-refs index, built from the references.
	2: func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRefs).ForEach(func(k, v []byte) error {
			var r Ref
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decoding reference %q: %w", k, err)
			}
			return tx.Bucket(bucketUsers).Put(userKey(r.Tree, r.TargetPath), nil)
		})
	},
	// 3 → 4: the tree-keys and tree-sources indexes, built from the
	// content keys and sources.
	3: indexLeads,
}

// userKey is a tree-refs key: the tree's references sort together.
func userKey(tree, target string) []byte { return []byte(tree + "\x00" + target) }

// users returns the target paths that reference tree, from the index.
func users(tx *bolt.Tx, tree string) []string {
	prefix := []byte(tree + "\x00")
	var out []string
	c := tx.Bucket(bucketUsers).Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		out = append(out, string(k[len(prefix):]))
	}
	return out
}

// putRef records a reference and its index entry, replacing what was
// recorded for the same target.
func putRef(tx *bolt.Tx, r Ref) error {
	var old Ref
	if ok, err := get(tx, bucketRefs, r.TargetPath, &old); err != nil {
		return err
	} else if ok {
		if err := tx.Bucket(bucketUsers).Delete(userKey(old.Tree, old.TargetPath)); err != nil {
			return err
		}
	}
	if err := put(tx, bucketRefs, r.TargetPath, r); err != nil {
		return err
	}
	return tx.Bucket(bucketUsers).Put(userKey(r.Tree, r.TargetPath), nil)
}

// deleteRef forgets a target's reference and its index entry, returning it.
func deleteRef(tx *bolt.Tx, target string) (Ref, bool, error) {
	var r Ref
	ok, err := get(tx, bucketRefs, target, &r)
	if err != nil || !ok {
		return r, ok, err
	}
	if err := tx.Bucket(bucketUsers).Delete(userKey(r.Tree, target)); err != nil {
		return r, ok, err
	}
	return r, ok, tx.Bucket(bucketRefs).Delete([]byte(target))
}

// migrate brings the database to SchemaVersion, or refuses a newer one.
func migrate(tx *bolt.Tx) error {
	v := 1
	if raw := tx.Bucket(bucketMeta).Get(keySchema); raw != nil {
		if _, err := fmt.Sscanf(string(raw), "%d", &v); err != nil {
			return fmt.Errorf("reading schema version %q: %w", raw, err)
		}
	}
	if v > SchemaVersion {
		return fmt.Errorf("%w: it has schema version %d and this version understands up to %d; run a modelcache-csi at least as new as the one that wrote it, or move the cache directory aside to start an empty cache", ErrNewerSchema, v, SchemaVersion)
	}
	for ; v < SchemaVersion; v++ {
		if err := migrations[v](tx); err != nil {
			return fmt.Errorf("migrating state database from schema version %d to %d: %w", v, v+1, err)
		}
	}
	return tx.Bucket(bucketMeta).Put(keySchema, fmt.Appendf(nil, "%d", SchemaVersion))
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

// NodeKey returns the node-local key used to fingerprint credentials,
// creating it on first use.
func (d *DB) NodeKey() ([]byte, error) {
	var key []byte
	err := d.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		if v := b.Get(keyNodeKey); len(v) == 32 {
			key = append([]byte(nil), v...)
			return nil
		}
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return err
		}
		return b.Put(keyNodeKey, key)
	})
	if err != nil {
		return nil, fmt.Errorf("reading node key: %w", err)
	}
	return key, nil
}

// TreeForKey implements store.Index.
func (d *DB) TreeForKey(key string) (store.Tree, bool, error) {
	var t store.Tree
	ok, err := d.get(bucketKeys, key, &t)
	return t, ok, err
}

// LookupObjects implements store.ObjectIndex: the tree of a content key,
// or else the blobs recorded for the objects, in one read.
func (d *DB) LookupObjects(key string, objects []string) (store.Tree, bool, map[string]string, error) {
	var t store.Tree
	var ok bool
	blobs := map[string]string{}
	err := d.view(func(tx *bolt.Tx) error {
		var err error
		if ok, err = get(tx, bucketKeys, key, &t); err != nil || ok {
			return err
		}
		b := tx.Bucket(bucketObjects)
		for _, k := range objects {
			if k == "" {
				continue
			}
			if v := b.Get([]byte(k)); v != nil {
				blobs[k] = string(v)
			}
		}
		return nil
	})
	return t, ok, blobs, err
}

// RecordTreeObjects implements store.ObjectIndex: RecordTree, what each
// object's bytes became and where they came from, in one transaction.
// Bytes from another download of the same tree (another content key with
// the same files, a repair) add to what is recorded.
func (d *DB) RecordTreeObjects(key string, t store.Tree, blobs map[string]string, from store.BytesFrom) error {
	return d.update(func(tx *bolt.Tx) error {
		for k, v := range blobs {
			if err := tx.Bucket(bucketObjects).Put([]byte(k), []byte(v)); err != nil {
				return err
			}
		}
		return recordTree(tx, key, t, from)
	})
}

// RecordObject implements store.ObjectIndex.
func (d *DB) RecordObject(object, blob string) error {
	return d.update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketObjects).Put([]byte(object), []byte(blob))
	})
}

// PruneObjects forgets the objects whose blob keep says is gone (removed
// by an eviction or quarantined), and returns how many it forgot. Such an
// entry is never used meanwhile: the store links the blob, and a blob that
// is not there is downloaded again.
func (d *DB) PruneObjects(keep func(blob string) bool) (int, error) {
	// Read first: most starts have nothing to forget, and need no write
	// (and no fsync) for it.
	var gone [][]byte
	err := d.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketObjects).ForEach(func(k, v []byte) error {
			if !keep(string(v)) {
				gone = append(gone, bytes.Clone(k))
			}
			return nil
		})
	})
	if err != nil || len(gone) == 0 {
		return 0, err
	}
	n := 0
	err = d.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketObjects)
		n = 0
		for _, k := range gone {
			// Recorded again meanwhile by a download: keep that.
			if v := b.Get(k); v != nil && !keep(string(v)) {
				if err := b.Delete(k); err != nil {
					return err
				}
				n++
			}
		}
		return nil
	})
	return n, err
}

// RecordTree implements store.Index.
func (d *DB) RecordTree(key string, t store.Tree) error {
	return d.update(func(tx *bolt.Tx) error { return recordTree(tx, key, t, store.BytesFrom{}) })
}

func recordTree(tx *bolt.Tx, key string, t store.Tree, from store.BytesFrom) error {
	if err := putKey(tx, key, t); err != nil {
		return err
	}
	var rec TreeRecord
	if _, err := get(tx, bucketTrees, t.Digest, &rec); err != nil {
		return err
	}
	rec.Tree = t
	if !from.IsZero() {
		rec.From = rec.From.Add(from)
	}
	if rec.LastUsed.IsZero() {
		rec.LastUsed = time.Now()
	}
	return put(tx, bucketTrees, t.Digest, rec)
}

// SourceTree returns the tree a source key last resolved to.
func (d *DB) SourceTree(sourceKey string) (Source, bool, error) {
	var s Source
	ok, err := d.get(bucketSources, sourceKey, &s)
	return s, ok, err
}

// Tree returns what is known about a tree.
func (d *DB) Tree(digest string) (TreeRecord, bool, error) {
	var rec TreeRecord
	ok, err := d.get(bucketTrees, digest, &rec)
	return rec, ok, err
}

// AddRef records a publish in one transaction: the reference, the tree the
// source resolved to, and the tree's last use.
func (d *DB) AddRef(r Ref, sourceKey string) error {
	return d.update(func(tx *bolt.Tx) error {
		if err := putRef(tx, r); err != nil {
			return err
		}
		if sourceKey != "" {
			if err := putSource(tx, sourceKey, Source{Tree: r.Tree, URI: r.URI, Revision: r.Revision, Checked: r.Published}); err != nil {
				return err
			}
		}
		var rec TreeRecord
		if _, err := get(tx, bucketTrees, r.Tree, &rec); err != nil {
			return err
		}
		rec.Digest = r.Tree
		rec.LastUsed = r.Published
		rec.note(r.URI, r.Revision)
		return put(tx, bucketTrees, r.Tree, rec)
	})
}

// Ref returns the reference for a target path.
func (d *DB) Ref(targetPath string) (Ref, bool, error) {
	var r Ref
	ok, err := d.get(bucketRefs, targetPath, &r)
	return r, ok, err
}

// DeleteRef forgets a target path; forgetting an unknown one is not an error.
func (d *DB) DeleteRef(targetPath string) error {
	return d.update(func(tx *bolt.Tx) error {
		_, _, err := deleteRef(tx, targetPath)
		return err
	})
}

// Touch records a use of a tree at the given time, if the tree is recorded.
func (d *DB) Touch(digest string, at time.Time) error {
	return d.update(func(tx *bolt.Tx) error {
		var rec TreeRecord
		ok, err := get(tx, bucketTrees, digest, &rec)
		if err != nil || !ok || !at.After(rec.LastUsed) {
			return err
		}
		rec.LastUsed = at
		return put(tx, bucketTrees, digest, rec)
	})
}

// Refs returns every reference.
func (d *DB) Refs() ([]Ref, error) {
	var refs []Ref
	err := d.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRefs).ForEach(func(k, v []byte) error {
			var r Ref
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decoding reference %q: %w", k, err)
			}
			refs = append(refs, r)
			return nil
		})
	})
	return refs, err
}

func (d *DB) get(bucket []byte, key string, v any) (bool, error) {
	var ok bool
	err := d.view(func(tx *bolt.Tx) error {
		var err error
		ok, err = get(tx, bucket, key, v)
		return err
	})
	return ok, err
}

func get(tx *bolt.Tx, bucket []byte, key string, v any) (bool, error) {
	raw := tx.Bucket(bucket).Get([]byte(key))
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return false, fmt.Errorf("decoding %s/%s: %w", bucket, key, err)
	}
	return true, nil
}

func put(tx *bolt.Tx, bucket []byte, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return tx.Bucket(bucket).Put([]byte(key), raw)
}

// Volume records a volume the controller created: enough to answer a
// repeated CreateVolume with the same volume, or ALREADY_EXISTS when the
// repeat asks for something else. It holds no secret.
type Volume struct {
	ID       string            `json:"id"`
	Name     string            `json:"name"`
	SpecHash string            `json:"specHash"` // digest of the model reference
	Capacity int64             `json:"capacity"` // bytes reported to the CO; 0 is unknown
	Context  map[string]string `json:"context"`  // volume_context handed to the node
	Created  time.Time         `json:"created"`
}

// Volume returns the controller's record of a volume ID.
func (d *DB) Volume(id string) (Volume, bool, error) {
	var v Volume
	ok, err := d.get(bucketVolumes, id, &v)
	return v, ok, err
}

// PutVolume records a created volume.
func (d *DB) PutVolume(v Volume) error {
	return d.update(func(tx *bolt.Tx) error {
		return put(tx, bucketVolumes, v.ID, v)
	})
}

// DeleteVolume forgets a volume; forgetting an unknown one is not an error.
func (d *DB) DeleteVolume(id string) error {
	return d.update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketVolumes).Delete([]byte(id))
	})
}
