package state_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
)

// The state database is what the peer endpoint looks objects up in.
var _ peer.Objects = (*state.DB)(nil)

// TestLookupObject: the blob recorded for one object key, as a peer asks
// for it; unknown keys are not found, not an error.
func TestLookupObject(t *testing.T) {
	db := openDB(t, dbPath(t))
	blob := strings.Repeat("ab", 32)
	if err := db.RecordObject("sha256:"+strings.Repeat("01", 32), blob); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, key, want string
		ok              bool
	}{
		{name: "recorded", key: "sha256:" + strings.Repeat("01", 32), want: blob, ok: true},
		{name: "another object", key: "sha256:" + strings.Repeat("02", 32)},
		{name: "empty key", key: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reads, writes := db.Transactions()
			got, ok, err := db.LookupObject(tt.key)
			if err != nil || ok != tt.ok || got != tt.want {
				t.Fatalf("LookupObject(%q) = %q, %v, %v; want %q, %v", tt.key, got, ok, err, tt.want, tt.ok)
			}
			if r, w := db.Transactions(); r != reads+1 || w != writes {
				t.Errorf("%d reads and %d writes, want one read", r-reads, w-writes)
			}
		})
	}
}

// TestHeldContentKeys: the content keys whose tree is held, in one read;
// a tree doomed or forgotten is no longer held, and a key whose tree
// changed names only the new one once.
func TestHeldContentKeys(t *testing.T) {
	db := openDB(t, dbPath(t))
	for _, kt := range [][2]string{{"kept", "a"}, {"also-a", "a"}, {"doomed", "b"}, {"forgotten", "c"}, {"moved", "c"}, {"moved", "d"}} {
		if err := db.RecordTree(kt[0], store.Tree{Digest: digestOf(kt[1]), Size: 1, Files: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Doom(digestOf("b"), "operator"); err != nil {
		t.Fatal(err)
	}
	if err := db.ForgetTree(digestOf("c")); err != nil {
		t.Fatal(err)
	}
	reads, writes := db.Transactions()
	got, err := db.HeldContentKeys()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	if want := []string{"also-a", "kept", "moved"}; !slices.Equal(got, want) {
		t.Errorf("HeldContentKeys = %q, want %q", got, want)
	}
	if r, w := db.Transactions(); r != reads+1 || w != writes {
		t.Errorf("%d reads and %d writes, want one read", r-reads, w-writes)
	}
}
