package source

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/modelcache/modelcache/pkg/egress"
	"github.com/modelcache/modelcache/pkg/source/remotespec"
	modelspec "github.com/modelpack/model-spec/specs-go/v1"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/errdef"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/errcode"
)

// maxOCIManifest bounds a manifest or index read into memory: the
// distribution spec's limit a registry must accept.
const maxOCIManifest = 4 << 20

// maxIndexProbes bounds the manifests of an index fetched to find the
// model when the index does not say which one is (no artifactType).
const maxIndexProbes = 8

// Media types an oci:// model is read from besides model-spec's own.
const (
	dockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	dockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	// The names model-spec used before it moved to the CNCF, which
	// artifacts pushed by older modctl releases carry.
	cnaiModelManifest = "application/vnd.cnai.model.manifest.v1+json"
	cnaiModelConfig   = "application/vnd.cnai.model.config.v1+json"
	cnaiFilepath      = "org.cnai.model.filepath"
	cnaiFileMetadata  = "org.cnai.model.file.metadata+json"
)

// WithPlainHTTPRegistries makes oci:// models of these registries
// (host[:port]) be pulled over plain HTTP instead of HTTPS: an in-cluster
// registry without TLS. Credentials sent to them cross the network in
// clear; only an operator may set it.
func WithPlainHTTPRegistries(hosts ...string) Option {
	return func(r *Sources) {
		for _, h := range hosts {
			if r.plainHTTP == nil {
				r.plainHTTP = map[string]bool{}
			}
			r.plainHTTP[registryKey(h)] = true
		}
	}
}

// resolveOCI prepares an oci:// model: the credential its
// .dockerconfigjson holds for the registry, and a registry client whose
// every connection (token service and blob redirects included) dials
// through the egress Guard. Nothing is contacted; a registry the egress
// rules refuse is refused here, as other sources' endpoints are.
func (r *Sources) resolveOCI(ctx context.Context, u URI, secrets map[string]string) (Remote, error) {
	cred, err := ociCredentialFor(u.Host, secrets)
	if err != nil {
		return nil, err
	}
	ep := remotespec.Endpoint{Key: "modelUri", URL: &url.URL{Scheme: "https", Host: u.Host}}
	if err := r.checkEndpoints(ctx, []remotespec.Endpoint{ep}); err != nil && !errors.Is(err, ErrUnavailable) {
		// A failed lookup is left to the dial, which the Guard checks
		// again: a cache hit must not fail for DNS.
		return nil, err
	}
	transport := &http.Transport{
		DialContext:           r.egress().DialContext,
		Proxy:                 nil, // the Guard must see every address dialled
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: time.Minute,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
	}
	client := &auth.Client{
		Client:     &http.Client{Transport: transport},
		Credential: auth.StaticCredential(u.Host, cred.cred),
		Cache:      auth.NewCache(),
		// The Guard checks every dial of the token request and its
		// redirects, when it is made (DNS answers included) and against
		// the node's own rules: oras-go's own realm list would only look
		// the name up once more beforehand.
		BlockedRealmPrefixes: []netip.Prefix{},
	}
	client.SetUserAgent("modelcache")
	repo := &remote.Repository{
		Client:           client,
		Reference:        registry.Reference{Registry: u.Host, Repository: u.Path},
		PlainHTTP:        r.plainHTTP[registryKey(u.Host)],
		MaxMetadataBytes: maxOCIManifest,
	}
	o := &ociRemote{
		uri:      u,
		identity: "oci\x00" + registryKey(u.Host) + "\x00" + u.Path,
		credID:   ociCredentialID(r.fingerprintKey, u.Host, cred),
		cred:     cred,
		maxFiles: r.maxFiles,
		repo:     repo,
		conns:    &activity{close: transport.CloseIdleConnections},
	}
	// Raw layers read in ranged chunks; tar layers, and every layer of a
	// registry that ignores Range, in one stream (CanRange, ErrNoRanges).
	return newOCIRanged(o), nil
}

// ociRemote is one ModelPack artifact in an OCI registry: one file per
// layer, its path in the layer's org.cncf.model.filepath annotation.
type ociRemote struct {
	uri      URI
	identity string
	credID   string
	cred     ociCredential
	maxFiles int
	repo     *remote.Repository
	conns    *activity

	mu sync.Mutex
	// revision is the manifest digest the last List resolved the
	// reference to; layers are its layers by entry path.
	revision string
	layers   map[string]ociLayer
}

