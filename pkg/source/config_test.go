package source

import (
	"context"
	"errors"
	"maps"
	"regexp"
	"strings"
	"testing"
)

// Distinctive secret values: none of them may ever appear in an error.
const (
	secretKeyID     = "AKIASUPERSECRETID42"
	secretAccessKey = "SUPERSECRETVALUE123"
)

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

// assertNoSecrets fails if text holds any secret value of 6 bytes or more.
func assertNoSecrets(t *testing.T, what, text string, secrets map[string]string) {
	t.Helper()
	for k, v := range secrets {
		if len(v) >= 6 && strings.Contains(v, "SUPERSECRET") && strings.Contains(text, v) {
			t.Errorf("%s leaks the value of secret key %s: %q", what, k, text)
		}
	}
}

var hexSHA256 = regexp.MustCompile(`^[0-9a-f]{64}$`)

// The "tenant configuration cannot reach the node" invariant, one row per rule: tenant configuration that could reach the
// node is refused by Resolve with ErrInvalid naming what to remove, before
// any DNS lookup or connection.
func TestResolveRefusesNodeReachingConfig(t *testing.T) {
	endpoint, hits := countingServer(t)
	good := minioSecret(endpoint, secretKeyID, secretAccessKey)
	tests := []struct {
		rule    string
		uri     string
		secrets map[string]string
		names   string // the key (or input) the message must name
	}{
		{"on-the-fly connection string", ":s3,endpoint=" + endpoint + ":bucket", good, "connection string"},
		{"named connection string", "mys3,env_auth=true:bucket", good, "connection string"},
		{"global option, underscore", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_GLOBAL_LOW_LEVEL_RETRIES", "1000"), "RCLONE_CONFIG_MYS3_GLOBAL_LOW_LEVEL_RETRIES"},
		{"global option, dot", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_GLOBAL.CONFIG", "/etc/rclone.conf"), "RCLONE_CONFIG_MYS3_GLOBAL.CONFIG"},
		{"override option, underscore", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_OVERRIDE_ENDPOINT", "http://169.254.169.254"), "RCLONE_CONFIG_MYS3_OVERRIDE_ENDPOINT"},
		{"override option, dot", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_override.env_auth", "true"), "RCLONE_CONFIG_MYS3_override.env_auth"},
		{"password command", "mys3:b", with(good, "RCLONE_PASSWORD_COMMAND", "cat /etc/shadow"), "RCLONE_PASSWORD_COMMAND"},
		{"config file path", "mys3:b", with(good, "RCLONE_CONFIG", "/etc/rclone.conf"), "RCLONE_CONFIG"},
		{"config password", "mys3:b", with(good, "RCLONE_CONFIG_PASS", "SUPERSECRETPASS1"), "RCLONE_CONFIG_PASS"},
		{"password command with the s3 form", "s3://bucket/m", map[string]string{"RCLONE_PASSWORD_COMMAND": "id"}, "RCLONE_PASSWORD_COMMAND"},
		{"backend-wide variable", "mys3:b", with(good, "RCLONE_S3_ENV_AUTH", "true"), "RCLONE_S3_ENV_AUTH"},
		{"global flag variable", "s3://bucket/m", map[string]string{"RCLONE_CA_CERT": "/etc/kubernetes/pki/ca.crt"}, "RCLONE_CA_CERT"},
		{"config directory", "mys3:b", with(good, "RCLONE_CONFIG_DIR", "/root"), "RCLONE_CONFIG_DIR"},
		{"remote without option", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_", "x"), "RCLONE_CONFIG_MYS3_"},
		{"option without remote", "mys3:b", with(good, "RCLONE_CONFIG__TYPE", "local"), "RCLONE_CONFIG__TYPE"},
		{"option not allow-listed", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_SHARED_CREDENTIALS_FILE", "/root/.aws/credentials"), "RCLONE_CONFIG_MYS3_SHARED_CREDENTIALS_FILE"},
		{"option of another backend", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_SERVICE_ACCOUNT_FILE", "/etc/key.json"), "RCLONE_CONFIG_MYS3_SERVICE_ACCOUNT_FILE"},
		{"node credentials", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_ENV_AUTH", "true"), "RCLONE_CONFIG_MYS3_ENV_AUTH"},
		{"option set twice in two cases", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_Endpoint", "http://other:9000"), "RCLONE_CONFIG_MYS3_Endpoint"},
		{"local backend", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_TYPE", "local"), `type "local"`},
		{"sftp backend", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_TYPE", "sftp"), `type "sftp"`},
		{"alias backend", "mys3:b", with(good, "RCLONE_CONFIG_MYS3_TYPE", "alias"), `type "alias"`},
		{"plain http remote", "web:m", map[string]string{"RCLONE_CONFIG_WEB_TYPE": "http", "RCLONE_CONFIG_WEB_URL": "http://models.example.com/"}, "RCLONE_CONFIG_WEB_URL"},
		{"file url", "web:m", map[string]string{"RCLONE_CONFIG_WEB_TYPE": "http", "RCLONE_CONFIG_WEB_URL": "file:///etc/"}, "RCLONE_CONFIG_WEB_URL"},
		{"azure account that is a host", "az:c/m", map[string]string{"RCLONE_CONFIG_AZ_TYPE": "azureblob", "RCLONE_CONFIG_AZ_ACCOUNT": "169.254.169.254/latest?"}, "RCLONE_CONFIG_AZ_ACCOUNT"},
		{"azure sas url that is no URL", "az:c/m", map[string]string{"RCLONE_CONFIG_AZ_TYPE": "azureblob", "RCLONE_CONFIG_AZ_SAS_URL": "c?sig=SUPERSECRETSIG1"}, "RCLONE_CONFIG_AZ_SAS_URL"},
		{"s3 region that is a host", "s3://bucket/m", map[string]string{"AWS_REGION": "x@169.254.169.254/"}, "AWS_REGION"},
		{"gcs credentials that are not JSON", "gcs1:b/m", map[string]string{"RCLONE_CONFIG_GCS1_TYPE": "gcs", "RCLONE_CONFIG_GCS1_SERVICE_ACCOUNT_CREDENTIALS": "{SUPERSECRETKEY1"}, "RCLONE_CONFIG_GCS1_SERVICE_ACCOUNT_CREDENTIALS"},
		{"gcs token_uri over plain http", "gs://b/m", map[string]string{"GOOGLE_APPLICATION_CREDENTIALS": `{"private_key":"SUPERSECRETKEY1","token_uri":"http://169.254.169.254/token"}`}, "GOOGLE_APPLICATION_CREDENTIALS (token_uri)"},
		{"gcs endpoint that is no URL", "gcs1:b/m", map[string]string{"RCLONE_CONFIG_GCS1_TYPE": "gcs", "RCLONE_CONFIG_GCS1_ENDPOINT": "storage.example.com"}, "RCLONE_CONFIG_GCS1_ENDPOINT"},
	}
	r, dns := newTestRclone(t, nil, WithAllowedEndpoints(loopback))
	for _, tc := range tests {
		t.Run(tc.rule, func(t *testing.T) {
			remote, err := r.Resolve(context.Background(), tc.uri, tc.secrets)
			if !errors.Is(err, ErrInvalid) || remote != nil {
				t.Fatalf("Resolve = %v, %v; want ErrInvalid", remote, err)
			}
			if !strings.Contains(err.Error(), tc.names) {
				t.Errorf("error %q does not name %s", err, tc.names)
			}
			assertNoSecrets(t, "Resolve error", err.Error(), tc.secrets)
		})
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("refused configurations made %d requests, want none", n)
	}
	if n := dns.count(); n != 0 {
		t.Errorf("refused configurations made %d DNS lookups, want none", n)
	}
}
