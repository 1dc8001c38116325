package store_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/store"
	"github.com/modelcache/modelcache/pkg/store/storetest"
)

// sampleModel is a small model with nested directories, an empty file and
// two paths holding the same bytes.
func sampleModel() map[string][]byte {
	return map[string][]byte{
		"config.json":                 []byte(`{"model_type":"bert"}`),
		"tokenizer/tokenizer.json":    bytesOf("tokenizer", 5000),
		"tokenizer/vocab.txt":         []byte("[PAD]\n[UNK]\n"),
		"weights/shard-1/model.bin":   bytesOf("weights-1", 3<<20+17), // larger than one copy buffer
		"weights/shard-2/model.bin":   bytesOf("weights-2", 4096),
		"weights/shard-2/copy-of.txt": []byte("[PAD]\n[UNK]\n"),
		"empty":                       {},
	}
}

func TestEnsureMissDownloadsAndCommits(t *testing.T) {
	idx := newIndex()
	s := openStore(t, idx)
	files := sampleModel()
	m := manifestOf(files)
	f := newFetcher(files)

	tr, fetched, err := s.Ensure(context.Background(), "key-1", m, f)
	if err != nil {
		t.Fatalf("Ensure: %v", err)
	}
	if !fetched {
		t.Error("Ensure on a miss returned fetched=false")
	}
	for p := range files {
		if n := f.openCount(p); n != 1 {
			t.Errorf("%s opened %d times, want 1", p, n)
		}
	}
	if f.readersClosed() != f.readersOpened() {
		t.Errorf("%d readers opened, %d closed", f.readersOpened(), f.readersClosed())
	}
	checkTree(t, s, tr, files)
	// Six distinct contents: vocab.txt and copy-of.txt share one blob.
	checkBlobs(t, s.Dir(), files["config.json"], files["tokenizer/tokenizer.json"],
		files["tokenizer/vocab.txt"], files["weights/shard-1/model.bin"],
		files["weights/shard-2/model.bin"], files["empty"])
	_, st := statT(t, blobPath(s, files["tokenizer/vocab.txt"]))
	if st.Nlink != 3 {
		t.Errorf("blob shared by two paths of one tree has %d links, want 3 (blob + 2 tree entries)", st.Nlink)
	}
	_, st = statT(t, blobPath(s, files["config.json"]))
	if st.Nlink != 2 {
		t.Errorf("config blob has %d links, want 2 (blob + tree); ingest copies must be gone", st.Nlink)
	}
	checkIngestEmpty(t, s.Dir())
	if got := entries(t, s.Dir(), store.TreesDir); len(got) != 1 {
		t.Errorf("trees/ holds %v, want exactly one tree", got)
	}
	if rec, ok := idx.get("key-1"); !ok || rec != tr {
		t.Errorf("index holds %+v, %v for the key; want %+v", rec, ok, tr)
	}
	if _, ok := s.Downloading("key-1"); ok {
		t.Error("Downloading reports a download after Ensure returned")
	}
}

func TestEnsureHitDoesNotFetch(t *testing.T) {
	idx := newIndex()
	s := openStore(t, idx)
	files := sampleModel()
	m := manifestOf(files)
	first, _, err := s.Ensure(context.Background(), "key", m, newFetcher(files))
	if err != nil {
		t.Fatal(err)
	}

	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name string
		ctx  context.Context
	}{
		{"live context", context.Background()},
		// A hit needs no waiting, so an ended context still gets the answer.
		{"ended context", cancelled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFetcher(files)
			tr, fetched, err := s.Ensure(tt.ctx, "key", m, f)
			if err != nil {
				t.Fatalf("Ensure: %v", err)
			}
			if fetched {
				t.Error("second Ensure returned fetched=true")
			}
			if tr != first {
				t.Errorf("second Ensure = %+v, want %+v", tr, first)
			}
			if n := f.totalOpens(); n != 0 {
				t.Errorf("cache hit opened %d objects", n)
			}
		})
	}
	if n := idx.records.Load(); n != 1 {
		t.Errorf("RecordTree called %d times, want 1", n)
	}
}

