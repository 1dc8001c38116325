package remotespec

import (
	"errors"
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/rclone/rclone/fs/config/configmap"
)

// Distinctive secret values: none of them may ever appear in an error.
const (
	secretKeyID     = "AKIASUPERSECRETID42"
	secretAccessKey = "SUPERSECRETVALUE123"
	secretOther     = "SUPERSECRETOTHERREMOTE77"
	secretGCS       = `{"type":"service_account","private_key":"SUPERSECRETPRIVATEKEY9"}`
)

// seldonSecret is Seldon's seldon-rclone-secret for a MinIO remote named mys3.
func seldonSecret() map[string]string {
	return map[string]string{
		"RCLONE_CONFIG_MYS3_TYPE":              "s3",
		"RCLONE_CONFIG_MYS3_PROVIDER":          "Minio",
		"RCLONE_CONFIG_MYS3_ENV_AUTH":          "false",
		"RCLONE_CONFIG_MYS3_ACCESS_KEY_ID":     secretKeyID,
		"RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": secretAccessKey,
		"RCLONE_CONFIG_MYS3_ENDPOINT":          "http://minio.minio-system.svc.cluster.local:9000",
	}
}

// with returns a copy of base with kv (key, value, key, value...) set; an
// empty value deletes the key.
func with(base map[string]string, kv ...string) map[string]string {
	m := maps.Clone(base)
	if m == nil {
		m = map[string]string{}
	}
	for i := 0; i < len(kv); i += 2 {
		if kv[i+1] == "" {
			delete(m, kv[i])
		} else {
			m[kv[i]] = kv[i+1]
		}
	}
	return m
}

func mustParse(t *testing.T, s string) URI {
	t.Helper()
	u, err := ParseURI(s)
	if err != nil {
		t.Fatalf("ParseURI(%q): %v", s, err)
	}
	return u
}

func mustBuild(t *testing.T, uri string, secrets map[string]string) BackendConfig {
	t.Helper()
	cfg, err := BuildConfig(mustParse(t, uri), secrets)
	if err != nil {
		t.Fatalf("BuildConfig(%q): %v", uri, err)
	}
	return cfg
}

// assertNoSecrets fails if text holds any secret value of 6 bytes or more.
func assertNoSecrets(t *testing.T, what, text string, secrets map[string]string) {
	t.Helper()
	for k, v := range secrets {
		if len(v) >= 6 && strings.Contains(v, "SUPERSECRET") && strings.Contains(text, v) {
			t.Errorf("%s leaks the value of secret key %s: %q", what, k, text)
		}
	}
}

