package source

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/url"
	"slices"
	"strings"

	"github.com/rclone/rclone/fs/config/configmap"
)

// allowedOptions lists, per backend type, the rclone option keys a tenant may
// set through a secret. Anything that would read node files, node
// credentials (env_auth, instance roles), run commands or change global
// behaviour is absent, so a volume attribute cannot reach the node
// (invariant 9).
var allowedOptions = map[string][]string{
	"s3": {
		"provider", "access_key_id", "secret_access_key", "session_token", "region", "endpoint",
		"location_constraint", "force_path_style", "v2_auth", "list_chunk", "list_version",
		"list_url_encode", "no_check_bucket", "no_head", "no_head_object", "requester_pays",
		"sse_customer_algorithm", "sse_customer_key", "sse_customer_key_base64", "sse_customer_key_md5",
		"use_multipart_etag", "use_unsigned_payload", "use_dual_stack", "use_accelerate_endpoint",
		"use_arn_region", "disable_http2", "directory_markers", "use_x_id", "sign_accept_encoding",
		"decompress", "might_gzip", "use_accept_encoding_gzip",
	},
	"google cloud storage": {
		"service_account_credentials", "anonymous", "project_number", "bucket_policy_only",
		"location", "endpoint", "access_token", "directory_markers", "decompress",
	},
	"azureblob": {
		"account", "key", "sas_url", "endpoint", "tenant", "client_id", "client_secret",
		"list_chunk", "public_access", "directory_markers", "disable_checksum",
	},
	"http": {"url", "headers", "no_slash", "no_head", "no_escape"},
}

// typeAliases maps the type names users write onto rclone's registered names.
var typeAliases = map[string]string{
	"s3": "s3", "gcs": "google cloud storage", "google cloud storage": "google cloud storage",
	"azureblob": "azureblob", "http": "http",
}

// forbiddenSecretKeys can never appear in a node-publish secret: each would
// make rclone read a file or run a command on the node.
var forbiddenSecretKeys = []string{"RCLONE_CONFIG", "RCLONE_PASSWORD_COMMAND", "RCLONE_CONFIG_PASS"}

// backendConfig is everything needed to build one rclone Fs, held in memory
// for one request.
type backendConfig struct {
	Type     string           // rclone registry name
	Options  configmap.Simple // allow-listed options
	Root     string           // bucket/prefix or path under the backend
	Identity string           // what the bytes are, independent of aliases and credentials
}

// buildConfig maps a parsed URI and its secret onto a backend configuration.
func buildConfig(u URI, secrets map[string]string) (backendConfig, error) {
	for _, k := range forbiddenSecretKeys {
		if _, ok := secrets[k]; ok {
			return backendConfig{}, fmt.Errorf("%w: secret key %s is not accepted: it would make the node read files or run commands", ErrInvalid, k)
		}
	}
	var (
		typ  string
		opts = configmap.Simple{}
		root = u.Path
	)
	switch u.Scheme {
	case SchemeRemote:
		prefix := "RCLONE_CONFIG_" + strings.ToUpper(strings.ReplaceAll(u.Remote, "-", "_")) + "_"
		for k, v := range secrets {
			if opt, ok := strings.CutPrefix(k, prefix); ok && !ofLongerRemote(k, prefix, secrets) {
				opts[strings.ToLower(opt)] = v
			}
		}
		if len(opts) == 0 {
			return backendConfig{}, fmt.Errorf("%w: remote %q is not defined: the node-publish secret has no %s* keys (it defines %s)",
				ErrInvalid, u.Remote, prefix, definedRemotes(secrets))
		}
		t, ok := opts["type"]
		if !ok || t == "" {
			return backendConfig{}, fmt.Errorf("%w: remote %q has no type: add %sTYPE (s3, gcs, azureblob or http) to the node-publish secret", ErrInvalid, u.Remote, prefix)
		}
		delete(opts, "type")
		typ, ok = typeAliases[strings.ToLower(t)]
		if !ok {
			return backendConfig{}, fmt.Errorf("%w: remote %q has type %q, which is not supported: use s3, gcs, azureblob or http", ErrInvalid, u.Remote, t)
		}
		for k, v := range opts {
			if k == "env_auth" {
				// Seldon's example secrets say ENV_AUTH "false"; only true would
				// hand the node's own credentials to the tenant.
				if v != "" && !strings.EqualFold(v, "false") {
					return backendConfig{}, fmt.Errorf("%w: secret key %sENV_AUTH=%s is not accepted: it would use the node's own credentials; set ACCESS_KEY_ID and SECRET_ACCESS_KEY", ErrInvalid, prefix, v)
				}
				delete(opts, k)
				continue
			}
			if strings.HasPrefix(k, "global.") || strings.HasPrefix(k, "override.") || !slices.Contains(allowedOptions[typ], k) {
				return backendConfig{}, fmt.Errorf("%w: secret key %s%s is not an allowed option for a %s remote", ErrInvalid, prefix, strings.ToUpper(k), t)
			}
		}
		if typ == "google cloud storage" && opts["service_account_credentials"] == "" && opts["access_token"] == "" {
			// Without credentials rclone falls back to the node's own Google
			// credentials (metadata server); a remote without any is public.
			opts["anonymous"] = "true"
		}
	case SchemeS3:
		typ = "s3"
		opts["access_key_id"] = secrets["AWS_ACCESS_KEY_ID"]
		opts["secret_access_key"] = secrets["AWS_SECRET_ACCESS_KEY"]
		if v := secrets["AWS_SESSION_TOKEN"]; v != "" {
			opts["session_token"] = v
		}
		if (opts["access_key_id"] == "") != (opts["secret_access_key"] == "") {
			return backendConfig{}, fmt.Errorf("%w: the node-publish secret must carry both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither for a public bucket", ErrInvalid)
		}
		if opts["access_key_id"] == "" {
			delete(opts, "access_key_id")
			delete(opts, "secret_access_key")
		}
		endpoint, err := s3Endpoint(secrets)
		if err != nil {
			return backendConfig{}, err
		}
		opts["provider"] = "AWS"
		if endpoint != "" {
			opts["endpoint"] = endpoint
			opts["provider"] = "Other"
		}
		if r := firstNonEmpty(secrets["AWS_REGION"], secrets["AWS_DEFAULT_REGION"]); r != "" {
			opts["region"] = r
		}
	case SchemeGCS:
		typ = "google cloud storage"
		if c := secrets["GOOGLE_APPLICATION_CREDENTIALS"]; c != "" {
			if !strings.HasPrefix(strings.TrimSpace(c), "{") {
				return backendConfig{}, fmt.Errorf("%w: GOOGLE_APPLICATION_CREDENTIALS must hold the service-account JSON itself, not a file path", ErrInvalid)
			}
			opts["service_account_credentials"] = c
		} else {
			opts["anonymous"] = "true"
		}
	case SchemeHTTPS:
		typ = "http"
		opts["url"] = "https://" + u.Host + "/"
	}
	if typ == "s3" {
		if ep := opts["endpoint"]; ep != "" {
			if pu, err := url.Parse(ep); err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
				return backendConfig{}, fmt.Errorf("%w: endpoint %q is not an http(s) URL", ErrInvalid, ep)
			}
		}
	}
	return backendConfig{Type: typ, Options: opts, Root: root, Identity: identity(typ, opts, root)}, nil
}