// An index entry whose tree is gone (evicted by hand, say) and an index that
// cannot be read both cost a download, never a wrong answer.
func TestEnsureRefetchesWhenIndexCannotBeTrusted(t *testing.T) {
	files := map[string][]byte{"a.bin": bytesOf("a", 100), "b/c.bin": bytesOf("c", 200)}
	m := manifestOf(files)
	tests := []struct {
		name  string
		spoil func(t *testing.T, s *store.Store, idx *memIndex, tr store.Tree)
	}{
		{"tree removed from disk", func(t *testing.T, s *store.Store, idx *memIndex, tr store.Tree) {
			storetest.MakeWritable(s.TreePath(tr.Digest))
			if err := os.RemoveAll(s.TreePath(tr.Digest)); err != nil {
				t.Fatal(err)
			}
		}},
		{"index names an invalid digest", func(t *testing.T, s *store.Store, idx *memIndex, tr store.Tree) {
			idx.mu.Lock()
			idx.trees["key"] = store.Tree{Digest: "sha256:../../etc"}
			idx.mu.Unlock()
		}},
		{"index unreadable", func(t *testing.T, s *store.Store, idx *memIndex, tr store.Tree) {
			idx.setLookupErr(errIndex)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			idx := newIndex()
			s := openStore(t, idx)
			tr, _, err := s.Ensure(context.Background(), "key", m, newFetcher(files))
			if err != nil {
				t.Fatal(err)
			}
			tt.spoil(t, s, idx, tr)
			f := newFetcher(files)
			got, fetched, err := s.Ensure(context.Background(), "key", m, f)
			if err != nil {
				t.Fatalf("Ensure: %v", err)
			}
			if !fetched || f.totalOpens() != int64(len(files)) {
				t.Errorf("fetched=%v with %d opens; want a fresh download of %d files", fetched, f.totalOpens(), len(files))
			}
			if got.Digest != tr.Digest {
				t.Errorf("digest %s, want %s", got.Digest, tr.Digest)
			}
			checkTree(t, s, got, files)
			checkIngestEmpty(t, s.Dir())
		})
	}
}

// The "one download per key" invariant: kubelet publishes many pods at once; the node downloads once.
func TestEnsureConcurrentSameKeyDownloadsOnce(t *testing.T) {
	const callers = 50
	idx := newIndex()
	s := openStore(t, idx)
	files := sampleModel()
	m := manifestOf(files)
	// The gate holds the first byte of every file so the download is still
	// running while the callers pile up.
	f := newFetcher(files).withGate(1)

	start := make(chan struct{})
	var ready, done sync.WaitGroup
	results := make([]result, callers)
	for i := range callers {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			ready.Done()
			<-start
			tr, fetched, err := s.Ensure(context.Background(), "key", m, f)
			results[i] = result{tr, fetched, err}
		}()
	}
	ready.Wait()
	close(start)
	// At least one reader reached the gate: the download is under way.
	f.waitBlocked(t, 1)
	f.release()
	done.Wait()

	for i, r := range results {
		if r.err != nil {
			t.Fatalf("caller %d: %v", i, r.err)
		}
		if r.tree != results[0].tree {
			t.Errorf("caller %d got %+v, caller 0 got %+v", i, r.tree, results[0].tree)
		}
	}
	for p := range files {
		if n := f.openCount(p); n != 1 {
			t.Errorf("%s opened %d times by %d concurrent callers, want exactly 1", p, n, callers)
		}
	}
	if n := idx.records.Load(); n != 1 {
		t.Errorf("RecordTree called %d times, want 1", n)
	}
	checkTree(t, s, results[0].tree, files)
	checkIngestEmpty(t, s.Dir())
}