// ociLayer is one layer of a model and how its file is stored in it.
type ociLayer struct {
	desc   ocispec.Descriptor
	format layerFormat
}

func (r *ociRemote) URI() URI { return r.uri }

// Identity names the repository as the node reaches it (the registry
// without case or default port), independent of credentials and of the
// tag: SourceKey adds the reference, and the content key the layers'
// digests.
func (r *ociRemote) Identity() string { return r.identity }

func (r *ociRemote) CredentialID() string { return r.credID }

// Revision is the digest ("sha256:<hex>") of the model manifest the last
// List pinned the reference to: a tag's at that moment, the index's model
// for a reference naming an index.
func (r *ociRemote) Revision() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.revision
}

func (r *ociRemote) where() string { return r.uri.Host + "/" + r.uri.Path }

// List resolves the reference once (a tag to the digest it names now) and
// lists the model manifest's layers, one Entry each.
func (r *ociRemote) List(ctx context.Context) (Manifest, error) {
	defer r.conns.begin()()
	desc, man, err := r.resolveModel(ctx, r.uri.Ref)
	if err != nil {
		return nil, err
	}
	m, layers, err := r.entries(ctx, man)
	if err != nil {
		return nil, err
	}
	if m, err = remotespec.CheckManifest(m); err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.revision, r.layers = desc.Digest.String(), layers
	r.mu.Unlock()
	return m, nil
}

// fetchManifest reads one manifest or index, bounded and checked against
// its digest (the one asked for, or the one the registry says a tag
// names).
func (r *ociRemote) fetchManifest(ctx context.Context, ref string) (ocispec.Descriptor, []byte, error) {
	op := fmt.Sprintf("fetching the manifest of %s", r.uri)
	desc, rc, err := r.repo.FetchReference(ctx, ref)
	if err != nil {
		return desc, nil, r.classify(op, err)
	}
	defer rc.Close()
	if desc.Size > maxOCIManifest {
		return desc, nil, fmt.Errorf("%w: %s: the manifest is %d bytes, more than the %d an OCI manifest may have", ErrInvalid, op, desc.Size, maxOCIManifest)
	}
	if strings.HasPrefix(ref, "sha256:") && desc.Digest.String() != ref {
		return desc, nil, fmt.Errorf("%w: %s: the registry answered with manifest %s", ErrCorrupt, op, desc.Digest)
	}
	body, err := content.ReadAll(rc, desc)
	if err != nil {
		return desc, nil, r.classify(op, err)
	}
	return desc, body, nil
}

// resolveModel fetches what ref names and, for an index, the ModelPack
// model in it; anything else (a container image) is refused.
func (r *ociRemote) resolveModel(ctx context.Context, ref string) (ocispec.Descriptor, ocispec.Manifest, error) {
	desc, body, err := r.fetchManifest(ctx, ref)
	if err != nil {
		return desc, ocispec.Manifest{}, err
	}
	if desc.MediaType == ocispec.MediaTypeImageIndex || desc.MediaType == dockerManifestList {
		var idx ocispec.Index
		if err := strictJSON(body, desc.MediaType, &idx.MediaType, &idx); err != nil {
			return desc, ocispec.Manifest{}, fmt.Errorf("%w: %s is not a valid index: %v", ErrInvalid, r.uri, err)
		}
		return r.pickModel(ctx, idx)
	}
	man, err := r.parseModel(desc, body)
	return desc, man, err
}

// parseModel reads a manifest and refuses one that is not a ModelPack
// model, saying what it is instead.
func (r *ociRemote) parseModel(desc ocispec.Descriptor, body []byte) (ocispec.Manifest, error) {
	if desc.MediaType != ocispec.MediaTypeImageManifest && desc.MediaType != dockerManifest {
		return ocispec.Manifest{}, fmt.Errorf("%w: %s is a %q, not an OCI manifest of a ModelPack model", ErrInvalid, r.uri, desc.MediaType)
	}
	var man ocispec.Manifest
	if err := strictJSON(body, desc.MediaType, &man.MediaType, &man); err != nil {
		return man, fmt.Errorf("%w: %s: the manifest is not valid: %v", ErrInvalid, r.uri, err)
	}
	if !isModel(man.ArtifactType, man.Config.MediaType) {
		return man, fmt.Errorf("%w: %s is not a ModelPack model (artifactType %q, config %q; a container image or another artifact): push the model with modctl or another ModelPack tool, or use a KServe modelcar image through KServe itself",
			ErrInvalid, r.uri, man.ArtifactType, man.Config.MediaType)
	}
	return man, nil
}

