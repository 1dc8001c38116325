package source

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/modelcache/modelcache/pkg/source/remotespec"
	"github.com/rclone/rclone/fs"
	"github.com/rclone/rclone/fs/config/configmap"
)

var _ Resolver = (*Sources)(nil)

// countingServer stands in for a remote: Resolve must never call it.
func countingServer(t *testing.T) (url string, hits *atomic.Int64) {
	t.Helper()
	hits = new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(http.StatusForbidden)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, hits
}

func minioSecret(endpoint, keyID, key string) map[string]string {
	return map[string]string{
		"RCLONE_CONFIG_MYS3_TYPE":              "s3",
		"RCLONE_CONFIG_MYS3_PROVIDER":          "Minio",
		"RCLONE_CONFIG_MYS3_ENV_AUTH":          "false",
		"RCLONE_CONFIG_MYS3_ENDPOINT":          endpoint,
		"RCLONE_CONFIG_MYS3_ACCESS_KEY_ID":     keyID,
		"RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": key,
	}
}

func TestResolveRejectsBadInputWithoutIO(t *testing.T) {
	endpoint, hits := countingServer(t)
	good := minioSecret(endpoint, secretKeyID, secretAccessKey)
	tests := []struct {
		name    string
		uri     string
		secrets map[string]string
	}{
		{"empty uri", "", good},
		{"local path", "/var/lib/kubelet", good},
		{"file scheme", "file:///etc/passwd", good},
		{"connection string", ":s3,endpoint=" + endpoint + ":bucket", good},
		{"escaping path", "mys3:bucket/../../x", good},
		{"undefined remote", "other:bucket/m", good},
		{"local backend", "mys3:bucket/m", with(good, "RCLONE_CONFIG_MYS3_TYPE", "local")},
		{"node credentials", "mys3:bucket/m", with(good, "RCLONE_CONFIG_MYS3_ENV_AUTH", "true")},
		{"credentials file", "mys3:bucket/m", with(good, "RCLONE_CONFIG_MYS3_SHARED_CREDENTIALS_FILE", "/root/.aws/credentials")},
		{"password command", "mys3:bucket/m", with(good, "RCLONE_PASSWORD_COMMAND", "cat /etc/shadow")},
		{"half an AWS key pair", "s3://bucket/m", map[string]string{"AWS_ACCESS_KEY_ID": secretKeyID, "AWS_ENDPOINT_URL": endpoint}},
		{"non-http endpoint", "mys3:bucket/m", with(good, "RCLONE_CONFIG_MYS3_ENDPOINT", "file:///etc")},
	}
	r, dns := newTestRclone(t, nil, WithAllowedEndpoints(loopback))
	if _, err := r.Resolve(context.Background(), "mys3:bucket/m", good); err != nil {
		t.Fatalf("Resolve with the good secret: %v", err)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			remote, err := r.Resolve(context.Background(), tc.uri, tc.secrets)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Resolve(%q) = %v, %v; want ErrInvalid", tc.uri, remote, err)
			}
			if remote != nil {
				t.Errorf("Resolve(%q) returned a Remote with its error", tc.uri)
			}
			assertNoSecrets(t, "Resolve error", err.Error(), tc.secrets)
		})
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("Resolve with bad input made %d requests to the remote, want none", n)
	}
	if n := dns.count(); n != 0 {
		t.Errorf("Resolve with bad input made %d DNS lookups, want none", n)
	}
}

