package source

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/modelcache/modelcache/pkg/egress"
	"github.com/modelcache/modelcache/pkg/source/remotespec"
	"github.com/rclone/rclone/fs"
	"github.com/rclone/rclone/fs/config/configmap"
	"github.com/rclone/rclone/fs/hash"
	"github.com/rclone/rclone/fs/walk"
	"golang.org/x/sync/errgroup"

	// The only backends a tenant can reach; see allowedOptions.
	_ "github.com/rclone/rclone/backend/azureblob"
	_ "github.com/rclone/rclone/backend/googlecloudstorage"
	_ "github.com/rclone/rclone/backend/http"
	_ "github.com/rclone/rclone/backend/s3"
)

// Remote is one model at one remote, reached with one request's credentials.
type Remote interface {
	// URI is the parsed modelUri.
	URI() URI
	// Identity names the bytes independent of alias and credentials.
	Identity() string
	// remotespec.CredentialID fingerprints the credentials used (HMAC, never the secret).
	CredentialID() string
	// List returns the model's manifest, validated and sorted.
	List(ctx context.Context) (Manifest, error)
	// Open streams one entry of the last listing.
	Open(ctx context.Context, e Entry) (io.ReadCloser, error)
	// Verify checks that this Remote's credentials can read every entry of
	// m, with metadata requests only (one HEAD or stat per entry, never a
	// download): the check a cache hit needs before a model fetched with
	// other credentials is served (the "authorized cache hits" invariant, the KEP-2535 rule). An
	// entry whose size or checksum no longer matches is ErrChanged; refused
	// credentials are ErrDenied, a missing entry ErrNotFound.
	Verify(ctx context.Context, m Manifest) error
}

// Pinned is a Remote whose modelUri names a movable version (a Hub
// branch, an OCI tag) that List resolves once per publish: Revision is
// what the last List pinned it to (the 40-hex commit, the manifest's
// sha256 digest), for events, modelcachectl and CachedModel status.
type Pinned interface {
	Revision() string
}

// Resolver turns a modelUri and its secret into a Remote.
type Resolver interface {
	Resolve(ctx context.Context, uri string, secrets map[string]string) (Remote, error)
}

// Sources resolves a modelUri to its source: an rclone backend configured
// in memory for object stores and HTTPS, the Hugging Face Hub for hf://
// and an OCI registry for oci://. Every connection of every source goes
// through one egress Guard.
type Sources struct {
	fingerprintKey []byte
	maxFiles       int // files a model may have (WithMaxFiles)
	// plainHTTP holds the registries oci:// reaches without TLS
	// (WithPlainHTTPRegistries), by registryKey.
	plainHTTP map[string]bool

	guardOnce sync.Once
	guard     *egress.Guard
	// For the Guard built when WithEgress gives none. resolver and
	// interfaceAddrs are injected by tests; nil means net.DefaultResolver
	// and net.InterfaceAddrs.
	allowed        []netip.Prefix
	resolver       egress.Resolver
	interfaceAddrs func() ([]net.Addr, error)
}

// egress is the Guard every connection of this resolver's remotes goes
// through.
func (r *Sources) egress() *egress.Guard {
	r.guardOnce.Do(func() {
		if r.guard != nil {
			return
		}
		var opts []egress.Option
		if r.resolver != nil {
			opts = append(opts, egress.WithResolver(r.resolver))
		}
		if r.interfaceAddrs != nil {
			opts = append(opts, egress.WithInterfaceAddrs(r.interfaceAddrs))
		}
		r.guard = egress.New(egress.Policy{Allow: r.allowed}, opts...)
	})
	return r.guard
}