// strictJSON decodes body and checks that the media type it states, if
// any, is the one the registry served it as: one body read two ways is a
// way to show different clients different contents.
func strictJSON(body []byte, served string, stated *string, v any) error {
	if err := json.Unmarshal(body, v); err != nil {
		return errors.New("it is not JSON")
	}
	if *stated != "" && *stated != served {
		return fmt.Errorf("it says it is %q but was served as %q", *stated, served)
	}
	return nil
}

func isModel(artifactType, configType string) bool {
	switch {
	case artifactType == modelspec.ArtifactTypeModelManifest, artifactType == cnaiModelManifest:
		return true
	case configType == modelspec.MediaTypeModelConfig, configType == cnaiModelConfig:
		return true
	}
	return false
}

// pickModel finds the one ModelPack model of an index: by the artifact
// type the index states, else by fetching the manifests that are no
// platform's image. Platform images are never taken.
func (r *ociRemote) pickModel(ctx context.Context, idx ocispec.Index) (ocispec.Descriptor, ocispec.Manifest, error) {
	var models []ocispec.Descriptor
	var unknown []ocispec.Descriptor
	seen := map[string]bool{}
	for _, d := range idx.Manifests {
		switch {
		case seen[d.Digest.String()]:
			// Listed twice (for two platforms, say): one manifest.
		case d.MediaType != ocispec.MediaTypeImageManifest && d.MediaType != dockerManifest:
			// A nested index: not followed.
		case isModel(d.ArtifactType, ""):
			models = append(models, d)
		case d.ArtifactType == "" && d.Platform == nil:
			unknown = append(unknown, d)
		}
		seen[d.Digest.String()] = true
	}
	var man ocispec.Manifest
	if len(models) == 0 {
		for _, d := range unknown[:min(len(unknown), maxIndexProbes)] {
			desc, body, err := r.fetchManifest(ctx, d.Digest.String())
			if err != nil {
				return desc, man, err
			}
			if m, err := r.parseModel(desc, body); err == nil {
				models, man = append(models, desc), m
			}
		}
	}
	switch len(models) {
	case 0:
		return ocispec.Descriptor{}, man, fmt.Errorf("%w: %s is an index of %d manifests and none is a ModelPack model (artifactType %s)", ErrNotFound, r.uri, len(idx.Manifests), modelspec.ArtifactTypeModelManifest)
	case 1:
	default:
		return ocispec.Descriptor{}, man, fmt.Errorf("%w: %s is an index holding several ModelPack models; name one by digest: oci://%s@%s", ErrInvalid, r.uri, r.where(), models[0].Digest)
	}
	if man.Config.MediaType != "" {
		return models[0], man, nil
	}
	desc, body, err := r.fetchManifest(ctx, models[0].Digest.String())
	if err != nil {
		return desc, man, err
	}
	man, err = r.parseModel(desc, body)
	return desc, man, err
}

