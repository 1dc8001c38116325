package source

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

	"oras.land/oras-go/v2/registry/remote/auth"
)

// dockerConfigKey is the one key a kubernetes.io/dockerconfigjson Secret
// carries, and the only one an oci:// model accepts.
const dockerConfigKey = ".dockerconfigjson"

// maxDockerConfig bounds the secret's JSON: a Secret is at most 1 MiB.
const maxDockerConfig = 1 << 20

// ociCredential is the registry credential one request uses, picked from
// its .dockerconfigjson; the zero value is an anonymous pull.
type ociCredential struct {
	cred auth.Credential
	// entry is the auths key the credential came from, for messages.
	entry string
}

func (c ociCredential) anonymous() bool { return c.cred == auth.EmptyCredential }

// values are the credential's secret strings, scrubbed from every message.
func (c ociCredential) values() map[string]string {
	return map[string]string{
		"username": c.cred.Username, "password": c.cred.Password,
		"refresh": c.cred.RefreshToken, "access": c.cred.AccessToken,
	}
}

// dockerAuth is one entry of a docker config's "auths".
type dockerAuth struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
	RegistryToken string `json:"registrytoken"`
}

// ociCredentialFor reads the node-publish secret of an oci:// model: no
// key (a public repository) or a .dockerconfigjson, parsed in memory. An
// auths entry for another registry is not an error: the pull is then
// anonymous, as docker's would be. No message repeats the JSON: it holds
// the passwords.
func ociCredentialFor(registry string, secrets map[string]string) (ociCredential, error) {
	for k := range secrets {
		if k != dockerConfigKey {
			return ociCredential{}, fmt.Errorf("%w: secret key %q is not accepted for an oci:// model: the only key read is %s (a kubernetes.io/dockerconfigjson Secret, as `kubectl create secret docker-registry` makes it)", ErrInvalid, k, dockerConfigKey)
		}
	}
	raw, ok := secrets[dockerConfigKey]
	if !ok {
		return ociCredential{}, nil
	}
	if len(raw) > maxDockerConfig {
		return ociCredential{}, fmt.Errorf("%w: secret key %s is larger than %d bytes", ErrInvalid, dockerConfigKey, maxDockerConfig)
	}
	var cfg struct {
		Auths map[string]dockerAuth `json:"auths"`
	}
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		// The decoder's message may quote the input: only its kind is kept.
		return ociCredential{}, fmt.Errorf("%w: secret key %s is not a docker config JSON ({\"auths\": {\"<registry>\": {\"auth\": \"<base64 user:password>\"}}})", ErrInvalid, dockerConfigKey)
	}
	key, a, found := pickAuth(registry, cfg.Auths)
	if !found {
		return ociCredential{}, nil
	}
	cred, err := a.credential()
	if err != nil {
		return ociCredential{}, fmt.Errorf("%w: secret key %s, entry %q: %v", ErrInvalid, dockerConfigKey, key, err)
	}
	return ociCredential{cred: cred, entry: key}, nil
}

// credential turns an auths entry into what oras-go authenticates with:
// user and password (from "auth" or the two fields), or an identity
// token exchanged for access tokens (OAuth2), or a registry token sent as
// is.
func (a dockerAuth) credential() (auth.Credential, error) {
	c := auth.Credential{Username: a.Username, Password: a.Password}
	if a.Auth != "" {
		b, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return c, fmt.Errorf("\"auth\" is not base64")
		}
		user, pass, ok := strings.Cut(string(b), ":")
		if !ok {
			return c, fmt.Errorf("\"auth\" is not base64 of user:password")
		}
		c.Username, c.Password = user, pass
	}
	switch {
	case a.IdentityToken != "":
		c.Password, c.RefreshToken = "", a.IdentityToken
	case a.RegistryToken != "":
		c = auth.Credential{AccessToken: a.RegistryToken}
	case c.Username == "" && c.Password == "":
		return c, fmt.Errorf("it has neither \"auth\", \"username\" and \"password\", nor a token")
	}
	return c, nil
}

// pickAuth finds the auths entry for registry as docker does: keys are
// host[:port], optionally written as a URL ("https://host/v1/"), compared
// without case and without the default port; Docker Hub's entry is
// "https://index.docker.io/v1/" whatever name the modelUri used for it.
func pickAuth(registry string, auths map[string]dockerAuth) (string, dockerAuth, bool) {
	want := registryKey(registry)
	// Sorted, so that two spellings of one registry pick the same entry
	// on every node.
	for _, k := range slices.Sorted(maps.Keys(auths)) {
		if registryKey(authHost(k)) == want {
			return k, auths[k], true
		}
	}
	return "", dockerAuth{}, false
}

// authHost is the host[:port] of an auths key.
func authHost(k string) string {
	k = strings.TrimPrefix(strings.TrimPrefix(k, "https://"), "http://")
	host, _, _ := strings.Cut(k, "/")
	return host
}

// registryKey is a registry as the node reaches it: lower case, without
// the default port, Docker Hub's names as one.
func registryKey(hostport string) string {
	h := strings.TrimSuffix(strings.ToLower(hostport), ":443")
	switch h {
	case "docker.io", "index.docker.io", "registry-1.docker.io":
		return "docker.io"
	}
	return h
}

// ociCredentialID fingerprints the credential a request uses, as
// remotespec.CredentialID does an rclone configuration: an HMAC under the node's
// key, so equal credentials give equal ids and nothing reveals them.
func ociCredentialID(key []byte, registry string, c ociCredential) string {
	mac := hmac.New(sha256.New, key)
	fmt.Fprintf(mac, "oci\x00%s", registryKey(registry))
	if c.anonymous() {
		mac.Write([]byte("\x00anonymous"))
	} else {
		fmt.Fprintf(mac, "\x00user=%s\x00password=%s\x00refresh=%s\x00access=%s", c.cred.Username, c.cred.Password, c.cred.RefreshToken, c.cred.AccessToken)
	}
	return hex.EncodeToString(mac.Sum(nil))
}
