package state_test

import (
	"bytes"
	"encoding/json"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/state"
	bolt "go.etcd.io/bbolt"
)

func volume(id string) state.Volume {
	return state.Volume{
		ID:       id,
		Name:     "pvc-" + id,
		SpecHash: "sha256:spec-" + id,
		Capacity: 17 << 30,
		Context: map[string]string{
			"modelUri":   "mys3:models/bert",
			"pullPolicy": "IfNotPresent",
			"digest":     treeA,
		},
		Created: time.Date(2025, 4, 5, 6, 7, 8, 987654321, time.UTC),
	}
}

func TestVolumeRoundTrip(t *testing.T) {
	db := openDB(t, dbPath(t))
	tests := []struct {
		name string
		vol  state.Volume
	}{
		{"every field", volume("csi-1")},
		{"zero capacity, empty context", state.Volume{ID: "csi-2", Name: "pvc-2", SpecHash: "h", Context: map[string]string{}, Created: time.Unix(0, 1).UTC()}},
		{"nil context, zero time", state.Volume{ID: "csi-3"}},
		{"empty context values", state.Volume{ID: "csi-4", Context: map[string]string{"digest": "", "": "empty key"}}},
		{"non-UTC time", state.Volume{ID: "csi-5", Created: time.Date(2025, 1, 1, 1, 0, 0, 0, time.FixedZone("CET", 3600))}},
		{"id with separators", state.Volume{ID: "ns/pvc:1 é", Name: "x"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := db.PutVolume(tt.vol); err != nil {
				t.Fatalf("PutVolume: %v", err)
			}
			got, ok, err := db.Volume(tt.vol.ID)
			if err != nil || !ok {
				t.Fatalf("Volume(%q) = ok %v, err %v", tt.vol.ID, ok, err)
			}
			if !got.Created.Equal(tt.vol.Created) {
				t.Errorf("Created = %v, want %v", got.Created, tt.vol.Created)
			}
			// The time's location does not survive JSON; its instant does.
			got.Created, tt.vol.Created = time.Time{}, time.Time{}
			if !reflect.DeepEqual(got, tt.vol) {
				t.Errorf("Volume round trip:\n got %#v\nwant %#v", got, tt.vol)
			}
		})
	}
}

// The caller's map is not shared with the database.
func TestVolumeContextIsCopied(t *testing.T) {
	db := openDB(t, dbPath(t))
	v := volume("csi-1")
	if err := db.PutVolume(v); err != nil {
		t.Fatal(err)
	}
	v.Context["modelUri"] = "changed after put"
	got, _, _ := db.Volume("csi-1")
	if got.Context["modelUri"] != "mys3:models/bert" {
		t.Errorf("stored context changed with the caller's map: %v", got.Context)
	}
	got.Context["digest"] = "changed after get"
	again, _, _ := db.Volume("csi-1")
	if again.Context["digest"] != treeA {
		t.Errorf("stored context changed with a returned map: %v", again.Context)
	}
}

func TestVolumeUnknown(t *testing.T) {
	db := openDB(t, dbPath(t))
	if err := db.PutVolume(volume("csi-1")); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"csi-2", "csi-", "CSI-1", ""} {
		got, ok, err := db.Volume(id)
		if ok || err != nil {
			t.Errorf("Volume(%q) = ok %v, err %v; want false, nil", id, ok, err)
		}
		if !reflect.DeepEqual(got, state.Volume{}) {
			t.Errorf("Volume(%q) = %+v, want the zero Volume", id, got)
		}
	}
}

func TestPutVolumeOverwrites(t *testing.T) {
	db := openDB(t, dbPath(t))
	first := volume("csi-1")
	if err := db.PutVolume(first); err != nil {
		t.Fatal(err)
	}
	second := state.Volume{
		ID:       "csi-1",
		Name:     "pvc-other",
		SpecHash: "sha256:other",
		Capacity: 1,
		Context:  map[string]string{"modelUri": "s3://b/m"}, // fewer keys: none linger
		Created:  first.Created.Add(time.Hour),
	}
	if err := db.PutVolume(second); err != nil {
		t.Fatal(err)
	}
	got, ok, err := db.Volume("csi-1")
	if err != nil || !ok {
		t.Fatalf("Volume = %v, %v", ok, err)
	}
	if !reflect.DeepEqual(got, second) {
		t.Errorf("Volume after overwrite:\n got %#v\nwant %#v", got, second)
	}
}

func TestDeleteVolume(t *testing.T) {
	db := openDB(t, dbPath(t))
	for _, id := range []string{"csi-1", "csi-2"} {
		if err := db.PutVolume(volume(id)); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct{ name, id string }{
		{"known volume", "csi-1"},
		{"same volume again", "csi-1"},
		{"never created", "csi-9"},
		{"empty", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := db.DeleteVolume(tt.id); err != nil {
				t.Errorf("DeleteVolume(%q) = %v, want nil (DeleteVolume is idempotent)", tt.id, err)
			}
			if _, ok, err := db.Volume(tt.id); ok || err != nil {
				t.Errorf("Volume(%q) after delete = %v, %v", tt.id, ok, err)
			}
		})
	}
	if got, ok, err := db.Volume("csi-2"); err != nil || !ok || !reflect.DeepEqual(got, volume("csi-2")) {
		t.Errorf("deleting csi-1 affected csi-2: %+v, %v, %v", got, ok, err)
	}
	// Deleted and re-created is a fresh record.
	again := volume("csi-1")
	again.SpecHash = "sha256:new"
	if err := db.PutVolume(again); err != nil {
		t.Fatal(err)
	}
	if got, ok, _ := db.Volume("csi-1"); !ok || !reflect.DeepEqual(got, again) {
		t.Errorf("Volume after re-create = %+v, %v; want %+v", got, ok, again)
	}
}

