package remotespec

import (
	"cmp"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/storage/azblob/sas"
	"github.com/rclone/rclone/fs/config/configmap"
)

// allowedOptions lists, per backend type, the rclone option keys a tenant may
// set through a secret. Anything that would read node files, node
// credentials (env_auth, instance roles), run commands or change global
// behaviour is absent, so a volume attribute cannot reach the node
// (the "tenant configuration cannot reach the node" invariant).
var allowedOptions = map[string][]string{
	BackendS3: {
		"provider", "access_key_id", "secret_access_key", "session_token", "region", "endpoint",
		"location_constraint", "force_path_style", "v2_auth", "list_chunk", "list_version",
		"list_url_encode", "no_check_bucket", "no_head", "no_head_object", "requester_pays",
		"sse_customer_algorithm", "sse_customer_key", "sse_customer_key_base64", "sse_customer_key_md5",
		"use_multipart_etag", "use_unsigned_payload", "use_dual_stack", "use_accelerate_endpoint",
		"use_arn_region", "disable_http2", "directory_markers", "use_x_id", "sign_accept_encoding",
		"decompress", "might_gzip", "use_accept_encoding_gzip",
	},
	BackendGCS: {
		"service_account_credentials", "anonymous", "project_number", "bucket_policy_only",
		"location", "endpoint", "access_token", "directory_markers", "decompress",
	},
	BackendAzure: {
		"account", "key", "sas_url", "endpoint", "tenant", "client_id", "client_secret",
		"list_chunk", "public_access", "directory_markers", "disable_checksum",
	},
	BackendHTTP: {"url", "headers", "no_slash", "no_head", "no_escape"},
}

// typeAliases maps the type names users write onto rclone's registered names.
var typeAliases = map[string]string{
	"s3": BackendS3, "gcs": BackendGCS, "google cloud storage": BackendGCS,
	"azureblob": BackendAzure, "http": BackendHTTP,
}

// forbiddenSecretKeys can never appear in a node-publish secret: each would
// make rclone read a file or run a command on the node.
var forbiddenSecretKeys = []string{"RCLONE_CONFIG", "RCLONE_PASSWORD_COMMAND", "RCLONE_CONFIG_PASS"}

// BackendConfig is everything needed to build one rclone Fs, held in memory
// for one request.
type BackendConfig struct {
	Type      string           // rclone registry name
	Options   configmap.Simple // allow-listed options
	Root      string           // bucket/prefix or path under the backend
	Identity  string           // what the bytes are, independent of aliases and credentials
	Endpoints []Endpoint       // URLs the tenant chose for the backend to connect to; Resolve checks where they lead
}

var (
	// azureAccount is a storage account name: one DNS label, as it becomes
	// the first label of <account>.blob.core.windows.net.
	azureAccount = regexp.MustCompile(`^[A-Za-z0-9]{1,63}$`)
	// s3Region is an AWS-style region name; the SDK builds host names from it.
	s3Region = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
)

// checkSecretKeys refuses rclone keys that would configure rclone itself
// rather than one remote. Nothing here puts secrets in the environment, so
// such keys would do nothing today; refusing them keeps it that way and
// tells the tenant early.
func checkSecretKeys(secrets map[string]string) error {
	for _, k := range forbiddenSecretKeys {
		if _, ok := secrets[k]; ok {
			return fmt.Errorf("%w: secret key %s is not accepted: it would make the node read files or run commands", ErrInvalid, k)
		}
	}
	for _, k := range sortedKeys(secrets) {
		rest, ok := strings.CutPrefix(k, "RCLONE_")
		if !ok {
			continue
		}
		rest, ok = strings.CutPrefix(rest, "CONFIG_")
		remote, opt, found := strings.Cut(rest, "_")
		if !ok || !found || remote == "" || opt == "" {
			return fmt.Errorf("%w: secret key %q is not accepted: the only rclone keys a node-publish secret may carry are RCLONE_CONFIG_<REMOTE>_<OPTION>", ErrInvalid, k)
		}
	}
	return nil
}

