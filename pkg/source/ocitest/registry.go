// Package ocitest runs an OCI registry on loopback for tests: the
// go-containerregistry registry behind Docker's token authentication
// (401 with a Bearer challenge, a token service checking basic auth and
// granting per repository), with ModelPack artifacts pushed by oras-go,
// the official client. Hooks make it misbehave: no Range support, a byte
// flipped in a blob, a blob redirected elsewhere.
package ocitest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/klauspost/compress/zstd"
	modelspec "github.com/modelpack/model-spec/specs-go/v1"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// The account that may push; Users adds accounts that may pull.
const (
	PushUser     = "pusher"
	PushPassword = "push-secret-123"
)

// Options configure a Registry.
type Options struct {
	// Users may pull every repository: user → password.
	Users map[string]string
	// Public repositories may be pulled without credentials.
	Public []string
	// IdentityTokens are OAuth2 refresh tokens (a dockerconfigjson's
	// "identitytoken"): token → user.
	IdentityTokens map[string]string
}

// Registry is a running registry; Host is its 127.0.0.1:port.
type Registry struct {
	Host string
	srv  *httptest.Server
	opts Options

	mu       sync.Mutex
	grants   map[string]map[string]bool // token → "repo:action"
	flip     map[string]int64           // blob digest → offset of the byte its GETs change
	redirect map[string]string          // blob digest → Location

	noRanges      atomic.Bool
	rangeRequests atomic.Int64
	blobGets      atomic.Int64
}

// New starts a registry; it stops with the test.
func New(t testing.TB, opts Options) *Registry {
	t.Helper()
	r := Start(opts)
	t.Cleanup(r.Close)
	return r
}

// Start starts a registry outside a test (test/benchrun); Close stops it.
func Start(opts Options) *Registry {
	r := &Registry{opts: opts, grants: map[string]map[string]bool{}, flip: map[string]int64{}, redirect: map[string]string{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.srv = httptest.NewServer(r.handler(reg))
	r.Host = strings.TrimPrefix(r.srv.URL, "http://")
	return r
}

// Close stops the registry.
func (r *Registry) Close() { r.srv.Close() }

// SetRanges makes blob GETs honour Range (and say so with Accept-Ranges),
// or ignore it as some registries do.
func (r *Registry) SetRanges(on bool) { r.noRanges.Store(!on) }

// RangeRequests counts blob GETs that asked for a range and got one.
func (r *Registry) RangeRequests() int64 { return r.rangeRequests.Load() }

// BlobGets counts blob GETs.
func (r *Registry) BlobGets() int64 { return r.blobGets.Load() }

// FlipByte makes every GET of blob d send its middle byte changed.
func (r *Registry) FlipByte(d ocispec.Descriptor) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.flip[d.Digest.String()] = d.Size / 2
}

// RedirectBlob answers GETs of blob d with a 307 to location, as a
// registry fronting object storage does.
func (r *Registry) RedirectBlob(d digest.Digest, location string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.redirect[d.String()] = location
}

func (r *Registry) handler(reg http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path == "/token" {
			r.token(w, req)
			return
		}
		repo, kind, ref := splitV2(req.URL.Path)
		action := "pull"
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			action = "push"
		}
		if !r.allowed(req, repo, action) {
			scope := ""
			if repo != "" {
				scope = fmt.Sprintf(",scope=\"repository:%s:%s\"", repo, map[string]string{"pull": "pull", "push": "pull,push"}[action])
			}
			w.Header().Set("WWW-Authenticate", fmt.Sprintf("Bearer realm=\"%s/token\",service=\"ocitest\"%s", r.srv.URL, scope))
			writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
			return
		}
		if kind == "blobs" && req.Method == http.MethodGet {
			r.blobGet(w, req, reg, ref)
			return
		}
		reg.ServeHTTP(w, req)
	})
}

func (r *Registry) blobGet(w http.ResponseWriter, req *http.Request, reg http.Handler, ref string) {
	r.blobGets.Add(1)
	r.mu.Lock()
	at, flip := r.flip[ref]
	location := r.redirect[ref]
	r.mu.Unlock()
	if location != "" {
		http.Redirect(w, req, location, http.StatusTemporaryRedirect)
		return
	}
	if r.noRanges.Load() {
		req.Header.Del("Range")
	} else {
		w.Header().Set("Accept-Ranges", "bytes")
		if req.Header.Get("Range") != "" {
			r.rangeRequests.Add(1)
		}
	}
	if flip {
		w = &flipWriter{ResponseWriter: w, at: at}
	}
	reg.ServeHTTP(w, req)
}

