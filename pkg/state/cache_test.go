package state_test

// Unit tests of the cache records operators and the cache's eviction use:
// listing, pins, removal marks, drain, forgetting and invalidating trees.

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
	bolt "go.etcd.io/bbolt"
)

// digestOf makes a valid tree digest from a letter.
func digestOf(c string) string { return "sha256:" + strings.Repeat(c, 64) }

// cacheT0 is a fixed time in the past; trees are used at offsets from it.
var cacheT0 = time.Date(2025, 6, 1, 8, 0, 0, 0, time.UTC)

// seedTree records a tree under key and sets its last use to at, through a
// reference that is removed again (the way a publish and unpublish leave it).
func seedTree(t *testing.T, db *state.DB, key, digest string, size int64, at time.Time) {
	t.Helper()
	if err := db.RecordTree(key, store.Tree{Digest: digest, Size: size, Files: 1}); err != nil {
		t.Fatalf("RecordTree(%s): %v", key, err)
	}
	touch := "/touch/" + digest
	if err := db.AddRef(state.Ref{VolumeID: "touch", TargetPath: touch, Tree: digest, URI: "uri-of-" + key, Published: at}, ""); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteRef(touch); err != nil {
		t.Fatal(err)
	}
}

// addRef records a mount of digest at target.
func addRef(t *testing.T, db *state.DB, target, digest string, at time.Time) {
	t.Helper()
	r := state.Ref{VolumeID: "vol" + target, TargetPath: target, Tree: digest, URI: "uri-ref", PodName: "pod" + strings.ReplaceAll(target, "/", "-"), PodNS: "ns", Published: at}
	if err := db.AddRef(r, ""); err != nil {
		t.Fatal(err)
	}
}

func digests(trees []state.CachedTree) []string {
	var out []string
	for _, c := range trees {
		out = append(out, c.Digest)
	}
	return out
}

func TestCachedTreesEmpty(t *testing.T) {
	db := openDB(t, dbPath(t))
	trees, err := db.CachedTrees()
	if err != nil || len(trees) != 0 {
		t.Errorf("CachedTrees of an empty database = %v, %v", trees, err)
	}
	if _, ok, err := db.CachedTree(digestOf("a")); ok || err != nil {
		t.Errorf("CachedTree(unknown) = %v, %v; want false, nil", ok, err)
	}
}

// CachedTrees lists every tree least recently used first, with its
// references, pin and removal mark.
func TestCachedTrees(t *testing.T) {
	db := openDB(t, dbPath(t))
	a, b, c, d := digestOf("a"), digestOf("b"), digestOf("c"), digestOf("d")
	// Recorded in an order that is neither LRU nor digest order.
	seedTree(t, db, "kb", b, 200, cacheT0.Add(3*time.Hour))
	seedTree(t, db, "kd", d, 400, cacheT0.Add(2*time.Hour))
	seedTree(t, db, "ka", a, 100, cacheT0)
	seedTree(t, db, "kc", c, 300, cacheT0.Add(-time.Hour))
	addRef(t, db, "/t/a1", a, cacheT0.Add(time.Hour))
	addRef(t, db, "/t/a2", a, cacheT0.Add(time.Hour))
	before := time.Now().Add(-time.Second)
	if err := db.SetPinned(b, true); err != nil {
		t.Fatal(err)
	}
	after := time.Now().Add(time.Second)
	if err := db.Doom(c, "operator"); err != nil {
		t.Fatal(err)
	}

	trees, err := db.CachedTrees()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := digests(trees), []string{c, a, d, b}; !slices.Equal(got, want) {
		t.Fatalf("CachedTrees order = %v, want %v (least recently used first)", got, want)
	}
	tests := []struct {
		digest  string
		size    int64
		targets []string
		pinned  bool
		doomed  string
	}{
		{c, 300, nil, false, "operator"},
		{a, 100, []string{"/t/a1", "/t/a2"}, false, ""},
		{d, 400, nil, false, ""},
		{b, 200, nil, true, ""},
	}
	for i, tt := range tests {
		got := trees[i]
		var targets []string
		for _, r := range got.Refs {
			if r.Tree != tt.digest {
				t.Errorf("tree %s lists a reference to %s", tt.digest, r.Tree)
			}
			targets = append(targets, r.TargetPath)
		}
		slices.Sort(targets)
		if !slices.Equal(targets, tt.targets) {
			t.Errorf("tree %s refs %v, want %v", tt.digest, targets, tt.targets)
		}
		if got.Size != tt.size || got.Pinned != tt.pinned || got.Doomed != tt.doomed {
			t.Errorf("tree %s = size %d pinned %v doomed %q; want %d %v %q", tt.digest, got.Size, got.Pinned, got.Doomed, tt.size, tt.pinned, tt.doomed)
		}
		if tt.pinned && (got.PinnedAt.Before(before) || got.PinnedAt.After(after)) {
			t.Errorf("tree %s PinnedAt = %v, want between %v and %v", tt.digest, got.PinnedAt, before, after)
		}
		if !tt.pinned && !got.PinnedAt.IsZero() {
			t.Errorf("unpinned tree %s has PinnedAt %v", tt.digest, got.PinnedAt)
		}
		one, ok, err := db.CachedTree(tt.digest)
		if err != nil || !ok || one.Digest != got.Digest || one.Pinned != got.Pinned || one.Doomed != got.Doomed || len(one.Refs) != len(got.Refs) {
			t.Errorf("CachedTree(%s) = %+v, %v, %v; want %+v", tt.digest, one, ok, err, got)
		}
	}
}

