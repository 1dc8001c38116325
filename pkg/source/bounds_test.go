package source

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/rclone/rclone/fs"
	"github.com/rclone/rclone/fs/hash"
)

// manyFs is an rclone Fs whose ListR hands out total objects in batches
// of 1,000, as a bucket listing's pages come, made as they are asked for:
// a remote's listing that would never end for an unbounded walk.
type manyFs struct {
	fs.Fs // unused methods panic
	total int
	// listed counts the objects handed out; heapPeak is the most heap in
	// use seen after a batch, beyond the heap when the walk began.
	listed   int
	base     uint64
	heapPeak uint64
}

func (f *manyFs) Name() string           { return "many" }
func (f *manyFs) Root() string           { return "bucket/model" }
func (f *manyFs) String() string         { return "many" }
func (f *manyFs) Hashes() hash.Set       { return hash.Set(hash.None) }
func (f *manyFs) Features() *fs.Features { return &fs.Features{ListR: f.listR} }

func (f *manyFs) listR(ctx context.Context, dir string, cb fs.ListRCallback) error {
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	f.base = ms.HeapInuse
	for f.listed < f.total {
		batch := make(fs.DirEntries, 0, 1000)
		for range min(1000, f.total-f.listed) {
			batch = append(batch, &manyObject{fs: f, remote: fmt.Sprintf("shard-%07d/weights-%07d.bin", f.listed/1000, f.listed), size: 1})
			f.listed++
		}
		if err := cb(batch); err != nil {
			return err
		}
		if f.listed%50000 == 0 || f.listed < 50000 {
			runtime.GC()
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > f.base {
				f.heapPeak = max(f.heapPeak, ms.HeapInuse-f.base)
			}
		}
	}
	return nil
}

type manyObject struct {
	fs.Object // unused methods panic
	fs        *manyFs
	remote    string
	size      int64
}

func (o *manyObject) Remote() string                                  { return o.remote }
func (o *manyObject) String() string                                  { return o.remote }
func (o *manyObject) Size() int64                                     { return o.size }
func (o *manyObject) ModTime(context.Context) time.Time               { return time.Unix(1700000000, 0) }
func (o *manyObject) Fs() fs.Info                                     { return o.fs }
func (o *manyObject) Hash(context.Context, hash.Type) (string, error) { return "", nil }

// A listing stops as soon as it finds more objects than the limit, and
// fails with ErrTooLarge naming the limit and the flag, so that a bucket of
// a million objects neither downloads nor fills the node's memory with a
// manifest (a 1M-entry one is over 100 MiB of heap); a model within the
// limit is listed whole.
func TestList_StopsPastMaxFiles_HeapBounded(t *testing.T) {
	const limit = 10_000
	for _, tt := range []struct {
		name    string
		objects int
		tooMany bool
	}{
		{"at the limit", limit, false},
		{"one more", limit + 1, true},
		{"a million", 1_000_000, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := &manyFs{total: tt.objects}
			r := &rcloneRemote{uri: URI{Remote: "mys3", Path: "bucket/model"}, maxFiles: limit, main: lazyFs{f: f}}
			m, err := r.List(context.Background())
			if !tt.tooMany {
				if err != nil || len(m) != tt.objects {
					t.Fatalf("listed %d entries, err %v; want %d", len(m), err, tt.objects)
				}
				return
			}
			if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "more than 10000 files") || !strings.Contains(err.Error(), "--max-files") {
				t.Fatalf("err %v, want ErrTooLarge naming the limit and --max-files", err)
			}
			// The walk ends within the batch that crossed the limit.
			if f.listed > limit+1000 {
				t.Errorf("the walk went on to %d objects past a limit of %d", f.listed, limit)
			}
			// 10,000 entries and their objects: a few MiB.
			if f.heapPeak > 32<<20 {
				t.Errorf("the listing's heap grew by %d MiB", f.heapPeak>>20)
			}
			t.Logf("stopped after %d objects; heap grew by at most %.1f MiB", f.listed, float64(f.heapPeak)/(1<<20))
		})
	}
}