// globalOrOverride reports whether an option key (lower case) would set
// rclone's global flags or override another option ("global.*",
// "override.*" in rclone's config syntax, however the separator is spelled).
func globalOrOverride(opt string) bool {
	for _, p := range []string{"global", "override"} {
		if rest, ok := strings.CutPrefix(opt, p); ok && (rest == "" || strings.ContainsRune("._-", rune(rest[0]))) {
			return true
		}
	}
	return false
}

// BuildConfig maps a parsed URI and its secret onto a backend configuration.
// It does no I/O.
func BuildConfig(u URI, secrets map[string]string) (BackendConfig, error) {
	if err := checkSecretKeys(secrets); err != nil {
		return BackendConfig{}, err
	}
	var d draft
	var err error
	switch u.Scheme {
	case SchemeRemote:
		d, err = remoteDraft(u, secrets)
	case SchemeS3:
		d, err = s3URIDraft(secrets)
	case SchemeGCS:
		d, err = gcsURIDraft(secrets)
	case SchemeHTTPS:
		d = httpsURIDraft(u)
	}
	if err != nil {
		return BackendConfig{}, err
	}
	// Every option that names a place to connect to becomes an endpoint the
	// resolver checks before anything is contacted.
	eps, err := backendChecks[d.typ](d)
	if err != nil {
		return BackendConfig{}, err
	}
	return BackendConfig{Type: d.typ, Options: d.opts, Root: u.Path, Identity: identity(d.typ, d.opts, u.Path), Endpoints: eps}, nil
}

// rclone backend types a tenant may use: object stores and HTTPS only.
const (
	BackendS3    = "s3"
	BackendGCS   = "google cloud storage"
	BackendAzure = "azureblob"
	BackendHTTP  = "http"
)

// draft is a backend's options as the secret gave them, before the checks.
type draft struct {
	typ   string
	opts  configmap.Simple
	keyOf map[string]string // option → the secret key that set it, for messages
}

func newDraft(typ string) draft {
	return draft{typ: typ, opts: configmap.Simple{}, keyOf: map[string]string{}}
}

// remoteDraft reads remote:path's RCLONE_CONFIG_<REMOTE>_* keys, as
// Seldon's seldon-rclone-secret carries them, through the allow-list.
func remoteDraft(u URI, secrets map[string]string) (draft, error) {
	d := newDraft("")
	prefix := "RCLONE_CONFIG_" + strings.ToUpper(strings.ReplaceAll(u.Remote, "-", "_")) + "_"
	for _, k := range sortedKeys(secrets) {
		opt, ok := strings.CutPrefix(k, prefix)
		if !ok || ofLongerRemote(k, prefix, secrets) {
			continue
		}
		opt = strings.ToLower(opt)
		if prev, dup := d.keyOf[opt]; dup {
			// Map order would pick one at random.
			return d, fmt.Errorf("%w: secret keys %s and %s both set option %s of remote %q: keep one", ErrInvalid, prev, k, opt, u.Remote)
		}
		d.keyOf[opt] = k
		d.opts[opt] = secrets[k]
	}
	if len(d.opts) == 0 {
		return d, fmt.Errorf("%w: remote %q is not defined: the node-publish secret has no %s* keys (it defines %s)",
			ErrInvalid, u.Remote, prefix, definedRemotes(secrets))
	}
	t, ok := d.opts["type"]
	if !ok || t == "" {
		return d, fmt.Errorf("%w: remote %q has no type: add %sTYPE (s3, gcs, azureblob or http) to the node-publish secret", ErrInvalid, u.Remote, prefix)
	}
	delete(d.opts, "type")
	d.typ, ok = typeAliases[strings.ToLower(t)]
	if !ok {
		return d, fmt.Errorf("%w: remote %q has type %q, which is not supported: use s3, gcs, azureblob or http", ErrInvalid, u.Remote, t)
	}
	for _, k := range sortedKeys(d.opts) {
		v := d.opts[k]
		switch {
		case k == "env_auth":
			// Seldon's example secrets say ENV_AUTH "false"; only true would
			// hand the node's own credentials to the tenant.
			if v != "" && !strings.EqualFold(v, "false") {
				return d, fmt.Errorf("%w: secret key %s=%s is not accepted: it would use the node's own credentials; set ACCESS_KEY_ID and SECRET_ACCESS_KEY", ErrInvalid, d.keyOf[k], v)
			}
			delete(d.opts, k)
		case globalOrOverride(k):
			return d, fmt.Errorf("%w: secret key %s is not an allowed option: global and override settings reach beyond this remote", ErrInvalid, d.keyOf[k])
		case !slices.Contains(allowedOptions[d.typ], k):
			return d, fmt.Errorf("%w: secret key %s is not an allowed option for a %s remote", ErrInvalid, d.keyOf[k], t)
		}
	}
	if d.typ == BackendGCS && d.opts["service_account_credentials"] == "" && d.opts["access_token"] == "" {
		// Without credentials rclone falls back to the node's own Google
		// credentials (metadata server); a remote without any is public.
		d.opts["anonymous"] = "true"
	}
	return d, nil
}

