package source

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/source/ocitest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry/remote/auth"
)

const (
	ociUser     = "reader"
	ociPassword = "reader-password-42"
)

// dockerConfig is a kubernetes.io/dockerconfigjson Secret's data.
func dockerConfig(host, user, pass string) map[string]string {
	a := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	return map[string]string{dockerConfigKey: fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, host, a)}
}

func newOCIRegistry(t *testing.T, public ...string) *ocitest.Registry {
	return ocitest.New(t, ocitest.Options{Users: map[string]string{ociUser: ociPassword}, Public: public})
}

func ociSources(reg *ocitest.Registry, opts ...Option) *Sources {
	return NewSources([]byte("node key"), append([]Option{WithAllowedEndpoints(loopback), WithPlainHTTPRegistries(reg.Host)}, opts...)...)
}

// resolveOCIModel resolves uri with secrets and lists it.
func resolveOCIModel(t *testing.T, s *Sources, uri string, secrets map[string]string) (*ociRemote, Manifest, error) {
	t.Helper()
	rem, err := s.Resolve(context.Background(), uri, secrets)
	if err != nil {
		t.Fatalf("Resolve(%s): %v", uri, err)
	}
	o := rem.(ociRanged).ociRemote
	m, err := o.List(context.Background())
	return o, m, err
}

