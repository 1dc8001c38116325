package bench

// Store and state hot paths, measured in process against a real store and a
// real state database in b.TempDir(): hashing, commit, tree build, reference
// lookup. They share this package's TestMain (root, MinIO) but use neither;
// the remote is an in-memory Fetcher. Compare runs with benchstat:
//
//	go test -run '^$' -bench 'Store|State|SHA256' -count 10 ./test/bench > new.txt
//
// A smoke run (-benchtime 1x) runs every path once in well under a minute;
// -short leaves out the sizes that cost seconds per iteration.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/state"
	"github.com/modelcache/modelcache/pkg/store"
)

// memFetcher serves a model's objects from memory.
type memFetcher map[string][]byte

// Open implements store.Fetcher.
func (f memFetcher) Open(_ context.Context, e source.Entry) (io.ReadCloser, error) {
	b, ok := f[e.Path]
	if !ok {
		return nil, fmt.Errorf("no object %q in the in-memory remote", e.Path)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

// manifest lists f's objects in path order, as source.Remote does.
func (f memFetcher) manifest(paths []string) source.Manifest {
	m := make(source.Manifest, len(paths))
	for i, p := range paths {
		m[i] = source.Entry{Path: p, Size: int64(len(f[p]))}
	}
	return m
}

// benchStore opens a store and its state database laid out as the driver
// lays them out under --cache-dir; both close at cleanup.
func benchStore(b *testing.B) (*store.Store, *state.DB) {
	b.Helper()
	dir := b.TempDir()
	db := benchDB(b, dir)
	s, err := store.Open(dir, db, store.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() }) // runs before the database closes
	return s, db
}

// benchDB opens the state database under dir, closed at cleanup.
func benchDB(b *testing.B, dir string) *state.DB {
	b.Helper()
	db, err := state.Open(filepath.Join(dir, "state", "modelcache.db"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = db.Close() })
	return db
}

// randomBytes returns n bytes that differ per seed.
func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	_, _ = rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), 7}).Read(b)
	return b
}

func ensure(b *testing.B, s *store.Store, key string, m source.Manifest, f store.Fetcher) store.Tree {
	b.Helper()
	t, _, err := s.Ensure(context.Background(), key, m, f)
	if err != nil {
		b.Fatalf("Ensure(%s): %v", key, err)
	}
	return t
}

// removeTree drops a tree and its blobs so disk use and the blob directory
// stay flat however many iterations run. Call it with the timer stopped.
func removeTree(b *testing.B, s *store.Store, t store.Tree) {
	b.Helper()
	if _, err := s.RemoveTree(t.Digest); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkStoreIngest is a cold Ensure of a one-file model: hashing while
// writing, fsync, blob commit, tree build, rename and the index record.
// dedup-64MiB ingests a new content key whose bytes are already committed:
// the download and hash still run, the commit finds blob and tree present.
func BenchmarkStoreIngest(b *testing.B) {
	for _, size := range []int{1 << 20, 64 << 20} {
		b.Run(fmt.Sprintf("%dMiB", size>>20), func(b *testing.B) {
			s, _ := benchStore(b)
			f := memFetcher{"w.bin": randomBytes(1, size)}
			m := f.manifest([]string{"w.bin"})
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				// New content each iteration, so nothing is ever already committed.
				binary.LittleEndian.PutUint64(f["w.bin"], uint64(i))
				t := ensure(b, s, fmt.Sprint("key-", i), m, f)
				b.StopTimer()
				removeTree(b, s, t)
				b.StartTimer()
			}
		})
	}
	b.Run("dedup-64MiB", func(b *testing.B) {
		const size = 64 << 20
		s, _ := benchStore(b)
		f := memFetcher{"w.bin": randomBytes(1, size)}
		m := f.manifest([]string{"w.bin"})
		ensure(b, s, "seed", m, f)
		b.SetBytes(size)
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			ensure(b, s, fmt.Sprint("key-", i), m, f)
		}
	})
}

// BenchmarkStoreTreeBuild is a cold Ensure of a model of many 64-byte files,
// 100 to a directory: the cost is per file (open, fsync, link, link).
func BenchmarkStoreTreeBuild(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		b.Run(fmt.Sprintf("%dfiles", n), func(b *testing.B) {
			if n > 1000 && testing.Short() {
				b.Skip("seconds per iteration; run without -short")
			}
			s, _ := benchStore(b)
			f := memFetcher{}
			paths := make([]string, n)
			for j := range paths {
				paths[j] = fmt.Sprintf("d%03d/f%05d.bin", j/100, j)
				f[paths[j]] = randomBytes(uint64(j), 64)
			}
			m := f.manifest(paths)
			b.SetBytes(m.Size())
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				b.StopTimer()
				for _, p := range paths {
					binary.LittleEndian.PutUint64(f[p], uint64(i))
				}
				b.StartTimer()
				t := ensure(b, s, fmt.Sprint("key-", i), m, f)
				b.StopTimer()
				removeTree(b, s, t)
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/file")
		})
	}
}

