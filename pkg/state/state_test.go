package state_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	bolt "go.etcd.io/bbolt"
)

// The state database is the store's index.
var _ store.Index = (*state.DB)(nil)

const (
	treeA = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	treeB = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

func openDB(t *testing.T, path string) *state.DB {
	t.Helper()
	db, err := state.Open(path)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func dbPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "state", "modelcache.db")
}

// readBolt opens a closed database file read-only and calls fn on it.
func readBolt(t *testing.T, path string, fn func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("opening %s read-only: %v", path, err)
	}
	defer db.Close()
	if err := db.View(fn); err != nil {
		t.Fatal(err)
	}
}

func TestOpenCreatesFileAndBuckets(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("database file not created: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("database file mode %v, want 0600", fi.Mode().Perm())
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm()&0o077 != 0 {
		t.Errorf("state directory mode %v; must not be open to other users", di.Mode().Perm())
	}
	// Bucket names are the on-disk format; renaming one loses every node's state.
	readBolt(t, path, func(tx *bolt.Tx) error {
		for _, b := range []string{"content-keys", "sources", "trees", "refs", "meta"} {
			if tx.Bucket([]byte(b)) == nil {
				t.Errorf("bucket %q not created", b)
			}
		}
		return nil
	})
}

func TestOpenFailsOnBadPath(t *testing.T) {
	dir := t.TempDir()
	notDir := filepath.Join(dir, "file")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage.db")
	if err := os.WriteFile(garbage, bytes.Repeat([]byte("not bolt "), 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, path string }{
		{"parent is a file", filepath.Join(notDir, "state.db")},
		{"path is a directory", dir},
		{"not a database", garbage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			db, err := state.Open(tt.path)
			if err == nil {
				db.Close()
				t.Fatalf("Open(%s) succeeded", tt.path)
			}
		})
	}
}

// A second plugin on the same cache directory must not share the database;
// the error says what is probably wrong.
func TestOpenLockedByAnotherProcess(t *testing.T) {
	path := dbPath(t)
	first := openDB(t, path)
	start := time.Now()
	second, err := state.Open(path)
	if err == nil {
		second.Close()
		t.Fatal("second Open of a database in use succeeded")
	}
	if !errors.Is(err, bolt.ErrTimeout) {
		t.Errorf("err = %v, want it to wrap bolt.ErrTimeout", err)
	}
	for _, want := range []string{"another modelcache-csi", path} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("waited %v for the lock", took)
	}
	// The first handle is unaffected.
	if err := first.RecordTree("k", store.Tree{Digest: treeA}); err != nil {
		t.Errorf("first handle after a refused second Open: %v", err)
	}
}

func TestNodeKey(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	k1, err := db.NodeKey()
	if err != nil {
		t.Fatal(err)
	}
	if len(k1) != 32 {
		t.Fatalf("node key has %d bytes, want 32", len(k1))
	}
	if bytes.Equal(k1, make([]byte, 32)) {
		t.Fatal("node key is all zeros")
	}
	k2, err := db.NodeKey()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k1, k2) {
		t.Error("node key changed between calls")
	}
	// The caller's copy is its own.
	k2[0] ^= 0xff
	if k3, _ := db.NodeKey(); !bytes.Equal(k1, k3) {
		t.Error("modifying a returned key changed the stored one")
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db = openDB(t, path)
	k4, err := db.NodeKey()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k1, k4) {
		t.Error("node key changed across Close/Open; every credential fingerprint would be invalidated")
	}

	other := openDB(t, dbPath(t))
	k5, err := other.NodeKey()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(k1, k5) {
		t.Error("two nodes' databases got the same key; it must be random")
	}
}