func TestBuildConfigAccepts(t *testing.T) {
	const minio = "http://minio.minio-system.svc.cluster.local:9000"
	seldonOpts := configmap.Simple{
		"provider":          "Minio",
		"access_key_id":     secretKeyID,
		"secret_access_key": secretAccessKey,
		"endpoint":          minio,
	}
	tests := []struct {
		name     string
		uri      string
		secrets  map[string]string
		wantType string
		wantOpts configmap.Simple
		wantRoot string
	}{
		{
			name:     "seldon rclone secret",
			uri:      "mys3:models/iris",
			secrets:  seldonSecret(),
			wantType: "s3", wantOpts: seldonOpts, wantRoot: "models/iris",
		},
		{
			name: "remote name with dash maps to underscore",
			uri:  "my-s3:models/iris",
			secrets: map[string]string{
				"RCLONE_CONFIG_MY_S3_TYPE":     "s3",
				"RCLONE_CONFIG_MY_S3_PROVIDER": "Minio",
				"RCLONE_CONFIG_MY_S3_ENDPOINT": minio,
			},
			wantType: "s3", wantOpts: configmap.Simple{"provider": "Minio", "endpoint": minio}, wantRoot: "models/iris",
		},
		{
			name: "mixed-case remote name",
			uri:  "MyS3:models/iris",
			secrets: with(seldonSecret(),
				"RCLONE_CONFIG_MYS3_ENV_AUTH", ""),
			wantType: "s3", wantOpts: seldonOpts, wantRoot: "models/iris",
		},
		{
			name: "keys of other remotes and other forms are ignored",
			uri:  "mys3:models/iris",
			secrets: with(seldonSecret(),
				"RCLONE_CONFIG_GCS1_TYPE", "gcs",
				"RCLONE_CONFIG_GCS1_SERVICE_ACCOUNT_FILE", "/etc/node-key.json",
				"RCLONE_CONFIG_LOCAL_TYPE", "local",
				"RCLONE_CONFIG_OTHER_SECRET_ACCESS_KEY", secretOther,
				"AWS_ACCESS_KEY_ID", "AKIAOTHERFORM",
				"AWS_ENDPOINT_URL", "http://elsewhere:9000",
				"GOOGLE_APPLICATION_CREDENTIALS", secretGCS),
			wantType: "s3", wantOpts: seldonOpts, wantRoot: "models/iris",
		},
		{
			name: "keys of a remote whose name extends this one are ignored",
			uri:  "mys3:models/iris",
			secrets: with(seldonSecret(),
				"RCLONE_CONFIG_MYS3_EU_TYPE", "s3",
				"RCLONE_CONFIG_MYS3_EU_ENDPOINT", "http://minio-eu:9000",
				"RCLONE_CONFIG_MYS3_EU_SECRET_ACCESS_KEY", secretOther),
			wantType: "s3", wantOpts: seldonOpts, wantRoot: "models/iris",
		},
		{
			name: "the longer remote gets its own keys",
			uri:  "mys3-eu:models/iris",
			secrets: with(seldonSecret(),
				"RCLONE_CONFIG_MYS3_EU_TYPE", "s3",
				"RCLONE_CONFIG_MYS3_EU_ENDPOINT", "http://minio-eu:9000",
				"RCLONE_CONFIG_MYS3_EU_SECRET_ACCESS_KEY", secretOther,
				"RCLONE_CONFIG_MYS3_EU_ACCESS_KEY_ID", "AKIAEU"),
			wantType: "s3",
			wantOpts: configmap.Simple{"endpoint": "http://minio-eu:9000", "secret_access_key": secretOther, "access_key_id": "AKIAEU"},
			wantRoot: "models/iris",
		},
		{
			name:     "type is case-insensitive and env_auth False is dropped",
			uri:      "mys3:b",
			secrets:  with(seldonSecret(), "RCLONE_CONFIG_MYS3_TYPE", "S3", "RCLONE_CONFIG_MYS3_ENV_AUTH", "False"),
			wantType: "s3", wantOpts: seldonOpts, wantRoot: "b",
		},
		{
			name: "allow-listed s3 options pass through lower-cased",
			uri:  "mys3:b/p",
			secrets: map[string]string{
				"RCLONE_CONFIG_MYS3_TYPE":             "s3",
				"RCLONE_CONFIG_MYS3_REGION":           "eu-west-1",
				"RCLONE_CONFIG_MYS3_FORCE_PATH_STYLE": "true",
				"RCLONE_CONFIG_MYS3_SESSION_TOKEN":    "SUPERSECRETSESSION1",
			},
			wantType: "s3",
			wantOpts: configmap.Simple{"region": "eu-west-1", "force_path_style": "true", "session_token": "SUPERSECRETSESSION1"},
			wantRoot: "b/p",
		},
		{
			name:     "gcs alias with service account",
			uri:      "gcs1:bucket/m",
			secrets:  map[string]string{"RCLONE_CONFIG_GCS1_TYPE": "gcs", "RCLONE_CONFIG_GCS1_SERVICE_ACCOUNT_CREDENTIALS": secretGCS},
			wantType: "google cloud storage", wantOpts: configmap.Simple{"service_account_credentials": secretGCS}, wantRoot: "bucket/m",
		},
		{
			name:     "gcs with access token",
			uri:      "gcs1:bucket/m",
			secrets:  map[string]string{"RCLONE_CONFIG_GCS1_TYPE": "google cloud storage", "RCLONE_CONFIG_GCS1_ACCESS_TOKEN": "SUPERSECRETTOKEN1"},
			wantType: "google cloud storage", wantOpts: configmap.Simple{"access_token": "SUPERSECRETTOKEN1"}, wantRoot: "bucket/m",
		},
		{
			// Without credentials rclone would fall back to the node's own
			// Google credentials; the remote must be anonymous instead.
			name:     "gcs without credentials is anonymous",
			uri:      "gcs1:bucket/m",
			secrets:  map[string]string{"RCLONE_CONFIG_GCS1_TYPE": "gcs"},
			wantType: "google cloud storage", wantOpts: configmap.Simple{"anonymous": "true"}, wantRoot: "bucket/m",
		},
		{
			name:     "gcs anonymous=false without credentials is still anonymous",
			uri:      "gcs1:bucket/m",
			secrets:  map[string]string{"RCLONE_CONFIG_GCS1_TYPE": "gcs", "RCLONE_CONFIG_GCS1_ANONYMOUS": "false"},
			wantType: "google cloud storage", wantOpts: configmap.Simple{"anonymous": "true"}, wantRoot: "bucket/m",
		},
		{
			name:     "azureblob with account key",
			uri:      "az:container/m",
			secrets:  map[string]string{"RCLONE_CONFIG_AZ_TYPE": "azureblob", "RCLONE_CONFIG_AZ_ACCOUNT": "acct", "RCLONE_CONFIG_AZ_KEY": secretAccessKey},
			wantType: "azureblob", wantOpts: configmap.Simple{"account": "acct", "key": secretAccessKey}, wantRoot: "container/m",
		},
		{
			name:     "http remote",
			uri:      "web:models/m",
			secrets:  map[string]string{"RCLONE_CONFIG_WEB_TYPE": "http", "RCLONE_CONFIG_WEB_URL": "https://models.example.com/"},
			wantType: "http", wantOpts: configmap.Simple{"url": "https://models.example.com/"}, wantRoot: "models/m",
		},
		{
			name:     "s3 with AWS keys",
			uri:      "s3://bucket/model",
			secrets:  map[string]string{"AWS_ACCESS_KEY_ID": secretKeyID, "AWS_SECRET_ACCESS_KEY": secretAccessKey},
			wantType: "s3",
			wantOpts: configmap.Simple{"provider": "AWS", "access_key_id": secretKeyID, "secret_access_key": secretAccessKey},
			wantRoot: "bucket/model",
		},
		{
			name: "s3 with endpoint and region",
			uri:  "s3://bucket/model",
			secrets: map[string]string{
				"AWS_ACCESS_KEY_ID": secretKeyID, "AWS_SECRET_ACCESS_KEY": secretAccessKey,
				"AWS_ENDPOINT_URL": "http://minio:9000/", "AWS_REGION": "us-east-1",
			},
			wantType: "s3",
			wantOpts: configmap.Simple{
				"provider": "Other", "endpoint": "http://minio:9000", "region": "us-east-1",
				"access_key_id": secretKeyID, "secret_access_key": secretAccessKey,
			},
			wantRoot: "bucket/model",
		},
		{
			name: "s3 with session token",
			uri:  "s3://bucket/model",
			secrets: map[string]string{
				"AWS_ACCESS_KEY_ID": secretKeyID, "AWS_SECRET_ACCESS_KEY": secretAccessKey, "AWS_SESSION_TOKEN": "SUPERSECRETSESSION1",
			},
			wantType: "s3",
			wantOpts: configmap.Simple{
				"provider": "AWS", "access_key_id": secretKeyID, "secret_access_key": secretAccessKey, "session_token": "SUPERSECRETSESSION1",
			},
			wantRoot: "bucket/model",
		},
		{
			name:     "s3 AWS_ENDPOINT_URL_S3 and AWS_DEFAULT_REGION",
			uri:      "s3://bucket/model",
			secrets:  map[string]string{"AWS_ENDPOINT_URL_S3": "https://s3.example.com", "AWS_DEFAULT_REGION": "eu-central-1"},
			wantType: "s3",
			wantOpts: configmap.Simple{"provider": "Other", "endpoint": "https://s3.example.com", "region": "eu-central-1"},
			wantRoot: "bucket/model",
		},
		{
			name:     "s3 AWS_ENDPOINT_URL wins over S3_ENDPOINT, AWS_REGION over AWS_DEFAULT_REGION",
			uri:      "s3://bucket/model",
			secrets:  map[string]string{"AWS_ENDPOINT_URL": "https://a.example.com", "S3_ENDPOINT": "b.example.com", "AWS_REGION": "r1", "AWS_DEFAULT_REGION": "r2"},
			wantType: "s3",
			wantOpts: configmap.Simple{"provider": "Other", "endpoint": "https://a.example.com", "region": "r1"},
			wantRoot: "bucket/model",
		},
		{
			name:     "s3 S3_ENDPOINT with S3_USE_HTTPS=0 (KServe)",
			uri:      "s3://bucket/model",
			secrets:  map[string]string{"AWS_ACCESS_KEY_ID": secretKeyID, "AWS_SECRET_ACCESS_KEY": secretAccessKey, "S3_ENDPOINT": "minio:9000", "S3_USE_HTTPS": "0"},
			wantType: "s3",
			wantOpts: configmap.Simple{"provider": "Other", "endpoint": "http://minio:9000", "access_key_id": secretKeyID, "secret_access_key": secretAccessKey},
			wantRoot: "bucket/model",
		},
		{
			name:     "s3 S3_ENDPOINT defaults to https",
			uri:      "s3://bucket/model",
			secrets:  map[string]string{"S3_ENDPOINT": "minio:9000"},
			wantType: "s3", wantOpts: configmap.Simple{"provider": "Other", "endpoint": "https://minio:9000"}, wantRoot: "bucket/model",
		},
		{
			name:     "s3 S3_ENDPOINT with scheme is kept",
			uri:      "s3://bucket/model",
			secrets:  map[string]string{"S3_ENDPOINT": "http://minio:9000/", "S3_USE_HTTPS": "1"},
			wantType: "s3", wantOpts: configmap.Simple{"provider": "Other", "endpoint": "http://minio:9000"}, wantRoot: "bucket/model",
		},
		{
			name:     "s3 without credentials is a public bucket",
			uri:      "s3://bucket/model",
			secrets:  nil,
			wantType: "s3", wantOpts: configmap.Simple{"provider": "AWS"}, wantRoot: "bucket/model",
		},
		{
			name:     "s3 form ignores rclone remote keys",
			uri:      "s3://bucket/model",
			secrets:  with(seldonSecret(), "RCLONE_CONFIG_MYS3_SHARED_CREDENTIALS_FILE", "/root/.aws/credentials"),
			wantType: "s3", wantOpts: configmap.Simple{"provider": "AWS"}, wantRoot: "bucket/model",
		},
		{
			name:     "gs with service-account JSON",
			uri:      "gs://bucket/model",
			secrets:  map[string]string{"GOOGLE_APPLICATION_CREDENTIALS": secretGCS},
			wantType: "google cloud storage", wantOpts: configmap.Simple{"service_account_credentials": secretGCS}, wantRoot: "bucket/model",
		},
		{
			name:     "gs with indented JSON",
			uri:      "gs://bucket/model",
			secrets:  map[string]string{"GOOGLE_APPLICATION_CREDENTIALS": "\n  " + secretGCS},
			wantType: "google cloud storage", wantOpts: configmap.Simple{"service_account_credentials": "\n  " + secretGCS}, wantRoot: "bucket/model",
		},
		{
			name:     "gs without credentials is anonymous",
			uri:      "gs://bucket/model",
			secrets:  map[string]string{},
			wantType: "google cloud storage", wantOpts: configmap.Simple{"anonymous": "true"}, wantRoot: "bucket/model",
		},
		{
			name:     "https",
			uri:      "https://models.example.com:8443/org/model",
			secrets:  map[string]string{"AWS_ACCESS_KEY_ID": secretKeyID},
			wantType: "http", wantOpts: configmap.Simple{"url": "https://models.example.com:8443/"}, wantRoot: "org/model",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := mustBuild(t, tc.uri, tc.secrets)
			if cfg.Type != tc.wantType {
				t.Errorf("Type = %q, want %q", cfg.Type, tc.wantType)
			}
			if !maps.Equal(cfg.Options, tc.wantOpts) {
				t.Errorf("Options = %v, want %v", cfg.Options, tc.wantOpts)
			}
			if cfg.Root != tc.wantRoot {
				t.Errorf("Root = %q, want %q", cfg.Root, tc.wantRoot)
			}
			if want := identity(cfg.Type, cfg.Options, cfg.Root); cfg.Identity != want {
				t.Errorf("Identity = %q, want %q", cfg.Identity, want)
			}
			assertNoSecrets(t, "Identity", cfg.Identity, tc.secrets)
			// Every option handed to rclone is allow-listed for its type.
			for k := range cfg.Options {
				if !slices.Contains(allowedOptions[cfg.Type], k) {
					t.Errorf("option %q is not allow-listed for %s", k, cfg.Type)
				}
			}
		})
	}
}