func readEntry(r Remote, e Entry) ([]byte, error) {
	rc, err := r.Open(context.Background(), e)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func sha256Hex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// modelFiles is a model in every layer form model-spec defines.
func modelFiles() []ocitest.File {
	big := bytes.Repeat([]byte("weights-0123456789abcdef"), 4096) // 96 KiB
	return []ocitest.File{
		{Path: "config.json", Data: []byte(`{"model_type":"llama"}`)},
		{Path: "model.safetensors", Data: big, Format: ocitest.Tar},
		{Path: "tokenizer/tokenizer.json", Data: bytes.Repeat([]byte("tok "), 1000), Format: ocitest.TarGzip, Metadata: true},
		{Path: "tokenizer/vocab.txt", Data: bytes.Repeat([]byte("vocab\n"), 500), Format: ocitest.TarZstd},
		{Path: "README.md", Data: []byte("# model\n"), Format: ocitest.Tar, Metadata: true},
	}
}

func TestOCIListAndOpen(t *testing.T) {
	reg := newOCIRegistry(t)
	files := modelFiles()
	man, layers := reg.PushModel(t, "models/llama", "v1", files...)
	s := ociSources(reg)
	secret := dockerConfig(reg.Host, ociUser, ociPassword)
	for _, uri := range []string{
		"oci://" + reg.Host + "/models/llama:v1",
		"oci://" + reg.Host + "/models/llama@" + man.Digest.String(),
	} {
		t.Run(uri, func(t *testing.T) {
			r, m, err := resolveOCIModel(t, s, uri, secret)
			if err != nil {
				t.Fatal(err)
			}
			if got := r.Revision(); got != man.Digest.String() {
				t.Errorf("Revision() = %s, want %s", got, man.Digest)
			}
			if len(m) != len(files) {
				t.Fatalf("listed %d entries, want %d", len(m), len(files))
			}
			byPath := map[string]Entry{}
			for _, e := range m {
				byPath[e.Path] = e
			}
			for i, f := range files {
				e, ok := byPath[f.Path]
				if !ok {
					t.Fatalf("%s not listed: %+v", f.Path, m)
				}
				if e.Size != int64(len(f.Data)) {
					t.Errorf("%s: size %d, want %d", f.Path, e.Size, len(f.Data))
				}
				if f.Format == "" {
					if e.SHA256 != layers[i].Digest.Encoded() || e.SHA256 != sha256Hex(f.Data) || e.Version != "digest:"+layers[i].Digest.String() {
						t.Errorf("%s: SHA256 %q Version %q, want the layer digest %s", f.Path, e.SHA256, e.Version, layers[i].Digest)
					}
				} else if e.SHA256 != "" || e.Version != "layer:"+layers[i].Digest.String() {
					t.Errorf("%s: SHA256 %q Version %q, want no SHA256 and the layer digest as Version", f.Path, e.SHA256, e.Version)
				}
				got, err := readEntry(r, e)
				if err != nil {
					t.Fatalf("reading %s: %v", f.Path, err)
				}
				if !bytes.Equal(got, f.Data) {
					t.Errorf("%s: read %d bytes that differ from the pushed %d", f.Path, len(got), len(f.Data))
				}
			}
		})
	}
}

// Two tags of one repository are two models: their source keys differ,
// or a cache hit for one would serve the other.
func TestOCIIdentityNamesTheReference(t *testing.T) {
	s, _ := newTestRclone(t, map[string][]string{"registry.example": {"93.184.215.14"}})
	key := func(uri string, secrets map[string]string) string {
		r, err := s.Resolve(context.Background(), uri, secrets)
		if err != nil {
			t.Fatal(err)
		}
		return SourceKey(r)
	}
	a := key("oci://Registry.example:443/models/llama:v1", nil)
	if b := key("oci://registry.example/models/llama:v1", nil); a != b {
		t.Error("the same registry written two ways gives two identities")
	}
	if b := key("oci://registry.example/models/llama:v2", nil); a == b {
		t.Error("two tags share a source key")
	}
	if b := key("oci://registry.example/models/llama:v1", dockerConfig("registry.example", "u", "p")); a == b {
		t.Error("anonymous and authenticated pulls share a source key")
	}
}

func TestOCICredentials(t *testing.T) {
	reg := newOCIRegistry(t, "public/model")
	reg.PushModel(t, "private/model", "v1", modelFiles()[:2]...)
	reg.PushModel(t, "public/model", "v1", modelFiles()[:2]...)
	s := ociSources(reg)
	const wrong = "not-the-password-77"
	tests := []struct {
		name    string
		repo    string
		secrets map[string]string
		want    error
		says    string
	}{
		{"reader", "private/model", dockerConfig(reg.Host, ociUser, ociPassword), nil, ""},
		{"wrong password", "private/model", dockerConfig(reg.Host, ociUser, wrong), ErrDenied, "refused the credentials in .dockerconfigjson"},
		{"anonymous on a private repository", "private/model", nil, ErrDenied, "refused an anonymous pull"},
		{"an entry for another registry is anonymous", "private/model", dockerConfig("other.example", ociUser, ociPassword), ErrDenied, "refused an anonymous pull"},
		{"anonymous on a public repository", "public/model", nil, nil, ""},
		{"no such repository", "private/nothing", dockerConfig(reg.Host, ociUser, ociPassword), ErrNotFound, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, m, err := resolveOCIModel(t, s, "oci://"+reg.Host+"/"+tc.repo+":v1", tc.secrets)
			if !errors.Is(err, tc.want) || tc.want == nil && len(m) != 2 {
				t.Fatalf("List: %v (%d entries), want %v", err, len(m), tc.want)
			}
			if err != nil && (!strings.Contains(err.Error(), tc.says) || strings.Contains(err.Error(), wrong)) {
				t.Errorf("error %q should say %q and never the password", err, tc.says)
			}
		})
	}
	t.Run("missing tag", func(t *testing.T) {
		_, _, err := resolveOCIModel(t, s, "oci://"+reg.Host+"/private/model:v9", dockerConfig(reg.Host, ociUser, ociPassword))
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("List: %v, want ErrNotFound", err)
		}
	})
}

func TestOCIIdentityToken(t *testing.T) {
	reg := ocitest.New(t, ocitest.Options{Users: map[string]string{ociUser: ociPassword}, IdentityTokens: map[string]string{"refresh-token-abc": ociUser}})
	reg.PushModel(t, "private/model", "v1", modelFiles()[:1]...)
	secret := map[string]string{dockerConfigKey: fmt.Sprintf(`{"auths":{%q:{"username":"<token>","identitytoken":"refresh-token-abc"}}}`, reg.Host)}
	if _, _, err := resolveOCIModel(t, ociSources(reg), "oci://"+reg.Host+"/private/model:v1", secret); err != nil {
		t.Fatal(err)
	}
}

