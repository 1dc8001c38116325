package store_test

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/peer"
	"github.com/modelcache/modelcache/pkg/store"
	"golang.org/x/sys/unix"
)

// The store is what the peer endpoint serves blobs from.
var _ peer.Blobs = (*store.Store)(nil)

// TestOpenBlob_RegularFilesOnly: OpenBlob (the peer endpoint's read of a
// blob) opens a regular file in blobs/ and nothing else: no link, however
// it got there, and no name that is not a blob's.
func TestOpenBlob_RegularFilesOnly(t *testing.T) {
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	blobs := filepath.Join(dir, store.BlobsDir)
	sumOf := func(b string) string { h := sha256.Sum256([]byte(b)); return hex.EncodeToString(h[:]) }
	committed := sumOf("committed")
	if err := os.WriteFile(filepath.Join(blobs, committed), []byte("committed"), 0o444); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("not a blob"), 0o600); err != nil {
		t.Fatal(err)
	}
	link, dirName, fifo := sumOf("link"), sumOf("dir"), sumOf("fifo")
	if err := os.Symlink(secret, filepath.Join(blobs, link)); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(blobs, dirName), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(blobs, fifo), 0o600); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		sum      string
		want     string // content, when it opens
		notExist bool   // else: refused with another error
	}{
		{name: "committed blob", sum: committed, want: "committed"},
		{name: "absent", sum: sumOf("absent"), notExist: true},
		{name: "symlink to a file outside", sum: link, notExist: true},
		{name: "directory", sum: dirName, notExist: true},
		{name: "fifo (would block an open)", sum: fifo, notExist: true},
		{name: "upper-case name", sum: strings.ToUpper(committed)},
		{name: "short name", sum: committed[:63]},
		{name: "path", sum: "../" + committed[3:]},
		{name: "empty", sum: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := s.OpenBlob(tt.sum)
			if tt.want != "" {
				if err != nil {
					t.Fatalf("OpenBlob: %v", err)
				}
				defer f.Close()
				b, err := io.ReadAll(f)
				if err != nil || string(b) != tt.want {
					t.Fatalf("read %q, %v; want %q", b, err, tt.want)
				}
				if _, err := f.Write([]byte("x")); err == nil {
					t.Error("the blob opened writable")
				}
				return
			}
			if err == nil {
				f.Close()
				t.Fatal("opened")
			}
			if got := errors.Is(err, fs.ErrNotExist); got != tt.notExist {
				t.Errorf("error %v: wraps fs.ErrNotExist %v, want %v", err, got, tt.notExist)
			}
			if strings.Contains(err.Error(), "not a blob") {
				t.Errorf("error %v shows what the link points at", err)
			}
		})
	}
}
