package store_test

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// TreeDigest names content, not origin: metadata a remote lists (checksum,
// time) and the content key play no part; every path and every byte does.
func TestTreeDigest(t *testing.T) {
	a, b, c := bytesOf("a", 10), bytesOf("b", 20), bytesOf("c", 30)
	base := map[string][]byte{"config.json": a, "model/weights.bin": b}
	baseDigest := digestOf(base)

	tests := []struct {
		name  string
		files map[string][]byte
		meta  func(source.Manifest) // changes listing metadata only
		same  bool
	}{
		{"identical listing", map[string][]byte{"config.json": a, "model/weights.bin": b}, nil, true},
		{"different remote checksums and times", base, func(m source.Manifest) {
			for i := range m {
				m[i].Hash = "other-etag"
				m[i].ModTime = time.Unix(1234567890, 0)
			}
		}, true},
		{"file renamed", map[string][]byte{"config.yaml": a, "model/weights.bin": b}, nil, false},
		{"file moved to another directory", map[string][]byte{"config.json": a, "weights/weights.bin": b}, nil, false},
		{"file moved to the top", map[string][]byte{"config.json": a, "weights.bin": b}, nil, false},
		{"content changed", map[string][]byte{"config.json": a, "model/weights.bin": c}, nil, false},
		{"one byte changed", map[string][]byte{"config.json": a, "model/weights.bin": flip(b)}, nil, false},
		{"contents swapped between paths", map[string][]byte{"config.json": b, "model/weights.bin": a}, nil, false},
		{"file added", map[string][]byte{"config.json": a, "model/weights.bin": b, "README": c}, nil, false},
		{"empty file added", map[string][]byte{"config.json": a, "model/weights.bin": b, "README": {}}, nil, false},
		{"file removed", map[string][]byte{"config.json": a}, nil, false},
		{"no files", map[string][]byte{}, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := manifestOf(tt.files)
			if tt.meta != nil {
				tt.meta(m)
			}
			got := store.TreeDigest(m, sumsOf(m, tt.files))
			if !store.ValidDigest(got) {
				t.Fatalf("TreeDigest = %q, not a valid digest", got)
			}
			if (got == baseDigest) != tt.same {
				t.Errorf("TreeDigest = %s, base %s; want equal=%v", got, baseDigest, tt.same)
			}
		})
	}
}

// Tree digests are persisted (state database, `digest` pins in volume
// attributes), so their encoding must not drift. This spells it out
// independently: "modelcache tree v1\0" then "<octal mode> <sha256> <path>\0"
// per file in path order.
func TestTreeDigestEncoding(t *testing.T) {
	files := map[string][]byte{"a.txt": []byte("hello\n"), "dir/b.bin": {0, 1, 2}}
	m := manifestOf(files)
	h := sha256.New()
	h.Write([]byte("modelcache tree v1\x00"))
	for _, e := range m {
		fmt.Fprintf(h, "444 %s %s\x00", sha256Hex(files[e.Path]), e.Path)
	}
	want := "sha256:" + hex.EncodeToString(h.Sum(nil))
	if got := store.TreeDigest(m, sumsOf(m, files)); got != want {
		t.Errorf("TreeDigest = %s, want %s", got, want)
	}
	empty := sha256.Sum256([]byte("modelcache tree v1\x00"))
	if got := store.TreeDigest(nil, nil); got != "sha256:"+hex.EncodeToString(empty[:]) {
		t.Errorf("TreeDigest(empty) = %s", got)
	}
}

func digestOf(files map[string][]byte) string {
	m := manifestOf(files)
	return store.TreeDigest(m, sumsOf(m, files))
}

func flip(b []byte) []byte {
	out := append([]byte(nil), b...)
	out[len(out)/2] ^= 1
	return out
}

// Two URIs holding the same files are one tree; the second download finds
// the tree committed and converges on it.
func TestEnsureSameContentDifferentKeys(t *testing.T) {
	idx := newIndex()
	s := openStore(t, idx)
	files := map[string][]byte{"config.json": bytesOf("cfg", 100), "model/w.bin": bytesOf("w", 5000)}
	m := manifestOf(files)

	first, fetched1, err := s.Ensure(context.Background(), "s3-key", m, newFetcher(files))
	if err != nil {
		t.Fatal(err)
	}
	// The second source lists different metadata for the same bytes.
	m2 := manifestOf(files)
	for i := range m2 {
		m2[i].Hash = "md5-from-gcs"
		m2[i].ModTime = time.Unix(42, 0)
	}
	f2 := newFetcher(files)
	second, fetched2, err := s.Ensure(context.Background(), "gcs-key", m2, f2)
	if err != nil {
		t.Fatal(err)
	}
	if !fetched1 || !fetched2 {
		t.Errorf("fetched = %v, %v; a new content key cannot be known without downloading", fetched1, fetched2)
	}
	if f2.totalOpens() != int64(len(files)) {
		t.Errorf("second key opened %d objects, want %d", f2.totalOpens(), len(files))
	}
	if first != second {
		t.Errorf("trees differ for identical content: %+v vs %+v", first, second)
	}
	for _, k := range []string{"s3-key", "gcs-key"} {
		if tr, ok := idx.get(k); !ok || tr != first {
			t.Errorf("index[%s] = %+v, %v; want %+v", k, tr, ok, first)
		}
	}
	if got := entries(t, s.Dir(), store.TreesDir); len(got) != 1 {
		t.Errorf("trees/ holds %v, want one", got)
	}
	checkTree(t, s, first, files)
	checkBlobs(t, s.Dir(), files["config.json"], files["model/w.bin"])
	for p, b := range files {
		if _, st := statT(t, blobPath(s, b)); st.Nlink != 2 {
			t.Errorf("blob of %s has %d links, want 2: the duplicate download must leave nothing behind", p, st.Nlink)
		}
	}
	checkIngestEmpty(t, s.Dir())
}

