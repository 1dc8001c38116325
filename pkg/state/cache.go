package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
)

// ErrUnknownTree means no tree with that digest is recorded.
var ErrUnknownTree = errors.New("no such tree in the cache")

// CachedTree is what an operator sees of one tree: its record, who uses it
// and whether it is protected or doomed.
type CachedTree struct {
	TreeRecord
	Refs     []Ref     `json:"refs"`
	Pinned   bool      `json:"pinned"`
	PinnedAt time.Time `json:"pinnedAt,omitzero"`
	// Doomed is why the tree goes when its last mount goes ("operator",
	// "drain"), or "".
	Doomed string `json:"doomed,omitempty"`
}

// CachedTrees returns every recorded tree with its references, pins and
// removal marks, least recently used first.
func (d *DB) CachedTrees() ([]CachedTree, error) {
	var out []CachedTree
	err := d.view(func(tx *bolt.Tx) error {
		refs := map[string][]Ref{}
		err := tx.Bucket(bucketRefs).ForEach(func(k, v []byte) error {
			var r Ref
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decoding reference %q: %w", k, err)
			}
			refs[r.Tree] = append(refs[r.Tree], r)
			return nil
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bucketTrees).ForEach(func(k, v []byte) error {
			var c CachedTree
			if err := json.Unmarshal(v, &c.TreeRecord); err != nil {
				return fmt.Errorf("decoding tree %q: %w", k, err)
			}
			c.Refs = refs[string(k)]
			if raw := tx.Bucket(bucketPins).Get(k); raw != nil {
				c.Pinned = true
				_ = c.PinnedAt.UnmarshalText(raw)
			}
			c.Doomed = string(tx.Bucket(bucketDoomed).Get(k))
			out = append(out, c)
			return nil
		})
	})
	slices.SortStableFunc(out, func(a, b CachedTree) int { return a.LastUsed.Compare(b.LastUsed) })
	return out, err
}

// CachedTree returns one tree as CachedTrees does, reading only its own
// records (its references through the tree-refs index).
func (d *DB) CachedTree(digest string) (CachedTree, bool, error) {
	var c CachedTree
	var ok bool
	err := d.view(func(tx *bolt.Tx) error {
		var err error
		if ok, err = get(tx, bucketTrees, digest, &c.TreeRecord); err != nil || !ok {
			return err
		}
		for _, target := range users(tx, digest) {
			var r Ref
			if found, err := get(tx, bucketRefs, target, &r); err != nil {
				return err
			} else if found {
				c.Refs = append(c.Refs, r)
			}
		}
		if raw := tx.Bucket(bucketPins).Get([]byte(digest)); raw != nil {
			c.Pinned = true
			_ = c.PinnedAt.UnmarshalText(raw)
		}
		c.Doomed = string(tx.Bucket(bucketDoomed).Get([]byte(digest)))
		return nil
	})
	return c, ok, err
}

// Referenced reports whether any recorded mount uses the tree.
func (d *DB) Referenced(digest string) (bool, error) {
	var found bool
	err := d.view(func(tx *bolt.Tx) error {
		found = len(users(tx, digest)) > 0
		return nil
	})
	return found, err
}

// Released is what ReleaseRef found.
type Released struct {
	Ref   Ref
	Known bool // a reference was recorded for the target
	// Last: no other reference uses the tree now.
	Last bool
	// Doomed is why the tree goes when its last mount goes, or "".
	Doomed  string
	Drained bool
}

// ReleaseRef forgets a target's reference and counts it as a use of its
// tree at the given time, in one transaction, and says whether that was the
// tree's last reference and whether the tree is to go. Forgetting an
// unknown target is not an error.
func (d *DB) ReleaseRef(target string, at time.Time) (Released, error) {
	var rel Released
	err := d.update(func(tx *bolt.Tx) error {
		var err error
		if rel.Ref, rel.Known, err = deleteRef(tx, target); err != nil || !rel.Known {
			return err
		}
		digest := rel.Ref.Tree
		var rec TreeRecord
		if ok, err := get(tx, bucketTrees, digest, &rec); err != nil {
			return err
		} else if ok && at.After(rec.LastUsed) {
			rec.LastUsed = at
			if err := put(tx, bucketTrees, digest, rec); err != nil {
				return err
			}
		}
		rel.Last = len(users(tx, digest)) == 0
		rel.Doomed = string(tx.Bucket(bucketDoomed).Get([]byte(digest)))
		rel.Drained = tx.Bucket(bucketMeta).Get(keyDrained) != nil
		return nil
	})
	return rel, err
}