// entries lists the model's layers, one file each.
func (r *ociRemote) entries(ctx context.Context, man ocispec.Manifest) (Manifest, map[string]ociLayer, error) {
	if limit := maxFilesOr(r.maxFiles); len(man.Layers) > limit {
		return nil, nil, tooManyFiles(r.uri, limit)
	}
	if len(man.Layers) == 0 {
		return nil, nil, fmt.Errorf("%w: the ModelPack model %s has no layers: no file to serve", ErrNotFound, r.uri)
	}
	m := make(Manifest, len(man.Layers))
	layers := make(map[string]ociLayer, len(man.Layers))
	for i, d := range man.Layers {
		l, e, err := r.layerEntry(i, d)
		if err != nil {
			return nil, nil, err
		}
		if _, dup := layers[e.Path]; dup {
			return nil, nil, fmt.Errorf("%w: %s: two layers are the file %q", ErrUnsafePath, r.uri, e.Path)
		}
		layers[e.Path], m[i] = l, e
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(verifyParallelism)
	for i := range m {
		if m[i].Size >= 0 {
			continue
		}
		// A tar layer without file metadata: its archive's header says
		// how large the file is.
		l := layers[m[i].Path]
		g.Go(func() error {
			n, err := r.tarFileSize(gctx, l, m[i].Path)
			m[i].Size = n
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, nil, err
	}
	return m, layers, nil
}

// layerEntry reads what the manifest says of one layer. A tar layer's
// size is -1 when no file metadata annotation gives it.
func (r *ociRemote) layerEntry(i int, d ocispec.Descriptor) (ociLayer, Entry, error) {
	p := d.Annotations[modelspec.AnnotationFilepath]
	if p == "" {
		p = d.Annotations[cnaiFilepath]
	}
	if p == "" {
		return ociLayer{}, Entry{}, fmt.Errorf("%w: %s: layer %d (%s) has no %s annotation: it is not a ModelPack file", ErrInvalid, r.uri, i, d.Digest, modelspec.AnnotationFilepath)
	}
	if err := ValidateKey(p); err != nil {
		return ociLayer{}, Entry{}, err
	}
	if d.Digest.Validate() != nil || d.Digest.Algorithm() != "sha256" || d.Size < 0 {
		return ociLayer{}, Entry{}, fmt.Errorf("%w: %s: layer %q has digest %q and size %d; only sha256 digests are read", ErrInvalid, r.uri, p, d.Digest, d.Size)
	}
	f, ok := layerFormatOf(d.MediaType)
	if !ok {
		return ociLayer{}, Entry{}, fmt.Errorf("%w: %s: layer %q has media type %q; a ModelPack file is .raw, .tar, .tar+gzip or .tar+zstd", ErrInvalid, r.uri, p, d.MediaType)
	}
	l := ociLayer{desc: d, format: f}
	if f == formatRaw {
		// The file is the layer: its digest is the file's sha256.
		return l, Entry{Path: p, Size: d.Size, SHA256: d.Digest.Encoded(), Version: "digest:" + d.Digest.String()}, nil
	}
	size, err := r.metadataSize(p, d)
	if err != nil {
		return l, Entry{}, err
	}
	// The layer's digest names the archive the file comes from: the
	// content key and the object key tell its versions apart by it.
	return l, Entry{Path: p, Size: size, Version: "layer:" + d.Digest.String()}, nil
}

// metadataSize is the size model-spec's file metadata annotation gives
// a tar layer's file, or -1 without one.
func (r *ociRemote) metadataSize(p string, d ocispec.Descriptor) (int64, error) {
	raw := d.Annotations[modelspec.AnnotationFileMetadata]
	if raw == "" {
		raw = d.Annotations[cnaiFileMetadata]
	}
	if raw == "" {
		return -1, nil
	}
	var md modelspec.FileMetadata
	if err := json.Unmarshal([]byte(raw), &md); err != nil || md.Size < 0 {
		return 0, fmt.Errorf("%w: %s: layer %q has an invalid %s annotation", ErrInvalid, r.uri, p, modelspec.AnnotationFileMetadata)
	}
	if md.Typeflag != 0 && md.Typeflag != '0' {
		return 0, fmt.Errorf("%w: %s: layer %q holds a %s, not a regular file; layers packing a directory are not supported", ErrInvalid, r.uri, p, typeName(md.Typeflag))
	}
	return md.Size, nil
}

func (r *ociRemote) layer(e Entry) (ociLayer, error) {
	r.mu.Lock()
	l, ok := r.layers[e.Path]
	r.mu.Unlock()
	if !ok {
		return l, fmt.Errorf("%w: %s/%s was not in the listing of this model", ErrNotFound, r.uri, e.Path)
	}
	return l, nil
}

// Open streams one file. A raw layer is the file (the store checks it
// against Entry.SHA256); a tar layer is read to its end and checked
// against its digest before the reader reports EOF.
func (r *ociRemote) Open(ctx context.Context, e Entry) (_ io.ReadCloser, err error) {
	l, err := r.layer(e)
	if err != nil {
		return nil, err
	}
	end := r.conns.begin()
	defer func() {
		if err != nil {
			end()
		}
	}()
	rc, err := r.repo.Blobs().Fetch(ctx, l.desc)
	if err != nil {
		return nil, r.classify(fmt.Sprintf("opening %s/%s", r.uri, e.Path), err)
	}
	body := &ociReader{rc: rc, op: fmt.Sprintf("reading %s/%s", r.uri, e.Path), remote: r, end: end}
	if l.format == formatRaw {
		return body, nil
	}
	t, err := newTarFile(r, l, e, body)
	if err != nil {
		body.Close()
		return nil, err
	}
	return t, nil
}

// Verify checks that these credentials may read the model m lists: the
// manifest fetched by the digest List pinned, its layers compared with m,
// and a HEAD of every layer's blob.
func (r *ociRemote) Verify(ctx context.Context, m Manifest) error {
	if err := verifiable(r.uri, m); err != nil {
		return err
	}
	defer r.conns.begin()()
	ref := r.Revision()
	if ref == "" {
		ref = r.uri.Ref
	}
	_, man, err := r.resolveModel(ctx, ref)
	if err != nil {
		return err
	}
	byPath := map[string]ocispec.Descriptor{}
	for _, d := range man.Layers {
		if p := cmpOr(d.Annotations[modelspec.AnnotationFilepath], d.Annotations[cnaiFilepath]); p != "" {
			byPath[p] = d
		}
	}
	blobs := map[string]ocispec.Descriptor{}
	for _, e := range m {
		d, ok := byPath[e.Path]
		switch {
		case !ok:
			return fmt.Errorf("%w: %s no longer holds %s", ErrChanged, r.uri, e.Path)
		case e.SHA256 != "" && e.SHA256 != d.Digest.Encoded(), !strings.HasSuffix(e.Version, ":"+d.Digest.String()):
			return fmt.Errorf("%w: %s/%s is layer %s at the registry, not the cached one", ErrChanged, r.uri, e.Path, d.Digest)
		}
		blobs[d.Digest.String()] = d
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(verifyParallelism)
	for _, d := range blobs {
		g.Go(func() error {
			if _, err := r.repo.Blobs().Resolve(gctx, d.Digest.String()); err != nil {
				return r.classify(fmt.Sprintf("checking layer %s of %s", d.Digest, r.uri), err)
			}
			return nil
		})
	}
	return g.Wait()
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// classify maps an oras-go or transport error onto the package's kinds,
// scrubbed of the credential's values.
func (r *ociRemote) classify(op string, err error) error {
	if err == nil {
		return nil
	}
	kind := ErrUnavailable
	var resp *errcode.ErrorResponse
	switch {
	case errors.Is(err, egress.ErrRefused):
		kind = ErrRefused
	case errors.As(err, &resp):
		kind = registryErrorKind(resp)
	case errors.Is(err, errdef.ErrNotFound):
		kind = ErrNotFound
	case errors.Is(err, content.ErrMismatchedDigest), errors.Is(err, content.ErrTrailingData),
		errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, content.ErrInvalidDescriptorSize):
		kind = ErrCorrupt
	}
	text := Scrub(err.Error(), r.cred.values())
	if kind != ErrDenied {
		return &kindError{kind: kind, msg: op + ": " + text}
	}
	if r.cred.anonymous() {
		return &kindError{kind: kind, msg: fmt.Sprintf("%s: the registry refused an anonymous pull of %s: give the volume a kubernetes.io/dockerconfigjson Secret with an entry for %s (%s)", op, r.where(), r.uri.Host, text)}
	}
	return &kindError{kind: kind, msg: fmt.Sprintf("%s: the registry refused the credentials in %s (entry %q) for %s: check them, and that the account may pull this repository (%s)", op, dockerConfigKey, r.cred.entry, r.where(), text)}
}

// registryErrorKind reads a registry's error response: the status first,
// then the distribution spec's error codes.
func registryErrorKind(resp *errcode.ErrorResponse) error {
	switch c := resp.StatusCode; {
	case c == http.StatusUnauthorized || c == http.StatusForbidden:
		return ErrDenied
	case c == http.StatusNotFound:
		return ErrNotFound
	case c == http.StatusTooManyRequests || c == http.StatusRequestTimeout || c >= 500:
		return ErrUnavailable
	}
	for _, e := range resp.Errors {
		switch e.Code {
		case "NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN":
			return ErrNotFound
		case errcode.ErrorCodeUnauthorized, errcode.ErrorCodeDenied:
			return ErrDenied
		case "TOOMANYREQUESTS":
			return ErrUnavailable
		}
	}
	if resp.StatusCode == http.StatusRequestedRangeNotSatisfiable {
		return ErrChanged
	}
	return ErrInvalid
}

// ociReader keeps mid-stream errors classified and ends the request with
// the stream.
type ociReader struct {
	rc     io.ReadCloser
	op     string
	remote *ociRemote
	end    func()
	err    error // the first error the stream itself gave, kept for the tar reader
}

func (o *ociReader) Read(p []byte) (int, error) {
	n, err := o.rc.Read(p)
	if err != nil && err != io.EOF {
		err = o.remote.classify(o.op, err)
		if o.err == nil {
			o.err = err
		}
	}
	return n, err
}

func (o *ociReader) Close() error {
	err := o.rc.Close()
	o.end()
	return err
}