// Two content keys (two URIs, two credentials) listing identical files
// download separately but converge on one tree and one set of blobs, even
// when both commits race.
func TestEnsureConcurrentKeysWithSameContentShareTree(t *testing.T) {
	const perKey = 10
	idx := newIndex()
	s := openStore(t, idx)
	files := map[string][]byte{
		"config.json": bytesOf("config", 300),
		"model.bin":   bytesOf("model", 70000),
		"sub/x.txt":   bytesOf("x", 10),
	}
	m := manifestOf(files)
	f := newFetcher(files).withGate(2)

	keys := []string{"key-from-s3", "key-from-gcs"}
	var chans []<-chan result
	for _, k := range keys {
		for range perKey {
			chans = append(chans, ensureAsync(context.Background(), s, k, m, f))
		}
	}
	// Both downloads hold every file at the gate (3 files each, within the
	// default 4 transfers), so their commits run at the same time.
	f.waitBlocked(t, len(keys)*len(files))
	f.release()

	var digest string
	for i, ch := range chans {
		r := waitResult(t, ch, fmt.Sprintf("Ensure %d", i))
		if r.err != nil {
			t.Fatalf("Ensure %d: %v", i, r.err)
		}
		if digest == "" {
			digest = r.tree.Digest
		}
		if r.tree.Digest != digest {
			t.Errorf("Ensure %d: digest %s, want %s", i, r.tree.Digest, digest)
		}
	}
	for p := range files {
		if n := f.openCount(p); n != int64(len(keys)) {
			t.Errorf("%s opened %d times, want once per key (%d)", p, n, len(keys))
		}
	}
	for _, k := range keys {
		if tr, ok := idx.get(k); !ok || tr.Digest != digest {
			t.Errorf("index for %s = %+v, %v; want digest %s", k, tr, ok, digest)
		}
	}
	if got := entries(t, s.Dir(), store.TreesDir); len(got) != 1 {
		t.Errorf("trees/ holds %v, want one shared tree", got)
	}
	checkTree(t, s, store.Tree{Digest: digest, Size: m.Size(), Files: len(m)}, files)
	checkBlobs(t, s.Dir(), files["config.json"], files["model.bin"], files["sub/x.txt"])
	for p, b := range files {
		if _, st := statT(t, blobPath(s, b)); st.Nlink != 2 {
			t.Errorf("blob of %s has %d links, want 2 (blob + the one tree)", p, st.Nlink)
		}
	}
	checkIngestEmpty(t, s.Dir())
}

// The "downloads outlive the RPC" invariant: a publish's context ends long before a big model arrives. The
// caller gets an *InProgressError with progress, the download goes on, and a
// retry joins it instead of starting another.
func TestEnsureDetachedDownload(t *testing.T) {
	idx := newIndex()
	s := openStore(t, idx)
	files := map[string][]byte{"model.safetensors": bytesOf("big", 1000)}
	m := manifestOf(files)
	f := newFetcher(files).withGate(250)

	ctx, cancel := context.WithCancel(context.Background())
	first := ensureAsync(ctx, s, "key", m, f)
	f.waitBlocked(t, 1)

	p, ok := s.Downloading("key")
	if !ok {
		t.Fatal("Downloading reports nothing while the download runs")
	}
	if p.Total != 1000 || p.Done() != 250 {
		t.Errorf("Downloading progress = %d/%d, want 250/1000", p.Done(), p.Total)
	}
	if _, ok := s.Downloading("other-key"); ok {
		t.Error("Downloading reports a download for a key nobody asked for")
	}

	cancel()
	r := waitResult(t, first, "Ensure with an ended context")
	var ip *store.InProgressError
	if !errors.As(r.err, &ip) || !store.IsInProgress(r.err) {
		t.Fatalf("Ensure with an ended context = %v, want *InProgressError", r.err)
	}
	if ip.Done != 250 || ip.Total != 1000 {
		t.Errorf("InProgressError = %d/%d, want 250/1000", ip.Done, ip.Total)
	}
	if !strings.Contains(ip.Error(), "25%") {
		t.Errorf("message %q does not say 25%%", ip.Error())
	}
	if r.fetched || r.tree != (store.Tree{}) {
		t.Errorf("in-progress answer carries a tree: %+v, fetched=%v", r.tree, r.fetched)
	}
	if f.readersCancelled() != 0 {
		t.Fatal("the caller's context cancelled the download; it must be detached")
	}
	if _, ok := s.Downloading("key"); !ok {
		t.Fatal("download stopped when its caller gave up")
	}
	checkNoTrees(t, s.Dir())

	// A retry whose own context has already ended gets progress, not a new download.
	ended, cancelEnded := context.WithCancel(context.Background())
	cancelEnded()
	r = waitResult(t, ensureAsync(ended, s, "key", m, f), "retry with an ended context")
	if !errors.As(r.err, &ip) || ip.Done != 250 || ip.Total != 1000 {
		t.Errorf("retry = %v, want in progress 250/1000", r.err)
	}

	// A patient retry joins the running download.
	retry := ensureAsync(context.Background(), s, "key", m, f)
	f.release()
	r = waitResult(t, retry, "joining Ensure")
	if r.err != nil {
		t.Fatalf("joining Ensure: %v", r.err)
	}
	checkTree(t, s, r.tree, files)
	if n := f.openCount("model.safetensors"); n != 1 {
		t.Errorf("object opened %d times across caller and retries, want 1", n)
	}
	if tr, ok := idx.get("key"); !ok || tr != r.tree {
		t.Errorf("finished download not recorded: %+v, %v", tr, ok)
	}
	if _, ok := s.Downloading("key"); ok {
		t.Error("Downloading still reports the finished download")
	}
	checkIngestEmpty(t, s.Dir())
}

