package store_test

// Sources that name each file's sha256 before the download (the Hub's LFS
// oids, OCI layer digests): the bytes are checked against it, and a file
// already on the node is linked, not fetched, once the request's own
// credentials were shown to read it.

import (
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// namingFetcher names each file's sha256 in its listing and records the
// paths each Verify was asked about.
type namingFetcher struct {
	*fakeFetcher
	mu        sync.Mutex
	verified  [][]string
	verifyErr error
}

func newNamingFetcher(files map[string][]byte) *namingFetcher {
	return &namingFetcher{fakeFetcher: newFetcher(files)}
}

func (f *namingFetcher) Verify(_ context.Context, m source.Manifest) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var paths []string
	for _, e := range m {
		paths = append(paths, e.Path)
	}
	f.verified = append(f.verified, paths)
	return f.verifyErr
}

func (f *namingFetcher) verifies() [][]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.verified)
}

// namedManifestOf lists files as such a source does: each with its sha256.
func namedManifestOf(files map[string][]byte) source.Manifest {
	m := manifestOf(files)
	for i := range m {
		m[i].Hash = ""
		m[i].SHA256 = sha256Hex(files[m[i].Path])
	}
	return m
}

func TestEnsureChecksBytesAgainstTheSourceSHA256(t *testing.T) {
	good := bytesOf("weights", 64<<10)
	flipped := slices.Clone(good)
	flipped[len(flipped)/3] ^= 0x40
	tests := []struct {
		name    string
		served  []byte
		wantErr bool
	}{
		{"intact", good, false},
		{"one byte flipped", flipped, true},
		{"cut short", good[:len(good)-1], true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			idx := newIndex()
			s := openStore(t, idx)
			m := namedManifestOf(map[string][]byte{"w.bin": good})
			tr, _, err := s.Ensure(context.Background(), "key", m, newNamingFetcher(map[string][]byte{"w.bin": tt.served}))
			if !tt.wantErr {
				if err != nil {
					t.Fatalf("Ensure: %v", err)
				}
				checkTree(t, s, tr, map[string][]byte{"w.bin": good})
				return
			}
			if err == nil {
				t.Fatalf("Ensure of wrong bytes committed %+v, want an error", tr)
			}
			if len(tt.served) == len(good) {
				if !errors.Is(err, source.ErrCorrupt) {
					t.Fatalf("Ensure of corrupted bytes: %v, want ErrCorrupt", err)
				}
				for _, want := range []string{"w.bin", sha256Hex(good), sha256Hex(tt.served)} {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error %q does not name %s", err, want)
					}
				}
			}
			checkNoTrees(t, s.Dir())
			checkIngestEmpty(t, s.Dir())
			checkBlobs(t, s.Dir())
		})
	}
}

// A fine-tune that shares its base model's tokenizer and shards fetches
// only what differs; the shared files are linked once the fine-tune's own
// credentials were checked for exactly those files.
func TestEnsureLinksFilesTheNodeHoldsBySHA256(t *testing.T) {
	shard, tok := bytesOf("shard", 96<<10), bytesOf("tokenizer", 8<<10)
	base := map[string][]byte{"config.json": []byte(`{"base":true}`), "model.safetensors": shard, "tokenizer.json": tok}
	tune := map[string][]byte{"config.json": []byte(`{"tuned":true}`), "weights/model.safetensors": shard, "tokenizer.json": tok}

	tests := []struct {
		name      string
		verifyErr error
		plain     bool // a fetcher that cannot Verify
		wantErr   error
		wantOpens map[string]int64
	}{
		{"credentials read the shared files", nil, false, nil,
			map[string]int64{"config.json": 1, "weights/model.safetensors": 0, "tokenizer.json": 0}},
		{"credentials refused for them", source.ErrDenied, false, source.ErrDenied,
			map[string]int64{"config.json": 0, "weights/model.safetensors": 0, "tokenizer.json": 0}},
		{"a fetcher that cannot show it downloads them", nil, true, nil,
			map[string]int64{"config.json": 1, "weights/model.safetensors": 1, "tokenizer.json": 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, newIndex())
			if _, _, err := s.Ensure(context.Background(), "base", namedManifestOf(base), newNamingFetcher(base)); err != nil {
				t.Fatal(err)
			}
			f := newNamingFetcher(tune)
			f.verifyErr = tt.verifyErr
			var fetcher interface {
				Open(context.Context, source.Entry) (io.ReadCloser, error)
			} = f
			if tt.plain {
				fetcher = f.fakeFetcher
			}
			ens, err := s.EnsureGated(context.Background(), "tune", namedManifestOf(tune), fetcher, nil)
			tr := ens.Tree
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Ensure = %v, want %v", err, tt.wantErr)
			}
			// Linked after Verify: nothing left for the cache to check
			// again with these credentials.
			if err == nil && ens.Reused != 0 {
				t.Errorf("Ensured.Reused = %d, want 0: the linked files were verified", ens.Reused)
			}
			for p, n := range tt.wantOpens {
				if got := f.openCount(p); got != n {
					t.Errorf("%s opened %d times, want %d", p, got, n)
				}
			}
			if tt.plain {
				if v := f.verifies(); len(v) != 0 {
					t.Errorf("Verify asked %v of a fetcher that cannot verify", v)
				}
			} else if v := f.verifies(); len(v) != 1 || !slices.Equal(v[0], []string{"tokenizer.json", "weights/model.safetensors"}) {
				t.Errorf("Verify asked %v, want once, of exactly the two files the node holds", v)
			}
			if tt.wantErr != nil {
				if strings.Contains(err.Error(), "config") {
					t.Errorf("error %q names a file it did not check", err)
				}
				return
			}
			checkTree(t, s, tr, tune)
			_, blob := statT(t, blobPath(s, shard))
			if blob.Nlink != 3 {
				t.Errorf("shared shard blob has %d links, want 3 (blob + two trees)", blob.Nlink)
			}
		})
	}
}

// streamChecking checks the bytes of the files it names while they stream,
// as the Hub's small files are checked against their git blob id.
type streamChecking struct {
	*fakeFetcher
	checks map[string]bool
}

func (f streamChecking) ChecksWhileStreaming(e source.Entry) bool { return f.checks[e.Path] }

// A file its source checks while it streams counts as checked against the
// remote, not as accepted unchecked; the others still count as unchecked.
func TestEnsureCountsFilesTheSourceChecksWhileStreaming(t *testing.T) {
	files := map[string][]byte{"config.json": bytesOf("c", 100), "vocab.txt": bytesOf("v", 200)}
	m := manifestOf(files) // no MD5 listed
	var reported int
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{OnUnchecked: func(n int) { reported += n }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(); storetest.MakeWritable(dir) })
	f := streamChecking{fakeFetcher: newFetcher(files), checks: map[string]bool{"config.json": true}}
	ens, err := s.EnsureGated(context.Background(), "key", m, f, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ens.Checks != (store.Checks{Remote: 1, Unchecked: 1}) || reported != 1 {
		t.Fatalf("checks = %+v, reported %d unchecked; want 1 checked by the source, 1 unchecked, reported 1", ens.Checks, reported)
	}
}
