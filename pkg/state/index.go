package state

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/modelcache/modelcache/pkg/store"
	bolt "go.etcd.io/bbolt"
)

// Indexes by tree of what leads to a tree (schema version 4), so that
// forgetting or invalidating one tree reads only its own records. Keys are
// the tree digest, NUL, and the content or source key; values are empty.
var (
	bucketTreeKeys    = []byte("tree-keys")    // tree digest NUL content key
	bucketTreeSources = []byte("tree-sources") // tree digest NUL source key
)

// byTree is an index key: one tree's entries sort together.
func byTree(tree, key string) []byte { return []byte(tree + "\x00" + key) }

// indexed returns the keys an index holds for a tree.
func indexed(tx *bolt.Tx, index []byte, tree string) []string {
	prefix := []byte(tree + "\x00")
	var out []string
	c := tx.Bucket(index).Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		out = append(out, string(k[len(prefix):]))
	}
	return out
}

// ContentKeys are the content keys whose tree is digest: what a removal
// of the tree tells other nodes it no longer holds.
func (d *DB) ContentKeys(digest string) ([]string, error) {
	var keys []string
	err := d.view(func(tx *bolt.Tx) error {
		for _, key := range indexed(tx, bucketTreeKeys, digest) {
			var t store.Tree
			if ok, err := get(tx, bucketKeys, key, &t); err != nil {
				return err
			} else if ok && t.Digest == digest {
				keys = append(keys, key)
			}
		}
		return nil
	})
	return keys, err
}

// putKey records the tree a content key produced and its index entry,
// dropping the entry of the tree it led to before.
func putKey(tx *bolt.Tx, key string, t store.Tree) error {
	var old store.Tree
	if ok, err := get(tx, bucketKeys, key, &old); err != nil {
		return err
	} else if ok && old.Digest != t.Digest {
		if err := tx.Bucket(bucketTreeKeys).Delete(byTree(old.Digest, key)); err != nil {
			return err
		}
	}
	if err := put(tx, bucketKeys, key, t); err != nil {
		return err
	}
	return tx.Bucket(bucketTreeKeys).Put(byTree(t.Digest, key), nil)
}

// putSource records the tree a source resolved to and its index entry,
// dropping the entry of the tree it resolved to before.
func putSource(tx *bolt.Tx, sourceKey string, s Source) error {
	var old Source
	if ok, err := get(tx, bucketSources, sourceKey, &old); err != nil {
		return err
	} else if ok && old.Tree != s.Tree {
		if err := tx.Bucket(bucketTreeSources).Delete(byTree(old.Tree, sourceKey)); err != nil {
			return err
		}
	}
	if err := put(tx, bucketSources, sourceKey, s); err != nil {
		return err
	}
	return tx.Bucket(bucketTreeSources).Put(byTree(s.Tree, sourceKey), nil)
}

// forgetLeads deletes the content keys and sources that lead to a tree,
// found through the indexes.
func forgetLeads(tx *bolt.Tx, digest string) error {
	for _, key := range indexed(tx, bucketTreeKeys, digest) {
		var t store.Tree
		if ok, err := get(tx, bucketKeys, key, &t); err != nil {
			return err
		} else if ok && t.Digest == digest {
			if err := tx.Bucket(bucketKeys).Delete([]byte(key)); err != nil {
				return err
			}
		}
		if err := tx.Bucket(bucketTreeKeys).Delete(byTree(digest, key)); err != nil {
			return err
		}
	}
	for _, key := range indexed(tx, bucketTreeSources, digest) {
		var s Source
		if ok, err := get(tx, bucketSources, key, &s); err != nil {
			return err
		} else if ok && s.Tree == digest {
			if err := tx.Bucket(bucketSources).Delete([]byte(key)); err != nil {
				return err
			}
		}
		if err := tx.Bucket(bucketTreeSources).Delete(byTree(digest, key)); err != nil {
			return err
		}
	}
	return nil
}

// indexLeads builds the tree-keys and tree-sources indexes from the
// records (the migration from schema version 3).
func indexLeads(tx *bolt.Tx) error {
	err := tx.Bucket(bucketKeys).ForEach(func(k, v []byte) error {
		var t store.Tree
		if err := json.Unmarshal(v, &t); err != nil {
			return fmt.Errorf("decoding content key %q: %w", k, err)
		}
		return tx.Bucket(bucketTreeKeys).Put(byTree(t.Digest, string(k)), nil)
	})
	if err != nil {
		return err
	}
	return tx.Bucket(bucketSources).ForEach(func(k, v []byte) error {
		var s Source
		if err := json.Unmarshal(v, &s); err != nil {
			return fmt.Errorf("decoding source %q: %w", k, err)
		}
		return tx.Bucket(bucketTreeSources).Put(byTree(s.Tree, string(k)), nil)
	})
}