// The index is not written by any RPC: a download whose every caller has
// gone still records its tree, so the next publish is a plain hit.
func TestEnsureDetachedDownloadRecordsWithoutCaller(t *testing.T) {
	idx := newIndex()
	s := openStore(t, idx)
	files := map[string][]byte{"a": bytesOf("a", 64), "b": bytesOf("b", 64)}
	m := manifestOf(files)
	f := newFetcher(files).withGate(8)

	ctx, cancel := context.WithCancel(context.Background())
	first := ensureAsync(ctx, s, "key", m, f)
	f.waitBlocked(t, 2)
	cancel()
	if r := waitResult(t, first, "Ensure"); !store.IsInProgress(r.err) {
		t.Fatalf("Ensure = %v, want in progress", r.err)
	}
	f.release()
	f.waitPassed(t, 2)
	// Close waits for the detached download. Both readers are through the
	// gate, so it finishes rather than being cancelled.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	tr, ok := idx.get("key")
	if !ok {
		t.Fatal("detached download finished without recording its tree")
	}
	s2 := openStoreAt(t, s.Dir(), idx)
	again := newFetcher(files)
	got, fetched, err := s2.Ensure(context.Background(), "key", m, again)
	if err != nil || fetched || got != tr || again.totalOpens() != 0 {
		t.Errorf("Ensure after detached download = %+v, %v, %v with %d opens; want a hit", got, fetched, err, again.totalOpens())
	}
	checkTree(t, s2, got, files)
}

