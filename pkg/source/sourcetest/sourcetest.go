// Package sourcetest is the in-memory remote every package's unit tests
// share: a source.Resolver whose remotes serve models from a map, count
// what they are asked and the readers they hand out, and can be told to
// fail (at open, or one object at a byte offset), to hang, or to hold a
// download at a byte offset until the test releases it. NewFetcher is
// one such remote on its own, for tests that need only a store.Fetcher.
package sourcetest

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
)

// model is one model at the fake remote.
type model struct {
	files   map[string][]byte
	modTime time.Time
	// uploaded overrides modTime for files uploaded since (UpdateFile).
	uploaded map[string]time.Time
}

func (m *model) manifest() source.Manifest {
	man := ManifestOf(m.files, m.modTime)
	for i, e := range man {
		if t, ok := m.uploaded[e.Path]; ok {
			man[i].ModTime = t
		}
	}
	return man
}

// Credentials of the fake remote: no message, log line, record or reply
// may hold them.
const (
	SecretKey = "s3cr3t-Secret-Access-Key-0123456789abcdef"
	AccessKey = "AKIAFAKEACCESSKEY9876"
)

// Secrets is a node-publish secret for remote mys3 in rclone's environment
// form, as Seldon's seldon-rclone-secret carries it.
func Secrets() map[string]string {
	return map[string]string{
		"RCLONE_CONFIG_MYS3_TYPE":              "s3",
		"RCLONE_CONFIG_MYS3_PROVIDER":          "Minio",
		"RCLONE_CONFIG_MYS3_ENDPOINT":          "http://minio.minio-system.svc.cluster.local:9000",
		"RCLONE_CONFIG_MYS3_ACCESS_KEY_ID":     AccessKey,
		"RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": SecretKey,
	}
}

// Resolver resolves every modelUri to a Remote backed by an in-memory map.
// It counts calls and can be told to fail or to hold downloads. Change its
// exported fields through Set.
type Resolver struct {
	mu     sync.Mutex
	models map[string]*model // canonical modelUri → model

	// Calls so far.
	Resolves, Lists, Verifies int
	// RangeOpens counts OpenRange calls; MaxReaders is the most readers
	// open at once (Open and OpenRange).
	RangeOpens, MaxReaders int
	// RangeBytes counts the bytes ranged readers delivered.
	RangeBytes int64
	readers    int
	// FailRanges makes the next FailRanges OpenRange calls fail with
	// ErrUnavailable, as a dropped connection would.
	FailRanges int
	// FailRangesFrom, when positive, makes every OpenRange from that
	// offset on fail with ErrUnavailable, and a range across it deliver
	// the bytes before it and then fail: a download that stops part way.
	FailRangesFrom int64
	// CutOpens makes the readers of the next CutOpens Open calls fail with
	// io.ErrUnexpectedEOF after CutAfter bytes: a connection closed mid-object.
	CutOpens, CutAfter int
	opens              map[string]int // "uri|path" → Open calls

	// FailPath's readers return FailErr once they have delivered FailAt
	// bytes of it: a connection that breaks at a chosen offset.
	FailPath string
	FailAt   int
	FailErr  error
	// ReadersOpened and ReadersClosed count the readers handed out and
	// closed; ReadersCancelled those the gate let go because their
	// download's context ended.
	ReadersOpened, ReadersClosed, ReadersCancelled int

	// VerifyDenied holds credential IDs whose Verify is refused.
	VerifyDenied map[string]bool

	// Errors injected at each step; nil means succeed.
	ResolveErr error
	ListErr    error
	OpenErr    error

	// ListWaitsForCtx makes List block until its context ends and return
	// the context's error, like a remote that never answers.
	ListWaitsForCtx bool
	// Listed receives the modelUri of every List call, when non-nil.
	Listed chan string

	// gate, when non-nil, stops every reader once it has delivered
	// gateAfter bytes, until gate is closed or the download's context
	// ends; the reader sends its path on blocked first.
	gate      chan struct{}
	gateAfter int
	blocked   chan string
	passed    chan string
}

// NewResolver returns a resolver with no models.
func NewResolver() *Resolver {
	return &Resolver{models: map[string]*model{}, opens: map[string]int{}}
}

