package state

import bolt "go.etcd.io/bbolt"

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