// A failed download leaves nothing visible: no tree, no index record, no
// ingest. Every caller sees the error and the next Ensure starts afresh.
func TestEnsureFailureLeavesNothing(t *testing.T) {
	good := map[string][]byte{
		"a/model.bin": bytesOf("model", 200000),
		"b.json":      bytesOf("b", 100),
		"c.txt":       bytesOf("c", 50),
	}
	tests := []struct {
		name   string
		remote func() *fakeFetcher // what the failing download reads
		isErr  error
	}{
		{"remote error mid-file", func() *fakeFetcher {
			f := newFetcher(good)
			f.failAt("a/model.bin", 70000, errBoom)
			return f
		}, errBoom},
		{"remote error before the first byte", func() *fakeFetcher {
			f := newFetcher(good)
			f.failAt("c.txt", 0, errBoom)
			return f
		}, errBoom},
		{"open fails", func() *fakeFetcher {
			f := newFetcher(good)
			f.failOpens(errBoom)
			return f
		}, errBoom},
		{"object shrank after listing", func() *fakeFetcher {
			changed := maps(good)
			changed["a/model.bin"] = changed["a/model.bin"][:150000]
			return newFetcher(changed)
		}, source.ErrChanged},
		{"object grew after listing", func() *fakeFetcher {
			changed := maps(good)
			changed["b.json"] = append(append([]byte(nil), changed["b.json"]...), "more"...)
			return newFetcher(changed)
		}, source.ErrChanged},
		{"object emptied after listing", func() *fakeFetcher {
			changed := maps(good)
			changed["c.txt"] = nil
			return newFetcher(changed)
		}, source.ErrChanged},
		{"object missing at the remote", func() *fakeFetcher {
			changed := maps(good)
			delete(changed, "b.json")
			return newFetcher(changed)
		}, source.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			idx := newIndex()
			s := openStore(t, idx)
			m := manifestOf(good)
			bad := tt.remote()

			// Several callers share the failing download and its error.
			var chans []<-chan result
			for range 3 {
				chans = append(chans, ensureAsync(context.Background(), s, "key", m, bad))
			}
			for i, ch := range chans {
				r := waitResult(t, ch, "failing Ensure")
				if !errors.Is(r.err, tt.isErr) {
					t.Errorf("caller %d: err = %v, want %v", i, r.err, tt.isErr)
				}
				if store.IsInProgress(r.err) {
					t.Errorf("caller %d: a failure reported as in progress", i)
				}
				if r.fetched || r.tree != (store.Tree{}) {
					t.Errorf("caller %d: failure carries a tree: %+v, fetched=%v", i, r.tree, r.fetched)
				}
			}
			checkNoTrees(t, s.Dir())
			checkIngestEmpty(t, s.Dir())
			if _, ok := idx.get("key"); ok {
				t.Error("index recorded a tree for a failed download")
			}
			if _, ok := s.Downloading("key"); ok {
				t.Error("Downloading reports the failed download")
			}
			if bad.readersClosed() != bad.readersOpened() {
				t.Errorf("%d readers opened, %d closed", bad.readersOpened(), bad.readersClosed())
			}
			if errors.Is(tt.isErr, source.ErrChanged) {
				r := waitResult(t, ensureAsync(context.Background(), s, "key", m, bad), "Ensure")
				if r.err == nil || !strings.Contains(r.err.Error(), "publish again") {
					t.Errorf("message %q does not say what to do", r.err)
				}
			}

			// The remote recovers; the next publish downloads and commits.
			f := newFetcher(good)
			tr, fetched, err := s.Ensure(context.Background(), "key", m, f)
			if err != nil {
				t.Fatalf("Ensure after failure: %v", err)
			}
			if !fetched {
				t.Error("Ensure after failure returned fetched=false")
			}
			checkTree(t, s, tr, good)
			checkIngestEmpty(t, s.Dir())
			if rec, ok := idx.get("key"); !ok || rec != tr {
				t.Errorf("index = %+v, %v after recovery", rec, ok)
			}
		})
	}
}

func maps(in map[string][]byte) map[string][]byte {
	out := make(map[string][]byte, len(in))
	for k, v := range in {
		out[k] = v
	}
	return out
}

// A tree that is committed but cannot be recorded is an error for the
// caller; the next Ensure records it without keeping a second copy.
func TestEnsureIndexWriteFailure(t *testing.T) {
	idx := newIndex()
	s := openStore(t, idx)
	files := map[string][]byte{"a": bytesOf("a", 10)}
	m := manifestOf(files)
	idx.setRecordErr(errIndex)
	_, _, err := s.Ensure(context.Background(), "key", m, newFetcher(files))
	if !errors.Is(err, errIndex) {
		t.Fatalf("Ensure = %v, want the index error", err)
	}
	checkIngestEmpty(t, s.Dir())

	idx.setRecordErr(nil)
	tr, _, err := s.Ensure(context.Background(), "key", m, newFetcher(files))
	if err != nil {
		t.Fatal(err)
	}
	checkTree(t, s, tr, files)
	if got, ok := idx.get("key"); !ok || got != tr {
		t.Errorf("index = %+v, %v", got, ok)
	}
	if got := entries(t, s.Dir(), store.TreesDir); len(got) != 1 {
		t.Errorf("trees/ holds %v, want one", got)
	}
}