type rejectCase struct {
	name    string
	uri     string
	secrets map[string]string
	wantMsg []string // fragments the operator needs to see
}

func TestBuildConfigRejects(t *testing.T) {
	seldon := seldonSecret()
	tests := []rejectCase{
		{
			name:    "remote not defined names the defined ones",
			uri:     "mys3:b",
			secrets: map[string]string{"RCLONE_CONFIG_OTHER_TYPE": "s3", "RCLONE_CONFIG_OTHER_SECRET_ACCESS_KEY": secretOther, "RCLONE_CONFIG_GCS1_TYPE": "gcs"},
			wantMsg: []string{`remote "mys3" is not defined`, "RCLONE_CONFIG_MYS3_", "remotes gcs1, other"},
		},
		{
			name:    "remote not defined in an empty secret",
			uri:     "mys3:b",
			secrets: nil,
			wantMsg: []string{"not defined", "no remotes"},
		},
		{
			name:    "remote keys are case-sensitive",
			uri:     "mys3:b",
			secrets: map[string]string{"rclone_config_mys3_type": "s3", "rclone_config_mys3_secret_access_key": secretAccessKey},
			wantMsg: []string{"not defined"},
		},
		{
			name:    "missing type",
			uri:     "mys3:b",
			secrets: with(seldon, "RCLONE_CONFIG_MYS3_TYPE", ""),
			wantMsg: []string{"has no type", "RCLONE_CONFIG_MYS3_TYPE"},
		},
		{
			name:    "empty type",
			uri:     "mys3:b",
			secrets: map[string]string{"RCLONE_CONFIG_MYS3_TYPE": "", "RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": secretAccessKey},
			wantMsg: []string{"has no type"},
		},
		{
			name:    "gs credentials as a file path",
			uri:     "gs://bucket/m",
			secrets: map[string]string{"GOOGLE_APPLICATION_CREDENTIALS": "/var/run/SUPERSECRETPATH/key.json"},
			wantMsg: []string{"not a file path"},
		},
		{
			name:    "s3 key id without secret key",
			uri:     "s3://bucket/m",
			secrets: map[string]string{"AWS_ACCESS_KEY_ID": secretKeyID},
			wantMsg: []string{"both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"},
		},
		{
			name:    "s3 secret key without key id",
			uri:     "s3://bucket/m",
			secrets: map[string]string{"AWS_SECRET_ACCESS_KEY": secretAccessKey},
			wantMsg: []string{"both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"},
		},
	}
	for _, typ := range []string{"local", "sftp", "crypt", "alias", "union", "ftp", "drive", "memory", "combine", "chunker", "webdav"} {
		tests = append(tests, rejectCase{
			name:    "unsupported type " + typ,
			uri:     "mys3:b",
			secrets: with(seldon, "RCLONE_CONFIG_MYS3_TYPE", typ, "RCLONE_CONFIG_MYS3_REMOTE", "/etc"),
			wantMsg: []string{`type "` + typ + `", which is not supported`},
		})
	}
	for _, k := range forbiddenSecretKeys {
		for _, uri := range []string{"mys3:b", "s3://bucket/m", "gs://bucket/m", "https://host/m"} {
			tests = append(tests, rejectCase{
				name:    "forbidden key " + k + " with " + uri,
				uri:     uri,
				secrets: with(seldon, k, "SUPERSECRETFORBIDDEN1"),
				wantMsg: []string{"secret key " + k + " is not accepted"},
			})
		}
	}
	notAllowed := []struct{ remote, typ, option, val string }{
		{"mys3", "s3", "SHARED_CREDENTIALS_FILE", "/root/.aws/credentials"},
		{"mys3", "s3", "PROFILE", "node-admin"},
		{"mys3", "s3", "GLOBAL.LOW_LEVEL_RETRIES", "1000"},
		{"mys3", "s3", "OVERRIDE.ENDPOINT", "http://evil:9000"},
		{"mys3", "s3", "SSE_KMS_KEY_ID", "SUPERSECRETKMS123"},
		{"mys3", "s3", "SERVICE_ACCOUNT_CREDENTIALS", secretGCS},
		{"mys3", "s3", "DESCRIPTION", "x"},
		{"gcs1", "gcs", "SERVICE_ACCOUNT_FILE", "/etc/node-key.json"},
		{"gcs1", "gcs", "TOKEN", `{"access_token":"SUPERSECRETTOKEN1"}`},
		{"az", "azureblob", "USE_MSI", "true"},
		{"az", "azureblob", "CLIENT_CERTIFICATE_PATH", "/etc/kubernetes/pki/apiserver.crt"},
		{"az", "azureblob", "SERVICE_PRINCIPAL_FILE", "/etc/kubernetes/azure.json"},
		{"web", "http", "ENDPOINT", "http://x"},
	}
	for _, na := range notAllowed {
		prefix := "RCLONE_CONFIG_" + strings.ToUpper(na.remote) + "_"
		tests = append(tests, rejectCase{
			name:    "option not allowed " + prefix + na.option,
			uri:     na.remote + ":bucket",
			secrets: with(seldon, prefix+"TYPE", na.typ, prefix+na.option, na.val),
			wantMsg: []string{"secret key " + prefix + na.option + " is not an allowed option"},
		})
	}
	for _, v := range []string{"true", "TRUE", "1", "yes"} {
		tests = append(tests, rejectCase{
			name:    "env_auth " + v,
			uri:     "mys3:b",
			secrets: with(seldon, "RCLONE_CONFIG_MYS3_ENV_AUTH", v),
			wantMsg: []string{"ENV_AUTH=" + v + " is not accepted", "node's own credentials"},
		})
	}
	badEndpoints := []string{"file:///etc", "ftp://x", "minio:9000", "http://", "//minio:9000", "gopher://x/"}
	for _, ep := range badEndpoints {
		for _, form := range []struct{ uri, key string }{
			{"mys3:b", "RCLONE_CONFIG_MYS3_ENDPOINT"},
			{"s3://bucket/m", "AWS_ENDPOINT_URL"},
			{"s3://bucket/m", "AWS_ENDPOINT_URL_S3"},
		} {
			tests = append(tests, rejectCase{
				name:    "endpoint " + ep + " via " + form.key,
				uri:     form.uri,
				secrets: with(seldon, "AWS_ACCESS_KEY_ID", secretKeyID, "AWS_SECRET_ACCESS_KEY", secretAccessKey, form.key, ep),
				wantMsg: []string{"is not an http(s) URL"},
			})
		}
	}
	tests = append(tests, rejectCase{
		name:    "S3_ENDPOINT with a file scheme",
		uri:     "s3://bucket/m",
		secrets: map[string]string{"S3_ENDPOINT": "file:///etc", "AWS_SECRET_ACCESS_KEY": secretAccessKey, "AWS_ACCESS_KEY_ID": secretKeyID},
		wantMsg: []string{"is not an http(s) URL"},
	})

	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := BuildConfig(mustParse(t, tc.uri), tc.secrets)
			if err == nil {
				t.Fatalf("BuildConfig(%q) = %+v, want an error", tc.uri, cfg)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("BuildConfig(%q) error %v is not ErrInvalid", tc.uri, err)
			}
			for _, frag := range tc.wantMsg {
				if !strings.Contains(err.Error(), frag) {
					t.Errorf("BuildConfig(%q) error %q does not say %q", tc.uri, err, frag)
				}
			}
			assertNoSecrets(t, "buildConfig error", err.Error(), tc.secrets)
			if len(cfg.Options) != 0 || cfg.Type != "" {
				t.Errorf("BuildConfig(%q) returned a config with its error: %+v", tc.uri, cfg)
			}
		})
	}
}

