package remotespec

import (
	"errors"
	"net/url"
	"path"
	"slices"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"
)

// Fuzz targets for hostile input. Seeds live in testdata/fuzz/<FuzzName>/;
// run one with: go test -run='^$' -fuzz=FuzzParseURI -fuzztime=20s ./pkg/source/remotespec

// checkSafeRelative fails if p, accepted as a path relative to a model or
// bucket root, could escape it or name it ambiguously.
func checkSafeRelative(t *testing.T, what, p string) {
	t.Helper()
	switch {
	case p == "" || path.IsAbs(p) || path.Clean(p) != p:
		t.Fatalf("%s %q is not a clean relative path", what, p)
	case strings.ContainsAny(p, "\x00\\") || strings.ContainsFunc(p, unicode.IsControl) || strings.ContainsFunc(p, isBidiControl):
		t.Fatalf("%s %q holds NUL, a backslash or a control character", what, p)
	case !utf8.ValidString(p):
		t.Fatalf("%s %q is not valid UTF-8", what, p)
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "" || seg == "." || seg == ".." || seg == encodedDot || seg == encodedDot+encodedDot {
			t.Fatalf("%s %q has a %q segment", what, p, seg)
		}
	}
	if j := path.Join("/root", p); !strings.HasPrefix(j, "/root/") {
		t.Fatalf("%s %q joined under /root is %q", what, p, j)
	}
}

func FuzzParseURI(f *testing.F) {
	for _, s := range []string{
		"mys3:models/iris", "s3://bucket/prefix/model", "gs://b/p", "https://models.example.com:8443/m/model.bin",
		":s3,provider=AWS:bucket", "mys3:bucket/../x", "https://user:pw@host/x", "mys3:///", "s3:x://y",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseURI(%q) error %v is not ErrInvalid", s, err)
			}
			if u != (URI{}) {
				t.Fatalf("ParseURI(%q) returned %+v with its error", s, u)
			}
			return
		}
		again, err := ParseURI(u.String())
		if err != nil || again != u {
			t.Fatalf("ParseURI(%q) = %+v; its String %q parses to %+v, %v", s, u, u.String(), again, err)
		}
		checkSafeRelative(t, "path", u.Path)
		switch u.Scheme {
		case SchemeRemote:
			if !remoteName.MatchString(u.Remote) || u.Host != "" {
				t.Fatalf("ParseURI(%q) = %+v: bad remote", s, u)
			}
		case SchemeHTTPS:
			if !validHostPort(u.Host) || u.Remote != "" {
				t.Fatalf("ParseURI(%q) = %+v: bad host", s, u)
			}
		case SchemeS3, SchemeGCS:
			if u.Host != "" || u.Remote != "" {
				t.Fatalf("ParseURI(%q) = %+v: stray fields", s, u)
			}
		default:
			t.Fatalf("ParseURI(%q) = %+v: unknown scheme", s, u)
		}
	})
}

// fuzzURIs are the modelUris FuzzBuildConfig pairs with fuzzed secrets.
var fuzzURIs = []string{
	"mys3:bucket/m", "my-s3:bucket/m", "gcs1:bucket/m", "az:container/m", "web:models/m", "x:b",
	"s3://bucket/m", "gs://bucket/m", "https://models.example.com/m",
}

// secretsFromText reads KEY=VALUE lines; "\n" inside a value is written "\\n".
func secretsFromText(text string) map[string]string {
	secrets := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		k, v, _ := strings.Cut(line, "=")
		secrets[k] = strings.ReplaceAll(v, `\n`, "\n")
	}
	return secrets
}

