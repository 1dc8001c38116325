package peer_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/peer"
)

// projected writes a token the way kubelet's atomic writer does: the
// file is a link through ..data to a timestamped directory, and an update
// swaps ..data to a new directory.
func projected(t *testing.T, dir, version, token string) {
	t.Helper()
	ts := filepath.Join(dir, "..v"+version)
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ts, "token"), []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "token")); os.IsNotExist(err) {
		if err := os.Symlink(filepath.Join("..data", "token"), filepath.Join(dir, "token")); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFileTokenSource: the token kubelet projects, read again after each
// rotation, trimmed; a missing, empty or oversized file is an error that
// does not show its content.
func TestFileTokenSource(t *testing.T) {
	dir := t.TempDir()
	src := &peer.FileTokenSource{Path: filepath.Join(dir, "token")}
	steps := []struct {
		name   string
		change func()
		want   string // "" for an error
	}{
		{name: "missing", change: func() {}},
		{name: "first token", change: func() { projected(t, dir, "1", "token-one\n") }, want: "token-one"},
		{name: "unchanged", change: func() {}, want: "token-one"},
		{name: "rotated, same length", change: func() { projected(t, dir, "2", "token-two\n") }, want: "token-two"},
		{name: "rotated, longer", change: func() { projected(t, dir, "3", "token-three") }, want: "token-three"},
		{name: "empty", change: func() { projected(t, dir, "4", " \n") }},
		{name: "oversized", change: func() { projected(t, dir, "5", strings.Repeat("s", 32<<10)) }},
		{name: "back to a token", change: func() { projected(t, dir, "6", "token-six") }, want: "token-six"},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			st.change()
			got, err := src.Token()
			if st.want == "" {
				if err == nil {
					t.Fatalf("token %q, want an error", got)
				}
				if strings.Contains(err.Error(), "sss") {
					t.Errorf("the error shows the file's content: %.80s", err)
				}
				return
			}
			if err != nil || got != st.want {
				t.Fatalf("Token() = %q, %v; want %q", got, err, st.want)
			}
		})
	}
}