// NewSources returns a Resolver. fingerprintKey is a node-local secret used to
// fingerprint credentials.
func NewSources(fingerprintKey []byte, opts ...Option) *Sources {
	r := &Sources{fingerprintKey: fingerprintKey}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Resolve validates uri and secrets and prepares the backend configuration
// in memory. It never contacts the remote: bad input never causes a request
// to it, and a cache hit never needs one. The only I/O is a DNS lookup of
// endpoint host names the secret chose, so that an endpoint reaching the
// node itself (loopback, the cloud metadata service, the node's own
// addresses) is refused with ErrInvalid before anything connects to it; a
// lookup that fails is ErrUnavailable. The default AWS and Google endpoints
// are not looked up. The backend is built on first List, Open or Verify.
func (r *Sources) Resolve(ctx context.Context, uri string, secrets map[string]string) (Remote, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	switch u.Scheme {
	case SchemeHF:
		return r.resolveHF(ctx, u, secrets)
	case SchemeOCI:
		return r.resolveOCI(ctx, u, secrets)
	}
	cfg, err := remotespec.BuildConfig(u, secrets)
	if err != nil {
		return nil, err
	}
	info, err := fs.Find(cfg.Type)
	if err != nil {
		return nil, fmt.Errorf("%w: backend %q is not built in", ErrInvalid, cfg.Type)
	}
	remote := &rcloneRemote{
		uri: u, cfg: cfg, info: info, secrets: secrets, maxFiles: r.maxFiles,
		credID: remotespec.CredentialID(r.fingerprintKey, cfg),
		guard:  r.egress(), egressID: newEgressID(),
	}
	remote.conns = &activity{close: func() { remote.guard.CloseConns(remote.egressID) }}
	if remote.proxyURL, err = remote.guard.ProxyURL(remote.egressID); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if err := r.checkEndpoints(ctx, cfg.Endpoints); err != nil {
		if !errors.Is(err, ErrUnavailable) {
			return nil, err
		}
		// The lookup failed (DNS down). A cache hit contacts no remote and
		// must not fail for it, so the check runs again before the first
		// call that would.
		remote.deferredCheck = func(ctx context.Context) error { return r.checkEndpoints(ctx, cfg.Endpoints) }
	}
	return remote, nil
}

// SourceKey names a model reference together with the credentials used for
// it: a cache hit through it needs no remote call, and credentials never
// seen for a model must list the remote first (the "authorized cache hits" invariant).
//
// A Hub revision or an OCI tag is part of the reference but not of the
// identity (two revisions of one model share its files), so it is added
// here: hf://org/model@v1 is not a hit for hf://org/model@main. rclone
// URIs have none, and their keys stay what they were.
func SourceKey(r Remote) string {
	ref := ""
	if u := r.URI(); u.Ref != "" {
		ref = "\x00ref:" + u.Ref
	}
	h := sha256.Sum256([]byte("modelcache source v1\x00" + r.Identity() + "\x00" + r.CredentialID() + ref))
	return "sha256:" + hex.EncodeToString(h[:])
}

// requestConfig gives each request its own rclone settings instead of the
// process-wide ones. Every connection the backend opens goes through the
// egress proxy (see pkg/egress): rclone's HTTP transports take a proxy
// from this configuration but no dialer.
func (r *rcloneRemote) requestConfig(ctx context.Context) context.Context {
	ctx, ci := fs.AddConfig(ctx)
	// The listing time is enough for the content key; reading per-object
	// metadata would cost one HEAD per file.
	ci.UseServerModTime = true
	ci.LowLevelRetries = 3
	ci.HTTPProxy = r.proxyURL
	return ctx
}

// newEgressID names one remote's connections at the egress proxy, so that
// a refusal is reported to the request that caused it.
func newEgressID() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (r *rcloneRemote) refused() *egress.RefusedError {
	if r.guard == nil {
		return nil
	}
	return r.guard.Refused(r.egressID)
}

// classify is the package's classify, except that an error after a
// connection of this remote was refused is that refusal: the client's own
// error (a SOCKS reply code) names neither the host nor the rule.
func (r *rcloneRemote) classify(op string, err error) error {
	if err == nil {
		return nil
	}
	if refused := r.refused(); refused != nil && !errors.Is(err, ErrRefused) {
		return &kindError{kind: ErrRefused, msg: op + ": " + Scrub(refused.Error(), r.secrets)}
	}
	return classify(op, err, r.secrets)
}

type rcloneRemote struct {
	uri     URI
	cfg     remotespec.BackendConfig
	info    *fs.RegInfo
	secrets map[string]string
	credID  string
	// maxFiles bounds the listing (WithMaxFiles).
	maxFiles int
	// guard checks every connection; egressID names this remote's
	// connections at its proxy, reached at proxyURL.
	guard    *egress.Guard
	egressID string
	proxyURL string
	// conns closes this remote's connections once it has no request left.
	conns *activity
	// deferredCheck is the endpoint check Resolve could not finish.
	deferredCheck func(ctx context.Context) error

	mu      sync.Mutex
	main    lazyFs // for List and Open
	meta    lazyFs // for Verify, when it needs other options than main
	objects map[string]fs.Object
	// ranged holds, per path, objects no ranged read is using: an rclone
	// Object records each response's headers as it opens, so two reads
	// at once must not share one.
	ranged map[string][]fs.Object
}

// lazyFs is an rclone Fs built on first use.
type lazyFs struct {
	f    fs.Fs
	file string // set when the modelUri names a single object
}

// backend builds the rclone Fs from the in-memory config, once.
func (r *rcloneRemote) backend(ctx context.Context) (fs.Fs, string, error) {
	return r.build(ctx, &r.main, r.cfg.Options)
}

// metadataBackend is the Fs Verify uses. Options that skip the HEAD behind
// NewObject (s3 no_head_object, http no_head) would let Verify pass
// without asking the remote anything, so they are dropped for it.
func (r *rcloneRemote) metadataBackend(ctx context.Context) (fs.Fs, string, error) {
	opts := r.cfg.Options
	if opts["no_head_object"] == "" && opts["no_head"] == "" {
		return r.backend(ctx)
	}
	opts = maps.Clone(opts)
	delete(opts, "no_head_object")
	delete(opts, "no_head")
	return r.build(ctx, &r.meta, opts)
}

func (r *rcloneRemote) build(ctx context.Context, l *lazyFs, opts configmap.Simple) (fs.Fs, string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if l.f != nil {
		return l.f, l.file, nil
	}
	if r.deferredCheck != nil {
		if err := r.deferredCheck(ctx); err != nil {
			return nil, "", err
		}
		r.deferredCheck = nil
	}
	f, err := r.info.NewFs(ctx, "model", r.cfg.Root, configMap(r.info, opts))
	file := ""
	if errors.Is(err, fs.ErrorIsFile) {
		// The modelUri names one object; f is rooted at its parent.
		file, err = path.Base(r.cfg.Root), nil
	}
	if err != nil {
		return nil, "", r.classify(fmt.Sprintf("connecting to %s", r.uri), err)
	}
	l.f, l.file = f, file
	return f, file, nil
}

// configMap gives a backend the request's options over the backend's
// defaults and nothing else. fs.ConfigMap would also read RCLONE_<BACKEND>_*
// variables from the node's environment, so a node with, say,
// RCLONE_S3_ENV_AUTH=true would hand its own credentials to every tenant.
func configMap(info *fs.RegInfo, opts configmap.Simple) *configmap.Map {
	m := configmap.New()
	m.AddGetter(opts, configmap.PriorityNormal)
	m.AddGetter(optionDefaults(info.Options), configmap.PriorityDefault)
	return m
}

// optionDefaults reads a backend's registered default values, ignoring any
// value set on the process (flags).
type optionDefaults fs.Options

func (o optionDefaults) Get(key string) (string, bool) {
	opt := fs.Options(o).Get(key)
	if opt == nil {
		return "", false
	}
	d := *opt
	d.Value = nil
	return d.String(), true
}

func (r *rcloneRemote) URI() URI             { return r.uri }
func (r *rcloneRemote) Identity() string     { return r.cfg.Identity }
func (r *rcloneRemote) CredentialID() string { return r.credID }

func (r *rcloneRemote) List(ctx context.Context) (Manifest, error) {
	defer r.conns.begin()()
	ctx = r.requestConfig(ctx)
	f, file, err := r.backend(ctx)
	if err != nil {
		return nil, err
	}
	objects := map[string]fs.Object{}
	var m Manifest
	add := func(o fs.Object) {
		e := Entry{Path: o.Remote(), Size: o.Size(), ModTime: o.ModTime(ctx)}
		if f.Hashes().Contains(hash.MD5) {
			// Best effort: an object without a cheap checksum still has size and time.
			e.Hash, _ = o.Hash(ctx, hash.MD5)
		}
		objects[e.Path] = o
		m = append(m, e)
	}
	if file != "" {
		o, err := f.NewObject(ctx, file)
		if err != nil {
			return nil, r.classify(fmt.Sprintf("reading %s", r.uri), err)
		}
		add(o)
	} else {
		// The walk stops past the limit: what a listing holds in memory
		// (the manifest and rclone's objects) is bounded by --max-files,
		// not by what the remote holds.
		limit, n := maxFilesOr(r.maxFiles), 0
		err := walk.ListR(ctx, f, "", true, -1, walk.ListObjects, func(entries fs.DirEntries) error {
			for _, de := range entries {
				if o, ok := de.(fs.Object); ok {
					if n++; n > limit {
						return errWalkStop
					}
					add(o)
				}
			}
			return nil
		})
		if errors.Is(err, errWalkStop) {
			return nil, tooManyFiles(r.uri, limit)
		}
		if err != nil {
			return nil, r.classify(fmt.Sprintf("listing %s", r.uri), err)
		}
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("%w: %s holds no objects", ErrNotFound, r.uri)
	}
	m, err = remotespec.CheckManifest(m)
	if err != nil {
		return nil, err
	}
	r.addVersions(ctx, f, m)
	r.mu.Lock()
	r.objects = objects
	r.mu.Unlock()
	return m, nil
}

func (r *rcloneRemote) Open(ctx context.Context, e Entry) (io.ReadCloser, error) {
	return r.open(ctx, e)
}

// OpenRange opens length bytes of an object from offset: one ranged GET of
// a large file fetched in parallel chunks.
//
// Each response is checked against the listing: the object's size, time
// and checksum as the response's own headers give them. A GET is served
// from one version of an object, so every range is known to be of the
// listed version, also for an object without a checksum, whose bytes
// nothing else could check.
func (r *rcloneRemote) OpenRange(ctx context.Context, e Entry, offset, length int64) (_ io.ReadCloser, err error) {
	end := r.conns.begin()
	defer func() {
		if err != nil {
			end()
		}
	}()
	ctx = r.requestConfig(ctx)
	op := fmt.Sprintf("opening %s/%s bytes %d-%d", r.uri, e.Path, offset, offset+length-1)
	o, err := r.takeRanged(ctx, e)
	if err != nil {
		return nil, r.classify(op, err)
	}
	rc, err := o.Open(ctx, &fs.RangeOption{Start: offset, End: offset + length - 1})
	if err != nil {
		return nil, r.classify(op, err)
	}
	if err := r.sameAsListed(ctx, o, e); err != nil {
		rc.Close()
		return nil, err
	}
	r.mu.Lock()
	r.ranged[e.Path] = append(r.ranged[e.Path], o)
	r.mu.Unlock()
	return &classifyingReader{rc: rc, op: fmt.Sprintf("reading %s/%s", r.uri, e.Path), remote: r, end: end}, nil
}

// takeRanged returns an object of e's path that no other read uses: a
// free one, or a new one (a HEAD, itself checked against the listing).
func (r *rcloneRemote) takeRanged(ctx context.Context, e Entry) (fs.Object, error) {
	r.mu.Lock()
	if free := r.ranged[e.Path]; len(free) > 0 {
		o := free[len(free)-1]
		r.ranged[e.Path] = free[:len(free)-1]
		r.mu.Unlock()
		return o, nil
	}
	if r.ranged == nil {
		r.ranged = map[string][]fs.Object{}
	}
	r.mu.Unlock()
	f, _, err := r.backend(ctx)
	if err != nil {
		return nil, err
	}
	o, err := f.NewObject(ctx, e.Path)
	if err != nil {
		return nil, err
	}
	return o, r.sameAsListed(ctx, o, e)
}

// sameAsListed compares what o last learnt of the object (its listing, a
// HEAD, or the headers of the response it just opened) with the listing.
func (r *rcloneRemote) sameAsListed(ctx context.Context, o fs.Object, e Entry) error {
	h := ""
	if e.Hash != "" {
		h, _ = o.Hash(ctx, hash.MD5)
	}
	return r.sameAs(e, o.Size(), o.ModTime(ctx), h)
}

// sameAs compares what the remote now says of e's object with the listing:
// its size (negative: unknown), its time (zero: unknown; compared to the
// second, as a HEAD or GET gives no finer) and its MD5 ("": unknown).
func (r *rcloneRemote) sameAs(e Entry, size int64, t time.Time, md5 string) error {
	changed := func(what string, now, listed any) error {
		return fmt.Errorf("%w: %s/%s now has %s %v, listed %v; the next publish lists the new version", ErrChanged, r.uri, e.Path, what, now, listed)
	}
	if size >= 0 && size != e.Size {
		return changed("size", size, e.Size)
	}
	if !t.IsZero() && !e.ModTime.IsZero() && !t.Truncate(time.Second).Equal(e.ModTime.Truncate(time.Second)) {
		return changed("time", t.UTC(), e.ModTime.UTC())
	}
	if md5 != "" && e.Hash != "" && !strings.EqualFold(md5, e.Hash) {
		return changed("checksum", md5, e.Hash)
	}
	return nil
}

func (r *rcloneRemote) open(ctx context.Context, e Entry, options ...fs.OpenOption) (_ io.ReadCloser, err error) {
	end := r.conns.begin()
	defer func() {
		if err != nil {
			end()
		}
	}()
	ctx = r.requestConfig(ctx)
	f, _, err := r.backend(ctx)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	o := r.objects[e.Path]
	r.mu.Unlock()
	if o == nil {
		if o, err = f.NewObject(ctx, e.Path); err != nil {
			return nil, r.classify(fmt.Sprintf("opening %s/%s", r.uri, e.Path), err)
		}
	}
	rc, err := o.Open(ctx, options...)
	if err != nil {
		return nil, r.classify(fmt.Sprintf("opening %s/%s", r.uri, e.Path), err)
	}
	return &classifyingReader{rc: rc, op: fmt.Sprintf("reading %s/%s", r.uri, e.Path), remote: r, end: end}, nil
}

// verifiable refuses a Verify of nothing (which must not read as
// "allowed") and of a path no listing would have given.
func verifiable(uri URI, m Manifest) error {
	if len(m) == 0 {
		return fmt.Errorf("%w: cannot verify access to %s: the manifest is empty", ErrInvalid, uri)
	}
	for _, e := range m {
		if err := ValidateKey(e.Path); err != nil {
			return err
		}
	}
	return nil
}

// verifyParallelism bounds the metadata requests one Verify has in flight.
const verifyParallelism = 8

func (r *rcloneRemote) Verify(ctx context.Context, m Manifest) error {
	if err := verifiable(r.uri, m); err != nil {
		return err
	}
	defer r.conns.begin()()
	ctx = r.requestConfig(ctx)
	f, file, err := r.metadataBackend(ctx)
	if err != nil {
		return err
	}
	if file != "" && (len(m) != 1 || m[0].Path != file) {
		// rclone also takes the root for an object when it may neither
		// stat nor list it: ask for the object to tell the two apart.
		if _, err := f.NewObject(ctx, file); err != nil {
			return r.classify(fmt.Sprintf("checking %s", r.uri), err)
		}
		return fmt.Errorf("%w: %s now names a single object, not the %d cached entries", ErrChanged, r.uri, len(m))
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(verifyParallelism)
	for _, e := range m {
		if gctx.Err() != nil {
			break // an entry failed: stop at the first error
		}
		g.Go(func() error { return r.verifyEntry(gctx, f, e) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		// Cancelled before every entry was checked.
		return r.classify(fmt.Sprintf("checking %s", r.uri), err)
	}
	return nil
}

// verifyEntry stats one object (a HEAD for S3, Azure and HTTPS, a metadata
// GET for GCS's JSON API; never the body) and compares what it recorded.
func (r *rcloneRemote) verifyEntry(ctx context.Context, f fs.Fs, e Entry) error {
	op := fmt.Sprintf("checking %s/%s", r.uri, e.Path)
	if err := ctx.Err(); err != nil {
		return r.classify(op, err)
	}
	o, err := f.NewObject(ctx, e.Path)
	if err != nil {
		return r.classify(op, err)
	}
	if size := o.Size(); size != e.Size {
		return fmt.Errorf("%w: %s/%s is %d bytes at the remote, the cached copy %d", ErrChanged, r.uri, e.Path, size, e.Size)
	}
	if e.Hash != "" && f.Hashes().Contains(hash.MD5) {
		h, err := o.Hash(ctx, hash.MD5)
		if err != nil {
			return r.classify(op, err)
		}
		if h != "" && !strings.EqualFold(h, e.Hash) {
			return fmt.Errorf("%w: %s/%s has checksum %s at the remote, the cached copy %s", ErrChanged, r.uri, e.Path, h, e.Hash)
		}
	}
	return nil
}

// classifyingReader keeps mid-stream errors (a reset connection) classified and scrubbed.
type classifyingReader struct {
	rc     io.ReadCloser
	op     string
	remote *rcloneRemote
	end    func() // the request ends with the reader
}

func (c *classifyingReader) Read(p []byte) (int, error) {
	n, err := c.rc.Read(p)
	if err != nil && err != io.EOF {
		err = c.remote.classify(c.op, err)
	}
	return n, err
}

func (c *classifyingReader) Close() error {
	err := c.rc.Close()
	c.end()
	return err
}
