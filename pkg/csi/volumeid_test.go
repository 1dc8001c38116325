package csi

// Unit tests of the controller's volume ID codec (volumeid.go).

import (
	"errors"
	"regexp"
	"strings"
	"testing"
)

// volumeIDFormat is the exact shape of an issued volume ID.
var volumeIDFormat = regexp.MustCompile(`^mc1-[0-9a-f]{32}-[0-9a-f]{8}$`)

// volumeIDTestNames are CreateVolume names as the external-provisioner and
// csi-sanity send them, plus awkward ones.
var volumeIDTestNames = []string{
	"pvc-6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b",
	"pvc-0f3c2b1a-5d6e-4f70-8a9b-0c1d2e3f4a5b",
	"sanity-controller-create-single-vol-7A3B1C2D-4E5F6A7B",
	"x",
	"名前/with spaces and\x00NUL",
	strings.Repeat("long-name-", 200),
}

func TestVolumeIDRoundTrip(t *testing.T) {
	for _, name := range volumeIDTestNames {
		id := volumeIDForName(name)
		if err := checkVolumeID(id); err != nil {
			t.Errorf("checkVolumeID(volumeIDForName(%.40q)) = %v, want nil", name, err)
		}
		if !volumeIDFormat.MatchString(id) {
			t.Errorf("volumeIDForName(%.40q) = %q, not of the form mc1-<32 hex>-<8 hex>", name, id)
		}
		if len(id) != volumeIDLen || len(id) > 128 {
			t.Errorf("volumeIDForName(%.40q) is %d bytes, want exactly %d (and CSI's limit is 128)", name, len(id), volumeIDLen)
		}
		if volumeIDLen != 45 {
			t.Errorf("volumeIDLen = %d, want 45 (mc1-, 32 hex, -, 8 hex)", volumeIDLen)
		}
	}
}

func TestVolumeIDDeterministicAndDistinct(t *testing.T) {
	seen := map[string]string{}
	for _, name := range volumeIDTestNames {
		a, b := volumeIDForName(name), volumeIDForName(name)
		if a != b {
			t.Errorf("volumeIDForName(%.40q) is not deterministic: %q then %q", name, a, b)
		}
		if prev, dup := seen[a]; dup {
			t.Errorf("names %.40q and %.40q share volume ID %q", prev, name, a)
		}
		seen[a] = name
	}
	// Names differing only in a suffix, case or a trailing byte.
	pairs := [][2]string{
		{"pvc-1", "pvc-2"},
		{"pvc-a", "PVC-A"},
		{"pvc-a", "pvc-a "},
		{"pvc-a", "pvc-a\x00"},
		{"", "\x00"},
	}
	for _, p := range pairs {
		if volumeIDForName(p[0]) == volumeIDForName(p[1]) {
			t.Errorf("names %q and %q share volume ID %q", p[0], p[1], volumeIDForName(p[0]))
		}
	}
}

// The ID follows from the name, but neither the name nor the model
// reference can be read out of it.
func TestVolumeIDHidesNameAndModel(t *testing.T) {
	for _, name := range []string{
		"pvc-6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b",
		"models-iris",
		testURI,
		"s3://models/iris",
	} {
		id := volumeIDForName(name)
		if strings.Contains(id, name) {
			t.Errorf("volume ID %q contains the name %q", id, name)
		}
		for _, part := range []string{"pvc", "iris", "models", "mys3", "s3:", "/"} {
			if strings.Contains(id, part) {
				t.Errorf("volume ID %q for %q contains %q", id, name, part)
			}
		}
	}
}

// Changing any single character of a valid ID, to any other printable
// ASCII character, gives an ID the controller refuses.
func TestCheckVolumeIDRejectsEveryOneCharEdit(t *testing.T) {
	id := volumeIDForName("pvc-6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b")
	for i := range len(id) {
		for c := byte(0x20); c < 0x7f; c++ {
			if c == id[i] {
				continue
			}
			edited := id[:i] + string(c) + id[i+1:]
			err := checkVolumeID(edited)
			if err == nil {
				t.Fatalf("checkVolumeID accepted %q (position %d changed from %q to %q)", edited, i, id[i], c)
			}
			if !errors.Is(err, errForeignVolumeID) {
				t.Fatalf("checkVolumeID(%q) = %v, want an error wrapping errForeignVolumeID", edited, err)
			}
		}
	}
}

// Swapping two adjacent differing hex digits is the classic typo; the
// check catches it.
func TestCheckVolumeIDRejectsTranspositions(t *testing.T) {
	id := volumeIDForName("pvc-0f3c2b1a-5d6e-4f70-8a9b-0c1d2e3f4a5b")
	for i := 0; i+1 < len(id); i++ {
		if id[i] == id[i+1] {
			continue
		}
		b := []byte(id)
		b[i], b[i+1] = b[i+1], b[i]
		if err := checkVolumeID(string(b)); err == nil {
			t.Errorf("checkVolumeID accepted %q (positions %d and %d swapped)", b, i, i+1)
		}
	}
}