func TestSetPinned(t *testing.T) {
	db := openDB(t, dbPath(t))
	a, unknown := digestOf("a"), digestOf("f")
	seedTree(t, db, "ka", a, 100, cacheT0)
	var firstPin time.Time
	steps := []struct {
		name       string
		digest     string
		pin        bool
		wantErr    error
		wantPinned bool
	}{
		{"pin unknown", unknown, true, state.ErrUnknownTree, false},
		{"unpin unknown", unknown, false, state.ErrUnknownTree, false},
		{"unpin never pinned", a, false, nil, false},
		{"pin", a, true, nil, true},
		{"pin again", a, true, nil, true},
		{"unpin", a, false, nil, false},
		{"unpin again", a, false, nil, false},
		{"pin after unpin", a, true, nil, true},
	}
	for _, st := range steps {
		if st.name == "pin again" {
			time.Sleep(10 * time.Millisecond) // a second pin must not move PinnedAt
		}
		err := db.SetPinned(st.digest, st.pin)
		if !errors.Is(err, st.wantErr) || (st.wantErr == nil) != (err == nil) {
			t.Fatalf("%s: SetPinned err = %v, want %v", st.name, err, st.wantErr)
		}
		if st.wantErr != nil && !strings.Contains(err.Error(), st.digest) {
			t.Errorf("%s: error %q does not name the tree", st.name, err)
		}
		c, ok, err := db.CachedTree(st.digest)
		if st.digest == unknown {
			if ok || err != nil {
				t.Errorf("%s: SetPinned created a record for an unknown tree (%v)", st.name, err)
			}
			continue
		}
		if err != nil || !ok || c.Pinned != st.wantPinned {
			t.Fatalf("%s: pinned = %v (%v, %v), want %v", st.name, c.Pinned, ok, err, st.wantPinned)
		}
		switch st.name {
		case "pin":
			firstPin = c.PinnedAt
		case "pin again":
			if !c.PinnedAt.Equal(firstPin) {
				t.Errorf("pinning again moved PinnedAt from %v to %v", firstPin, c.PinnedAt)
			}
		}
	}
}