func TestResolve(t *testing.T) {
	endpoint, hits := countingServer(t)
	r, _ := newTestRclone(t, nil, WithAllowedEndpoints(loopback))
	ctx := context.Background()

	remote, err := r.Resolve(ctx, "mys3:models/iris/", minioSecret(endpoint, secretKeyID, secretAccessKey))
	if err != nil {
		t.Fatalf("Resolve: %v", err)
	}
	if got, want := remote.URI(), (URI{Scheme: SchemeRemote, Remote: "mys3", Path: "models/iris"}); got != want {
		t.Errorf("URI() = %+v, want %+v", got, want)
	}
	if got, want := remote.Identity(), remotespec.IdentityVersion+"|s3|"+strings.ToLower(endpoint)+"|models/iris"; got != want {
		t.Errorf("Identity() = %q, want %q", got, want)
	}
	id := remote.CredentialID()
	if !hexSHA256.MatchString(id) {
		t.Errorf("remotespec.CredentialID() = %q, want 64 hex digits", id)
	}
	for _, v := range []string{secretKeyID, secretAccessKey} {
		if strings.Contains(id, v) || strings.Contains(remote.Identity(), v) || strings.Contains(remote.URI().String(), v) {
			t.Errorf("the Remote's names leak %q", v)
		}
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("Resolve made %d requests to the remote, want none", n)
	}

	resolve := func(r *Sources, uri string, secrets map[string]string) Remote {
		t.Helper()
		rm, err := r.Resolve(ctx, uri, secrets)
		if err != nil {
			t.Fatalf("Resolve(%q): %v", uri, err)
		}
		return rm
	}
	sameCreds := resolve(r, "mys3:models/iris", minioSecret(endpoint, secretKeyID, secretAccessKey))
	otherKey := resolve(r, "mys3:models/iris", minioSecret(endpoint, secretKeyID, "SUPERSECRETVALUE124"))
	otherAlias := resolve(r, "minio-2:models/iris", map[string]string{
		"RCLONE_CONFIG_MINIO_2_TYPE":              "s3",
		"RCLONE_CONFIG_MINIO_2_PROVIDER":          "Minio",
		"RCLONE_CONFIG_MINIO_2_ENDPOINT":          endpoint,
		"RCLONE_CONFIG_MINIO_2_ACCESS_KEY_ID":     secretKeyID,
		"RCLONE_CONFIG_MINIO_2_SECRET_ACCESS_KEY": secretAccessKey,
	})
	otherModel := resolve(r, "mys3:models/mnist", minioSecret(endpoint, secretKeyID, secretAccessKey))
	otherNode := resolve(NewSources([]byte("another node's key"), WithAllowedEndpoints(loopback)), "mys3:models/iris", minioSecret(endpoint, secretKeyID, secretAccessKey))
	s3Form := resolve(r, "s3://models/iris", map[string]string{"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": secretKeyID, "AWS_SECRET_ACCESS_KEY": "SUPERSECRETVALUE125"})

	t.Run("identity", func(t *testing.T) {
		for name, rm := range map[string]Remote{"same credentials": sameCreds, "other key": otherKey, "other alias": otherAlias, "other node": otherNode, "s3 form": s3Form} {
			if rm.Identity() != remote.Identity() {
				t.Errorf("%s: Identity() = %q, want %q (same bytes)", name, rm.Identity(), remote.Identity())
			}
		}
		if otherModel.Identity() == remote.Identity() {
			t.Errorf("another model has the same identity %q", remote.Identity())
		}
	})

	sk := SourceKey(remote)
	t.Run("source key", func(t *testing.T) {
		if !regexp.MustCompile(`^sha256:[0-9a-f]{64}$`).MatchString(sk) {
			t.Errorf("SourceKey = %q, want sha256:<64 hex>", sk)
		}
		if got := SourceKey(sameCreds); got != sk {
			t.Errorf("SourceKey with equal credentials = %q, want %q", got, sk)
		}
		// The alias is not part of what the credentials are.
		if got := SourceKey(otherAlias); got != sk {
			t.Errorf("SourceKey under another alias with equal credentials = %q, want %q", got, sk)
		}
		differ := map[string]Remote{
			"different secret key":         otherKey,
			"different model":              otherModel,
			"different node key":           otherNode,
			"different form and secret":    s3Form,
			"different access key, anyway": resolve(r, "mys3:models/iris", minioSecret(endpoint, "AKIAOTHER0001", secretAccessKey)),
		}
		for name, rm := range differ {
			if got := SourceKey(rm); got == sk {
				t.Errorf("%s: SourceKey = %q, equal to the first credentials' key", name, got)
			}
		}
	})

	if n := hits.Load(); n != 0 {
		t.Errorf("Resolve, Identity, remotespec.CredentialID and SourceKey made %d requests, want none", n)
	}
}