func TestDefinedRemotes(t *testing.T) {
	tests := []struct {
		secrets map[string]string
		want    string
	}{
		{nil, "no remotes"},
		{map[string]string{"AWS_ACCESS_KEY_ID": "x"}, "no remotes"},
		{map[string]string{"RCLONE_CONFIG_B_TYPE": "s3", "RCLONE_CONFIG_A_TYPE": secretAccessKey, "RCLONE_CONFIG_A_KEY": secretAccessKey}, "remotes a, b"},
	}
	for _, tc := range tests {
		if got := definedRemotes(tc.secrets); got != tc.want {
			t.Errorf("definedRemotes(%v) = %q, want %q", tc.secrets, got, tc.want)
		}
	}
}

func TestIdentity(t *testing.T) {
	creds := func(prefix, id, key string) []string {
		return []string{prefix + "TYPE", "s3", prefix + "ACCESS_KEY_ID", id, prefix + "SECRET_ACCESS_KEY", key}
	}
	tenantA := with(nil, append(creds("RCLONE_CONFIG_MINIO_A_", "AKIAAAAAAA", "SUPERSECRETA1"), "RCLONE_CONFIG_MINIO_A_ENDPOINT", "http://minio:9000", "RCLONE_CONFIG_MINIO_A_PROVIDER", "Minio")...)
	tenantB := with(nil, append(creds("RCLONE_CONFIG_MINIO_B_", "AKIABBBBBB", "SUPERSECRETB2"), "RCLONE_CONFIG_MINIO_B_ENDPOINT", "http://MINIO:9000/")...)
	awsForm := map[string]string{"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "AKIACCCCCC", "AWS_SECRET_ACCESS_KEY": "SUPERSECRETC3"}

	same := []struct {
		name   string
		a, b   BackendConfig
		reason string
	}{
		{"aliases and credentials differ", mustBuild(t, "minio-a:bucket/m", tenantA), mustBuild(t, "minio_b:bucket/m", tenantB), "alias, credentials, provider and endpoint spelling are not the bytes"},
		{"remote form and s3 form", mustBuild(t, "minio-a:bucket/m", tenantA), mustBuild(t, "s3://bucket/m", awsForm), "same endpoint and path"},
		{"trailing slash in the uri", mustBuild(t, "s3://bucket/m/", awsForm), mustBuild(t, "s3://bucket/m", awsForm), "the path is cleaned"},
		{"anonymous and authenticated s3", mustBuild(t, "s3://bucket/m", nil), mustBuild(t, "s3://bucket/m", map[string]string{"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "SUPERSECRETD4"}), "credentials are not the bytes"},
	}
	for _, tc := range same {
		t.Run("same/"+tc.name, func(t *testing.T) {
			if tc.a.Identity != tc.b.Identity {
				t.Errorf("identities differ (%s):\n%q\n%q", tc.reason, tc.a.Identity, tc.b.Identity)
			}
		})
	}

	differ := []struct {
		name string
		a, b BackendConfig
	}{
		{"path", mustBuild(t, "minio-a:bucket/m", tenantA), mustBuild(t, "minio-a:bucket/m2", tenantA)},
		{"bucket", mustBuild(t, "s3://bucket/m", awsForm), mustBuild(t, "s3://other/m", awsForm)},
		{"endpoint host", mustBuild(t, "s3://bucket/m", awsForm), mustBuild(t, "s3://bucket/m", with(awsForm, "AWS_ENDPOINT_URL", "http://minio2:9000"))},
		{"endpoint port", mustBuild(t, "s3://bucket/m", awsForm), mustBuild(t, "s3://bucket/m", with(awsForm, "AWS_ENDPOINT_URL", "http://minio:9001"))},
		{"endpoint vs AWS", mustBuild(t, "s3://bucket/m", awsForm), mustBuild(t, "s3://bucket/m", nil)},
		{"region", mustBuild(t, "s3://bucket/m", map[string]string{"AWS_REGION": "us-east-1"}), mustBuild(t, "s3://bucket/m", map[string]string{"AWS_REGION": "eu-west-1"})},
		{"backend type", mustBuild(t, "s3://bucket/m", nil), mustBuild(t, "gs://bucket/m", nil)},
		{"https host", mustBuild(t, "https://a.example.com/m", nil), mustBuild(t, "https://b.example.com/m", nil)},
		{"azure account", mustBuild(t, "az:c/m", map[string]string{"RCLONE_CONFIG_AZ_TYPE": "azureblob", "RCLONE_CONFIG_AZ_ACCOUNT": "one"}),
			mustBuild(t, "az:c/m", map[string]string{"RCLONE_CONFIG_AZ_TYPE": "azureblob", "RCLONE_CONFIG_AZ_ACCOUNT": "two"})},
	}
	for _, tc := range differ {
		t.Run("differ/"+tc.name, func(t *testing.T) {
			if tc.a.Identity == tc.b.Identity {
				t.Errorf("identities are equal for a different %s: %q", tc.name, tc.a.Identity)
			}
		})
	}

	t.Run("never holds credentials", func(t *testing.T) {
		for _, s := range []map[string]string{tenantA, tenantB, awsForm} {
			for _, uri := range []string{"minio-a:bucket/m", "minio_b:bucket/m", "s3://bucket/m"} {
				if cfg, err := BuildConfig(mustParse(t, uri), s); err == nil {
					for k, v := range s {
						if strings.Contains(k, "KEY") && strings.Contains(cfg.Identity, v) {
							t.Errorf("identity %q holds the value of %s", cfg.Identity, k)
						}
					}
				}
			}
		}
	})
}

// TestIdentityNamesTheEndpointContacted: an identity names the service
// rclone really connects to, with rclone's precedence between options, so a
// tenant cannot take another's identity with an option the backend then
// ignores; spellings of one endpoint give one identity.
func TestIdentityNamesTheEndpointContacted(t *testing.T) {
	const sig = "sv=2024-05-04&ss=b&srt=co&sp=rl&se=2030-01-01T00:00:00Z&sig=c2VjcmV0LXNhcy1zaWduYXR1cmU%3D"
	az := func(kv ...string) map[string]string {
		m := map[string]string{"RCLONE_CONFIG_AZ_TYPE": "azureblob"}
		for i := 0; i < len(kv); i += 2 {
			m["RCLONE_CONFIG_AZ_"+kv[i]] = kv[i+1]
		}
		return m
	}
	s3 := func(kv ...string) map[string]string {
		m := map[string]string{"RCLONE_CONFIG_S_TYPE": "s3", "RCLONE_CONFIG_S_PROVIDER": "Other"}
		for i := 0; i < len(kv); i += 2 {
			m["RCLONE_CONFIG_S_"+kv[i]] = kv[i+1]
		}
		return m
	}
	gcs := func(kv ...string) map[string]string {
		m := map[string]string{"RCLONE_CONFIG_G_TYPE": "gcs"}
		for i := 0; i < len(kv); i += 2 {
			m["RCLONE_CONFIG_G_"+kv[i]] = kv[i+1]
		}
		return m
	}
	web := func(u string) map[string]string {
		return map[string]string{"RCLONE_CONFIG_W_TYPE": "http", "RCLONE_CONFIG_W_URL": u}
	}
	victim := mustBuild(t, "az:models/m", az("ACCOUNT", "victim", "KEY", "dmljdGltLWtleQ=="))
	attackerSAS := "https://attacker.blob.core.windows.net/models?" + sig

	tests := []struct {
		name     string
		a, b     BackendConfig
		same     bool
		endpoint string // the endpoint a names, when checked
	}{
		// Attacks: an option the backend ignores does not choose the identity.
		{name: "azure: victim's account beside the tenant's own sas_url is the SAS URL's account",
			a: mustBuild(t, "az:models/m", az("ACCOUNT", "victim", "SAS_URL", attackerSAS)), b: victim, endpoint: "https://attacker.blob.core.windows.net"},
		{name: "azure: victim's account and endpoint beside a sas_url are ignored as rclone ignores them",
			a: mustBuild(t, "az:models/m", az("ACCOUNT", "victim", "ENDPOINT", "https://victim.blob.core.windows.net", "SAS_URL", attackerSAS)), b: victim},
		{name: "azure: a sas_url is the tenant's own account's identity",
			a: mustBuild(t, "az:models/m", az("ACCOUNT", "victim", "SAS_URL", attackerSAS)), b: mustBuild(t, "az:models/m", az("ACCOUNT", "attacker", "KEY", "YXR0YWNrZXIta2V5")), same: true},
		{name: "azure: account and key win over a sas_url, as in rclone",
			a: mustBuild(t, "az:models/m", az("ACCOUNT", "victim", "KEY", "b3RoZXIta2V5", "SAS_URL", attackerSAS)), b: victim, same: true, endpoint: "https://victim.blob.core.windows.net"},
		{name: "azure: endpoint overrides the account's host",
			a: mustBuild(t, "az:models/m", az("ACCOUNT", "victim", "KEY", "dmljdGltLWtleQ==", "ENDPOINT", "https://attacker.example.com")), b: victim, endpoint: "https://attacker.example.com"},
		{name: "azure: emulator accounts on one address differ",
			a: mustBuild(t, "az:models/m", az("SAS_URL", "http://127.0.0.1:10000/acct1/models?"+sig)), b: mustBuild(t, "az:models/m", az("SAS_URL", "http://127.0.0.1:10000/acct2/models?"+sig))},
		{name: "s3: an endpoint rclone does not see as http is not the http endpoint",
			a: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "HTTP://minio:9000")), b: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://minio:9000"))},
		{name: "s3: an endpoint is not AWS whatever the region says",
			a: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "https://attacker.example.com", "REGION", "us-east-1")), b: mustBuild(t, "s3://bucket/m", nil)},
		{name: "http: the url's path keeps its case",
			a: mustBuild(t, "w:m", web("https://files.example.com/Private/")), b: mustBuild(t, "w:m", web("https://files.example.com/private/"))},
		{name: "gcs: an endpoint is not Google's",
			a: mustBuild(t, "g:bucket/m", gcs("ENDPOINT", "https://gcs.example.com")), b: mustBuild(t, "gs://bucket/m", nil)},

		// Spellings of one endpoint.
		{name: "azure: the account's default URL and the same URL as endpoint",
			a: mustBuild(t, "az:models/m", az("ACCOUNT", "victim", "KEY", "dmljdGltLWtleQ==", "ENDPOINT", "https://VICTIM.blob.core.windows.net.:443/")), b: victim, same: true},
		{name: "azure: two SAS tokens of one account",
			a: mustBuild(t, "az:models/m", az("SAS_URL", attackerSAS)), b: mustBuild(t, "az:models/m", az("SAS_URL", "https://attacker.blob.core.windows.net/models?sv=2024&sig=b3RoZXI%3D")), same: true},
		{name: "azure: container-level and account-level SAS URLs of one account",
			a: mustBuild(t, "az:models/m", az("SAS_URL", attackerSAS)), b: mustBuild(t, "az:models/m", az("SAS_URL", "https://attacker.blob.core.windows.net/?"+sig)), same: true},
		{name: "s3: host case, trailing dot and trailing slash",
			a: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://MinIO.Example.com.:9000/")), b: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://minio.example.com:9000")), same: true, endpoint: "http://minio.example.com:9000"},
		{name: "s3: default https port",
			a: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "https://s3.example.com:443")), b: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "https://s3.example.com")), same: true},
		{name: "s3: default http port",
			a: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://s3.example.com:80/")), b: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://s3.example.com")), same: true},
		{name: "s3: a region beside an endpoint only signs",
			a: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://minio:9000", "REGION", "eu-west-1")), b: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://minio:9000")), same: true},
		{name: "s3: AWS without a region is us-east-1",
			a: mustBuild(t, "s3://bucket/m", nil), b: mustBuild(t, "s3://bucket/m", map[string]string{"AWS_REGION": "US-East-1"}), same: true, endpoint: "https://s3.us-east-1.amazonaws.com"},
		{name: "s3: an IPv6 address in two forms",
			a: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://[2001:DB8:0::1]:9000")), b: mustBuild(t, "s:bucket/m", s3("ENDPOINT", "http://[2001:db8::1]:9000/")), same: true, endpoint: "http://[2001:db8::1]:9000"},
		{name: "gcs: Google's endpoint written out",
			a: mustBuild(t, "g:bucket/m", gcs("ENDPOINT", "https://Storage.GoogleAPIs.com/")), b: mustBuild(t, "gs://bucket/m", nil), same: true},
		{name: "https: host case and default port",
			a: mustBuild(t, "https://Files.Example.com:443/m", nil), b: mustBuild(t, "w:m", web("https://files.example.com")), same: true},
		{name: "http: user information is not the service",
			a: mustBuild(t, "w:m", web("https://reader:cGFzc3dvcmQ@files.example.com/")), b: mustBuild(t, "w:m", web("https://files.example.com")), same: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.a.Identity == tc.b.Identity; got != tc.same {
				t.Errorf("identities equal = %v, want %v:\n%q\n%q", got, tc.same, tc.a.Identity, tc.b.Identity)
			}
			if tc.endpoint != "" {
				if want := strings.Join([]string{IdentityVersion, tc.a.Type, tc.endpoint, tc.a.Root}, "|"); tc.a.Identity != want {
					t.Errorf("identity %q, want %q", tc.a.Identity, want)
				}
			}
			for _, secret := range []string{"sig=", "c2VjcmV0", "cGFzc3dvcmQ", "reader", "dmljdGltLWtleQ", "YXR0YWNrZXIta2V5", "b3RoZXIta2V5"} {
				if strings.Contains(tc.a.Identity+tc.b.Identity, secret) {
					t.Errorf("identities %q, %q hold credential %q", tc.a.Identity, tc.b.Identity, secret)
				}
			}
		})
	}
}