func FuzzBuildConfig(f *testing.F) {
	f.Add(uint8(0), "RCLONE_CONFIG_MYS3_TYPE=s3\nRCLONE_CONFIG_MYS3_ENDPOINT=http://minio:9000\nRCLONE_CONFIG_MYS3_ACCESS_KEY_ID=a\nRCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY=b")
	f.Add(uint8(0), "RCLONE_CONFIG_MYS3_TYPE=s3\nRCLONE_CONFIG_MYS3_GLOBAL.LOW_LEVEL_RETRIES=9")
	f.Add(uint8(0), "RCLONE_CONFIG_MYS3_TYPE=S3\nRCLONE_CONFIG_MYS3_OVERRIDE_ENDPOINT=x\nRCLONE_CONFIG_MYS3_endpoint=http://a")
	f.Add(uint8(1), "RCLONE_CONFIG_MY_S3_TYPE=local\nRCLONE_CONFIG_MY_S3_NOUNC=true")
	f.Add(uint8(2), "RCLONE_CONFIG_GCS1_TYPE=gcs\nRCLONE_CONFIG_GCS1_SERVICE_ACCOUNT_CREDENTIALS={\"token_uri\":\"https://oauth2.example/t\"}")
	f.Add(uint8(3), "RCLONE_CONFIG_AZ_TYPE=azureblob\nRCLONE_CONFIG_AZ_ACCOUNT=acct\nRCLONE_CONFIG_AZ_SAS_URL=https://a.example/c?sig=x")
	f.Add(uint8(4), "RCLONE_CONFIG_WEB_TYPE=http\nRCLONE_CONFIG_WEB_URL=https://models.example.com/\nRCLONE_CONFIG_WEB_HEADERS=Authorization,Bearer x")
	f.Add(uint8(6), "AWS_ACCESS_KEY_ID=a\nAWS_SECRET_ACCESS_KEY=b\nS3_ENDPOINT=minio:9000\nS3_USE_HTTPS=0\nAWS_REGION=us-east-1")
	f.Add(uint8(7), "GOOGLE_APPLICATION_CREDENTIALS={\"type\":\"service_account\"}")
	f.Add(uint8(8), "RCLONE_PASSWORD_COMMAND=id")
	f.Fuzz(func(t *testing.T, which uint8, text string) {
		u, err := ParseURI(fuzzURIs[int(which)%len(fuzzURIs)])
		if err != nil {
			t.Fatal(err)
		}
		secrets := secretsFromText(text)
		cfg, err := BuildConfig(u, secrets)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("buildConfig error %v is not ErrInvalid", err)
			}
			if cfg.Type != "" || cfg.Options != nil || cfg.Endpoints != nil {
				t.Fatalf("buildConfig returned %+v with its error", cfg)
			}
			return
		}
		allowed, ok := allowedOptions[cfg.Type]
		if !ok {
			t.Fatalf("buildConfig accepted backend type %q", cfg.Type)
		}
		for k := range cfg.Options {
			if !slices.Contains(allowed, k) || globalOrOverride(k) {
				t.Fatalf("buildConfig passed option %q to a %s backend", k, cfg.Type)
			}
		}
		for k := range secrets {
			if k == "RCLONE_CONFIG" || k == "RCLONE_PASSWORD_COMMAND" || k == "RCLONE_CONFIG_PASS" {
				t.Fatalf("buildConfig accepted secret key %s", k)
			}
			if rest, ok := strings.CutPrefix(k, "RCLONE_"); ok {
				remote, opt, _ := strings.Cut(strings.TrimPrefix(rest, "CONFIG_"), "_")
				if !strings.HasPrefix(rest, "CONFIG_") || remote == "" || opt == "" {
					t.Fatalf("buildConfig accepted secret key %s", k)
				}
			}
		}
		if v := cfg.Options["env_auth"]; v != "" {
			t.Fatalf("buildConfig passed env_auth=%q", v)
		}
		if cfg.Type == "google cloud storage" && cfg.Options["service_account_credentials"] == "" && cfg.Options["access_token"] == "" && cfg.Options["anonymous"] != "true" {
			t.Fatalf("a Google remote without credentials is not anonymous: %v", cfg.Options)
		}
		for _, opt := range []string{"endpoint", "url", "sas_url"} {
			v := cfg.Options[opt]
			if v == "" {
				continue
			}
			pu, err := url.Parse(v)
			if err != nil || !slices.ContainsFunc(cfg.Endpoints, func(e Endpoint) bool { return e.URL.Host == pu.Host }) {
				t.Fatalf("option %s=%q is not among the endpoints Resolve checks: %v", opt, v, cfg.Endpoints)
			}
		}
		for _, e := range cfg.Endpoints {
			if e.URL.Scheme != "http" && e.URL.Scheme != "https" || e.URL.Hostname() == "" {
				t.Fatalf("endpoint %s from %s is not an http(s) URL with a host", e.URL, e.Key)
			}
		}
		if cfg.Root != u.Path || cfg.Identity != identity(cfg.Type, cfg.Options, cfg.Root) {
			t.Fatalf("config %+v does not match the URI %+v", cfg, u)
		}
	})
}

func FuzzValidateKey(f *testing.F) {
	for _, s := range []string{
		"a/b/c.bin", ".gitattributes", "../x", "a//b", "/abs", "a\x00b", `a\b`, "\uff0e\uff0e/x", "a/./b",
		"a/\u212a", "a\nb", "\xff", "a/..", "...", "a\u0085b", "model\u202enib.exe", "a/\u2066b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		err := ValidateKey(key)
		if err != nil {
			if !errors.Is(err, ErrUnsafePath) {
				t.Fatalf("ValidateKey(%q) error %v is not ErrUnsafePath", key, err)
			}
			return
		}
		checkSafeRelative(t, "key", key)
		if len(key) > maxPath {
			t.Fatalf("key of %d bytes accepted", len(key))
		}
		for _, seg := range strings.Split(key, "/") {
			if len(seg) > maxSegment {
				t.Fatalf("segment of %d bytes accepted", len(seg))
			}
		}
		// A manifest of the key alone is valid too, and keeps it as it is.
		m, err := CheckManifest(Manifest{{Path: key, Size: 1}})
		if err != nil || len(m) != 1 || m[0].Path != key {
			t.Fatalf("checkManifest of accepted key %q = %v, %v", key, m, err)
		}
	})
}