func TestVolumesPersistAcrossReopen(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	kept, gone := volume("csi-kept"), volume("csi-gone")
	for _, v := range []state.Volume{kept, gone} {
		if err := db.PutVolume(v); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.DeleteVolume(gone.ID); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	// On disk, in the "volumes" bucket, keyed by volume ID; no other key.
	readBolt(t, path, func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("volumes"))
		if b == nil {
			t.Fatal(`bucket "volumes" not created`)
		}
		var keys []string
		if err := b.ForEach(func(k, _ []byte) error {
			keys = append(keys, string(k))
			return nil
		}); err != nil {
			return err
		}
		if !slices.Equal(keys, []string{kept.ID}) {
			t.Errorf("volumes bucket keys = %q, want [%s]", keys, kept.ID)
		}
		return nil
	})

	db = openDB(t, path)
	if got, ok, err := db.Volume(kept.ID); err != nil || !ok || !reflect.DeepEqual(got, kept) {
		t.Errorf("Volume after reopen = %+v, %v, %v; want %+v", got, ok, err, kept)
	}
	if _, ok, err := db.Volume(gone.ID); ok || err != nil {
		t.Errorf("deleted volume came back after reopen: %v, %v", ok, err)
	}
}

// The stored volume is plain JSON with exactly the fields of Volume.
func TestVolumeEncoding(t *testing.T) {
	path := dbPath(t)
	db, err := state.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	v := volume("csi-1")
	if err := db.PutVolume(v); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	readBolt(t, path, func(tx *bolt.Tx) error {
		raw := tx.Bucket([]byte("volumes")).Get([]byte("csi-1"))
		var fields map[string]json.RawMessage
		if err := json.Unmarshal(raw, &fields); err != nil {
			t.Fatalf("stored volume is not JSON: %v", err)
		}
		var keys []string
		for k := range fields {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		if want := []string{"capacity", "context", "created", "id", "name", "specHash"}; !slices.Equal(keys, want) {
			t.Errorf("stored fields = %v, want %v", keys, want)
		}
		var back state.Volume
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&back); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back, v) {
			t.Errorf("stored volume decodes to %+v, want %+v", back, v)
		}
		return nil
	})
}

// Volumes (controller) and references (node) live side by side: forgetting
// one never forgets the other, even under the same string.
func TestVolumesAndRefsIndependent(t *testing.T) {
	db := openDB(t, dbPath(t))
	const shared = "csi-1" // used as both a volume ID and a target path
	ref := state.Ref{VolumeID: shared, TargetPath: shared, Tree: treeA, ArgsHash: "h", URI: "u",
		Published: time.Date(2025, 2, 3, 4, 5, 6, 0, time.UTC)}
	other := state.Ref{VolumeID: "csi-2", TargetPath: "/t/2", Tree: treeB, URI: "u2", Published: ref.Published}
	vol := volume(shared)
	for _, r := range []state.Ref{ref, other} {
		if err := db.AddRef(r, "src-"+r.VolumeID); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.PutVolume(vol); err != nil {
		t.Fatal(err)
	}
	if err := db.PutVolume(volume("csi-2")); err != nil {
		t.Fatal(err)
	}

	// Refs lists references only.
	if refs, err := db.Refs(); err != nil || len(refs) != 2 {
		t.Errorf("Refs = %+v, %v; want the two references and no volume", refs, err)
	}

	if err := db.DeleteVolume(shared); err != nil {
		t.Fatal(err)
	}
	if got, ok, err := db.Ref(shared); err != nil || !ok || !reflect.DeepEqual(got, ref) {
		t.Errorf("DeleteVolume dropped the reference at %s: %+v, %v, %v", shared, got, ok, err)
	}
	if _, ok, _ := db.Tree(treeA); !ok {
		t.Error("DeleteVolume dropped a tree record")
	}
	if _, ok, _ := db.SourceTree("src-" + shared); !ok {
		t.Error("DeleteVolume dropped a source record")
	}

	if err := db.PutVolume(vol); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteRef(shared); err != nil {
		t.Fatal(err)
	}
	if got, ok, err := db.Volume(shared); err != nil || !ok || !reflect.DeepEqual(got, vol) {
		t.Errorf("DeleteRef dropped the volume %s: %+v, %v, %v", shared, got, ok, err)
	}
	if refs, err := db.Refs(); err != nil || len(refs) != 1 || !reflect.DeepEqual(refs[0], other) {
		t.Errorf("Refs = %+v, %v; want only %+v", refs, err, other)
	}
	if got, ok, _ := db.Volume("csi-2"); !ok || !reflect.DeepEqual(got, volume("csi-2")) {
		t.Errorf("volume csi-2 = %+v, %v", got, ok)
	}
}

// A volume without an ID cannot be looked up again, so it is refused.
func TestPutVolumeEmptyID(t *testing.T) {
	db := openDB(t, dbPath(t))
	if err := db.PutVolume(state.Volume{Name: "pvc-1"}); err == nil {
		t.Error("PutVolume with an empty ID succeeded")
	}
	if _, ok, err := db.Volume(""); ok || err != nil {
		t.Errorf("Volume(\"\") = %v, %v; want false, nil", ok, err)
	}
}
