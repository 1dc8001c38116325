// Package store is the content-addressed model store under --cache-dir.
// Files are streamed into ingest/, hashed while they stream, fsynced and
// linked into blobs/sha256/<hex>; a model is a tree of read-only hardlinks
// into blobs/, named by the digest of its content and made visible by one
// atomic rename. Every write goes through an os.Root opened on the cache
// directory, so no path built from remote input can leave it.
package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"golang.org/x/sync/singleflight"
	"k8s.io/klog/v2"
)

// Layout under the cache directory (docs/design.md "Store layout").
const (
	BlobsDir  = "blobs/sha256"
	TreesDir  = "trees/sha256"
	IngestDir = "ingest"
	// PartialDir is in partial.go.
)

// ErrNoTree means a tree is not (or no longer) in the store.
var ErrNoTree = errors.New("tree is not in the store")

var digestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)

// ValidDigest reports whether d is "sha256:<64 lowercase hex>". Digests are
// checked before they become paths.
func ValidDigest(d string) bool { return digestRE.MatchString(d) }

// Tree describes a committed model.
type Tree struct {
	Digest string `json:"digest"` // sha256:<hex> of paths, modes and file digests
	Size   int64  `json:"size"`   // bytes of file content
	Files  int    `json:"files"`  // records written as "Files" still decode
}

// Index remembers which tree a content key produced. pkg/state implements it;
// keeping it behind an interface lets the store record a finished download
// even when every RPC that asked for it has already returned.
type Index interface {
	TreeForKey(key string) (Tree, bool, error)
	RecordTree(key string, t Tree) error
}