func TestRecordTreeAndTreeForKey(t *testing.T) {
	db := openDB(t, dbPath(t))

	if _, ok, err := db.TreeForKey("unknown"); ok || err != nil {
		t.Errorf("TreeForKey(unknown) = ok %v, err %v; want false, nil", ok, err)
	}
	if _, ok, err := db.Tree(treeA); ok || err != nil {
		t.Errorf("Tree(unknown) = ok %v, err %v; want false, nil", ok, err)
	}

	ta := store.Tree{Digest: treeA, Size: 1 << 40, Files: 7}
	tb := store.Tree{Digest: treeB, Size: 0, Files: 0}
	before := time.Now()
	tests := []struct {
		key  string
		tree store.Tree
	}{
		{"sha256:key-1", ta},
		{"sha256:key-2", ta}, // another source, same content
		{"sha256:key-3", tb},
	}
	for _, tt := range tests {
		if err := db.RecordTree(tt.key, tt.tree); err != nil {
			t.Fatalf("RecordTree(%s): %v", tt.key, err)
		}
	}
	after := time.Now()
	for _, tt := range tests {
		got, ok, err := db.TreeForKey(tt.key)
		if err != nil || !ok || got != tt.tree {
			t.Errorf("TreeForKey(%s) = %+v, %v, %v; want %+v", tt.key, got, ok, err, tt.tree)
		}
	}
	rec, ok, err := db.Tree(treeA)
	if err != nil || !ok {
		t.Fatalf("Tree(%s) = %v, %v", treeA, ok, err)
	}
	if rec.Tree != ta {
		t.Errorf("tree record = %+v, want %+v", rec.Tree, ta)
	}
	if rec.LastUsed.Before(before.Truncate(time.Second)) || rec.LastUsed.After(after.Add(time.Second)) {
		t.Errorf("LastUsed = %v, want between %v and %v", rec.LastUsed, before, after)
	}
	if len(rec.URIs) != 0 {
		t.Errorf("RecordTree invented URIs %v", rec.URIs)
	}

	// Re-recording moves the key to a new tree.
	if err := db.RecordTree("sha256:key-1", tb); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := db.TreeForKey("sha256:key-1"); got != tb {
		t.Errorf("TreeForKey after re-record = %+v, want %+v", got, tb)
	}
}

func TestAddRef(t *testing.T) {
	db := openDB(t, dbPath(t))
	t0 := time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.UTC)

	first := state.Ref{
		VolumeID:   "csi-3f1c",
		TargetPath: "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/models/mount",
		Tree:       treeA,
		ArgsHash:   "sha256:args-1",
		URI:        "mys3:models/bert",
		PodName:    "bert-0",
		PodNS:      "serving",
		PodUID:     "uid-1",
		Published:  t0,
	}
	if err := db.AddRef(first, "src-1"); err != nil {
		t.Fatal(err)
	}
	got, ok, err := db.Ref(first.TargetPath)
	if err != nil || !ok {
		t.Fatalf("Ref = %v, %v", ok, err)
	}
	if !reflect.DeepEqual(got, first) {
		t.Errorf("Ref round trip:\n got %+v\nwant %+v", got, first)
	}
	if src, ok, err := db.SourceTree("src-1"); err != nil || !ok || !reflect.DeepEqual(src, state.Source{Tree: treeA, URI: first.URI, Checked: first.Published}) {
		t.Errorf("SourceTree = %+v, %v, %v", src, ok, err)
	}
	rec, ok, err := db.Tree(treeA)
	if err != nil || !ok {
		t.Fatalf("Tree = %v, %v", ok, err)
	}
	if rec.Digest != treeA || !slices.Equal(rec.URIs, []string{first.URI}) || !rec.LastUsed.Equal(t0) {
		t.Errorf("tree record = %+v; want digest %s, URIs [%s], LastUsed %v", rec, treeA, first.URI, t0)
	}

	// Same URI published again elsewhere, later: URI kept once, LastUsed moves.
	t1 := t0.Add(time.Hour)
	second := first
	second.VolumeID, second.TargetPath, second.PodUID, second.Published = "csi-77aa", "/var/lib/kubelet/pods/uid-2/mount", "uid-2", t1
	if err := db.AddRef(second, "src-1"); err != nil {
		t.Fatal(err)
	}
	// Another URI with the same content, without a source key.
	t2 := t1.Add(time.Minute)
	third := state.Ref{VolumeID: "pv-1", TargetPath: "/t/3", Tree: treeA, ArgsHash: "h3", URI: "s3://bucket/bert", Published: t2}
	if err := db.AddRef(third, ""); err != nil {
		t.Fatal(err)
	}
	rec, _, _ = db.Tree(treeA)
	if want := []string{"mys3:models/bert", "s3://bucket/bert"}; !slices.Equal(rec.URIs, want) {
		t.Errorf("URIs = %v, want %v (each once, in first-use order)", rec.URIs, want)
	}
	if !rec.LastUsed.Equal(t2) {
		t.Errorf("LastUsed = %v, want %v", rec.LastUsed, t2)
	}
	if _, ok, _ := db.SourceTree(""); ok {
		t.Error("an empty source key was recorded")
	}

	// A source re-resolving to new content points at the new tree.
	moved := state.Ref{VolumeID: "csi-9", TargetPath: "/t/4", Tree: treeB, URI: "mys3:models/bert", Published: t2}
	if err := db.AddRef(moved, "src-1"); err != nil {
		t.Fatal(err)
	}
	if src, _, _ := db.SourceTree("src-1"); src.Tree != treeB {
		t.Errorf("SourceTree after re-resolve = %+v, want tree %s", src, treeB)
	}

	refs, err := db.Refs()
	if err != nil {
		t.Fatal(err)
	}
	byTarget := map[string]state.Ref{}
	for _, r := range refs {
		byTarget[r.TargetPath] = r
	}
	want := []state.Ref{first, second, third, moved}
	if len(refs) != len(want) {
		t.Errorf("Refs returned %d references, want %d", len(refs), len(want))
	}
	for _, w := range want {
		if !reflect.DeepEqual(byTarget[w.TargetPath], w) {
			t.Errorf("Refs[%s] = %+v, want %+v", w.TargetPath, byTarget[w.TargetPath], w)
		}
	}

	// Publishing the same target again replaces its reference.
	replaced := third
	replaced.Tree, replaced.ArgsHash = treeB, "h3b"
	if err := db.AddRef(replaced, ""); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := db.Ref(third.TargetPath); !reflect.DeepEqual(got, replaced) {
		t.Errorf("Ref after re-publish = %+v, want %+v", got, replaced)
	}
	if refs, _ := db.Refs(); len(refs) != len(want) {
		t.Errorf("re-publishing a target changed the number of references to %d", len(refs))
	}
}

