package cache

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
)

// Free inodes count like free bytes: a model of 20,000 one-byte files
// that would take the filesystem below the inodes the budget keeps free is
// refused, ErrNoSpace naming inodes and --min-free-inodes, before any
// object is opened; a model that fits, or any model on a filesystem without
// a fixed number of inodes, downloads.
func TestBudget_FreeInodes_ManySmallFilesRefused(t *testing.T) {
	for _, tt := range []struct {
		name              string
		files, free, have int64 // model files; free and total inodes
		refused           bool
	}{
		// 25,000 free, 10,000 kept: 15,000 to spend.
		{"20,000 files", 20_000, 25_000, 100_000, true},
		// 10,200 free, 10,000 kept: 200 to spend.
		{"100 files", 100, 10_200, 100_000, false},
		{"no fixed inodes", 100, 0, 0, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := openBudgetCache(t, nil, Options{Budget: Budget{MinFreeInodes: 0.10}}, nil)
			b.budget.stat = func() (store.FSStat, error) {
				return store.FSStat{Size: 1 << 40, Free: 1 << 39, Files: tt.have, FreeFiles: tt.free}, nil
			}
			var m source.Manifest
			files := map[string][]byte{}
			for i := range tt.files {
				p := fmt.Sprintf("d%d/f%05d", i%2, i)
				m = append(m, source.Entry{Path: p, Size: 1})
				files[p] = []byte("x")
			}
			f := sourcetest.NewFetcher(files)
			// The cache's gate, as a fetch passes it.
			_, err := b.store.EnsureGated(context.Background(), "key", m, f, b.gate(nopObserver{}, m))
			if !tt.refused {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var noRoom *NoRoomError
			if !errors.Is(err, ErrNoSpace) || !errors.As(err, &noRoom) || !strings.Contains(err.Error(), "inodes") || !strings.Contains(err.Error(), "--min-free-inodes") {
				t.Fatalf("err %v, want ErrNoSpace naming inodes and --min-free-inodes", err)
			}
			// The files, their 2 directories, the tree and the ingest directory.
			if want := tt.files + 4; noRoom.NeedInodes != want {
				t.Errorf("needs %d inodes, want %d", noRoom.NeedInodes, want)
			}
			if n := f.Resolver().OpenTotal(); n != 0 {
				t.Errorf("%d objects opened before the refusal", n)
			}
		})
	}
}