// s3Endpoint reads the endpoint the Seldon and KServe storage initializers accept.
func s3Endpoint(secrets map[string]string) (string, error) {
	if ep := firstNonEmpty(secrets["AWS_ENDPOINT_URL"], secrets["AWS_ENDPOINT_URL_S3"]); ep != "" {
		return strings.TrimRight(ep, "/"), nil
	}
	ep := secrets["S3_ENDPOINT"]
	if ep == "" {
		return "", nil
	}
	if strings.Contains(ep, "://") {
		return strings.TrimRight(ep, "/"), nil
	}
	if secrets["S3_USE_HTTPS"] == "0" {
		return "http://" + ep, nil
	}
	return "https://" + ep, nil
}

// identity names the bytes a config reaches: backend type, endpoint, region
// and path. It leaves out the alias and the credentials so that two remotes
// pointing at the same place share a content key.
func identity(typ string, opts configmap.Simple, root string) string {
	endpoint := strings.ToLower(strings.TrimRight(firstNonEmpty(opts["endpoint"], opts["url"], opts["account"]), "/"))
	return strings.Join([]string{typ, endpoint, opts["region"], root}, "|")
}

// credentialID fingerprints the whole effective config with a node-local key:
// equal for equal credentials, useless to anyone without the key, and never
// the credential itself.
func credentialID(key []byte, cfg backendConfig) string {
	keys := make([]string, 0, len(cfg.Options))
	for k := range cfg.Options {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(cfg.Type))
	for _, k := range keys {
		fmt.Fprintf(mac, "\x00%s=%s", k, cfg.Options[k])
	}
	return hex.EncodeToString(mac.Sum(nil))
}

// ofLongerRemote reports whether secret key k, which starts with prefix,
// belongs to another remote whose name extends this one's: with remotes
// "mys3" and "mys3-eu" defined, RCLONE_CONFIG_MYS3_EU_ENDPOINT is mys3-eu's.
func ofLongerRemote(k, prefix string, secrets map[string]string) bool {
	for t := range secrets {
		if p, ok := strings.CutSuffix(t, "_TYPE"); ok && len(p) >= len(prefix) && strings.HasPrefix(p, prefix) && strings.HasPrefix(k, p+"_") {
			return true
		}
	}
	return false
}

// definedRemotes lists remote names (never values) defined in a secret, for error messages.
func definedRemotes(secrets map[string]string) string {
	var names []string
	for k := range secrets {
		if rest, ok := strings.CutPrefix(k, "RCLONE_CONFIG_"); ok {
			if name, ok := strings.CutSuffix(rest, "_TYPE"); ok {
				names = append(names, strings.ToLower(name))
			}
		}
	}
	if len(names) == 0 {
		return "no remotes"
	}
	slices.Sort(names)
	return "remotes " + strings.Join(names, ", ")
}

func firstNonEmpty(vs ...string) string {
	for _, v := range vs {
		if v != "" {
			return v
		}
	}
	return ""
}
