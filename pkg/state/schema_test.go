package state_test

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	bolt "go.etcd.io/bbolt"
)

// schemaOf reads the version key straight from the file.
func schemaOf(t *testing.T, path string) string {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v string
	_ = db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket([]byte("meta")); b != nil {
			v = string(b.Get([]byte("schema-version")))
		}
		return nil
	})
	return v
}

func setSchema(t *testing.T, path, v string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("meta"))
		if v == "" {
			return b.Delete([]byte("schema-version"))
		}
		return b.Put([]byte("schema-version"), []byte(v))
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestSchema_NewDatabaseIsCurrent(t *testing.T) {
	path := dbPath(t)
	db := openDB(t, path)
	db.Close()
	if got, want := schemaOf(t, path), fmt.Sprint(state.SchemaVersion); got != want {
		t.Fatalf("schema version of a new database = %q, want %q", got, want)
	}
}

// A database written before the version key existed (version 1) is
// migrated on open, its records intact.
func TestSchema_UnversionedDatabaseMigrated(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	tree := store.Tree{Digest: treeA, Size: 42, Files: 3}
	if err := db.RecordTree("key-a", tree); err != nil {
		t.Fatal(err)
	}
	db.Close()
	setSchema(t, path, "")

	db = openDB(t, path)
	got, ok, err := db.TreeForKey("key-a")
	if err != nil || !ok || got != tree {
		t.Fatalf("after migration TreeForKey = %+v, %v, %v; want %+v", got, ok, err, tree)
	}
	db.Close()
	if v := schemaOf(t, path); v != fmt.Sprint(state.SchemaVersion) {
		t.Fatalf("schema version after migration = %q, want %d", v, state.SchemaVersion)
	}
}

// Version 3 indexes references by tree; a version 2 database gets the
// index built from its references when it is opened.
func TestSchema_Version2GetsTheTreeRefsIndex(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.AddRef(state.Ref{VolumeID: "v", TargetPath: "/t/a", Tree: treeA, URI: "mys3:m"}, ""); err != nil {
		t.Fatal(err)
	}
	db.Close()
	raw, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = raw.Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket([]byte("tree-refs")); err != nil {
			return err
		}
		return tx.Bucket([]byte("meta")).Put([]byte("schema-version"), []byte("2"))
	})
	raw.Close()
	if err != nil {
		t.Fatal(err)
	}
	db = openDB(t, path)
	if used, err := db.Referenced(treeA); err != nil || !used {
		t.Fatalf("Referenced after migrating a version 2 database = %v, %v; want true", used, err)
	}
	if c, ok, err := db.CachedTree(treeA); err != nil || !ok || len(c.Refs) != 1 {
		t.Fatalf("CachedTree after migration = %+v, %v, %v; want its one reference", c, ok, err)
	}
}

// A database from a newer modelcache is refused with a message that says
// what to do, and is left as it was.
func TestSchema_NewerDatabaseRefused(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	setSchema(t, path, "9")
	_, err = state.Open(path)
	if !errors.Is(err, state.ErrNewerSchema) {
		t.Fatalf("Open of a version 9 database: %v, want ErrNewerSchema", err)
	}
	for _, want := range []string{filepath.Base(path), "version 9", "at least as new", "move the cache directory aside"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message %q does not say %q", err, want)
		}
	}
	if v := schemaOf(t, path); v != "9" {
		t.Fatalf("refused database's version changed to %q", v)
	}
}