// RecordTree after a publish keeps what AddRef learnt and fills in sizes.
func TestRecordTreeKeepsUsage(t *testing.T) {
	db := openDB(t, dbPath(t))
	t0 := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	if err := db.AddRef(state.Ref{TargetPath: "/t", Tree: treeA, URI: "u", Published: t0}, ""); err != nil {
		t.Fatal(err)
	}
	tree := store.Tree{Digest: treeA, Size: 99, Files: 3}
	if err := db.RecordTree("k", tree); err != nil {
		t.Fatal(err)
	}
	rec, _, _ := db.Tree(treeA)
	if rec.Tree != tree || !slices.Equal(rec.URIs, []string{"u"}) || !rec.LastUsed.Equal(t0) {
		t.Errorf("tree record = %+v; want %+v, URIs [u], LastUsed %v", rec, tree, t0)
	}
}

func TestDeleteRef(t *testing.T) {
	db := openDB(t, dbPath(t))
	r := state.Ref{VolumeID: "v", TargetPath: "/target", Tree: treeA, URI: "u", Published: time.Unix(1, 0).UTC()}
	if err := db.AddRef(r, "src"); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, target string }{
		{"known target", "/target"},
		{"same target again", "/target"},
		{"never published", "/nowhere"},
		{"empty", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := db.DeleteRef(tt.target); err != nil {
				t.Errorf("DeleteRef(%q) = %v, want nil (unpublish is idempotent)", tt.target, err)
			}
			if _, ok, err := db.Ref(tt.target); ok || err != nil {
				t.Errorf("Ref(%q) after delete = %v, %v", tt.target, ok, err)
			}
		})
	}
	if refs, err := db.Refs(); err != nil || len(refs) != 0 {
		t.Errorf("Refs = %v, %v; want none", refs, err)
	}
	// Forgetting a reference does not forget the tree or the source.
	if _, ok, _ := db.Tree(treeA); !ok {
		t.Error("DeleteRef dropped the tree record")
	}
	if _, ok, _ := db.SourceTree("src"); !ok {
		t.Error("DeleteRef dropped the source record")
	}
}

func TestPersistsAcrossReopen(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := db.NodeKey()
	tree := store.Tree{Digest: treeA, Size: 5, Files: 1}
	ref := state.Ref{VolumeID: "v", TargetPath: "/t", Tree: treeA, ArgsHash: "h", URI: "mys3:m",
		PodName: "p", PodNS: "ns", PodUID: "uid", Published: time.Date(2025, 6, 7, 8, 9, 10, 11, time.UTC)}
	if err := db.RecordTree("ck", tree); err != nil {
		t.Fatal(err)
	}
	if err := db.AddRef(ref, "sk"); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteRef("/gone"); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db = openDB(t, path)
	if k, _ := db.NodeKey(); !bytes.Equal(k, key) {
		t.Error("node key lost")
	}
	if got, ok, _ := db.TreeForKey("ck"); !ok || got != tree {
		t.Errorf("content key lost: %+v, %v", got, ok)
	}
	if got, ok, _ := db.Ref("/t"); !ok || !reflect.DeepEqual(got, ref) {
		t.Errorf("reference lost: %+v, %v", got, ok)
	}
	if got, ok, _ := db.SourceTree("sk"); !ok || got.Tree != treeA || got.URI != "mys3:m" || !got.Checked.Equal(ref.Published) {
		t.Errorf("source lost: %+v, %v", got, ok)
	}
	if rec, ok, _ := db.Tree(treeA); !ok || rec.Tree != tree || !slices.Equal(rec.URIs, []string{"mys3:m"}) {
		t.Errorf("tree record lost: %+v, %v", rec, ok)
	}
	if refs, _ := db.Refs(); len(refs) != 1 {
		t.Errorf("Refs = %v, want one", refs)
	}
}

