package state

import (
	"encoding/json"
	"fmt"

	"github.com/modelcache/modelcache/pkg/store"
	bolt "go.etcd.io/bbolt"
)

// LookupObject returns the blob recorded for one object key
// (source.ObjectKey), in one read, for a peer asking which blob holds an
// object (pkg/peer's Objects). ok is false when none is recorded. The blob
// may have gone since (evicted, quarantined): the caller checks.
func (d *DB) LookupObject(key string) (blob string, ok bool, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketObjects).Get([]byte(key)); v != nil {
			blob, ok = string(v), true
		}
		return nil
	})
	return blob, ok, err
}

// HeldContentKeys returns every content key whose tree this node holds
// and does not mean to remove (not doomed): what the peers' Leases should
// list this node as holding. One read, which a node plugin makes at
// start-up.
func (d *DB) HeldContentKeys() ([]string, error) {
	var keys []string
	err := d.view(func(tx *bolt.Tx) error {
		trees, doomed := tx.Bucket(bucketTrees), tx.Bucket(bucketDoomed)
		return tx.Bucket(bucketKeys).ForEach(func(k, v []byte) error {
			var t store.Tree
			if err := json.Unmarshal(v, &t); err != nil {
				return fmt.Errorf("decoding content key %q: %w", k, err)
			}
			if trees.Get([]byte(t.Digest)) != nil && doomed.Get([]byte(t.Digest)) == nil {
				keys = append(keys, string(k))
			}
			return nil
		})
	})
	return keys, err
}