// CheckedTree returns, in one read, the source a source key last resolved
// to and that tree's record.
func (d *DB) CheckedTree(sourceKey string) (Source, TreeRecord, bool, error) {
	var src Source
	var rec TreeRecord
	var ok bool
	err := d.view(func(tx *bolt.Tx) error {
		var err error
		if ok, err = get(tx, bucketSources, sourceKey, &src); err != nil || !ok {
			return err
		}
		ok, err = get(tx, bucketTrees, src.Tree, &rec)
		return err
	})
	return src, rec, ok, err
}

// SetPinned pins or unpins a recorded tree; pinned trees are never evicted
// to make room.
func (d *DB) SetPinned(digest string, pinned bool) error {
	return d.update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketTrees).Get([]byte(digest)) == nil {
			return fmt.Errorf("%w: tree %s", ErrUnknownTree, digest)
		}
		if !pinned {
			return tx.Bucket(bucketPins).Delete([]byte(digest))
		}
		if tx.Bucket(bucketPins).Get([]byte(digest)) != nil {
			return nil
		}
		now, _ := time.Now().UTC().MarshalText()
		return tx.Bucket(bucketPins).Put([]byte(digest), now)
	})
}

// Doom marks a tree to be removed when its last mount goes; reason "" clears it.
func (d *DB) Doom(digest, reason string) error {
	return d.update(func(tx *bolt.Tx) error {
		if reason == "" {
			return tx.Bucket(bucketDoomed).Delete([]byte(digest))
		}
		return tx.Bucket(bucketDoomed).Put([]byte(digest), []byte(reason))
	})
}

// Drained reports whether the node is drained: no new downloads start.
func (d *DB) Drained() (bool, error) {
	var on bool
	err := d.view(func(tx *bolt.Tx) error {
		on = tx.Bucket(bucketMeta).Get(keyDrained) != nil
		return nil
	})
	return on, err
}

// SetDrained drains or undrains the node.
func (d *DB) SetDrained(on bool) error {
	return d.update(func(tx *bolt.Tx) error {
		if !on {
			return tx.Bucket(bucketMeta).Delete(keyDrained)
		}
		return tx.Bucket(bucketMeta).Put(keyDrained, []byte("1"))
	})
}

// ForgetTree removes every record of a tree that is gone from the store:
// the tree, the content keys and sources that led to it (found through
// the indexes by tree), its pin and mark.
func (d *DB) ForgetTree(digest string) error {
	return d.update(func(tx *bolt.Tx) error {
		if err := forgetLeads(tx, digest); err != nil {
			return err
		}
		for _, b := range [][]byte{bucketTrees, bucketPins, bucketDoomed} {
			if err := tx.Bucket(b).Delete([]byte(digest)); err != nil {
				return err
			}
		}
		return nil
	})
}

// Invalidate stops a tree from being served to new publishes (its content
// keys and sources are dropped) while keeping its record, so running pods
// stay listed. The next publish of the model downloads and repairs it.
func (d *DB) Invalidate(digest string) error {
	return d.update(func(tx *bolt.Tx) error { return forgetLeads(tx, digest) })
}

// RecordSource remembers that a source resolved to a tree without a mount
// (a prefetch), so the next publish with the same credentials is a hit.
func (d *DB) RecordSource(sourceKey string, src Source) error {
	return d.update(func(tx *bolt.Tx) error {
		if err := putSource(tx, sourceKey, src); err != nil {
			return err
		}
		var rec TreeRecord
		if _, err := get(tx, bucketTrees, src.Tree, &rec); err != nil {
			return err
		}
		rec.Digest = src.Tree
		rec.LastUsed = time.Now()
		rec.note(src.URI, src.Revision)
		return put(tx, bucketTrees, src.Tree, rec)
	})
}