// Two models sharing a tokenizer share its blob: one inode, linked from both
// trees.
func TestEnsureModelsShareBlobs(t *testing.T) {
	s := openStore(t, newIndex())
	tok := bytesOf("tokenizer", 20000)
	modelA := map[string][]byte{
		"config.json":    []byte(`{"name":"a"}`),
		"tokenizer.json": tok,
		"weights/a.bin":  bytesOf("a", 9000),
	}
	modelB := map[string][]byte{
		"config.json":          []byte(`{"name":"b"}`),
		"tokenizer/tok.json":   tok, // same bytes under another path
		"weights/b.bin":        bytesOf("b", 9000),
		"weights/b-extra.json": []byte(`{"name":"a"}`), // same bytes as A's config
	}
	ta, _, err := s.Ensure(context.Background(), "a", manifestOf(modelA), newFetcher(modelA))
	if err != nil {
		t.Fatal(err)
	}
	tb, _, err := s.Ensure(context.Background(), "b", manifestOf(modelB), newFetcher(modelB))
	if err != nil {
		t.Fatal(err)
	}
	if ta.Digest == tb.Digest {
		t.Fatal("different models got the same tree")
	}
	checkTree(t, s, ta, modelA)
	checkTree(t, s, tb, modelB)
	checkBlobs(t, s.Dir(), tok, modelA["config.json"], modelA["weights/a.bin"],
		modelB["config.json"], modelB["weights/b.bin"])

	_, blob := statT(t, blobPath(s, tok))
	_, inA := statT(t, filepath.Join(s.TreePath(ta.Digest), "tokenizer.json"))
	_, inB := statT(t, filepath.Join(s.TreePath(tb.Digest), "tokenizer", "tok.json"))
	if inA.Ino != blob.Ino || inB.Ino != blob.Ino {
		t.Errorf("tokenizer inodes: blob %d, model a %d, model b %d; want one", blob.Ino, inA.Ino, inB.Ino)
	}
	if blob.Nlink != 3 {
		t.Errorf("shared tokenizer blob has %d links, want 3 (blob + two trees)", blob.Nlink)
	}
	if _, st := statT(t, blobPath(s, modelA["config.json"])); st.Nlink != 3 {
		t.Errorf("blob shared across paths of two models has %d links, want 3", st.Nlink)
	}
	if _, st := statT(t, blobPath(s, modelA["weights/a.bin"])); st.Nlink != 2 {
		t.Errorf("unshared blob has %d links, want 2", st.Nlink)
	}
}

// The "no remote input becomes a path unchecked" invariant is enforced where keys are listed (source.ValidateKey), and the
// store must not turn an unchecked key into a path either: no tree may be
// committed that lacks a file its digest names, and nothing may be written
// outside the tree being built.
func TestEnsureRejectsUnsafePaths(t *testing.T) {
	tests := []string{
		"../escape",
		"../../../outside",
		"../../../../../../../../tmp/escape",
		"/etc/passwd",
		"a/../../b",
		"a//b",
		"./a",
		"a/./b",
		"a/",
		"",
		"a\x00b",
	}
	for _, bad := range tests {
		t.Run(fmt.Sprintf("%q", bad), func(t *testing.T) {
			idx := newIndex()
			s := openStore(t, idx)
			files := map[string][]byte{"ok.txt": []byte("fine"), bad: []byte("evil")}
			m := manifestOf(files)
			f := newFetcher(files)
			tr, _, err := s.Ensure(context.Background(), "key", m, f)
			if err == nil {
				t.Fatalf("Ensure committed %+v from a manifest with key %q", tr, bad)
			}
			if !errors.Is(err, source.ErrUnsafePath) {
				t.Errorf("err = %v, want source.ErrUnsafePath", err)
			}
			if n := f.totalOpens(); n != 0 {
				t.Errorf("%d objects downloaded before the manifest was rejected", n)
			}
			checkNoTrees(t, s.Dir())
			checkIngestEmpty(t, s.Dir())
			if _, ok := idx.get("key"); ok {
				t.Error("index recorded a tree for an unsafe manifest")
			}
			// Nothing but the layout exists under the cache directory.
			top := entries(t, s.Dir(), ".")
			for _, n := range top {
				if n != "blobs" && n != "trees" && n != "ingest" && n != store.PartialDir {
					t.Errorf("unexpected %q in the cache directory", n)
				}
			}
			if _, err := os.Lstat(filepath.Join(filepath.Dir(s.Dir()), "escape")); err == nil {
				t.Error("a file escaped the cache directory")
			}
		})
	}
}