// BenchmarkSHA256Stream is the hashing baseline for StoreIngest: sha256
// through a 1 MiB copy buffer, as the store's bufPool hands out.
func BenchmarkSHA256Stream(b *testing.B) {
	for _, size := range []int{1 << 20, 64 << 20} {
		b.Run(fmt.Sprintf("%dMiB", size>>20), func(b *testing.B) {
			data := randomBytes(1, size)
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				h := sha256.New()
				// Hide bytes.Reader's WriteTo so the copy goes through buf.
				if _, err := io.CopyBuffer(h, struct{ io.Reader }{bytes.NewReader(data)}, buf); err != nil {
					b.Fatal(err)
				}
				h.Sum(nil)
			}
		})
	}
}

// filledDB returns a state database holding n references, each from its
// own source key, spread over 10 trees, and the target paths and source keys.
func filledDB(b *testing.B, n int) (*state.DB, []string, []string) {
	b.Helper()
	db := benchDB(b, b.TempDir())
	targets, sources := make([]string, n), make([]string, n)
	for i := range n {
		targets[i] = fmt.Sprintf("/var/lib/kubelet/pods/%08d-0000-0000-0000-000000000000/volumes/kubernetes.io~csi/model/mount", i)
		sources[i] = fmt.Sprintf("source-%064x", i)
		if err := db.AddRef(benchRef(i, targets[i]), sources[i]); err != nil {
			b.Fatal(err)
		}
	}
	return db, targets, sources
}

func benchRef(i int, target string) state.Ref {
	return state.Ref{
		VolumeID:   fmt.Sprint("csi-", i),
		TargetPath: target,
		Tree:       fmt.Sprintf("sha256:%064x", i%10),
		ArgsHash:   fmt.Sprintf("sha256:%064x", i),
		URI:        fmt.Sprintf("mys3:bench/model-%d", i%10),
		PodName:    fmt.Sprint("pod-", i),
		PodNS:      "default",
		PodUID:     fmt.Sprintf("%08d-0000-0000-0000-000000000000", i),
		Published:  time.Unix(1700000000, 0).Add(time.Duration(i) * time.Second),
	}
}

// BenchmarkStateRefLookup reads one reference (NodeUnpublish, a repeated
// NodePublish) and one source (a warm publish) from a database of n.
func BenchmarkStateRefLookup(b *testing.B) {
	for _, n := range []int{100, 10000} {
		b.Run(fmt.Sprintf("%drefs", n), func(b *testing.B) {
			db, targets, sources := filledDB(b, n)
			b.Run("Ref", func(b *testing.B) {
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					if _, ok, err := db.Ref(targets[i%n]); err != nil || !ok {
						b.Fatalf("Ref: ok=%v err=%v", ok, err)
					}
				}
			})
			b.Run("SourceTree", func(b *testing.B) {
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					if _, ok, err := db.SourceTree(sources[i%n]); err != nil || !ok {
						b.Fatalf("SourceTree: ok=%v err=%v", ok, err)
					}
				}
			})
		})
	}
}

// BenchmarkStateAddRef records a publish: one committed (fsynced) bbolt
// transaction writing the reference, the source and the tree's last use.
func BenchmarkStateAddRef(b *testing.B) {
	db, _, _ := filledDB(b, 100)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		target := fmt.Sprintf("/var/lib/kubelet/pods/bench-%d/volumes/kubernetes.io~csi/model/mount", i)
		if err := db.AddRef(benchRef(i, target), fmt.Sprintf("source-bench-%d", i%100)); err != nil {
			b.Fatal(err)
		}
	}
}

// populate commits trees models of files small files each into s, the
// first file shared by every model, and returns their content keys.
func populate(b *testing.B, s *store.Store, trees, files int) []string {
	b.Helper()
	shared := randomBytes(0, 4096)
	keys := make([]string, trees)
	for i := range keys {
		f := memFetcher{"config.json": shared}
		paths := []string{"config.json"}
		for j := 1; j < files; j++ {
			p := fmt.Sprintf("shard-%d.bin", j)
			f[p] = randomBytes(uint64(i*files+j), 16<<10)
			paths = append(paths, p)
		}
		keys[i] = fmt.Sprint("key-", i)
		ensure(b, s, keys[i], f.manifest(paths), f)
	}
	return keys
}

// BenchmarkStoreCachedLookup is the store's side of a warm publish: the
// content key's tree from the index, and that the tree is on disk.
func BenchmarkStoreCachedLookup(b *testing.B) {
	s, _ := benchStore(b)
	keys := populate(b, s, 20, 2)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if _, ok := s.Cached(keys[i%len(keys)]); !ok {
			b.Fatalf("%s is not cached", keys[i%len(keys)])
		}
	}
}

// BenchmarkStoreUsage walks a cache of 100 trees of 5 files each (what
// modelcachectl usage and the metrics scrape cost).
func BenchmarkStoreUsage(b *testing.B) {
	b.Run("100trees", func(b *testing.B) {
		s, _ := benchStore(b)
		populate(b, s, 100, 5)
		b.ReportAllocs()
		for b.Loop() {
			u, err := s.Usage()
			if err != nil {
				b.Fatal(err)
			}
			if u.Trees != 100 {
				b.Fatalf("Usage counted %d trees, want 100", u.Trees)
			}
		}
	})
}