// ForgetTree and Invalidate touch one tree's records and no other's.
func TestForgetTreeAndInvalidate(t *testing.T) {
	a, b := digestOf("a"), digestOf("b")
	tests := []struct {
		name        string
		op          func(db *state.DB, digest string) error
		keepsRecord bool // the tree record, its pin and mark stay
	}{
		{"ForgetTree", (*state.DB).ForgetTree, false},
		{"Invalidate", (*state.DB).Invalidate, true},
	}
	for _, tt := range tests {
		for _, target := range []string{a, b} {
			t.Run(fmt.Sprintf("%s %s", tt.name, target[7:8]), func(t *testing.T) {
				db := openDB(t, dbPath(t))
				keys := map[string][]string{a: {"ka1", "ka2"}, b: {"kb"}}
				sources := map[string][]string{a: {"sa1", "sa2"}, b: {"sb"}}
				for d, ks := range keys {
					for _, k := range ks {
						seedTree(t, db, k, d, 100, cacheT0)
					}
					for _, s := range sources[d] {
						if err := db.RecordSource(s, state.Source{Tree: d, URI: "uri-" + s}); err != nil {
							t.Fatal(err)
						}
					}
					if err := db.SetPinned(d, true); err != nil {
						t.Fatal(err)
					}
					if err := db.Doom(d, "drain"); err != nil {
						t.Fatal(err)
					}
				}
				addRef(t, db, "/t/"+target[7:8], target, cacheT0)
				before, _, _ := db.CachedTree(target)

				if err := tt.op(db, target); err != nil {
					t.Fatalf("%s: %v", tt.name, err)
				}
				for d := range keys {
					mine := d == target
					for _, k := range keys[d] {
						if _, ok, err := db.TreeForKey(k); err != nil || ok == mine {
							t.Errorf("TreeForKey(%s) found = %v (%v), want %v", k, ok, err, !mine)
						}
					}
					for _, s := range sources[d] {
						if _, ok, err := db.SourceTree(s); err != nil || ok == mine {
							t.Errorf("SourceTree(%s) found = %v (%v), want %v", s, ok, err, !mine)
						}
					}
					c, ok, err := db.CachedTree(d)
					if err != nil {
						t.Fatal(err)
					}
					wantRecord := !mine || tt.keepsRecord
					if ok != wantRecord {
						t.Errorf("tree %s record present = %v, want %v", d[:8], ok, wantRecord)
						continue
					}
					if ok && (!c.Pinned || c.Doomed != "drain") {
						t.Errorf("tree %s lost its pin or mark: pinned %v doomed %q", d[:8], c.Pinned, c.Doomed)
					}
					if ok && mine && (!slices.Equal(c.URIs, before.URIs) || len(c.Refs) != 1 || c.Size != before.Size) {
						t.Errorf("invalidated tree record = %+v, want URIs %v, its reference and size kept", c, before.URIs)
					}
				}
				if tt.keepsRecord {
					return
				}
				// Recorded again later (downloaded anew), the tree starts clean.
				if err := db.RecordTree("again", store.Tree{Digest: target, Size: 5}); err != nil {
					t.Fatal(err)
				}
				c, ok, err := db.CachedTree(target)
				if err != nil || !ok || c.Pinned || c.Doomed != "" || len(c.URIs) != 0 {
					t.Errorf("re-recorded tree = %+v (%v, %v); want no pin, mark or URIs left over", c, ok, err)
				}
			})
		}
	}
}

func TestForgetUnknownTree(t *testing.T) {
	db := openDB(t, dbPath(t))
	seedTree(t, db, "ka", digestOf("a"), 1, cacheT0)
	for _, op := range []func(string) error{db.ForgetTree, db.Invalidate} {
		if err := op(digestOf("9")); err != nil {
			t.Errorf("on an unknown tree: %v", err)
		}
	}
	if _, ok, _ := db.TreeForKey("ka"); !ok {
		t.Error("forgetting an unknown tree dropped another tree's key")
	}
}

func TestRecordSource(t *testing.T) {
	db := openDB(t, dbPath(t))
	a, b, c := digestOf("a"), digestOf("b"), digestOf("c")
	seedTree(t, db, "ka", a, 1234, cacheT0)                // URIs [uri-of-ka], oldest
	seedTree(t, db, "kb", b, 10, cacheT0.Add(time.Hour))   // URIs [uri-of-kb]
	seedTree(t, db, "kc", c, 10, cacheT0.Add(2*time.Hour)) // URIs [uri-of-kc]
	steps := []struct {
		source   string
		src      state.Source
		wantURIs []string
		wantLRU  []string
	}{
		{"s1", state.Source{Tree: a, URI: "mys3:models/a"}, []string{"uri-of-ka", "mys3:models/a"}, []string{b, c, a}},
		{"s2", state.Source{Tree: a, URI: "mys3:models/a"}, []string{"uri-of-ka", "mys3:models/a"}, []string{b, c, a}},
		{"s3", state.Source{Tree: b, URI: "uri-of-kb"}, []string{"uri-of-kb"}, []string{c, a, b}},
		{"s4", state.Source{Tree: digestOf("d"), URI: "s3://bucket/d"}, []string{"s3://bucket/d"}, []string{c, a, b, digestOf("d")}},
	}
	for _, st := range steps {
		before := time.Now()
		if err := db.RecordSource(st.source, st.src); err != nil {
			t.Fatalf("RecordSource(%s): %v", st.source, err)
		}
		if got, ok, err := db.SourceTree(st.source); err != nil || !ok || got != st.src {
			t.Errorf("SourceTree(%s) = %+v, %v, %v; want %+v", st.source, got, ok, err, st.src)
		}
		rec, ok, err := db.Tree(st.src.Tree)
		if err != nil || !ok {
			t.Fatalf("Tree(%s) = %v, %v", st.src.Tree[:8], ok, err)
		}
		if rec.Digest != st.src.Tree || !slices.Equal(rec.URIs, st.wantURIs) {
			t.Errorf("after %s: tree %s URIs %v, want %v", st.source, rec.Digest, rec.URIs, st.wantURIs)
		}
		if rec.LastUsed.Before(before.Add(-time.Second)) {
			t.Errorf("after %s: LastUsed %v not bumped (now %v)", st.source, rec.LastUsed, before)
		}
		trees, err := db.CachedTrees()
		if err != nil {
			t.Fatal(err)
		}
		if got := digests(trees); !slices.Equal(got, st.wantLRU) {
			t.Errorf("after %s: LRU order %v, want %v", st.source, got, st.wantLRU)
		}
	}
	if rec, _, _ := db.Tree(a); rec.Size != 1234 {
		t.Errorf("RecordSource changed the tree's size to %d", rec.Size)
	}
}