func TestOCISecretParsing(t *testing.T) {
	const host = "registry.example:5000"
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	tests := []struct {
		name    string
		secrets map[string]string
		want    auth.Credential
		err     string // "" for no error
	}{
		{"no secret", nil, auth.EmptyCredential, ""},
		{"auth", map[string]string{dockerConfigKey: `{"auths":{"registry.example:5000":{"auth":"` + b64("u:p:with:colons") + `"}}}`}, auth.Credential{Username: "u", Password: "p:with:colons"}, ""},
		{"username and password", map[string]string{dockerConfigKey: `{"auths":{"registry.example:5000":{"username":"u","password":"p"}}}`}, auth.Credential{Username: "u", Password: "p"}, ""},
		{"URL key", map[string]string{dockerConfigKey: `{"auths":{"https://Registry.Example:5000/v1/":{"username":"u","password":"p"}}}`}, auth.Credential{Username: "u", Password: "p"}, ""},
		{"identity token", map[string]string{dockerConfigKey: `{"auths":{"registry.example:5000":{"username":"<token>","identitytoken":"rt"}}}`}, auth.Credential{Username: "<token>", RefreshToken: "rt"}, ""},
		{"another registry's entry", map[string]string{dockerConfigKey: `{"auths":{"registry.example":{"username":"u","password":"p"}}}`}, auth.EmptyCredential, ""},
		{"bad JSON", map[string]string{dockerConfigKey: `{"auths":{"registry.example:5000":{"password":"hunter2-secret"`}, auth.EmptyCredential, "secret key .dockerconfigjson is not a docker config JSON"},
		{"auth not base64", map[string]string{dockerConfigKey: `{"auths":{"registry.example:5000":{"auth":"hunter2-secret!"}}}`}, auth.EmptyCredential, "is not base64"},
		{"auth without a colon", map[string]string{dockerConfigKey: `{"auths":{"registry.example:5000":{"auth":"` + b64("hunter2-secret") + `"}}}`}, auth.EmptyCredential, "not base64 of user:password"},
		{"empty entry", map[string]string{dockerConfigKey: `{"auths":{"registry.example:5000":{}}}`}, auth.EmptyCredential, "neither"},
		{"unknown key", map[string]string{"AWS_ACCESS_KEY_ID": "x"}, auth.EmptyCredential, `secret key "AWS_ACCESS_KEY_ID" is not accepted for an oci:// model: the only key read is .dockerconfigjson`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ociCredentialFor(host, tc.secrets)
			if tc.err != "" {
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want ErrInvalid saying %q", err, tc.err)
				}
				if strings.Contains(err.Error(), "hunter2") {
					t.Errorf("error %q repeats the secret", err)
				}
				return
			}
			if err != nil || c.cred != tc.want {
				t.Fatalf("credential %+v, %v; want %+v", c.cred, err, tc.want)
			}
		})
	}
}

func TestOCIRefusedRegistry(t *testing.T) {
	for _, uri := range []string{"oci://169.254.169.254/m:v1", "oci://127.0.0.1:5000/m:v1"} {
		s, _ := newTestRclone(t, nil)
		_, err := s.Resolve(context.Background(), uri, nil)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "--allow-endpoint") {
			t.Errorf("Resolve(%s): %v, want ErrInvalid naming --allow-endpoint", uri, err)
		}
	}
}