// The stored reference is plain JSON with fixed field names: exactly the
// fields of Ref, nothing else (no secret can hide in an extra field), and
// the pod fields are left out when unknown.
func TestRefEncoding(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	full := state.Ref{VolumeID: "v", TargetPath: "/full", Tree: treeA, ArgsHash: "h", URI: "mys3:m",
		PodName: "p", PodNS: "ns", PodUID: "uid", Published: time.Date(2025, 1, 1, 0, 0, 0, 5, time.UTC)}
	bare := state.Ref{VolumeID: "v2", TargetPath: "/bare", Tree: treeA, ArgsHash: "h2", URI: "mys3:m"}
	for _, r := range []state.Ref{full, bare} {
		if err := db.AddRef(r, "source-fingerprint"); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		target string
		ref    state.Ref
		fields []string
	}{
		{"/full", full, []string{"argsHash", "podName", "podNamespace", "podUID", "published", "targetPath", "tree", "uri", "volumeID"}},
		{"/bare", bare, []string{"argsHash", "published", "targetPath", "tree", "uri", "volumeID"}},
	}
	readBolt(t, path, func(tx *bolt.Tx) error {
		for _, tt := range tests {
			raw := tx.Bucket([]byte("refs")).Get([]byte(tt.target))
			if raw == nil {
				t.Errorf("no stored reference for %s", tt.target)
				continue
			}
			var fields map[string]json.RawMessage
			if err := json.Unmarshal(raw, &fields); err != nil {
				t.Fatalf("stored reference is not JSON: %v", err)
			}
			var keys []string
			for k := range fields {
				keys = append(keys, k)
			}
			slices.Sort(keys)
			if !slices.Equal(keys, tt.fields) {
				t.Errorf("stored fields of %s = %v, want %v", tt.target, keys, tt.fields)
			}
			var back state.Ref
			dec := json.NewDecoder(bytes.NewReader(raw))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&back); err != nil {
				t.Fatalf("decoding stored reference: %v", err)
			}
			if !reflect.DeepEqual(back, tt.ref) {
				t.Errorf("stored reference decodes to %+v, want %+v", back, tt.ref)
			}
		}
		src := tx.Bucket([]byte("sources")).Get([]byte("source-fingerprint"))
		var s map[string]any
		if err := json.Unmarshal(src, &s); err != nil {
			t.Fatal(err)
		}
		if len(s) != 2 || s["tree"] != treeA || s["uri"] != "mys3:m" {
			t.Errorf("stored source = %v, want exactly tree and uri", s)
		}
		return nil
	})
}

// The state database as the store's index: a download recorded by one
// process is a cache hit for the next, with no Open at all.
func TestStoreIndexAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	t.Cleanup(func() {
		_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.IsDir() {
				_ = os.Chmod(p, 0o700)
			}
			return nil
		})
	})
	files := map[string][]byte{"config.json": []byte(`{}`), "model/w.bin": bytes.Repeat([]byte{7}, 4096)}
	m := source.Manifest{
		{Path: "config.json", Size: int64(len(files["config.json"]))},
		{Path: "model/w.bin", Size: int64(len(files["model/w.bin"]))},
	}
	open := func() (*state.DB, *store.Store) {
		db, err := state.Open(filepath.Join(dir, "state", "state.db"))
		if err != nil {
			t.Fatal(err)
		}
		s, err := store.Open(dir, db, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return db, s
	}

	db, s := open()
	f := sourcetest.NewFetcher(files)
	tr, fetched, err := s.Ensure(context.Background(), "content-key", m, f)
	if err != nil || !fetched || f.Resolver().OpenTotal() != len(files) {
		t.Fatalf("first Ensure = %+v, %v, %v with %d opens", tr, fetched, err, f.Resolver().OpenTotal())
	}
	if got, ok, err := db.TreeForKey("content-key"); err != nil || !ok || got != tr {
		t.Errorf("TreeForKey = %+v, %v, %v; want %+v", got, ok, err, tr)
	}
	if rec, ok, _ := db.Tree(tr.Digest); !ok || rec.Tree != tr || rec.LastUsed.IsZero() {
		t.Errorf("tree record = %+v, %v", rec, ok)
	}
	s.Close()
	db.Close()

	db, s = open()
	defer db.Close()
	defer s.Close()
	f2 := sourcetest.NewFetcher(files)
	got, fetched, err := s.Ensure(context.Background(), "content-key", m, f2)
	if err != nil || fetched || got != tr || f2.Resolver().OpenTotal() != 0 {
		t.Errorf("Ensure after restart = %+v, %v, %v with %d opens; want a hit", got, fetched, err, f2.Resolver().OpenTotal())
	}
}