// splitV2 reads /v2/<repo>/(manifests|blobs|tags)/<ref>.
func splitV2(p string) (repo, kind, ref string) {
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return "", "", ""
	}
	for _, k := range []string{"/manifests/", "/blobs/", "/tags/"} {
		if i := strings.LastIndex(rest, k); i >= 0 {
			return rest[:i], strings.Trim(k, "/"), rest[i+len(k):]
		}
	}
	return "", "", ""
}

func (r *Registry) allowed(req *http.Request, repo, action string) bool {
	tok, ok := strings.CutPrefix(req.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	g, ok := r.grants[tok]
	return ok && (repo == "" || g[repo+":"+action])
}

// token is the token service: basic auth (or an OAuth2 password or
// refresh-token grant) checked, then a token for the scopes this account
// may have, as Docker's distribution token server does. Wrong
// credentials get a 401; an anonymous request gets a token for public
// repositories only.
func (r *Registry) token(w http.ResponseWriter, req *http.Request) {
	user, pass, hasBasic := req.BasicAuth()
	scopes := req.URL.Query()["scope"]
	if req.Method == http.MethodPost {
		req.ParseForm()
		scopes = strings.Split(req.PostForm.Get("scope"), " ")
		switch req.PostForm.Get("grant_type") {
		case "password":
			user, pass, hasBasic = req.PostForm.Get("username"), req.PostForm.Get("password"), true
		case "refresh_token":
			u, ok := r.opts.IdentityTokens[req.PostForm.Get("refresh_token")]
			if !ok {
				writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "invalid refresh token")
				return
			}
			user, pass, hasBasic = u, r.opts.Users[u], true
		}
	}
	if hasBasic && !r.validUser(user, pass) {
		writeError(w, http.StatusUnauthorized, "UNAUTHORIZED", "invalid username or password")
		return
	}
	grant := map[string]bool{}
	for _, s := range scopes {
		parts := strings.Split(s, ":")
		if len(parts) != 3 || parts[0] != "repository" {
			continue
		}
		for _, a := range strings.Split(parts[2], ",") {
			if r.may(hasBasic, user, parts[1], a) {
				grant[parts[1]+":"+a] = true
			}
		}
	}
	var b [16]byte
	rand.Read(b[:])
	tok := hex.EncodeToString(b[:])
	r.mu.Lock()
	r.grants[tok] = grant
	r.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]string{"token": tok, "access_token": tok})
}

func (r *Registry) validUser(user, pass string) bool {
	if user == PushUser {
		return pass == PushPassword
	}
	p, ok := r.opts.Users[user]
	return ok && p == pass
}