func TestOCIRegistryKeys(t *testing.T) {
	for _, tc := range []struct{ registry, key string }{
		{"Registry.Example:443", "https://registry.example"},
		{"docker.io", "https://index.docker.io/v1/"},
		{"registry-1.docker.io", "docker.io"},
		{"ghcr.io", "http://ghcr.io/"},
	} {
		if _, _, ok := pickAuth(tc.registry, map[string]dockerAuth{tc.key: {}}); !ok {
			t.Errorf("the auths entry %q is not picked for registry %q", tc.key, tc.registry)
		}
	}
	if _, _, ok := pickAuth("registry.example:5000", map[string]dockerAuth{"registry.example": {}}); ok {
		t.Error("an entry for another port is picked")
	}
}

func TestOCICredentialID(t *testing.T) {
	key := []byte("node key")
	id := func(user, pass string) string {
		return ociCredentialID(key, "r.example", ociCredential{cred: auth.Credential{Username: user, Password: pass}})
	}
	anon := ociCredentialID(key, "r.example", ociCredential{})
	if id("u", "p") != id("u", "p") || id("u", "p") == id("u", "q") || id("u", "p") == anon {
		t.Error("credential ids must be equal for equal credentials only")
	}
	if strings.Contains(id("u", "secret-password"), "secret-password") {
		t.Error("the id holds the password")
	}
}

func TestOCIIndex(t *testing.T) {
	reg := newOCIRegistry(t)
	model, _ := reg.PushModel(t, "models/mixed", "", modelFiles()[:1]...)
	second, _ := reg.PushModel(t, "models/mixed", "", modelFiles()[1:2]...)
	image := reg.PushManifestOf(t, "models/mixed", "", "", ocispec.MediaTypeImageConfig, nil)
	platform := &ocispec.Platform{OS: "linux", Architecture: "amd64"}
	imageDesc := ocispec.Descriptor{MediaType: image.MediaType, Digest: image.Digest, Size: image.Size, Platform: platform}
	typed := model
	typed.ArtifactType = "application/vnd.cncf.model.manifest.v1+json"
	reg.PushIndex(t, "models/mixed", "typed", imageDesc, typed)
	reg.PushIndex(t, "models/mixed", "untyped", imageDesc, model)
	reg.PushIndex(t, "models/mixed", "images", imageDesc)
	reg.PushIndex(t, "models/mixed", "two", model, second)
	reg.PushManifestOf(t, "models/mixed", "image", "", ocispec.MediaTypeImageConfig, nil)
	s := ociSources(reg)
	secret := dockerConfig(reg.Host, ociUser, ociPassword)
	for _, tc := range []struct {
		tag  string
		want error
		says string
	}{
		{"typed", nil, ""},
		{"untyped", nil, ""},
		{"images", ErrNotFound, "none is a ModelPack model"},
		{"two", ErrInvalid, "several ModelPack models"},
		{"image", ErrInvalid, "is not a ModelPack model"},
	} {
		t.Run(tc.tag, func(t *testing.T) {
			r, m, err := resolveOCIModel(t, s, "oci://"+reg.Host+"/models/mixed:"+tc.tag, secret)
			if !errors.Is(err, tc.want) || err != nil && !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("List: %v, want %v saying %q", err, tc.want, tc.says)
			}
			if tc.want == nil && (len(m) != 1 || r.Revision() != model.Digest.String()) {
				t.Errorf("listed %+v at %s, want the model %s", m, r.Revision(), model.Digest)
			}
		})
	}
}