// Store is a content-addressed model store.
type Store struct {
	dir       string
	root      *os.Root
	index     Index
	transfers int
	// Ranged downloads: files of rangeCutoff bytes or more (0: never) in
	// chunks of rangeChunk, rangeStreams at a time.
	rangeCutoff, rangeChunk, rangeSpan, rangeCheckpoint int64
	rangeStreams                                        int
	// chunks are the node's ranged-chunk buffers, conns bounds the node's
	// requests to remotes; both are shared fairly by running downloads.
	chunks *chunkPool
	conns  *fairSlots
	// A stream below minStreamRate bytes/s over stallWindow is cut and
	// retried; a download without progress for stallTimeout fails, one no
	// caller waited for within grace is cancelled (0: never).
	minStreamRate                    int64
	stallWindow, stallTimeout, grace time.Duration
	// partialBusy: partial files a download is writing.
	partialMu   sync.Mutex
	partialBusy map[string]bool

	tally       tally // running counts (counts.go)
	onUnchecked func(objects int)
	onDownload  func() func(int64, error)
	onBytes     func(source string, n int64)

	flights singleflight.Group
	mu      sync.Mutex
	running map[string]*Progress
	wants   map[string]*wanted

	// treesMu orders removals (writers) against publishes mounting a tree
	// (readers, UseTree).
	treesMu sync.RWMutex

	// Downloads are detached from RPC contexts and end only with the store.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// Options tune a Store.
type Options struct {
	// Transfers is how many files of one model download at once (default
	// DefaultTransfers).
	Transfers int
	// MaxConnections bounds the requests to remotes open at once on the
	// node, over all downloads (default DefaultMaxConnections).
	MaxConnections int
	// RangeCutoff: files of this many bytes or more download in parallel
	// ranged chunks (default DefaultRangeCutoff; negative: never).
	RangeCutoff int64
	// RangeStreams is how many chunks of one file download at once
	// (default DefaultRangeStreams).
	RangeStreams int
	// RangeChunk is the size of one chunk (default DefaultRangeChunk).
	RangeChunk int64
	// RangeSpan is how much one ranged read asks for, in whole chunks
	// (default DefaultRangeSpan).
	RangeSpan int64
	// RangeCheckpoint is how many bytes of a ranged download are made
	// durable at a time, for resuming (default DefaultRangeCheckpoint).
	RangeCheckpoint int64
	// MinStreamRate in bytes/s over StallWindow: a stream slower than that
	// is cut and retried (defaults DefaultMinStreamRate and
	// DefaultStallWindow; negative: never cut).
	MinStreamRate int64
	StallWindow   time.Duration
	// StallTimeout fails a download that makes no progress for that long
	// (default DefaultStallTimeout; negative: never).
	StallTimeout time.Duration
	// DownloadGrace cancels a download no caller waited for within it
	// (default DefaultDownloadGrace; negative: never).
	DownloadGrace time.Duration
	// OnUnchecked is told how many objects of a download the remote listed
	// without any checksum, so that nothing checked them (metrics).
	OnUnchecked func(objects int)
	// OnDownload is called as a download starts; the function it returns
	// is called with the bytes transferred when it ends (metrics).
	OnDownload func() (done func(bytes int64, err error))
	// OnBytes is told of every read of a download's bytes, by where they
	// came from (FromOrigin, FromPeer), as they arrive (metrics). It runs
	// on the download's hot path: it must be cheap.
	OnBytes func(source string, n int64)
}

// Defaults of Options.
const (
	// DefaultTransfers is higher than rclone's --transfers 4: a model of
	// many small files is bound by each request's time to first byte, not
	// by bandwidth.
	DefaultTransfers = 16
	// DefaultMaxConnections leaves room for a few downloads at once.
	DefaultMaxConnections = 64
)

// Open prepares the layout under dir and removes ingest left by a crash:
// nothing in ingest/ was ever visible as a model, so it is safe to drop.
// Partial files of large downloads are kept for resuming, for a day.
func Open(dir string, index Index, opt Options) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating cache directory: %w", err)
	}
	// kubelet creates a DirectoryOrCreate hostPath 0755; models and the
	// state database are for root on this node only.
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("restricting cache directory: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("opening cache directory: %w", err)
	}
	if err := removeAll(root, IngestDir); err != nil {
		root.Close()
		return nil, fmt.Errorf("cleaning leftover ingest: %w", err)
	}
	for _, d := range []string{BlobsDir, TreesDir, IngestDir, PartialDir} {
		if err := root.MkdirAll(d, 0o700); err != nil {
			root.Close()
			return nil, fmt.Errorf("creating %s: %w", d, err)
		}
	}
	if err := sealTrees(root); err != nil {
		root.Close()
		return nil, err
	}
	if opt.Transfers <= 0 {
		opt.Transfers = DefaultTransfers
	}
	if opt.MaxConnections <= 0 {
		opt.MaxConnections = DefaultMaxConnections
	}
	if opt.RangeCheckpoint <= 0 {
		opt.RangeCheckpoint = DefaultRangeCheckpoint
	}
	switch {
	case opt.RangeCutoff == 0:
		opt.RangeCutoff = DefaultRangeCutoff
	case opt.RangeCutoff < 0:
		opt.RangeCutoff = 0
	}
	if opt.RangeStreams <= 0 {
		opt.RangeStreams = DefaultRangeStreams
	}
	if opt.RangeChunk <= 0 {
		opt.RangeChunk = DefaultRangeChunk
	}
	if opt.RangeSpan <= 0 {
		opt.RangeSpan = DefaultRangeSpan
	}
	opt.MinStreamRate = orDefault(opt.MinStreamRate, DefaultMinStreamRate)
	opt.StallWindow = orDefault(opt.StallWindow, DefaultStallWindow)
	opt.StallTimeout = orDefault(opt.StallTimeout, DefaultStallTimeout)
	opt.DownloadGrace = orDefault(opt.DownloadGrace, DefaultDownloadGrace)
	ctx, cancel := context.WithCancel(context.Background())
	s := &Store{
		dir: dir, root: root, index: index, transfers: opt.Transfers,
		rangeCutoff: opt.RangeCutoff, rangeStreams: opt.RangeStreams, rangeChunk: opt.RangeChunk, rangeSpan: opt.RangeSpan, rangeCheckpoint: opt.RangeCheckpoint,
		chunks: newChunkPool(2 * opt.RangeStreams), conns: newFairSlots(opt.MaxConnections),
		minStreamRate: opt.MinStreamRate, stallWindow: opt.StallWindow, stallTimeout: opt.StallTimeout, grace: opt.DownloadGrace,
		partialBusy: map[string]bool{},
		onUnchecked: opt.OnUnchecked, onDownload: opt.OnDownload, onBytes: opt.OnBytes,
		running: map[string]*Progress{}, wants: map[string]*wanted{}, ctx: ctx, cancel: cancel,
	}
	if _, err := s.DropPartials(partialMaxAge); err != nil {
		root.Close()
		return nil, err
	}
	if err := s.count(); err != nil {
		root.Close()
		return nil, fmt.Errorf("counting the store: %w", err)
	}
	return s, nil
}

