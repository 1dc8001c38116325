package store_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/units"
)

const validHex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func TestValidDigest(t *testing.T) {
	tests := []struct {
		name   string
		digest string
		want   bool
	}{
		{"lowercase sha256", "sha256:" + validHex, true},
		{"all zeros", "sha256:" + strings.Repeat("0", 64), true},
		{"empty", "", false},
		{"algorithm only", "sha256:", false},
		{"no algorithm", validHex, false},
		{"other algorithm", "sha512:" + validHex, false},
		{"uppercase algorithm", "SHA256:" + validHex, false},
		{"uppercase hex", "sha256:" + strings.ToUpper(validHex), false},
		{"63 hex", "sha256:" + validHex[:63], false},
		{"65 hex", "sha256:" + validHex + "0", false},
		{"non-hex letter", "sha256:" + validHex[:63] + "g", false},
		{"path traversal", "sha256:../../etc", false},
		{"traversal padded to length", "sha256:../" + validHex[3:], false},
		{"slash inside", "sha256:" + validHex[:32] + "/" + validHex[33:], false},
		{"trailing newline", "sha256:" + validHex + "\n", false},
		{"leading space", " sha256:" + validHex, false},
		{"trailing NUL", "sha256:" + validHex + "\x00", false},
		{"prefix of a longer string", "sha256:" + validHex + "/x", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := store.ValidDigest(tt.digest); got != tt.want {
				t.Errorf("ValidDigest(%q) = %v, want %v", tt.digest, got, tt.want)
			}
		})
	}
}

func TestOpenCreatesLayout(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "not", "yet", "there")
	s := openStoreAt(t, dir, newIndex())
	if s.Dir() != dir {
		t.Errorf("Dir() = %s, want %s", s.Dir(), dir)
	}
	for _, sub := range []string{store.BlobsDir, store.TreesDir, store.IngestDir} {
		fi, err := os.Stat(filepath.Join(dir, sub))
		if err != nil {
			t.Errorf("%s not created: %v", sub, err)
			continue
		}
		if !fi.IsDir() {
			t.Errorf("%s is %v, want a directory", sub, fi.Mode())
		}
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v; store internals must not be open to other users", sub, fi.Mode())
		}
	}
}

func TestOpenRejectsFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cache")
	if err := os.WriteFile(dir, []byte("not a directory"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := store.Open(dir, newIndex(), store.Options{})
	if err == nil {
		s.Close()
		t.Fatal("Open on a regular file succeeded")
	}
}

// A crash leaves ingest/ behind, including sealed (0555) tree directories a
// non-root process cannot remove without restoring write bits first. Open
// must drop all of it and keep committed blobs and trees.
func TestOpenRemovesLeftoverIngest(t *testing.T) {
	dir := t.TempDir()
	idx := newIndex()
	files := map[string][]byte{"config.json": []byte(`{"a":1}`), "w/model.bin": bytesOf("w", 3000)}
	m := manifestOf(files)

	// A committed model from before the crash.
	s := openStoreAt(t, dir, idx)
	tr, _, err := s.Ensure(context.Background(), "key", m, newFetcher(files))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// Debris of a crashed download, sealed the way buildTree seals a tree.
	crash := filepath.Join(dir, store.IngestDir, "0badc0ffee")
	deep := filepath.Join(crash, "tree", "sub", "deeper")
	if err := os.MkdirAll(deep, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{filepath.Join(crash, "blob-0"), filepath.Join(deep, "file")} {
		if err := os.WriteFile(f, []byte("partial"), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{deep, filepath.Dir(deep), filepath.Join(crash, "tree"), crash} {
		if err := os.Chmod(d, 0o555); err != nil {
			t.Fatal(err)
		}
	}
	// A second leftover that is just a file.
	if err := os.WriteFile(filepath.Join(dir, store.IngestDir, "stray"), nil, 0o444); err != nil {
		t.Fatal(err)
	}

	s2 := openStoreAt(t, dir, idx)
	checkIngestEmpty(t, dir)
	fi, err := os.Stat(filepath.Join(dir, store.IngestDir))
	if err != nil || !fi.IsDir() {
		t.Fatalf("ingest/ not recreated: %v", err)
	}
	// Committed content survives and is a cache hit with no download.
	checkTree(t, s2, tr, files)
	checkBlobs(t, dir, files["config.json"], files["w/model.bin"])
	none := newFetcher(nil)
	got, fetched, err := s2.Ensure(context.Background(), "key", m, none)
	if err != nil || fetched || got != tr {
		t.Fatalf("Ensure after restart = %+v, %v, %v; want %+v, false, nil", got, fetched, err, tr)
	}
	if none.totalOpens() != 0 {
		t.Errorf("cache hit after restart opened %d objects", none.totalOpens())
	}
}

func TestHasTree(t *testing.T) {
	s := openStore(t, newIndex())
	dir := s.Dir()
	files := map[string][]byte{"a": []byte("a")}
	tr, _, err := s.Ensure(context.Background(), "k", manifestOf(files), newFetcher(files))
	if err != nil {
		t.Fatal(err)
	}

	// Things that exist on disk but must never be taken for trees.
	mk := func(p string) string {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(dir, p), 0o700); err != nil {
			t.Fatal(err)
		}
		return p
	}
	mk("etc")                                                    // what sha256:../../etc would name
	mk(filepath.Join(store.TreesDir, strings.ToUpper(validHex))) // uppercase name
	mk(filepath.Join(store.TreesDir, "short"))
	fileHex := strings.Repeat("f", 64)
	if err := os.WriteFile(filepath.Join(dir, store.TreesDir, fileHex), nil, 0o444); err != nil {
		t.Fatal(err)
	}
	linkHex := strings.Repeat("e", 64)
	if err := os.Symlink(s.TreePath(tr.Digest), filepath.Join(dir, store.TreesDir, linkHex)); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name   string
		digest string
		want   bool
	}{
		{"committed tree", tr.Digest, true},
		{"valid but absent", "sha256:" + validHex, false},
		{"traversal to an existing directory", "sha256:../../etc", false},
		{"traversal into trees", "sha256:../sha256/" + strings.TrimPrefix(tr.Digest, "sha256:"), false},
		{"uppercase hex of an existing directory", "sha256:" + strings.ToUpper(validHex), false},
		{"short name of an existing directory", "sha256:short", false},
		{"no algorithm", strings.TrimPrefix(tr.Digest, "sha256:"), false},
		{"empty", "", false},
		{"a regular file, not a tree", "sha256:" + fileHex, false},
		{"a symlink to a tree", "sha256:" + linkHex, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := s.HasTree(tt.digest); got != tt.want {
				t.Errorf("HasTree(%q) = %v, want %v", tt.digest, got, tt.want)
			}
		})
	}
}

func TestHumanBytes(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{10 * 1024, "10.0 KiB"},
		{1 << 20, "1.0 MiB"},
		{3<<20 + 1<<19, "3.5 MiB"},
		{5 << 30, "5.0 GiB"},
		{1 << 40, "1.0 TiB"},
		{1 << 50, "1.0 PiB"},
		{1 << 60, "1.0 EiB"},
		{1<<63 - 1, "8.0 EiB"},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.n), func(t *testing.T) {
			if got := units.Bytes(tt.n); got != tt.want {
				t.Errorf("units.Bytes(%d) = %q, want %q", tt.n, got, tt.want)
			}
		})
	}
}