func TestDoom(t *testing.T) {
	db := openDB(t, dbPath(t))
	a := digestOf("a")
	seedTree(t, db, "ka", a, 1, cacheT0)
	for _, reason := range []string{"operator", "drain", "", "", "operator"} {
		if err := db.Doom(a, reason); err != nil {
			t.Fatalf("Doom(%q): %v", reason, err)
		}
		c, _, err := db.CachedTree(a)
		if err != nil || c.Doomed != reason {
			t.Errorf("after Doom(%q): Doomed = %q (%v)", reason, c.Doomed, err)
		}
	}
}

// Drain is node state: it survives a restart of the plugin.
func TestDrainedPersists(t *testing.T) {
	path := dbPath(t)
	steps := []struct {
		set    *bool
		reopen bool
		want   bool
	}{
		{nil, false, false},
		{ptr(true), false, true},
		{nil, true, true},
		{ptr(true), false, true},
		{ptr(false), false, false},
		{nil, true, false},
		{ptr(false), false, false},
		{ptr(true), true, true},
	}
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { db.Close() }()
	for i, st := range steps {
		if st.set != nil {
			if err := db.SetDrained(*st.set); err != nil {
				t.Fatalf("step %d: SetDrained(%v): %v", i, *st.set, err)
			}
		}
		if st.reopen {
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			if db, err = state.Open(path); err != nil {
				t.Fatal(err)
			}
		}
		got, err := db.Drained()
		if err != nil || got != st.want {
			t.Errorf("step %d: Drained = %v, %v; want %v", i, got, err, st.want)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// Records written before store.Tree had JSON tags ("Digest", "Size",
// "Files") are read back whole after an upgrade: a node keeps its cache.
func TestTreeRecordsFromEarlierVersions(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	a := digestOf("a")
	old := map[string]map[string]string{
		"content-keys": {"sha256:key": `{"Digest":"` + a + `","Size":5000,"Files":3}`},
		"trees":        {a: `{"Digest":"` + a + `","Size":5000,"Files":3,"uris":["mys3:models/a"],"lastUsed":"2025-06-01T08:00:00Z"}`},
	}
	raw, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = raw.Update(func(tx *bolt.Tx) error {
		for bucket, kv := range old {
			for k, v := range kv {
				if err := tx.Bucket([]byte(bucket)).Put([]byte(k), []byte(v)); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if cerr := raw.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}

	db = openDB(t, path)
	want := store.Tree{Digest: a, Size: 5000, Files: 3}
	tests := []struct {
		name string
		get  func() (store.Tree, bool, error)
	}{
		{"content key", func() (store.Tree, bool, error) { return db.TreeForKey("sha256:key") }},
		{"tree record", func() (store.Tree, bool, error) {
			rec, ok, err := db.Tree(a)
			return rec.Tree, ok, err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if "" != "" {
			}
			got, ok, err := tt.get()
			if err != nil || !ok || got != want {
				t.Errorf("earlier record reads back as %+v, %v, %v; want %+v", got, ok, err, want)
			}
		})
	}
}