// orDefault is v, or def for zero, or zero (off) for a negative v.
func orDefault[T int64 | time.Duration](v, def T) T {
	switch {
	case v == 0:
		return def
	case v < 0:
		return 0
	}
	return v
}

// acquireConn takes one of the node's connections to remotes for the
// download ctx belongs to, within its share.
func (s *Store) acquireConn(ctx context.Context) error {
	return s.conns.acquire(ctx, downloadOf(ctx))
}

func (s *Store) releaseConn(ctx context.Context) { s.conns.release(downloadOf(ctx)) }

// connSlots are the node's connections as source.Slots.
type connSlots struct{ s *Store }

func (c connSlots) Acquire(ctx context.Context) error { return c.s.acquireConn(ctx) }
func (c connSlots) Release(ctx context.Context)       { c.s.releaseConn(ctx) }

// withConns makes the requests source makes with rclone's API clients
// under ctx (checksum HEADs, GCS metadata) take the node's connections.
func (s *Store) withConns(ctx context.Context) context.Context {
	return source.WithSlots(ctx, connSlots{s})
}

// Close cancels running downloads and waits for them to clean up.
func (s *Store) Close() error {
	// Under mu, so no download registers itself after the cancel.
	s.mu.Lock()
	s.cancel()
	s.mu.Unlock()
	s.wg.Wait()
	return s.saveCountsAndClose()
}

// Dir is the cache directory.
func (s *Store) Dir() string { return s.dir }

// TreePath is the absolute path of a tree; digest must be valid.
func (s *Store) TreePath(digest string) string {
	return filepath.Join(s.dir, TreesDir, digest[len("sha256:"):])
}

// HasTree reports whether a committed tree exists.
func (s *Store) HasTree(digest string) bool {
	if !ValidDigest(digest) {
		return false
	}
	fi, err := s.root.Lstat(path.Join(TreesDir, digest[len("sha256:"):]))
	return err == nil && fi.IsDir()
}

// sealTrees drops the write bits of every tree's top directory. A tree is
// renamed into trees/ before its top is sealed, so a crash between the two
// steps leaves a complete tree that is still writable (the "read-only everywhere" invariant).
func sealTrees(root *os.Root) error {
	des, err := fs.ReadDir(root.FS(), TreesDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading %s: %w", TreesDir, err)
	}
	for _, d := range des {
		if !d.IsDir() {
			continue
		}
		if err := root.Chmod(path.Join(TreesDir, d.Name()), dirMode); err != nil {
			return fmt.Errorf("sealing tree %s: %w", d.Name(), err)
		}
	}
	return nil
}

// randomName is an ingest directory name no other download uses.
func randomName() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// removeAll removes name under root even where earlier commits dropped the
// write bits (0555 directories), which RemoveAll alone cannot do as non-root.
func removeAll(root *os.Root, name string) error {
	err := fs.WalkDir(root.FS(), name, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = root.Chmod(p, 0o700)
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		klog.V(4).InfoS("walking before removal", "path", name, "err", err)
	}
	return root.RemoveAll(name)
}

// Content is the store's contract with the cache above it, small enough
// for one conformance suite (storetest.Run) that every implementation
// passes, as containerd's content stores pass content/testsuite.
type Content interface {
	// Ensure returns the committed tree for a content key, downloading the
	// manifest's files through f once however many callers ask.
	Ensure(ctx context.Context, key string, m source.Manifest, f Fetcher) (Tree, bool, error)
	// Cached returns the committed tree for a content key, if any.
	Cached(key string) (Tree, bool)
	// HasTree reports whether a tree is committed.
	HasTree(digest string) bool
	// TreePath is where a committed tree is, for mounting.
	TreePath(digest string) string
	// TreeFiles lists a committed tree's files.
	TreeFiles(digest string) ([]TreeFile, error)
	// RemoveTree removes a tree and every blob no other tree links.
	RemoveTree(digest string) (int64, error)
}

var _ Content = (*Store)(nil)
