package main

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/admin"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
)

// gcReply is what pkg/admin's gc handler replies with.
type gcReply = admin.GCResult

var (
	apiT0 = time.Date(2025, 11, 25, 10, 0, 0, 0, time.UTC)
	apiD1 = "sha256:" + repeatHex("1")
	apiD2 = "sha256:" + repeatHex("2")
)

func repeatHex(c string) string {
	return string(bytes.Repeat([]byte(c), 64))
}

func fullCachedTree() state.CachedTree {
	return state.CachedTree{
		TreeRecord: state.TreeRecord{
			Tree:     store.Tree{Digest: apiD1, Size: 42, Files: 3},
			URIs:     []string{"mys3:models/llama"},
			LastUsed: apiT0,
		},
		Refs: []state.Ref{{
			VolumeID: "csi-1", TargetPath: "/var/lib/kubelet/pods/x/volumes/m", Tree: apiD1, ArgsHash: "h",
			URI: "mys3:models/llama", PodName: "llama-0", PodNS: "serving", PodUID: "uid-1", Published: apiT0,
		}},
		Pinned:   true,
		PinnedAt: apiT0.Add(time.Hour),
		Doomed:   "operator",
	}
}

// TestWireTypesMatchAdmin round-trips fully populated pkg/admin values
// through this CLI's mirror types: a field added, renamed or retagged on
// either side fails here.
func TestWireTypesMatchAdmin(t *testing.T) {
	replies := []struct {
		name   string
		server any // what pkg/admin encodes
		cli    any // pointer to what modelcachectl decodes into
	}{
		{"tree", admin.Tree{CachedTree: fullCachedTree(), Present: true}, &tree{}},
		{"cached tree (pin reply)", fullCachedTree(), &cachedTree{}},
		{"inspection", admin.Inspection{
			Tree:     admin.Tree{CachedTree: fullCachedTree(), Present: true},
			Contents: []admin.File{{Path: "config.json", Size: 7, Sha256: repeatHex("a")}},
		}, &inspection{}},
		{"disk usage", admin.DiskUsage{Usage: store.Usage{BlobBytes: 1, Blobs: 2, TreeBytes: 3, Trees: 4, IngestBytes: 5, Quarantined: 6, FSSize: 7, FSFree: 8}, SavedBytes: 9, Drained: true}, &diskUsage{}},
		{"evict result", admin.EvictResult{Tree: apiD1, Removed: true, Freed: 10, Pending: true}, &evictResult{}},
		{"gc reply", gcReply{Plan: store.Plan{Evicted: []store.Candidate{{Digest: apiD1, Size: 11}}, Freed: 11, Over: 12}, DryRun: true, Warning: "no room"}, &gcResult{}},
		{"drain result", admin.DrainResult{Drained: true, Removed: []string{apiD1}, Freed: 13, Pending: []string{apiD2}}, &drainResult{}},
		{"verify report", admin.VerifyReport{
			VerifyResult: store.VerifyResult{Blobs: 1, Bytes: 2, Corrupt: []string{"c"}, Damaged: []string{apiD1}, Took: "1s", Quarantined: []string{"c-1"}},
			Removed:      []string{apiD1}, Invalidated: []string{apiD2}, OK: true,
		}, &verifyReport{}},
		{"prefetch event", admin.PrefetchEvent{Event: "done", Done: 1, Total: 2, Tree: apiD1, Files: 3, Fetched: true, Took: "1s", Error: "e"}, &prefetchEvent{}},
		{"error", admin.Error{Error: "boom"}, &apiErrorBody{}},
	}
	for _, tc := range replies {
		t.Run("reply "+tc.name, func(t *testing.T) {
			assertAllSet(t, reflect.ValueOf(tc.server), tc.name)
			sent := mustJSON(t, tc.server)
			dec := json.NewDecoder(bytes.NewReader(sent))
			dec.DisallowUnknownFields()
			if err := dec.Decode(tc.cli); err != nil {
				t.Fatalf("decoding %s into the CLI's type: %v", sent, err)
			}
			assertSameJSON(t, sent, mustJSON(t, tc.cli))
		})
	}

	// Requests go the other way: the server decodes them strictly.
	requests := []struct {
		name   string
		cli    any
		server any
	}{
		{"ref request", refRequest{Ref: apiD1, WhenUnused: true, DryRun: true}, &admin.RefRequest{}},
		{"prefetch request", prefetchRequest{URI: "mys3:m", Secrets: map[string]string{"K": "v"}}, &admin.PrefetchRequest{}},
	}
	for _, tc := range requests {
		t.Run("request "+tc.name, func(t *testing.T) {
			assertAllSet(t, reflect.ValueOf(tc.cli), tc.name)
			sent := mustJSON(t, tc.cli)
			dec := json.NewDecoder(bytes.NewReader(sent))
			dec.DisallowUnknownFields()
			if err := dec.Decode(tc.server); err != nil {
				t.Fatalf("the server cannot decode %s: %v", sent, err)
			}
			assertSameJSON(t, sent, mustJSON(t, tc.server))
			assertAllSet(t, reflect.ValueOf(tc.server).Elem(), tc.name+" as decoded by the server")
		})
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func assertSameJSON(t *testing.T, want, got []byte) {
	t.Helper()
	var w, g any
	if err := json.Unmarshal(want, &w); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(w, g) {
		t.Errorf("shapes differ:\nserver: %s\ncli:    %s", want, got)
	}
}

// assertAllSet fails when a field of v is zero, so a field added to a type
// later cannot hide from the round trip behind omitempty.
func assertAllSet(t *testing.T, v reflect.Value, path string) {
	t.Helper()
	switch v.Kind() {
	case reflect.Pointer, reflect.Interface:
		if v.IsNil() {
			t.Errorf("%s is nil: populate it", path)
			return
		}
		assertAllSet(t, v.Elem(), path)
	case reflect.Struct:
		if v.Type() == reflect.TypeFor[time.Time]() {
			if v.Interface().(time.Time).IsZero() {
				t.Errorf("%s is zero: populate it", path)
			}
			return
		}
		for i := range v.NumField() {
			f := v.Type().Field(i)
			if f.IsExported() {
				assertAllSet(t, v.Field(i), path+"."+f.Name)
			}
		}
	case reflect.Slice, reflect.Map:
		if v.Len() == 0 {
			t.Errorf("%s is empty: populate it", path)
		}
		if v.Kind() == reflect.Slice {
			for i := range v.Len() {
				assertAllSet(t, v.Index(i), path+"[]")
			}
		}
	default:
		if v.IsZero() {
			t.Errorf("%s is zero: populate it", path)
		}
	}
}
