package state_test

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	bolt "go.etcd.io/bbolt"
)

// Where a tree's bytes came from is recorded with the tree, adds up over
// the downloads of one tree, stays bounded, and survives the record's
// other writers (a publish, a use).
func TestRecordTreeObjects_From(t *testing.T) {
	tree := store.Tree{Digest: treeA, Size: 100, Files: 2}
	nodes := func(n int) (b store.BytesFrom) {
		for i := range n {
			b.Nodes = append(b.Nodes, store.NodeBytes{Node: fmt.Sprintf("node-%02d", i), Bytes: int64(100 - i)})
			b.Peers += int64(100 - i)
		}
		return b
	}
	for _, tt := range []struct {
		name  string
		write func(db *state.DB) error
		want  store.BytesFrom
	}{
		{name: "origin only", want: store.BytesFrom{Origin: 100},
			write: func(db *state.DB) error {
				return db.RecordTreeObjects("k", tree, nil, store.BytesFrom{Origin: 100})
			}},
		{name: "peers and the origin",
			want: store.BytesFrom{Origin: 40, Peers: 60, Nodes: []store.NodeBytes{{Node: "node-a", Bytes: 60}}},
			write: func(db *state.DB) error {
				return db.RecordTreeObjects("k", tree, nil, store.BytesFrom{Origin: 40, Peers: 60, Nodes: []store.NodeBytes{{Node: "node-a", Bytes: 60}}})
			}},
		{name: "a second download of the tree adds to the first",
			want: store.BytesFrom{Origin: 10, Peers: 150, Nodes: []store.NodeBytes{{Node: "node-b", Bytes: 90}, {Node: "node-a", Bytes: 60}}},
			write: func(db *state.DB) error {
				if err := db.RecordTreeObjects("k1", tree, nil, store.BytesFrom{Peers: 60, Nodes: []store.NodeBytes{{Node: "node-a", Bytes: 60}}}); err != nil {
					return err
				}
				return db.RecordTreeObjects("k2", tree, nil, store.BytesFrom{Origin: 10, Peers: 90, Nodes: []store.NodeBytes{{Node: "node-b", Bytes: 90}}})
			}},
		{name: "a download that read nothing keeps what was recorded", want: store.BytesFrom{Origin: 100},
			write: func(db *state.DB) error {
				if err := db.RecordTreeObjects("k1", tree, nil, store.BytesFrom{Origin: 100}); err != nil {
					return err
				}
				return db.RecordTreeObjects("k2", tree, map[string]string{"o": "b"}, store.BytesFrom{})
			}},
		{name: "at most MaxFromNodes named, every byte counted",
			want: func() store.BytesFrom {
				b := nodes(store.MaxFromNodes + 4)
				b.Nodes = b.Nodes[:store.MaxFromNodes]
				return b
			}(),
			write: func(db *state.DB) error {
				return db.RecordTreeObjects("k", tree, nil, store.BytesFrom{}.Add(nodes(store.MaxFromNodes+4)))
			}},
		{name: "a publish and a use keep it", want: store.BytesFrom{Origin: 100},
			write: func(db *state.DB) error {
				if err := db.RecordTreeObjects("k", tree, nil, store.BytesFrom{Origin: 100}); err != nil {
					return err
				}
				if err := db.AddRef(state.Ref{VolumeID: "v", TargetPath: "/t/a", Tree: treeA, URI: "mys3:m", Published: time.Now()}, "src"); err != nil {
					return err
				}
				return db.Touch(treeA, time.Now().Add(time.Minute))
			}},
		{name: "RecordTree records none", want: store.BytesFrom{},
			write: func(db *state.DB) error { return db.RecordTree("k", tree) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			db := openDB(t, dbPath(t))
			if err := tt.write(db); err != nil {
				t.Fatal(err)
			}
			rec, ok, err := db.Tree(treeA)
			if err != nil || !ok {
				t.Fatalf("Tree = %v, %v", ok, err)
			}
			if !reflect.DeepEqual(rec.From, tt.want) {
				t.Errorf("recorded From = %+v\nwant %+v", rec.From, tt.want)
			}
			c, _, err := db.CachedTree(treeA)
			if err != nil || !reflect.DeepEqual(c.From, tt.want) {
				t.Errorf("CachedTree From = %+v, %v", c.From, err)
			}
			all, err := db.CachedTrees()
			if err != nil || len(all) != 1 || !reflect.DeepEqual(all[0].From, tt.want) {
				t.Errorf("CachedTrees = %+v, %v", all, err)
			}
		})
	}
}

// A tree record as schema version 4 wrote it, before From existed, reads
// as "nothing recorded" and takes the next download's counts: the new
// field needed no migration.
func TestSchema_Version4TreeRecordWithoutFrom(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	raw, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = raw.Update(func(tx *bolt.Tx) error {
		v4 := `{"digest":"` + treeA + `","size":42,"files":3,"uris":["mys3:m"],"lastUsed":"2025-01-02T03:04:05Z"}`
		if err := tx.Bucket([]byte("trees")).Put([]byte(treeA), []byte(v4)); err != nil {
			return err
		}
		return tx.Bucket([]byte("meta")).Put([]byte("schema-version"), []byte("4"))
	})
	raw.Close()
	if err != nil {
		t.Fatal(err)
	}

	db = openDB(t, path)
	rec, ok, err := db.Tree(treeA)
	if err != nil || !ok {
		t.Fatalf("Tree = %v, %v", ok, err)
	}
	want := state.TreeRecord{Tree: store.Tree{Digest: treeA, Size: 42, Files: 3}, URIs: []string{"mys3:m"}, LastUsed: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
	if !reflect.DeepEqual(rec, want) {
		t.Fatalf("version 4 record reads as %+v\nwant %+v", rec, want)
	}
	from := store.BytesFrom{Origin: 2, Peers: 40, Nodes: []store.NodeBytes{{Node: "node-a", Bytes: 40}}}
	if err := db.RecordTreeObjects("k", rec.Tree, nil, from); err != nil {
		t.Fatal(err)
	}
	if rec, _, _ = db.Tree(treeA); !reflect.DeepEqual(rec.From, from) || !reflect.DeepEqual(rec.URIs, want.URIs) {
		t.Fatalf("after a download: %+v", rec)
	}
	db.Close()
	if v := schemaOf(t, path); v != fmt.Sprint(state.SchemaVersion) {
		t.Fatalf("schema version %q, want %d", v, state.SchemaVersion)
	}
}