func TestCheckVolumeIDRejects(t *testing.T) {
	valid := volumeIDForName("pvc-6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b")
	body, check := valid[:volumeIDLen-9], valid[volumeIDLen-8:]
	// Another version with check digits computed the same way: a future
	// or past format must not be read as this one.
	mc2 := "mc2" + body[3:]
	mc2 += "-" + volumeIDCheck(mc2)
	// A body of uppercase hex with matching check digits.
	upper := "mc1-" + strings.ToUpper(body[4:])
	upper += "-" + volumeIDCheck(upper)

	tests := []struct {
		name, id string
		hint     string // in the error message
	}{
		{"empty", "", "does not have the form"},
		{"csi-sanity fake ID", "fake-vol-id", "does not have the form"},
		{"csi-sanity nonexistent ID", "some-vol-id", "does not have the form"},
		{"uuid", "6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b", "does not have the form"},
		{"pv name", "pvc-6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b", "does not have the form"},
		{"model URI", testURI, "does not have the form"},
		{"inline volume ID", "csi-0f3c2b1a5d6e4f708a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f", "does not have the form"},
		{"prefix only", "mc1-", "does not have the form"},
		{"truncated by one", valid[:len(valid)-1], "does not have the form"},
		{"truncated check", body, "does not have the form"},
		{"extended by one hex", valid + "0", "does not have the form"},
		{"extended by newline", valid + "\n", "does not have the form"},
		{"leading space", " " + valid, "does not have the form"},
		{"trailing space", valid[:len(valid)-1] + " ", "does not have the form"},
		{"doubled", valid + valid, "does not have the form"},
		{"wrong version, valid check", mc2, "does not have the form"},
		{"uppercase version", "MC1" + valid[3:], "does not have the form"},
		{"uppercase check", body + "-" + strings.ToUpper(check), "does not have the form"},
		{"uppercase body, valid check", upper, "does not have the form"},
		{"body and check swapped", "mc1-" + check + "-" + body[4:], "does not have the form"},
		{"separator replaced", body + "_" + check, "does not have the form"},
		{"all zeros", "mc1-" + strings.Repeat("0", 32) + "-" + strings.Repeat("0", 8), "check digits"},
		{"check of another body", body + "-" + volumeIDCheck(volumeIDForName("other")[:volumeIDLen-9]), "check digits"},
		{"non-ASCII of the same length", "mc1-" + strings.Repeat("é", 16) + "-" + check, "does not have the form"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := checkVolumeID(tc.id)
			if err == nil {
				t.Fatalf("checkVolumeID(%q) = nil, want an error", tc.id)
			}
			if !errors.Is(err, errForeignVolumeID) {
				t.Errorf("checkVolumeID(%q) = %v, want an error wrapping errForeignVolumeID", tc.id, err)
			}
			if !strings.Contains(err.Error(), tc.hint) {
				t.Errorf("checkVolumeID(%q) = %q, want it to say %q", tc.id, err, tc.hint)
			}
		})
	}
	if upper == valid || mc2 == valid {
		t.Fatal("test IDs are not edits of the valid one")
	}
}

// FuzzCheckVolumeID: checkVolumeID never panics, and whatever it accepts
// has exactly the issued format with matching check digits.
func FuzzCheckVolumeID(f *testing.F) {
	for _, name := range volumeIDTestNames {
		id := volumeIDForName(name)
		f.Add(id)
		f.Add(id[:len(id)-1])
		f.Add(strings.ToUpper(id))
	}
	for _, s := range []string{"", "fake-vol-id", "mc1-", "mc1--", "6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if checkVolumeID(id) != nil {
			return
		}
		if !volumeIDFormat.MatchString(id) {
			t.Fatalf("checkVolumeID accepted %q, which is not of the form mc1-<32 hex>-<8 hex>", id)
		}
		if volumeIDCheck(id[:volumeIDLen-9]) != id[volumeIDLen-8:] {
			t.Fatalf("checkVolumeID accepted %q with wrong check digits", id)
		}
	})
}

// FuzzVolumeIDForName: every name gives a valid ID of the fixed length.
func FuzzVolumeIDForName(f *testing.F) {
	for _, name := range volumeIDTestNames {
		f.Add(name)
	}
	f.Add("")
	f.Fuzz(func(t *testing.T, name string) {
		id := volumeIDForName(name)
		if err := checkVolumeID(id); err != nil {
			t.Fatalf("checkVolumeID(volumeIDForName(%q)) = %v", name, err)
		}
		if len(id) != volumeIDLen {
			t.Fatalf("volumeIDForName(%q) is %d bytes, want %d", name, len(id), volumeIDLen)
		}
	})
}