func TestOCIInvalidModels(t *testing.T) {
	reg := newOCIRegistry(t)
	noPath, data := ocitest.Layer(t, ocitest.File{Path: "x", Data: []byte("x")})
	delete(noPath.Annotations, "org.cncf.model.filepath")
	reg.PushBlob(t, "m/nopath", noPath, data)
	reg.PushManifestOf(t, "m/nopath", "v1", "application/vnd.cncf.model.manifest.v1+json", "application/vnd.cncf.model.config.v1+json", []ocispec.Descriptor{noPath})
	escape, data := ocitest.Layer(t, ocitest.File{Path: "../etc/passwd", Data: []byte("x")})
	reg.PushBlob(t, "m/escape", escape, data)
	reg.PushManifestOf(t, "m/escape", "v1", "application/vnd.cncf.model.manifest.v1+json", "application/vnd.cncf.model.config.v1+json", []ocispec.Descriptor{escape})
	reg.PushModel(t, "m/many", "v1", modelFiles()...)
	s := ociSources(reg, WithMaxFiles(3))
	secret := dockerConfig(reg.Host, ociUser, ociPassword)
	for _, tc := range []struct {
		repo string
		want error
	}{
		{"m/nopath", ErrInvalid},
		{"m/escape", ErrUnsafePath},
		{"m/many", ErrTooLarge},
	} {
		if _, _, err := resolveOCIModel(t, s, "oci://"+reg.Host+"/"+tc.repo+":v1", secret); !errors.Is(err, tc.want) {
			t.Errorf("%s: List: %v, want %v", tc.repo, err, tc.want)
		}
	}
}

// A tar layer holding several files is refused, not half read.
func TestOCITarOfSeveralFiles(t *testing.T) {
	reg := newOCIRegistry(t)
	reg.PushModel(t, "m/two", "v1", ocitest.File{Path: "a.bin", Data: []byte("aaaa"), Format: ocitest.Tar, Extra: &ocitest.File{Path: "b.bin", Data: []byte("bb")}})
	r, m, err := resolveOCIModel(t, ociSources(reg), "oci://"+reg.Host+"/m/two:v1", dockerConfig(reg.Host, ociUser, ociPassword))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := readEntry(r, m[0]); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "more than one file") {
		t.Fatalf("reading: %v, want ErrInvalid about several files", err)
	}
}

// A byte changed in transit: a tar layer's reader fails before EOF; a raw
// layer's bytes no longer match the Entry.SHA256 the store checks.
func TestOCICorruptInTransit(t *testing.T) {
	for _, f := range modelFiles() {
		t.Run(f.Path, func(t *testing.T) {
			reg := newOCIRegistry(t)
			_, layers := reg.PushModel(t, "m/flip", "v1", f)
			reg.FlipByte(layers[0])
			r, m, err := resolveOCIModel(t, ociSources(reg), "oci://"+reg.Host+"/m/flip:v1", dockerConfig(reg.Host, ociUser, ociPassword))
			if err != nil && f.Format == "" {
				t.Fatal(err)
			}
			if err != nil {
				// The archive header itself was changed.
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("List: %v, want ErrCorrupt", err)
				}
				return
			}
			got, err := readEntry(r, m[0])
			if f.Format == "" {
				if err != nil || sha256Hex(got) == m[0].SHA256 {
					t.Fatalf("raw layer: %v; its changed bytes must differ from Entry.SHA256", err)
				}
				return
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("reading %s: %v, want ErrCorrupt", f.Path, err)
			}
		})
	}
}