// SetModel puts (or replaces) a model at uri. A new modTime makes the
// listing change, as an upload would.
func (r *Resolver) SetModel(uri string, files map[string][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	prev := r.models[uri]
	mt := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	if prev != nil {
		mt = prev.modTime.Add(time.Hour)
	}
	r.models[uri] = &model{files: files, modTime: mt}
}

// UpdateFile uploads one file of the model at uri anew, as a new version
// that changes only that file would: the others keep their listing.
func (r *Resolver) UpdateFile(uri, path string, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.models[uri]
	files := make(map[string][]byte, len(m.files)+1)
	for k, v := range m.files {
		files[k] = v
	}
	files[path] = data
	uploaded := map[string]time.Time{path: m.modTime.Add(time.Duration(len(m.uploaded)+1) * time.Hour)}
	for k, v := range m.uploaded {
		if k != path {
			uploaded[k] = v
		}
	}
	r.models[uri] = &model{files: files, modTime: m.modTime, uploaded: uploaded}
}

// Put puts a model at uri with the given upload time, inside a Set
// callback (the resolver is locked there; SetModel would wait for it).
func (r *Resolver) Put(uri string, files map[string][]byte, modTime time.Time) {
	r.models[uri] = &model{files: files, modTime: modTime}
}

// WithGate makes every reader stop after n bytes until Release, sending
// its path on Blocked first.
func (r *Resolver) WithGate(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.gate = make(chan struct{})
	r.gateAfter = n
	r.blocked = make(chan string, 1024)
	r.passed = make(chan string, 1024)
}

// Release lets gated readers go on.
func (r *Resolver) Release() { close(r.gate) }

// Blocked receives the path of each reader the gate stopped.
func (r *Resolver) Blocked() <-chan string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.blocked
}

// Passed receives the path of each reader once it is through the gate.
func (r *Resolver) Passed() <-chan string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.passed
}

// Set runs f with the resolver locked, to change its fields safely.
func (r *Resolver) Set(f func(r *Resolver)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	f(r)
}

// Counts returns the Resolve, List and Open calls so far.
func (r *Resolver) Counts() (resolves, lists, opens int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, n := range r.opens {
		opens += n
	}
	return r.Resolves, r.Lists, opens
}

// OpenCount is the number of Open calls for one object.
func (r *Resolver) OpenCount(uri, path string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.opens[uri+"|"+path]
}

// ListCount is the number of List calls.
func (r *Resolver) ListCount() int {
	_, l, _ := r.Counts()
	return l
}

// OpenTotal is the number of Open calls.
func (r *Resolver) OpenTotal() int {
	_, _, o := r.Counts()
	return o
}

// Resolve implements source.Resolver.
func (r *Resolver) Resolve(_ context.Context, uri string, secrets map[string]string) (source.Remote, error) {
	r.mu.Lock()
	r.Resolves++
	err := r.ResolveErr
	r.mu.Unlock()
	if err != nil {
		return nil, err
	}
	u, err := source.ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return &Remote{r: r, uri: u, credID: Fingerprint(secrets)}, nil
}

// FetcherURI is the modelUri of the model NewFetcher serves.
const FetcherURI = "mys3:models/fetcher"

// NewFetcher returns a Remote serving files, on a resolver of its own, for
// tests that need a store.Fetcher (and RangeFetcher) but no resolving: its
// Resolver counts, fails and holds as any other.
func NewFetcher(files map[string][]byte) *Remote {
	r := NewResolver()
	r.SetModel(FetcherURI, files)
	u, err := source.ParseURI(FetcherURI)
	if err != nil {
		panic(err)
	}
	return &Remote{r: r, uri: u, credID: Fingerprint(nil)}
}

// Resolver is the resolver behind the remote, to count and steer it.
func (f *Remote) Resolver() *Resolver { return f.r }

// OpenCount is the number of Open and OpenRange calls for one object of
// this remote's model.
func (f *Remote) OpenCount(path string) int { return f.r.OpenCount(f.uri.String(), path) }