// s3URIDraft maps the storage initializer's AWS_* keys for s3://.
func s3URIDraft(secrets map[string]string) (draft, error) {
	d := newDraft(BackendS3)
	d.opts["access_key_id"] = secrets["AWS_ACCESS_KEY_ID"]
	d.opts["secret_access_key"] = secrets["AWS_SECRET_ACCESS_KEY"]
	if v := secrets["AWS_SESSION_TOKEN"]; v != "" {
		d.opts["session_token"] = v
	}
	if (d.opts["access_key_id"] == "") != (d.opts["secret_access_key"] == "") {
		return d, fmt.Errorf("%w: the node-publish secret must carry both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither for a public bucket", ErrInvalid)
	}
	if d.opts["access_key_id"] == "" {
		delete(d.opts, "access_key_id")
		delete(d.opts, "secret_access_key")
	}
	endpoint, key := s3Endpoint(secrets)
	d.opts["provider"] = "AWS"
	if endpoint != "" {
		d.opts["endpoint"] = endpoint
		d.opts["provider"] = "Other"
		d.keyOf["endpoint"] = key
	}
	for _, k := range []string{"AWS_REGION", "AWS_DEFAULT_REGION"} {
		if r := secrets[k]; r != "" {
			d.opts["region"] = r
			d.keyOf["region"] = k
			break
		}
	}
	return d, nil
}

// gcsURIDraft maps GOOGLE_APPLICATION_CREDENTIALS (the JSON itself) for gs://.
func gcsURIDraft(secrets map[string]string) (draft, error) {
	d := newDraft(BackendGCS)
	if c := secrets["GOOGLE_APPLICATION_CREDENTIALS"]; c != "" {
		if !strings.HasPrefix(strings.TrimSpace(c), "{") {
			return d, fmt.Errorf("%w: GOOGLE_APPLICATION_CREDENTIALS must hold the service-account JSON itself, not a file path", ErrInvalid)
		}
		d.opts["service_account_credentials"] = c
		d.keyOf["service_account_credentials"] = "GOOGLE_APPLICATION_CREDENTIALS"
	} else {
		d.opts["anonymous"] = "true"
	}
	return d, nil
}

// httpsURIDraft serves https://host/path with rclone's http backend.
func httpsURIDraft(u URI) draft {
	d := newDraft(BackendHTTP)
	d.opts["url"] = "https://" + u.Host + "/"
	d.keyOf["url"] = "modelUri"
	return d
}