func TestOCIRanges(t *testing.T) {
	reg := newOCIRegistry(t)
	data := bytes.Repeat([]byte("0123456789"), 10_000)
	reg.PushModel(t, "m/ranged", "v1", ocitest.File{Path: "w.bin", Data: data}, ocitest.File{Path: "t.bin", Data: data, Format: ocitest.Tar})
	r, m, err := resolveOCIModel(t, ociSources(reg), "oci://"+reg.Host+"/m/ranged:v1", dockerConfig(reg.Host, ociUser, ociPassword))
	if err != nil {
		t.Fatal(err)
	}
	rr := newOCIRanged(r)
	raw, tarred := m[1], m[0]
	if !rr.CanRange(raw) || rr.CanRange(tarred) {
		t.Fatal("CanRange: raw layers only")
	}
	read := func(off, n int64) ([]byte, error) {
		rc, err := rr.OpenRange(context.Background(), raw, off, n)
		if err != nil {
			return nil, err
		}
		defer rc.Close()
		return io.ReadAll(rc)
	}
	for _, c := range [][2]int64{{0, 1}, {12345, 4096}, {int64(len(data)) - 7, 7}} {
		got, err := read(c[0], c[1])
		if err != nil || !bytes.Equal(got, data[c[0]:c[0]+c[1]]) {
			t.Fatalf("OpenRange(%d, %d): %d bytes, %v", c[0], c[1], len(got), err)
		}
	}
	// One bounded GET per range, none of the whole blob first (oras-go's
	// seekable reader made two per range); the one more is the first
	// range's, answered 401 before the client had its token.
	if reg.RangeRequests() != 3 || reg.BlobGets() != 4 {
		t.Errorf("%d ranged requests in %d blob GETs, want 3 in 4", reg.RangeRequests(), reg.BlobGets())
	}
	if _, err := rr.OpenRange(context.Background(), tarred, 0, 10); !errors.Is(err, ErrInvalid) {
		t.Errorf("OpenRange of a tar layer: %v, want ErrInvalid", err)
	}
	if _, err := read(int64(len(data))-1, 2); !errors.Is(err, ErrChanged) {
		t.Errorf("OpenRange past the end: %v, want ErrChanged", err)
	}

	reg.SetRanges(false)
	if _, err := read(10, 10); !errors.Is(err, ErrUnavailable) || rr.CanRange(raw) {
		t.Fatalf("OpenRange without Range support: %v, CanRange %v; want ErrUnavailable and no more ranges", err, rr.CanRange(raw))
	}
	for _, e := range m {
		if got, err := readEntry(r, e); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("reading %s without ranges: %d bytes, %v", e.Path, len(got), err)
		}
	}
	if reg.RangeRequests() != 3 {
		t.Errorf("%d ranged requests, want still 3", reg.RangeRequests())
	}
}

// A blob redirected (as registries do to object storage) to an address
// tenants may not reach is refused when it is dialled.
func TestOCIRedirectRefused(t *testing.T) {
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("x")) }))
	defer other.Close()
	otherAddr := netip.MustParseAddrPort(strings.TrimPrefix(other.URL, "http://"))
	for _, tc := range []struct {
		name     string
		location string
	}{
		{"metadata service", "http://169.254.169.254/latest/meta-data/"},
		{"loopback not allowed", fmt.Sprintf("http://127.0.0.2:%d/blob", otherAddr.Port())},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := newOCIRegistry(t)
			_, layers := reg.PushModel(t, "m/redir", "v1", ocitest.File{Path: "w.bin", Data: []byte("weights")})
			reg.RedirectBlob(layers[0].Digest, tc.location)
			// Only the registry's own address is allowed.
			s := NewSources([]byte("node key"), WithAllowedEndpoints([]netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}), WithPlainHTTPRegistries(reg.Host))
			r, m, err := resolveOCIModel(t, s, "oci://"+reg.Host+"/m/redir:v1", dockerConfig(reg.Host, ociUser, ociPassword))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := readEntry(r, m[0]); !errors.Is(err, ErrRefused) {
				t.Fatalf("reading a blob redirected to %s: %v, want ErrRefused", tc.location, err)
			}
		})
	}
}