// Close cancels a running download and returns only after it has cleaned
// up: no ingest left, no tree, the caller told why.
func TestCloseCancelsRunningDownload(t *testing.T) {
	idx := newIndex()
	dir := t.TempDir()
	s, err := store.Open(dir, idx, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { storetest.MakeWritable(dir) })
	files := map[string][]byte{"a": bytesOf("a", 100), "b": bytesOf("b", 100)}
	m := manifestOf(files)
	f := newFetcher(files).withGate(10)
	caller := ensureAsync(context.Background(), s, "key", m, f)
	f.waitBlocked(t, 2)
	if len(entries(t, dir, store.IngestDir)) != 1 {
		t.Fatal("running download has no ingest directory")
	}

	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-timeAfter():
		t.Fatal("Close did not return; it must cancel the download")
	}
	// Close has returned: the download must already be over and cleaned up.
	if n := f.readersCancelled(); n != 2 {
		t.Errorf("%d readers saw the cancellation, want 2", n)
	}
	if f.readersClosed() != f.readersOpened() {
		t.Errorf("%d readers opened, %d closed when Close returned", f.readersOpened(), f.readersClosed())
	}
	checkIngestEmpty(t, dir)
	checkNoTrees(t, dir)
	if _, ok := s.Downloading("key"); ok {
		t.Error("Downloading reports a download after Close")
	}
	if _, ok := idx.get("key"); ok {
		t.Error("cancelled download recorded a tree")
	}
	r := waitResult(t, caller, "Ensure interrupted by Close")
	if !errors.Is(r.err, context.Canceled) {
		t.Errorf("caller got %v, want context.Canceled", r.err)
	}
}

func TestCloseIdle(t *testing.T) {
	s, err := store.Open(t.TempDir(), newIndex(), store.Options{Transfers: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// A closed store downloads nothing.
func TestEnsureAfterClose(t *testing.T) {
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"a": []byte("a")}
	f := newFetcher(files)
	_, _, err = s.Ensure(context.Background(), "key", manifestOf(files), f)
	if err == nil || !strings.Contains(err.Error(), "shutting down") {
		t.Errorf("Ensure on a closed store: %v, want an error saying the store is shutting down", err)
	}
	if n := f.readersOpened(); n != 0 {
		t.Errorf("closed store opened %d objects at the remote", n)
	}
	checkNoTrees(t, dir)
	if n, _ := filepath.Glob(filepath.Join(dir, store.BlobsDir, "*")); len(n) != 0 {
		t.Errorf("closed store committed blobs %v", n)
	}
}

// Close racing new downloads must neither trip the race detector nor leave
// a download running on a closed store.
func TestCloseRacingEnsure(t *testing.T) {
	dir := t.TempDir()
	s, err := store.Open(dir, newIndex(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"a": []byte("a")}
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			_, _, _ = s.Ensure(context.Background(), fmt.Sprint("key-", i), manifestOf(files), newFetcher(files))
		})
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
}

// Transfers bounds how many files of one model stream at once, and
// MaxConnections how many streams the node opens, whatever Transfers says.
func TestEnsureTransfersLimit(t *testing.T) {
	tests := []struct {
		transfers, conns, files, want int
	}{
		{1, 0, 5, 1},
		{2, 0, 5, 2},
		{0, 0, store.DefaultTransfers + 4, store.DefaultTransfers}, // default
		{8, 0, 3, 3},
		{8, 3, 6, 3},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("transfers=%d conns=%d files=%d", tt.transfers, tt.conns, tt.files), func(t *testing.T) {
			dir := t.TempDir()
			s, err := store.Open(dir, newIndex(), store.Options{Transfers: tt.transfers, MaxConnections: tt.conns})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close(); storetest.MakeWritable(dir) })
			files := map[string][]byte{}
			for i := range tt.files {
				files[fmt.Sprintf("f%d", i)] = bytesOf(fmt.Sprint(i), 32)
			}
			f := newFetcher(files).withGate(4)
			res := ensureAsync(context.Background(), s, "key", manifestOf(files), f)
			f.waitBlocked(t, tt.want)
			time.Sleep(20 * time.Millisecond) // time for an open beyond the bound to show
			// Every allowed transfer is parked at the gate; no more may open.
			if n := f.totalOpens(); n != int64(tt.want) {
				t.Errorf("%d files open at once, want %d", n, tt.want)
			}
			f.release()
			r := waitResult(t, res, "Ensure")
			if r.err != nil {
				t.Fatal(r.err)
			}
			checkTree(t, s, r.tree, files)
		})
	}
}