// backendChecks validates each backend's options and returns the
// endpoints they name, one function per backend as rclone registers them.
var backendChecks = map[string]func(d draft) ([]Endpoint, error){
	BackendS3: func(d draft) ([]Endpoint, error) {
		if r := d.opts["region"]; r != "" && !s3Region.MatchString(r) {
			return nil, fmt.Errorf("%w: region in %s is not a region name (letters, digits, '.', '-' and '_')", ErrInvalid, d.keyOf["region"])
		}
		return d.endpoints(false, "endpoint")
	},
	BackendGCS: func(d draft) ([]Endpoint, error) {
		eps, err := d.endpoints(false, "endpoint")
		if err != nil {
			return nil, err
		}
		ep, err := gcsTokenEndpoint(d.keyOf["service_account_credentials"], d.opts["service_account_credentials"])
		if ep != nil {
			eps = append(eps, *ep)
		}
		return eps, err
	},
	BackendAzure: func(d draft) ([]Endpoint, error) {
		if a := d.opts["account"]; a != "" && !azureAccount.MatchString(a) {
			return nil, fmt.Errorf("%w: account in %s is not a storage account name (letters and digits only)", ErrInvalid, d.keyOf["account"])
		}
		return d.endpoints(false, "endpoint", "sas_url")
	},
	BackendHTTP: func(d draft) ([]Endpoint, error) { return d.endpoints(true, "url") },
}

// endpoints parses the options that name places to connect to.
func (d draft) endpoints(httpsOnly bool, opts ...string) ([]Endpoint, error) {
	var eps []Endpoint
	for _, opt := range opts {
		v := d.opts[opt]
		if v == "" {
			continue
		}
		ep, err := ParseEndpointURL(d.keyOf[opt], v, httpsOnly)
		if err != nil {
			return nil, err
		}
		eps = append(eps, ep)
	}
	return eps, nil
}

// gcsTokenEndpoint reads the token_uri a service-account key sends its
// token exchange to: a key written by the tenant can point it anywhere.
func gcsTokenEndpoint(key, creds string) (*Endpoint, error) {
	if creds == "" {
		return nil, nil
	}
	var f struct {
		TokenURI string `json:"token_uri"`
	}
	if err := json.Unmarshal([]byte(creds), &f); err != nil {
		// Not repeated: the parser's message may quote the key.
		return nil, fmt.Errorf("%w: %s does not hold a service-account JSON key", ErrInvalid, key)
	}
	if f.TokenURI == "" {
		return nil, nil
	}
	ep, err := ParseEndpointURL(key+" (token_uri)", f.TokenURI, true)
	if err != nil {
		return nil, err
	}
	return &ep, nil
}