func TestOCIVerify(t *testing.T) {
	reg := ocitest.New(t, ocitest.Options{Users: map[string]string{ociUser: ociPassword, "other": "other-password-1"}})
	reg.PushModel(t, "m/v", "v1", modelFiles()...)
	s := ociSources(reg)
	uri := "oci://" + reg.Host + "/m/v:v1"
	_, m, err := resolveOCIModel(t, s, uri, dockerConfig(reg.Host, ociUser, ociPassword))
	if err != nil {
		t.Fatal(err)
	}
	check := func(secrets map[string]string, m Manifest) error {
		r, err := s.Resolve(context.Background(), uri, secrets)
		if err != nil {
			t.Fatal(err)
		}
		return r.Verify(context.Background(), m)
	}
	if err := check(dockerConfig(reg.Host, "other", "other-password-1"), m); err != nil {
		t.Fatalf("Verify with other valid credentials: %v", err)
	}
	if err := check(dockerConfig(reg.Host, "other", "wrong-password-1"), m); !errors.Is(err, ErrDenied) {
		t.Fatalf("Verify with a wrong password: %v, want ErrDenied", err)
	}
	if err := check(nil, m); !errors.Is(err, ErrDenied) {
		t.Fatalf("Verify anonymously: %v, want ErrDenied", err)
	}
	changed := append(Manifest(nil), m...)
	changed[0].Path = "gone.bin"
	if err := check(dockerConfig(reg.Host, "other", "other-password-1"), changed); !errors.Is(err, ErrChanged) {
		t.Fatalf("Verify of a file the model no longer has: %v, want ErrChanged", err)
	}
	// The tag moves: a remote that listed v1 before checks what it listed.
	reg.PushModel(t, "m/v", "v1", modelFiles()[:1]...)
	if err := check(dockerConfig(reg.Host, "other", "other-password-1"), m); !errors.Is(err, ErrChanged) {
		t.Fatalf("Verify after the tag moved: %v, want ErrChanged", err)
	}
}

// The manifest JSON must be what the registry says it is.
func TestOCIManifestTypeConfusion(t *testing.T) {
	reg := newOCIRegistry(t)
	idx, _ := json.Marshal(ocispec.Index{MediaType: ocispec.MediaTypeImageIndex})
	reg.PushManifest(t, "m/confused", "v1", ocispec.MediaTypeImageManifest, idx)
	_, _, err := resolveOCIModel(t, ociSources(reg), "oci://"+reg.Host+"/m/confused:v1", dockerConfig(reg.Host, ociUser, ociPassword))
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("List: %v, want ErrInvalid", err)
	}
}

// A tag moved to a model of the same paths and sizes is another content
// key: tar entries carry their layer's digest.
func TestOCIContentKeyFollowsLayers(t *testing.T) {
	reg := newOCIRegistry(t)
	s := ociSources(reg)
	uri := "oci://" + reg.Host + "/m/moving:v1"
	keys := map[string]bool{}
	for _, data := range []string{"aaaa", "bbbb"} {
		reg.PushModel(t, "m/moving", "v1", ocitest.File{Path: "w.bin", Data: []byte(data), Format: ocitest.Tar, Metadata: true})
		r, m, err := resolveOCIModel(t, s, uri, dockerConfig(reg.Host, ociUser, ociPassword))
		if err != nil {
			t.Fatal(err)
		}
		keys[ContentKey(r.Identity(), m)] = true
	}
	if len(keys) != 2 {
		t.Fatal("two contents under one tag share a content key")
	}
}

// A blob redirected to object storage the egress rules allow is read
// from there, without the registry's token.
func TestOCIRedirectFollowed(t *testing.T) {
	reg := newOCIRegistry(t)
	data := []byte("weights from object storage")
	_, layers := reg.PushModel(t, "m/redir", "v1", ocitest.File{Path: "w.bin", Data: data, Format: ocitest.Tar})
	_, layer := ocitest.Layer(t, ocitest.File{Path: "w.bin", Data: data, Format: ocitest.Tar})
	var authorization []string
	store := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		authorization = append(authorization, req.Header.Get("Authorization"))
		w.Write(layer)
	}))
	defer store.Close()
	reg.RedirectBlob(layers[0].Digest, store.URL+"/blob?signature=abc")
	r, m, err := resolveOCIModel(t, ociSources(reg), "oci://"+reg.Host+"/m/redir:v1", dockerConfig(reg.Host, ociUser, ociPassword))
	if err != nil {
		t.Fatal(err)
	}
	got, err := readEntry(r, m[0])
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("reading a redirected blob: %q, %v", got, err)
	}
	if len(authorization) == 0 || slices.ContainsFunc(authorization, func(a string) bool { return a != "" }) {
		t.Fatalf("the object store got Authorization %q, want none", authorization)
	}
}