var hexSHA256 = regexp.MustCompile(`^[0-9a-f]{64}$`)

func TestCredentialID(t *testing.T) {
	key := []byte("node-local fingerprint key")
	base := BackendConfig{Type: "s3", Options: configmap.Simple{"access_key_id": secretKeyID, "secret_access_key": secretAccessKey, "endpoint": "http://minio:9000"}}
	withOpts := func(kv ...string) BackendConfig {
		c := base
		c.Options = maps.Clone(base.Options)
		for i := 0; i < len(kv); i += 2 {
			if kv[i+1] == "" {
				delete(c.Options, kv[i])
			} else {
				c.Options[kv[i]] = kv[i+1]
			}
		}
		return c
	}
	id := CredentialID(key, base)

	t.Run("format and secrecy", func(t *testing.T) {
		if !hexSHA256.MatchString(id) {
			t.Errorf("credentialID = %q, want 64 lower-case hex digits", id)
		}
		for _, v := range base.Options {
			if strings.Contains(id, v) {
				t.Errorf("credentialID %q contains option value %q", id, v)
			}
		}
	})

	t.Run("deterministic", func(t *testing.T) {
		for i := 0; i < 20; i++ { // map order varies between runs
			if got := CredentialID(key, withOpts()); got != id {
				t.Fatalf("credentialID of an equal config = %q, want %q", got, id)
			}
		}
		// Equal configs built from two secrets that only differ in alias.
		a := mustBuild(t, "one:bucket/m", map[string]string{"RCLONE_CONFIG_ONE_TYPE": "s3", "RCLONE_CONFIG_ONE_SECRET_ACCESS_KEY": secretAccessKey, "RCLONE_CONFIG_ONE_ACCESS_KEY_ID": secretKeyID})
		b := mustBuild(t, "two:bucket/m", map[string]string{"RCLONE_CONFIG_TWO_TYPE": "S3", "RCLONE_CONFIG_TWO_ACCESS_KEY_ID": secretKeyID, "RCLONE_CONFIG_TWO_SECRET_ACCESS_KEY": secretAccessKey})
		if CredentialID(key, a) != CredentialID(key, b) {
			t.Errorf("equal credentials under two aliases have different credential IDs")
		}
	})

	differ := []struct {
		name string
		key  []byte
		cfg  BackendConfig
	}{
		{"secret access key", key, withOpts("secret_access_key", "SUPERSECRETVALUE124")},
		{"access key id", key, withOpts("access_key_id", "AKIAOTHER")},
		{"endpoint", key, withOpts("endpoint", "http://minio:9001")},
		{"extra option", key, withOpts("session_token", "SUPERSECRETSESSION1")},
		{"missing option", key, withOpts("endpoint", "")},
		{"same value under another key", key, withOpts("secret_access_key", "", "session_token", secretAccessKey)},
		{"backend type", key, BackendConfig{Type: "azureblob", Options: base.Options}},
		{"fingerprint key", []byte("another node"), base},
		{"no fingerprint key", nil, base},
	}
	for _, tc := range differ {
		t.Run("differs with "+tc.name, func(t *testing.T) {
			if got := CredentialID(tc.key, tc.cfg); got == id {
				t.Errorf("credentialID did not change with a different %s: %q", tc.name, got)
			}
		})
	}
}

func TestGlobalOrOverride(t *testing.T) {
	for opt, want := range map[string]bool{
		"global": true, "global.config": true, "global_low_level_retries": true, "global-x": true,
		"override": true, "override.endpoint": true, "override_endpoint": true,
		"globally": false, "overrides": false, "endpoint": false, "x_global": false,
	} {
		if got := globalOrOverride(opt); got != want {
			t.Errorf("globalOrOverride(%q) = %v, want %v", opt, got, want)
		}
	}
}