// The backend sees the request's options over rclone's defaults, never
// RCLONE_* variables from the node's environment (the "tenant configuration cannot reach the node" invariant).
func TestConfigMapIgnoresNodeEnvironment(t *testing.T) {
	for k, v := range map[string]string{
		"RCLONE_S3_ENV_AUTH":              "true",
		"RCLONE_S3_ACCESS_KEY_ID":         "AKIANODE0000",
		"RCLONE_S3_SECRET_ACCESS_KEY":     "NODESECRETKEY0",
		"RCLONE_S3_ENDPOINT":              "http://node-endpoint:9000",
		"RCLONE_S3_PROVIDER":              "Ceph",
		"RCLONE_ENV_AUTH":                 "true",
		"RCLONE_ACCESS_KEY_ID":            "AKIANODE0001",
		"RCLONE_GCS_ENV_AUTH":             "true",
		"RCLONE_GCS_SERVICE_ACCOUNT_FILE": "/etc/node-key.json",
		"RCLONE_GCS_ANONYMOUS":            "false",
	} {
		t.Setenv(k, v)
	}
	r, _ := newTestRclone(t, map[string][]string{"minio": {"10.96.0.20"}})
	tests := []struct {
		name    string
		uri     string
		secrets map[string]string
		want    map[string]string // option → value the backend reads
	}{
		{
			name:    "anonymous s3",
			uri:     "s3://bucket/m",
			secrets: nil,
			want:    map[string]string{"env_auth": "false", "access_key_id": "", "secret_access_key": "", "endpoint": "", "provider": "AWS"},
		},
		{
			name:    "s3 remote",
			uri:     "mys3:bucket/m",
			secrets: minioSecret("http://minio:9000", secretKeyID, secretAccessKey),
			want:    map[string]string{"env_auth": "false", "access_key_id": secretKeyID, "secret_access_key": secretAccessKey, "endpoint": "http://minio:9000", "provider": "Minio"},
		},
		{
			name:    "anonymous gcs",
			uri:     "gs://bucket/m",
			secrets: nil,
			want:    map[string]string{"env_auth": "false", "anonymous": "true", "service_account_file": ""},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rm, err := r.Resolve(context.Background(), tc.uri, tc.secrets)
			if err != nil {
				t.Fatalf("Resolve: %v", err)
			}
			rr := rm.(*rcloneRemote)
			m := configMap(rr.info, rr.cfg.Options)
			for k, want := range tc.want {
				if got, _ := m.Get(k); got != want {
					t.Errorf("backend option %s = %q, want %q", k, got, want)
				}
			}
			// Options the request did not set still get rclone's defaults.
			if v, ok := m.Get("encoding"); !ok || v == "" {
				t.Errorf("backend option encoding = %q, %v; want rclone's default", v, ok)
			}
			if v, ok := m.Get("no_such_option"); ok {
				t.Errorf("unknown option reads %q, want nothing", v)
			}
		})
	}
}

// A value set on rclone's option registry (as a command-line flag would) is
// process-wide, so it must not reach a request either.
func TestConfigMapIgnoresProcessWideOptionValues(t *testing.T) {
	info, err := fs.Find("s3")
	if err != nil {
		t.Fatal(err)
	}
	opt := info.Options.Get("env_auth")
	old := opt.Value
	opt.Value = true
	t.Cleanup(func() { opt.Value = old })

	if got, _ := configMap(info, configmap.Simple{"provider": "AWS"}).Get("env_auth"); got != "false" {
		t.Errorf("backend option env_auth = %q with a process-wide value set, want rclone's default %q", got, "false")
	}
}