// Manifests whose safe keys still cannot form one tree fail without leaving
// a partial tree behind.
func TestEnsureRejectsConflictingEntries(t *testing.T) {
	tests := []struct {
		name string
		m    source.Manifest
	}{
		{"file is also a directory", source.Manifest{{Path: "a", Size: 1}, {Path: "a/b", Size: 1}}},
		{"path listed twice", source.Manifest{{Path: "a", Size: 1}, {Path: "a", Size: 1}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			idx := newIndex()
			s := openStore(t, idx)
			f := newFetcher(map[string][]byte{"a": []byte("x"), "a/b": []byte("y")})
			if tr, _, err := s.Ensure(context.Background(), "key", tt.m, f); err == nil {
				t.Fatalf("Ensure committed %+v", tr)
			}
			checkNoTrees(t, s.Dir())
			checkIngestEmpty(t, s.Dir())
			if _, ok := idx.get("key"); ok {
				t.Error("index recorded a tree")
			}
		})
	}
}

// Bytes that differ from the checksum the remote listed are never
// committed: a flipped byte (size intact), another object's bytes of the
// same size, and a listing whose checksum is not an MD5 (nothing to check
// against: accepted).
func TestEnsureChecksBytesAgainstTheRemoteMD5(t *testing.T) {
	good := bytesOf("weights", 64<<10)
	flipped := slices.Clone(good)
	flipped[len(flipped)/2] ^= 0x01
	other := bytesOf("other weights", 64<<10)
	md5Of := func(b []byte) string { s := md5.Sum(b); return hex.EncodeToString(s[:]) }
	tests := []struct {
		name    string
		served  []byte
		listed  string // the checksum the listing gave
		wantErr bool
	}{
		{"intact", good, md5Of(good), false},
		{"intact, upper-case ETag", good, strings.ToUpper(md5Of(good)), false},
		{"one byte flipped", flipped, md5Of(good), true},
		{"another object's bytes", other, md5Of(good), true},
		{"no MD5 listed", flipped, "etag-abc-3", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			idx := newIndex()
			s := openStore(t, idx)
			m := source.Manifest{{Path: "w.bin", Size: int64(len(good)), Hash: tt.listed}}
			tr, _, err := s.Ensure(context.Background(), "key", m, newFetcher(map[string][]byte{"w.bin": tt.served}))
			if !tt.wantErr {
				if err != nil {
					t.Fatalf("Ensure: %v", err)
				}
				checkTree(t, s, tr, map[string][]byte{"w.bin": tt.served})
				return
			}
			if !errors.Is(err, source.ErrCorrupt) {
				t.Fatalf("Ensure of corrupted bytes: %v (committed %+v), want ErrCorrupt", err, tr)
			}
			for _, want := range []string{"w.bin", strings.ToLower(tt.listed), md5Of(tt.served)} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not name %s", err, want)
				}
			}
			checkNoTrees(t, s.Dir())
			checkIngestEmpty(t, s.Dir())
			checkBlobs(t, s.Dir())
			if _, ok := idx.get("key"); ok {
				t.Error("index recorded a tree")
			}
		})
	}
}

// A download says how its objects were checked, and reports the objects
// the remote listed without any checksum.
func TestEnsureCountsChecks(t *testing.T) {
	files := map[string][]byte{"a": bytesOf("a", 100), "b": bytesOf("b", 200), "c": bytesOf("c", 300)}
	m := manifestOf(files) // "etag-<path>": not an MD5
	for i := range m[:2] {
		s := md5.Sum(files[m[i].Path])
		m[i].Hash = hex.EncodeToString(s[:])
	}
	var reported int
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{OnUnchecked: func(n int) { reported += n }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(); storetest.MakeWritable(dir) })
	ens, err := s.EnsureGated(context.Background(), "key", m, newFetcher(files), nil)
	if err != nil {
		t.Fatal(err)
	}
	if ens.Checks != (store.Checks{MD5: 2, Unchecked: 1}) || reported != 1 {
		t.Fatalf("checks = %+v, reported %d unchecked; want 2 MD5, 1 unchecked, reported 1", ens.Checks, reported)
	}
}
