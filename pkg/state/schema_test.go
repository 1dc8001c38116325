package state_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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

// writeVersion3 writes a database as schema version 3 wrote it: its
// buckets (no tree-keys, no tree-sources) and JSON records, through bbolt
// directly.
func writeVersion3(t *testing.T, path string, keys map[string]store.Tree, sources map[string]state.Source, trees map[string]state.TreeRecord) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	raw, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	err = raw.Update(func(tx *bolt.Tx) error {
		for _, b := range []string{"content-keys", "sources", "trees", "refs", "tree-refs", "objects", "volumes", "pins", "doomed", "meta"} {
			if _, err := tx.CreateBucket([]byte(b)); err != nil {
				return err
			}
		}
		putJSON := func(bucket, k string, v any) error {
			b, err := json.Marshal(v)
			if err != nil {
				return err
			}
			return tx.Bucket([]byte(bucket)).Put([]byte(k), b)
		}
		for k, v := range keys {
			if err := putJSON("content-keys", k, v); err != nil {
				return err
			}
		}
		for k, v := range sources {
			if err := putJSON("sources", k, v); err != nil {
				return err
			}
		}
		for k, v := range trees {
			if err := putJSON("trees", k, v); err != nil {
				return err
			}
		}
		return tx.Bucket([]byte("meta")).Put([]byte("schema-version"), []byte("3"))
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Version 4 indexes content keys and sources by tree; a version 3
// database gets both indexes built when it is opened, and every answer
// about its records is as before. Forgetting or invalidating one tree then
// drops exactly the keys and sources that led to it.
func TestSchema_Version3GetsTheLeadIndexes(t *testing.T) {
	keys := map[string]store.Tree{
		"key-a1": {Digest: treeA, Size: 10, Files: 1},
		"key-a2": {Digest: treeA, Size: 10, Files: 1},
		"key-b":  {Digest: treeB, Size: 20, Files: 2},
	}
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	sources := map[string]state.Source{
		"src-a": {Tree: treeA, URI: "mys3:a", Checked: t0},
		"src-b": {Tree: treeB, URI: "mys3:b", Checked: t0},
	}
	trees := map[string]state.TreeRecord{
		treeA: {Tree: keys["key-a1"], URIs: []string{"mys3:a"}, LastUsed: t0},
		treeB: {Tree: keys["key-b"], URIs: []string{"mys3:b"}, LastUsed: t0},
	}
	tests := []struct {
		name     string
		act      func(db *state.DB) error
		keysLeft []string
		srcsLeft []string
		recsLeft []string
	}{
		{"nothing", func(*state.DB) error { return nil }, []string{"key-a1", "key-a2", "key-b"}, []string{"src-a", "src-b"}, []string{treeA, treeB}},
		{"invalidate a", func(db *state.DB) error { return db.Invalidate(treeA) }, []string{"key-b"}, []string{"src-b"}, []string{treeA, treeB}},
		{"forget a", func(db *state.DB) error { return db.ForgetTree(treeA) }, []string{"key-b"}, []string{"src-b"}, []string{treeB}},
		{"forget b", func(db *state.DB) error { return db.ForgetTree(treeB) }, []string{"key-a1", "key-a2"}, []string{"src-a"}, []string{treeA}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := dbPath(t)
			writeVersion3(t, path, keys, sources, trees)
			db := openDB(t, path)
			if err := tt.act(db); err != nil {
				t.Fatal(err)
			}
			for k, want := range keys {
				got, ok, err := db.TreeForKey(k)
				if wantOK := slices.Contains(tt.keysLeft, k); err != nil || ok != wantOK || (ok && got != want) {
					t.Errorf("TreeForKey(%s) = %+v, %v, %v; want %+v, %v", k, got, ok, err, want, wantOK)
				}
			}
			for k, want := range sources {
				got, ok, err := db.SourceTree(k)
				if wantOK := slices.Contains(tt.srcsLeft, k); err != nil || ok != wantOK || (ok && (got.Tree != want.Tree || got.URI != want.URI || !got.Checked.Equal(want.Checked))) {
					t.Errorf("SourceTree(%s) = %+v, %v, %v; want %+v, %v", k, got, ok, err, want, wantOK)
				}
				if !slices.Contains(tt.srcsLeft, k) {
					continue
				}
				if src, rec, ok, err := db.CheckedTree(k); err != nil || !ok || src.Tree != want.Tree || rec.Digest != want.Tree || rec.Size != trees[want.Tree].Size {
					t.Errorf("CheckedTree(%s) = %+v, %+v, %v, %v", k, src, rec, ok, err)
				}
			}
			for d := range trees {
				_, ok, err := db.Tree(d)
				if want := slices.Contains(tt.recsLeft, d); err != nil || ok != want {
					t.Errorf("Tree(%s) found %v (%v), want %v", d, ok, err, want)
				}
			}
			db.Close()
			if v := schemaOf(t, path); v != fmt.Sprint(state.SchemaVersion) {
				t.Errorf("schema version after migration = %q, want %d", v, state.SchemaVersion)
			}
		})
	}
}

// A content key or source recorded again for another tree leaves the
// first tree's index: forgetting the first tree keeps it.
func TestForgetTreeKeepsLeadsMovedToAnotherTree(t *testing.T) {
	db := openDB(t, dbPath(t))
	steps := []func() error{
		func() error { return db.RecordTree("k", store.Tree{Digest: treeA}) },
		func() error {
			return db.AddRef(state.Ref{VolumeID: "v", TargetPath: "/t", Tree: treeA, URI: "u"}, "src")
		},
		func() error { return db.RecordTree("k", store.Tree{Digest: treeB}) },
		func() error { return db.RecordSource("src", state.Source{Tree: treeB, URI: "u"}) },
		func() error { return db.ForgetTree(treeA) },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if got, ok, err := db.TreeForKey("k"); err != nil || !ok || got.Digest != treeB {
		t.Errorf("TreeForKey after forgetting the tree it led to before = %+v, %v, %v; want %s", got, ok, err, treeB)
	}
	if got, ok, err := db.SourceTree("src"); err != nil || !ok || got.Tree != treeB {
		t.Errorf("SourceTree after forgetting the tree it led to before = %+v, %v, %v; want %s", got, ok, err, treeB)
	}
	if err := db.ForgetTree(treeB); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := db.TreeForKey("k"); ok {
		t.Error("the content key outlived the tree it leads to")
	}
	if _, ok, _ := db.SourceTree("src"); ok {
		t.Error("the source outlived the tree it leads to")
	}
}