func (r *Registry) may(authed bool, user, repo, action string) bool {
	switch {
	case authed && user == PushUser:
		return true
	case action != "pull":
		return false
	case authed:
		return true
	}
	for _, p := range r.opts.Public {
		if p == repo {
			return true
		}
	}
	return false
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"errors":[{"code":%q,"message":%q}]}`, code, msg)
}

// flipWriter changes the byte at offset at of a response body.
type flipWriter struct {
	http.ResponseWriter
	at, n int64
}

func (f *flipWriter) Write(p []byte) (int, error) {
	if f.at >= f.n && f.at < f.n+int64(len(p)) {
		p = bytes.Clone(p)
		p[f.at-f.n] ^= 0x01
	}
	f.n += int64(len(p))
	return f.ResponseWriter.Write(p)
}

// Format is how a File is packed into its layer.
type Format string

// The layer forms model-spec defines.
const (
	Raw     Format = "raw"
	Tar     Format = "tar"
	TarGzip Format = "tar+gzip"
	TarZstd Format = "tar+zstd"
)

// File is one file of a model, one layer.
type File struct {
	Path string
	Data []byte
	// Format defaults to Raw.
	Format Format
	// Metadata adds model-spec's file metadata annotation (its size).
	Metadata bool
	// Extra is a second file packed into the same tar layer.
	Extra *File
}

// Layer packs f as model-spec does (modctl's tar layers hold the file
// under its path) and returns its descriptor and bytes.
func Layer(t testing.TB, f File) (ocispec.Descriptor, []byte) {
	t.Helper()
	format := f.Format
	if format == "" {
		format = Raw
	}
	data := f.Data
	if format != Raw {
		data = tarOf(t, f)
		switch format {
		case TarGzip:
			data = gzipOf(t, data)
		case TarZstd:
			enc, err := zstd.NewWriter(nil)
			if err != nil {
				t.Fatal(err)
			}
			data = enc.EncodeAll(data, nil)
		}
	}
	ann := map[string]string{modelspec.AnnotationFilepath: f.Path}
	if f.Metadata {
		md, _ := json.Marshal(modelspec.FileMetadata{Name: path.Base(f.Path), Mode: 0o644, Size: int64(len(f.Data)), Typeflag: tar.TypeReg})
		ann[modelspec.AnnotationFileMetadata] = string(md)
	}
	return ocispec.Descriptor{
		MediaType:   "application/vnd.cncf.model.weight.v1." + string(format),
		Digest:      digest.FromBytes(data),
		Size:        int64(len(data)),
		Annotations: ann,
	}, data
}

func tarOf(t testing.TB, f File) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for g := &f; g != nil; g = g.Extra {
		if err := tw.WriteHeader(&tar.Header{Name: g.Path, Mode: 0o644, Size: int64(len(g.Data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write(g.Data)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gzipOf(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// repo is an oras-go client of one repository, as the pushing account.
func (r *Registry) repo(t testing.TB, name string) *remote.Repository {
	t.Helper()
	repo, err := remote.NewRepository(r.Host + "/" + name)
	if err != nil {
		t.Fatal(err)
	}
	repo.PlainHTTP = true
	repo.Client = &auth.Client{
		Client:     &http.Client{Transport: &http.Transport{}},
		Credential: auth.StaticCredential(r.Host, auth.Credential{Username: PushUser, Password: PushPassword}),
		Cache:      auth.NewCache(),
	}
	return repo
}

// PushBlob uploads one blob to repository name.
func (r *Registry) PushBlob(t testing.TB, name string, desc ocispec.Descriptor, data []byte) {
	t.Helper()
	repo := r.repo(t, name)
	ctx := context.Background()
	if ok, err := repo.Exists(ctx, desc); err == nil && ok {
		return
	}
	if err := repo.Push(ctx, desc, bytes.NewReader(data)); err != nil {
		t.Fatalf("pushing blob %s: %v", desc.Digest, err)
	}
}

// PushManifest uploads a manifest or index and tags it (tag "" leaves it
// untagged), returning its descriptor.
func (r *Registry) PushManifest(t testing.TB, name, tag, mediaType string, body []byte) ocispec.Descriptor {
	t.Helper()
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(body), Size: int64(len(body))}
	repo := r.repo(t, name)
	ctx := context.Background()
	var err error
	if tag == "" {
		err = repo.Push(ctx, desc, bytes.NewReader(body))
	} else {
		err = repo.PushReference(ctx, desc, bytes.NewReader(body), tag)
	}
	if err != nil {
		t.Fatalf("pushing manifest to %s:%s: %v", name, tag, err)
	}
	return desc
}

// PushModel pushes a ModelPack model of files (one layer each) and tags
// it; it returns the manifest's descriptor and the layers'.
func (r *Registry) PushModel(t testing.TB, name, tag string, files ...File) (ocispec.Descriptor, []ocispec.Descriptor) {
	t.Helper()
	var layers []ocispec.Descriptor
	for _, f := range files {
		desc, data := Layer(t, f)
		r.PushBlob(t, name, desc, data)
		layers = append(layers, desc)
	}
	return r.PushManifestOf(t, name, tag, modelspec.ArtifactTypeModelManifest, modelspec.MediaTypeModelConfig, layers), layers
}

// PushManifestOf pushes an OCI manifest with this artifact type, config
// media type and layers (already pushed).
func (r *Registry) PushManifestOf(t testing.TB, name, tag, artifactType, configType string, layers []ocispec.Descriptor) ocispec.Descriptor {
	t.Helper()
	cfg := []byte(`{"descriptor":{"name":"test"},"modelfs":{"type":"layers","diffIds":[]},"config":{}}`)
	cfgDesc := ocispec.Descriptor{MediaType: configType, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
	r.PushBlob(t, name, cfgDesc, cfg)
	if layers == nil {
		layers = []ocispec.Descriptor{}
	}
	man := ocispec.Manifest{
		Versioned:    specs.Versioned{SchemaVersion: 2},
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: artifactType,
		Config:       cfgDesc,
		Layers:       layers,
	}
	body, err := json.Marshal(man)
	if err != nil {
		t.Fatal(err)
	}
	return r.PushManifest(t, name, tag, ocispec.MediaTypeImageManifest, body)
}

// PushIndex pushes an OCI index of manifests (already pushed).
func (r *Registry) PushIndex(t testing.TB, name, tag string, manifests ...ocispec.Descriptor) ocispec.Descriptor {
	t.Helper()
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: manifests}
	body, err := json.Marshal(idx)
	if err != nil {
		t.Fatal(err)
	}
	return r.PushManifest(t, name, tag, ocispec.MediaTypeImageIndex, body)
}