func TestInProgressError(t *testing.T) {
	tests := []struct {
		name        string
		done, total int64
		want        string
	}{
		{"nothing yet", 0, 4 << 30, "download still running: 0 B of 4.0 GiB (0%)"},
		{"half", 512, 1024, "download still running: 512 B of 1.0 KiB (50%)"},
		{"rounded", 1 << 30, 3 << 30, "download still running: 1.0 GiB of 3.0 GiB (33%)"},
		{"complete", 7 << 20, 7 << 20, "download still running: 7.0 MiB of 7.0 MiB (100%)"},
		{"unknown total", 10, 0, "download still running: 10 B of 0 B (0%)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := &store.InProgressError{Done: tt.done, Total: tt.total}
			if got := err.Error(); got != tt.want {
				t.Errorf("Error() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestIsInProgress(t *testing.T) {
	ip := &store.InProgressError{Done: 1, Total: 2}
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"plain error", errors.New("download still running"), false},
		{"context deadline", context.DeadlineExceeded, false},
		{"not cached", store.ErrNoTree, false},
		{"in progress", ip, true},
		{"wrapped once", fmt.Errorf("publishing: %w", ip), true},
		{"wrapped twice", fmt.Errorf("a: %w", fmt.Errorf("b: %w", ip)), true},
		{"joined", errors.Join(errBoom, ip), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := store.IsInProgress(tt.err); got != tt.want {
				t.Errorf("IsInProgress(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// A crash between a tree's rename into trees/ and the sealing of its top
// directory leaves it writable; the next Open seals it (the "read-only everywhere" invariant).
func TestOpenSealsTreeLeftWritableByACrash(t *testing.T) {
	dir := t.TempDir()
	idx := newIndex()
	files := map[string][]byte{"config.json": []byte(`{}`)}
	s := openStoreAt(t, dir, idx)
	tr, _, err := s.Ensure(context.Background(), "key", manifestOf(files), newFetcher(files))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	top := s.TreePath(tr.Digest)
	if err := os.Chmod(top, 0o700); err != nil {
		t.Fatal(err)
	}
	s = openStoreAt(t, dir, idx)
	defer s.Close()
	fi, err := os.Stat(top)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o555 {
		t.Fatalf("tree top mode after Open is %v, want 0555", fi.Mode().Perm())
	}
}