// s3Endpoint reads the endpoint the Seldon and KServe storage initializers
// accept, and the secret key it came from.
func s3Endpoint(secrets map[string]string) (endpoint, key string) {
	for _, k := range []string{"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"} {
		if ep := secrets[k]; ep != "" {
			return strings.TrimRight(ep, "/"), k
		}
	}
	ep := secrets["S3_ENDPOINT"]
	switch {
	case ep == "":
		return "", ""
	case strings.Contains(ep, "://"):
		return strings.TrimRight(ep, "/"), "S3_ENDPOINT"
	case secrets["S3_USE_HTTPS"] == "0":
		return "http://" + ep, "S3_ENDPOINT"
	}
	return "https://" + ep, "S3_ENDPOINT"
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// IdentityVersion starts every identity. Identities enter content, object
// and source keys; a change to what they name changes the version, so a key
// of one version never equals a key of another. Identities before it
// ("type|endpoint|region|root") had no version.
const IdentityVersion = "v2"

// identity names the bytes a config reaches: the backend type, the
// endpoint rclone really contacts for it (contactedEndpoint) and the root.
// It leaves out the alias and the credentials so that two remotes pointing
// at the same place share a content key, and never names a place from an
// option the backend then ignores.
func identity(typ string, opts configmap.Simple, root string) string {
	return strings.Join([]string{IdentityVersion, typ, contactedEndpoint(typ, opts), root}, "|")
}

// Where rclone v1.76's backends connect when no endpoint option is set.
const (
	gcsDefaultEndpoint   = "https://storage.googleapis.com"
	azureBlobDomain      = "blob.core.windows.net"
	s3DefaultRegion      = "us-east-1"
	s3AWSEndpointPattern = "https://s3.%s.amazonaws.com"
)

// contactedEndpoint is the canonical URL of the service a backend's
// requests go to, worked out with rclone's own precedence (backend/s3,
// backend/googlecloudstorage, backend/azureblob/auth, backend/http):
//   - s3: endpoint, with "https://" put before it unless it starts with
//     "http" as rclone does; without one the SDK's AWS endpoint of region
//     (us-east-1 when unset). Region and provider otherwise only sign and
//     shape requests to that endpoint.
//   - gcs: endpoint, else storage.googleapis.com.
//   - azureblob: with account and key, endpoint or else
//     https://<account>.blob.core.windows.net; else, with sas_url, the SAS
//     URL's service (its account, without the container or the token),
//     whatever account or endpoint say; else endpoint or the account's URL
//     again. sas_url wins over account as rclone's auth.NewClient decides.
//   - http: url.
//
// The result is "" when the options name nowhere rclone could connect; such
// a config fails when rclone builds it.
func contactedEndpoint(typ string, opts configmap.Simple) string {
	switch typ {
	case BackendS3:
		if ep := opts["endpoint"]; ep != "" {
			if !strings.HasPrefix(ep, "http") {
				ep = "https://" + ep
			}
			return canonicalURL(ep)
		}
		region := cmp.Or(opts["region"], s3DefaultRegion)
		return canonicalURL(fmt.Sprintf(s3AWSEndpointPattern, region))
	case BackendGCS:
		return canonicalURL(cmp.Or(opts["endpoint"], gcsDefaultEndpoint))
	case BackendAzure:
		account, key, sasURL := opts["account"], opts["key"], opts["sas_url"]
		if sasURL != "" && (account == "" || key == "") {
			return azureSASService(sasURL)
		}
		if ep := opts["endpoint"]; ep != "" {
			return canonicalURL(ep)
		}
		if account != "" {
			return canonicalURL("https://" + account + "." + azureBlobDomain)
		}
		return ""
	case BackendHTTP:
		return canonicalURL(opts["url"])
	}
	return ""
}

// azureSASService is the service URL rclone's Azure client is built on
// from a SAS URL: the URL without its container (and blob), canonical, so
// without the token either.
func azureSASService(sasURL string) string {
	parts, err := sas.ParseURL(sasURL)
	if err != nil {
		return ""
	}
	if parts.ContainerName == "" {
		return canonicalURL(sasURL)
	}
	parts.ContainerName, parts.BlobName = "", ""
	return canonicalURL(parts.String())
}

// canonicalURL spells a URL one way for identities: scheme and host in
// lower case, the host without a trailing dot, an IP address in its
// canonical form, the scheme's default port dropped, the path without
// trailing slashes (its case kept: paths are case-sensitive), and no user
// information, query or fragment, which may hold credentials and do not
// choose the service. It is "" for what does not parse as a URL with a
// host.
func canonicalURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return ""
	}
	scheme := strings.ToLower(u.Scheme)
	host := strings.TrimSuffix(strings.ToLower(u.Hostname()), ".")
	if a, err := netip.ParseAddr(host); err == nil {
		host = a.Unmap().String()
	}
	port := u.Port()
	if (scheme == "https" && port == "443") || (scheme == "http" && port == "80") {
		port = ""
	}
	hostPort := host
	switch {
	case port != "":
		hostPort = net.JoinHostPort(host, port)
	case strings.Contains(host, ":"):
		hostPort = "[" + host + "]"
	}
	return scheme + "://" + hostPort + strings.TrimRight(u.EscapedPath(), "/")
}

// CredentialID fingerprints the whole effective config with a node-local key:
// equal for equal credentials, useless to anyone without the key, and never
// the credential itself.
func CredentialID(key []byte, cfg BackendConfig) string {
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
