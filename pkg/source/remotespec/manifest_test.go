package remotespec

import (
	"errors"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestCheckManifest(t *testing.T) {
	ts := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	e := func(p string, size int64) Entry { return Entry{Path: p, Size: size, Hash: "h-" + p, ModTime: ts} }
	tests := []struct {
		name      string
		in        Manifest
		wantPaths []string // sorted, when valid
		wantErr   error
		wantMsg   string
	}{
		{name: "empty", in: Manifest{}, wantPaths: []string{}},
		{name: "one file", in: Manifest{e("model.bin", 3)}, wantPaths: []string{"model.bin"}},
		{name: "sorts by path", in: Manifest{e("b", 1), e("a/c", 2), e("a/b", 3), e("a.bin", 4)}, wantPaths: []string{"a.bin", "a/b", "a/c", "b"}},
		{name: "byte order, not locale order", in: Manifest{e("b", 1), e("C", 1), e("a", 1), e("é", 1)}, wantPaths: []string{"C", "a", "b", "é"}},
		{name: "zero size is fine", in: Manifest{e("empty", 0)}, wantPaths: []string{"empty"}},
		{name: "name that prefixes a directory name", in: Manifest{e("ab", 1), e("a/b", 1), e("a-b/c", 1)}, wantPaths: []string{"a-b/c", "a/b", "ab"}},
		{name: "siblings under a deep directory", in: Manifest{e("x/y/z/1", 1), e("x/y/z/2", 1), e("x/y/3", 1)}, wantPaths: []string{"x/y/3", "x/y/z/1", "x/y/z/2"}},
		{name: "duplicate", in: Manifest{e("a", 1), e("b", 1), e("a", 1)}, wantErr: ErrUnsafePath, wantMsg: `"a" is listed twice`},
		{name: "file is also a directory", in: Manifest{e("a", 1), e("a/b", 1)}, wantErr: ErrUnsafePath, wantMsg: `"a" is both an object and a directory`},
		{name: "file is also a directory, listed after", in: Manifest{e("a/b", 1), e("a", 1)}, wantErr: ErrUnsafePath, wantMsg: `"a" is both`},
		{name: "file is also a deep directory", in: Manifest{e("a/b/c/d", 1), e("a/b", 1)}, wantErr: ErrUnsafePath, wantMsg: `"a/b" is both`},
		{name: "negative size", in: Manifest{e("a", 1), e("b", -1)}, wantErr: ErrInvalid, wantMsg: `"b" has no known size`},
		{name: "escaping key", in: Manifest{e("ok", 1), e("../x", 1)}, wantErr: ErrUnsafePath, wantMsg: `".." segment`},
		{name: "absolute key", in: Manifest{e("/etc/passwd", 1)}, wantErr: ErrUnsafePath, wantMsg: "absolute"},
		{name: "empty key", in: Manifest{e("", 1)}, wantErr: ErrUnsafePath, wantMsg: "empty"},
		{name: "directory marker key", in: Manifest{e("dir/", 0)}, wantErr: ErrUnsafePath, wantMsg: "empty segment"},
		{name: "NUL in key", in: Manifest{e("a\x00b", 1)}, wantErr: ErrUnsafePath, wantMsg: "NUL"},
		{name: "control character in key", in: Manifest{e("a\nb", 1)}, wantErr: ErrUnsafePath, wantMsg: `"a\nb" contains a control character`},
		{name: "keys differ only in case", in: Manifest{e("Model.bin", 1), e("model.bin", 1)}, wantErr: ErrUnsafePath, wantMsg: `objects "Model.bin" and "model.bin" differ only in case`},
		{name: "keys differ only in case, deep", in: Manifest{e("x/y/Z", 1), e("x/Y/z", 1), e("x/q", 1)}, wantErr: ErrUnsafePath, wantMsg: "differ only in case"},
		{name: "keys equal under Unicode folding", in: Manifest{e("\u212a.bin", 1), e("k.bin", 1)}, wantErr: ErrUnsafePath, wantMsg: "differ only in case"},
		{name: "long s folds to s", in: Manifest{e("\u017fafe", 1), e("Safe", 1)}, wantErr: ErrUnsafePath, wantMsg: "differ only in case"},
		{name: "file is a directory under case folding", in: Manifest{e("A", 1), e("a/b", 1)}, wantErr: ErrUnsafePath, wantMsg: `object "A" and directory "a" differ only in case`},
		{name: "file is a deep directory under case folding", in: Manifest{e("m/Tok", 1), e("m/tok/vocab", 1)}, wantErr: ErrUnsafePath, wantMsg: "differ only in case"},
		{name: "exact directory wins the message", in: Manifest{e("A/x", 1), e("a", 1), e("a/y", 1)}, wantErr: ErrUnsafePath, wantMsg: `"a" is both an object and a directory`},
		{name: "directories differing in case are fine", in: Manifest{e("a/x", 1), e("A/y", 1)}, wantPaths: []string{"A/y", "a/x"}},
		{name: "fold-distinct names", in: Manifest{e("ss", 1), e("ß", 1), e("e\u0301", 1), e("é", 1)}, wantPaths: []string{"e\u0301", "ss", "ß", "é"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := CheckManifest(slices.Clone(tc.in))
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("checkManifest = %v, %v; want error %v", got, err, tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantMsg) {
					t.Errorf("checkManifest error %q does not say %q", err, tc.wantMsg)
				}
				if got != nil {
					t.Errorf("checkManifest returned %v with its error, want nil", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("checkManifest: %v", err)
			}
			paths := []string{}
			for _, e := range got {
				paths = append(paths, e.Path)
				// Fields travel with their path through the sort.
				if e.Hash != "h-"+e.Path {
					t.Errorf("entry %q carries hash %q, want %q", e.Path, e.Hash, "h-"+e.Path)
				}
			}
			if !slices.Equal(paths, tc.wantPaths) {
				t.Errorf("checkManifest paths = %q, want %q", paths, tc.wantPaths)
			}
			if got.Size() != tc.in.Size() {
				t.Errorf("checkManifest changed the total size: %d, want %d", got.Size(), tc.in.Size())
			}
		})
	}
}

func TestManifestSize(t *testing.T) {
	if got := (Manifest{}).Size(); got != 0 {
		t.Errorf("empty Size() = %d, want 0", got)
	}
	m := Manifest{{Path: "a", Size: 1}, {Path: "b", Size: 1 << 40}, {Path: "c", Size: 0}}
	if got, want := m.Size(), int64(1+1<<40); got != want {
		t.Errorf("Size() = %d, want %d", got, want)
	}
}

func TestContentKey(t *testing.T) {
	const identity = "s3|http://minio:9000||bucket/m"
	ts := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	base := Manifest{
		{Path: "config.json", Size: 10, Hash: "aaaa", ModTime: ts},
		{Path: "weights/model.safetensors", Size: 1 << 30, Hash: "bbbb", ModTime: ts.Add(time.Second)},
	}
	change := func(i int, f func(*Entry)) Manifest {
		m := slices.Clone(base)
		f(&m[i])
		return m
	}
	key := ContentKey(identity, base)

	t.Run("format", func(t *testing.T) {
		if !regexp.MustCompile(`^sha256:[0-9a-f]{64}$`).MatchString(key) {
			t.Errorf("ContentKey = %q, want sha256:<64 hex>", key)
		}
	})

	t.Run("stable", func(t *testing.T) {
		if again := ContentKey(identity, slices.Clone(base)); again != key {
			t.Errorf("ContentKey of an equal manifest = %q, want %q", again, key)
		}
		// The same instant in another zone is the same listing.
		inZone := change(0, func(e *Entry) { e.ModTime = ts.In(time.FixedZone("CET", 3600)) })
		if got := ContentKey(identity, inZone); got != key {
			t.Errorf("ContentKey changed with the time zone of an equal instant: %q, want %q", got, key)
		}
		// Golden value: content keys are persisted in every node's state
		// database, so the v1 encoding must not change by accident.
		const golden = "sha256:97c12d4f6895875f85ef4225de54d95d1ffc16fd5346966c7729b6a58d54ae54"
		if key != golden {
			t.Errorf("ContentKey = %q, want the v1 value %q", key, golden)
		}
	})

	variants := []struct {
		name     string
		identity string
		m        Manifest
	}{
		{"path", identity, change(0, func(e *Entry) { e.Path = "config2.json" })},
		{"size", identity, change(1, func(e *Entry) { e.Size++ })},
		{"hash", identity, change(1, func(e *Entry) { e.Hash = "cccc" })},
		{"hash appears", identity, change(0, func(e *Entry) { e.Hash = "" })},
		{"modtime", identity, change(0, func(e *Entry) { e.ModTime = ts.Add(time.Nanosecond) })},
		{"identity endpoint", "s3|http://minio2:9000||bucket/m", base},
		{"identity path", "s3|http://minio:9000||bucket/m2", base},
		{"an added entry", identity, append(slices.Clone(base), Entry{Path: "z", ModTime: ts})},
		{"a removed entry", identity, base[:1]},
		{"no entries", identity, Manifest{}},
		{"size moved between entries", identity, change(0, func(e *Entry) { e.Size = 11 })},
	}
	for _, tc := range variants {
		t.Run("changes with "+tc.name, func(t *testing.T) {
			if got := ContentKey(tc.identity, tc.m); got == key {
				t.Errorf("ContentKey did not change with a different %s", tc.name)
			}
		})
	}

	t.Run("fields do not run into each other", func(t *testing.T) {
		a := ContentKey("id", Manifest{{Path: "a1", Size: 2, ModTime: ts}})
		b := ContentKey("id", Manifest{{Path: "a", Size: 12, ModTime: ts}})
		c := ContentKey("ida", Manifest{{Path: "1", Size: 2, ModTime: ts}})
		if a == b || a == c || b == c {
			t.Errorf("ContentKey is ambiguous across field boundaries: %s %s %s", a, b, c)
		}
	})
}

// ObjectKey names an object by its MD5 when listed with one, else by its
// version, in a format of its own; nothing at all when it has neither.
func TestObjectKey(t *testing.T) {
	ts := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	const id = "s3|endpoint|bucket"
	base := Entry{Path: "w.bin", Size: 10, ModTime: ts}
	with := func(f func(*Entry)) Entry { e := base; f(&e); return e }
	md5 := with(func(e *Entry) { e.Hash = "0123456789abcdef0123456789abcdef" })
	etag := with(func(e *Entry) { e.Version = "etag:0123456789abcdef0123456789abcdef-3" })
	// The same string as MD5 and as version must name two objects.
	sameString := with(func(e *Entry) { e.Version = md5.Hash })
	tests := []struct {
		name   string
		a, b   Entry
		idB    string
		equal  bool
		emptyA bool
	}{
		{"no MD5, no version: no key", base, base, id, false, true},
		{"same MD5", md5, md5, id, true, false},
		{"same version", etag, etag, id, true, false},
		{"MD5 wins over version", md5, with(func(e *Entry) { e.Hash = md5.Hash; e.Version = "etag:x-2" }), id, true, false},
		{"other version", etag, with(func(e *Entry) { e.Version = "etag:0123456789abcdef0123456789abcdef-4" }), id, false, false},
		{"version never equals an MD5 key", md5, sameString, id, false, false},
		{"other size", etag, with(func(e *Entry) { e.Version = etag.Version; e.Size = 11 }), id, false, false},
		{"other time", etag, with(func(e *Entry) { e.Version = etag.Version; e.ModTime = ts.Add(time.Nanosecond) }), id, false, false},
		{"other path", etag, with(func(e *Entry) { e.Version = etag.Version; e.Path = "x.bin" }), id, false, false},
		{"other backend", etag, etag, "s3|endpoint|other", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := ObjectKey(id, tt.a), ObjectKey(tt.idB, tt.b)
			if (a == "") != tt.emptyA {
				t.Fatalf("ObjectKey(%+v) = %q, want empty %v", tt.a, a, tt.emptyA)
			}
			if tt.emptyA {
				return
			}
			if (a == b) != tt.equal {
				t.Errorf("keys %q and %q: equal %v, want %v", a, b, a == b, tt.equal)
			}
		})
	}
}