// Fingerprint stands in for the HMAC of the credentials: equal secrets give
// equal IDs, and the ID does not contain them.
func Fingerprint(secrets map[string]string) string {
	keys := make([]string, 0, len(secrets))
	for k := range secrets {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	fmt.Fprint(h, "fake node key\x00")
	for _, k := range keys {
		fmt.Fprintf(h, "%s=%s\x00", k, secrets[k])
	}
	return "cred:" + hex.EncodeToString(h.Sum(nil))[:16]
}

// Remote is one model reached with one request's credentials.
type Remote struct {
	r      *Resolver
	uri    source.URI
	credID string
}

// URI implements source.Remote.
func (f *Remote) URI() source.URI { return f.uri }

// Identity implements source.Remote.
func (f *Remote) Identity() string { return IdentityOf(f.uri.String()) }

// CredentialID implements source.Remote.
func (f *Remote) CredentialID() string { return f.credID }

// IdentityOf is the fake's backend identity for a modelUri.
func IdentityOf(uri string) string { return "fake-s3|minio.example|" + uri }

// Verify implements source.Remote: credentials Listed in VerifyDenied are
// refused, as the remote's HEAD would refuse them.
func (f *Remote) Verify(_ context.Context, _ source.Manifest) error {
	r := f.r
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Verifies++
	if r.VerifyDenied[f.credID] {
		return fmt.Errorf("HEAD %s: %w", f.uri, source.ErrDenied)
	}
	return nil
}

// List implements source.Remote.
func (f *Remote) List(ctx context.Context) (source.Manifest, error) {
	r := f.r
	r.mu.Lock()
	r.Lists++
	err, wait, Listed := r.ListErr, r.ListWaitsForCtx, r.Listed
	m := r.models[f.uri.String()]
	var man source.Manifest
	if m != nil {
		man = m.manifest()
	}
	r.mu.Unlock()
	if Listed != nil {
		Listed <- f.uri.String()
	}
	if wait {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, err
	}
	if m == nil {
		return nil, fmt.Errorf("listing %s: %w", f.uri, source.ErrNotFound)
	}
	return man, nil
}

// Open implements source.Remote.
func (f *Remote) Open(ctx context.Context, e source.Entry) (io.ReadCloser, error) {
	r := f.r
	r.mu.Lock()
	defer r.mu.Unlock()
	r.opens[f.uri.String()+"|"+e.Path]++
	if r.OpenErr != nil {
		return nil, r.OpenErr
	}
	m := r.models[f.uri.String()]
	if m == nil {
		return nil, fmt.Errorf("opening %s/%s: %w", f.uri, e.Path, source.ErrNotFound)
	}
	data, ok := m.files[e.Path]
	if !ok {
		return nil, fmt.Errorf("opening %s/%s: %w", f.uri, e.Path, source.ErrNotFound)
	}
	if r.CutOpens > 0 && r.CutAfter < len(data) {
		r.CutOpens--
		return &cutReader{ReadCloser: r.reader(ctx, data[:r.CutAfter], e.Path)}, nil
	}
	return r.reader(ctx, data, e.Path), nil
}

// cutReader ends with io.ErrUnexpectedEOF where the connection was cut.
type cutReader struct{ io.ReadCloser }

func (c *cutReader) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// OpenRange implements store.RangeFetcher: length bytes from offset.
func (f *Remote) OpenRange(ctx context.Context, e source.Entry, offset, length int64) (io.ReadCloser, error) {
	r := f.r
	r.mu.Lock()
	defer r.mu.Unlock()
	r.opens[f.uri.String()+"|"+e.Path]++
	r.RangeOpens++
	if r.FailRanges > 0 || r.FailRangesFrom > 0 && offset >= r.FailRangesFrom {
		r.FailRanges = max(r.FailRanges-1, 0)
		return nil, fmt.Errorf("opening %s/%s: connection reset: %w", f.uri, e.Path, source.ErrUnavailable)
	}
	if r.OpenErr != nil {
		return nil, r.OpenErr
	}
	m := r.models[f.uri.String()]
	data, ok := []byte(nil), false
	if m != nil {
		data, ok = m.files[e.Path]
	}
	if !ok || offset < 0 || offset+length > int64(len(data)) {
		return nil, fmt.Errorf("opening %s/%s bytes %d+%d: %w", f.uri, e.Path, offset, length, source.ErrNotFound)
	}
	g := r.reader(ctx, data[offset:offset+length], e.Path)
	g.ranged = true
	if from := r.FailRangesFrom; from > 0 && offset+length > from {
		g.failAt, g.failErr = int(from-offset), fmt.Errorf("reading %s/%s: connection reset: %w", f.uri, e.Path, source.ErrUnavailable)
	}
	return g, nil
}

// reader serves data through the gate, counting open readers. The caller
// holds r.mu.
func (r *Resolver) reader(ctx context.Context, data []byte, path string) *gatedReader {
	r.readers++
	r.ReadersOpened++
	r.MaxReaders = max(r.MaxReaders, r.readers)
	g := &gatedReader{ctx: ctx, data: data, path: path, gate: r.gate, after: r.gateAfter, blocked: r.blocked, passedCh: r.passed, r: r, failAt: -1}
	if r.FailErr != nil && r.FailPath == path {
		g.failAt, g.failErr = r.FailAt, r.FailErr
	}
	return g
}

// gatedReader serves data, stopping once at after bytes while gate is open.
type gatedReader struct {
	ctx     context.Context
	data    []byte
	off     int
	path    string
	gate    chan struct{}
	after   int
	blocked chan string
	passed  bool
	r       *Resolver
	closed  bool
	// passedCh hears the path once the reader is through the gate.
	passedCh chan string
	// failAt, when not negative, is where the reader fails with failErr.
	failAt  int
	failErr error
	ranged  bool // an OpenRange's: what it delivers counts in RangeBytes
}

func (g *gatedReader) Read(p []byte) (int, error) {
	failing := g.failAt >= 0
	if failing && g.off >= g.failAt {
		return 0, g.failErr
	}
	if g.gate != nil && !g.passed && g.off >= g.after && g.after < len(g.data) {
		g.blocked <- g.path
		select {
		case <-g.gate:
			g.passed = true
			select { // tests that never wait on Passed must not stall here
			case g.passedCh <- g.path:
			default:
			}
		case <-g.ctx.Done():
			g.r.mu.Lock()
			g.r.ReadersCancelled++
			g.r.mu.Unlock()
			return 0, g.ctx.Err()
		}
	}
	if g.off >= len(g.data) {
		return 0, io.EOF
	}
	end := len(g.data)
	if g.gate != nil && !g.passed && g.after < end {
		end = g.after
	}
	if failing && g.failAt < end {
		end = g.failAt
	}
	n := copy(p, g.data[g.off:end])
	g.off += n
	if g.ranged {
		g.r.mu.Lock()
		g.r.RangeBytes += int64(n)
		g.r.mu.Unlock()
	}
	return n, nil
}

func (g *gatedReader) Close() error {
	if g.r != nil && !g.closed {
		g.closed = true
		g.r.mu.Lock()
		g.r.readers--
		g.r.ReadersClosed++
		g.r.mu.Unlock()
	}
	return nil
}

// ManifestOf Lists files the way a Remote does: sorted, with size, an
// ETag-like checksum and the upload time.
func ManifestOf(files map[string][]byte, modTime time.Time) source.Manifest {
	var m source.Manifest
	for p, b := range files {
		sum := md5.Sum(b)
		m = append(m, source.Entry{Path: p, Size: int64(len(b)), Hash: hex.EncodeToString(sum[:]), ModTime: modTime})
	}
	slices.SortFunc(m, func(a, b source.Entry) int { return strings.Compare(a.Path, b.Path) })
	return m
}

// SizeOf is the bytes of a model's files.
func SizeOf(files map[string][]byte) int64 {
	var n int64
	for _, b := range files {
		n += int64(len(b))
	}
	return n
}

// Manifest is the listing the resolver currently gives for uri.
func (r *Resolver) Manifest(uri string) source.Manifest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.models[uri].manifest()
}

// Files returns the files of the model at uri.
func (r *Resolver) Files(uri string) map[string][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	if m := r.models[uri]; m != nil {
		return m.files
	}
	return nil
}

// Bytes makes n deterministic bytes that differ per seed.
func Bytes(seed string, n int) []byte {
	b := make([]byte, 0, n+sha256.Size)
	for i := 0; len(b) < n; i++ {
		s := sha256.Sum256([]byte(fmt.Sprintf("%s/%d", seed, i)))
		b = append(b, s[:]...)
	}
	return b[:n]
}

// Sha256Hex is the hex sha256 of b.
func Sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Recv waits for a value from ch, failing the test after limit: a guard
// against hangs, never a timing a test depends on.
func Recv[T any](t testing.TB, ch <-chan T, limit time.Duration, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(limit):
		t.Fatalf("timed out waiting for %s", what)
		var zero T
		return zero
	}
}
