package store

import (
	"context"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
)

type mapIndex map[string]Tree

func (x mapIndex) TreeForKey(key string) (Tree, bool, error) { t, ok := x[key]; return t, ok, nil }
func (x mapIndex) RecordTree(key string, t Tree) error       { x[key] = t; return nil }

// A caller that waits for a download another caller started is told it
// joined: it needed a download, though its fetcher read nothing. The one
// that started it fetched; neither found the tree committed.
func TestEnsureGated_JoinerIsToldItJoined(t *testing.T) {
	s, err := Open(t.TempDir(), mapIndex{}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	m := source.Manifest{{Path: "a", Size: 1}, {Path: "b", Size: 1}}
	f := sourcetest.NewFetcher(map[string][]byte{"a": []byte("x"), "b": []byte("x")})
	f.Resolver().WithGate(0) // every object is held until Release
	type res struct {
		e   Ensured
		err error
	}
	first, second := make(chan res, 1), make(chan res, 1)
	go func() {
		e, err := s.EnsureGated(context.Background(), "key", m, f, nil)
		first <- res{e, err}
	}()
	waitFor(t, func() bool { _, ok := s.Downloading("key"); return ok })
	go func() {
		e, err := s.EnsureGated(context.Background(), "key", m, f, func() error {
			t.Error("a joiner ran the gate")
			return nil
		})
		second <- res{e, err}
	}()
	// Both callers keep the download wanted once they wait in the flight.
	waitFor(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.wants["key"] != nil && s.wants["key"].n == 2
	})
	f.Resolver().Release()
	a, b := <-first, <-second
	if a.err != nil || b.err != nil {
		t.Fatalf("EnsureGated: %v, %v", a.err, b.err)
	}
	if !a.e.Fetched || a.e.Joined {
		t.Errorf("starter: %+v, want Fetched, not Joined", a.e)
	}
	if b.e.Fetched || !b.e.Joined || b.e.Tree != a.e.Tree {
		t.Errorf("joiner: %+v, want Joined the same tree, not Fetched", b.e)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(time.Millisecond)
	}
}
