package source

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"path"
	"sync"

	"github.com/rclone/rclone/fs"
	"github.com/rclone/rclone/fs/config/configmap"
	"github.com/rclone/rclone/fs/hash"
	"github.com/rclone/rclone/fs/walk"

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
	// CredentialID fingerprints the credentials used (HMAC, never the secret).
	CredentialID() string
	// List returns the model's manifest, validated and sorted.
	List(ctx context.Context) (Manifest, error)
	// Open streams one entry of the last listing.
	Open(ctx context.Context, e Entry) (io.ReadCloser, error)
}

// Resolver turns a modelUri and its secret into a Remote.
type Resolver interface {
	Resolve(ctx context.Context, uri string, secrets map[string]string) (Remote, error)
}

// Rclone resolves models through rclone backends configured in memory.
type Rclone struct {
	fingerprintKey []byte
}

// NewRclone returns a Resolver. fingerprintKey is a node-local secret used to
// fingerprint credentials.
func NewRclone(fingerprintKey []byte) *Rclone {
	return &Rclone{fingerprintKey: fingerprintKey}
}

// Resolve validates uri and secrets and prepares the backend configuration
// in memory. It does no I/O: bad input never causes an outbound request, and
// a cache hit never needs one. The backend is built on first List or Open.
func (r *Rclone) Resolve(_ context.Context, uri string, secrets map[string]string) (Remote, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	cfg, err := buildConfig(u, secrets)
	if err != nil {
		return nil, err
	}
	info, err := fs.Find(cfg.Type)
	if err != nil {
		return nil, fmt.Errorf("%w: backend %q is not built in", ErrInvalid, cfg.Type)
	}
	return &rcloneRemote{
		uri: u, cfg: cfg, info: info, secrets: secrets,
		credID: credentialID(r.fingerprintKey, cfg),
	}, nil
}

// SourceKey names a model reference together with the credentials used for
// it: a cache hit through it needs no remote call, and credentials never
// seen for a model must list the remote first (invariant 10).
func SourceKey(r Remote) string {
	h := sha256.Sum256([]byte("modelcache source v1\x00" + r.Identity() + "\x00" + r.CredentialID()))
	return "sha256:" + hex.EncodeToString(h[:])
}

// requestConfig gives each request its own rclone settings instead of the
// process-wide ones.
func requestConfig(ctx context.Context) context.Context {
	ctx, ci := fs.AddConfig(ctx)
	// The listing time is enough for the content key; reading per-object
	// metadata would cost one HEAD per file.
	ci.UseServerModTime = true
	ci.LowLevelRetries = 3
	return ctx
}

type rcloneRemote struct {
	uri     URI
	cfg     backendConfig
	info    *fs.RegInfo
	secrets map[string]string
	credID  string

	mu      sync.Mutex
	f       fs.Fs  // built on first use
	file    string // set when the modelUri names a single object
	objects map[string]fs.Object
}

// backend builds the rclone Fs from the in-memory config, once.
func (r *rcloneRemote) backend(ctx context.Context) (fs.Fs, string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f != nil {
		return r.f, r.file, nil
	}
	f, err := r.info.NewFs(ctx, "model", r.cfg.Root, configMap(r.info, r.cfg.Options))
	if errors.Is(err, fs.ErrorIsFile) {
		// The modelUri names one object; f is rooted at its parent.
		r.file, err = path.Base(r.cfg.Root), nil
	}
	if err != nil {
		return nil, "", classify(fmt.Sprintf("connecting to %s", r.uri), err, r.secrets)
	}
	r.f = f
	return f, r.file, nil
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
	ctx = requestConfig(ctx)
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
			return nil, classify(fmt.Sprintf("reading %s", r.uri), err, r.secrets)
		}
		add(o)
	} else {
		err := walk.ListR(ctx, f, "", true, -1, walk.ListObjects, func(entries fs.DirEntries) error {
			for _, de := range entries {
				if o, ok := de.(fs.Object); ok {
					add(o)
				}
			}
			return nil
		})
		if err != nil {
			return nil, classify(fmt.Sprintf("listing %s", r.uri), err, r.secrets)
		}
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("%w: %s holds no objects", ErrNotFound, r.uri)
	}
	m, err = checkManifest(m)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.objects = objects
	r.mu.Unlock()
	return m, nil
}

func (r *rcloneRemote) Open(ctx context.Context, e Entry) (io.ReadCloser, error) {
	ctx = requestConfig(ctx)
	f, _, err := r.backend(ctx)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	o := r.objects[e.Path]
	r.mu.Unlock()
	if o == nil {
		if o, err = f.NewObject(ctx, e.Path); err != nil {
			return nil, classify(fmt.Sprintf("opening %s/%s", r.uri, e.Path), err, r.secrets)
		}
	}
	rc, err := o.Open(ctx)
	if err != nil {
		return nil, classify(fmt.Sprintf("opening %s/%s", r.uri, e.Path), err, r.secrets)
	}
	return &classifyingReader{rc: rc, op: fmt.Sprintf("reading %s/%s", r.uri, e.Path), secrets: r.secrets}, nil
}

// classifyingReader keeps mid-stream errors (a reset connection) classified and scrubbed.
type classifyingReader struct {
	rc      io.ReadCloser
	op      string
	secrets map[string]string
}

func (c *classifyingReader) Read(p []byte) (int, error) {
	n, err := c.rc.Read(p)
	if err != nil && err != io.EOF {
		err = classify(c.op, err, c.secrets)
	}
	return n, err
}

func (c *classifyingReader) Close() error { return c.rc.Close() }
