// Package remotespec checks what a tenant writes: a modelUri, the keys of a
// node-publish secret, and the in-memory rclone backend configuration they
// make. It does no I/O and links no backend: package source resolves and
// downloads with its results, and fuzzing it (make fuzz) builds only this
// and the standard library, not every backend source links.
package remotespec

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"unicode/utf8"
)

// Scheme is the form a modelUri was written in.
type Scheme string

// The modelUri forms the driver accepts.
const (
	SchemeRemote Scheme = "remote" // mys3:bucket/prefix, settings from RCLONE_CONFIG_MYS3_* secret keys
	SchemeS3     Scheme = "s3"     // s3://bucket/prefix with AWS_* secret keys
	SchemeGCS    Scheme = "gs"     // gs://bucket/prefix with GOOGLE_APPLICATION_CREDENTIALS content
	SchemeHTTPS  Scheme = "https"  // https://host/path, a plain HTTPS directory or file
	SchemeHF     Scheme = "hf"     // hf://org/model[@revision], a Hugging Face Hub model (HF_TOKEN, HF_ENDPOINT keys)
	SchemeOCI    Scheme = "oci"    // oci://registry/repository[:tag|@sha256:digest], a ModelPack artifact (.dockerconfigjson key)
)

// The revision and tag a reference without one means, as the Hub and
// every OCI client read it.
const (
	DefaultHFRevision = "main"
	DefaultOCITag     = "latest"
)

// formsHelp is appended to every modelUri error so the operator sees what is valid.
const formsHelp = `valid forms are "remote:bucket/path" (an rclone remote defined by RCLONE_CONFIG_<REMOTE>_* keys in the node-publish secret), "s3://bucket/path", "gs://bucket/path", "https://host/path", "hf://org/model[@revision]" and "oci://registry/repository[:tag|@sha256:digest]"`

// URI is a parsed modelUri.
type URI struct {
	Scheme Scheme
	Remote string // rclone remote name, for SchemeRemote
	Host   string // host[:port], for SchemeHTTPS and SchemeOCI (the registry)
	Path   string // bucket/prefix (object stores), path (https), repository id (hf, oci); cleaned, no leading or trailing slash
	// Ref is what names one version of an hf or oci model: a revision
	// (branch, tag, refs/pr/N or commit) for hf, a tag or "sha256:<hex>"
	// for oci. ParseURI fills in the default when the URI has none.
	Ref string
}

// String gives the URI back in its canonical form.
func (u URI) String() string {
	switch u.Scheme {
	case SchemeRemote:
		return u.Remote + ":" + u.Path
	case SchemeHTTPS:
		return "https://" + u.Host + "/" + u.Path
	case SchemeHF:
		return "hf://" + u.Path + "@" + u.Ref
	case SchemeOCI:
		if strings.HasPrefix(u.Ref, "sha256:") {
			return "oci://" + u.Host + "/" + u.Path + "@" + u.Ref
		}
		return "oci://" + u.Host + "/" + u.Path + ":" + u.Ref
	default:
		return string(u.Scheme) + "://" + u.Path
	}
}

// Within reports whether u names prefix or something under it, on whole
// path segments ("mys3:models/a" holds "mys3:models/a/b", not
// "mys3:models/ab"), compared as the node would reach them: remote names as
// the secret keys they read ("my-s3" and "MY_S3" are one remote), hosts
// without case or the default port. Both come from ParseURI, so neither
// holds "..", empty segments or another spelling of the scheme. Refs are
// not compared: every version of an hf or oci model is within its
// repository.
func (u URI) Within(prefix URI) bool {
	if u.Scheme != prefix.Scheme || u.reachKey() != prefix.reachKey() {
		return false
	}
	return u.Path == prefix.Path || strings.HasPrefix(u.Path, prefix.Path+"/")
}

// reachKey is the part of a URI before its path, as the node resolves it.
func (u URI) reachKey() string {
	switch u.Scheme {
	case SchemeRemote:
		return strings.ToUpper(strings.ReplaceAll(u.Remote, "-", "_"))
	case SchemeHTTPS, SchemeOCI:
		return strings.TrimSuffix(strings.ToLower(u.Host), ":443")
	}
	return ""
}

var (
	remoteName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)
	hostPort   = regexp.MustCompile(`^[A-Za-z0-9.-]+(:[0-9]{1,5})?$`)
	schemeName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*$`)
)

// ParseURI validates a modelUri. It does no I/O.
func ParseURI(s string) (URI, error) {
	if s == "" {
		return URI{}, fmt.Errorf("%w: modelUri is empty; %s", ErrInvalid, formsHelp)
	}
	if len(s) > 2048 {
		return URI{}, fmt.Errorf("%w: modelUri is %d bytes long, the limit is 2048; %s", ErrInvalid, len(s), formsHelp)
	}
	if strings.ContainsAny(s, "\x00\\") || strings.ContainsFunc(s, isControl) || strings.ContainsFunc(s, isBidiControl) {
		return URI{}, fmt.Errorf("%w: modelUri contains a control character (bidirectional ones included) or backslash; %s", ErrInvalid, formsHelp)
	}
	if !utf8.ValidString(s) {
		return URI{}, fmt.Errorf("%w: modelUri is not valid UTF-8; %s", ErrInvalid, formsHelp)
	}
	if scheme, rest, ok := strings.Cut(s, "://"); ok && schemeName.MatchString(scheme) {
		switch Scheme(scheme) {
		case SchemeS3, SchemeGCS:
			p, err := cleanPath(rest)
			if err != nil {
				return URI{}, err
			}
			return URI{Scheme: Scheme(scheme), Path: p}, nil
		case SchemeHTTPS:
			// The messages below never repeat a query or user info: they
			// may hold tokens, and errors end up in events and logs.
			if strings.ContainsAny(rest, "?#") {
				return URI{}, fmt.Errorf("%w: modelUri carries a query or fragment; put tokens in the node-publish secret, not in the URI; %s", ErrInvalid, formsHelp)
			}
			host, p, _ := strings.Cut(rest, "/")
			if strings.Contains(host, "@") {
				return URI{}, fmt.Errorf("%w: modelUri carries user info before the host; put credentials in the node-publish secret, not in the URI; %s", ErrInvalid, formsHelp)
			}
			if !validHostPort(host) {
				return URI{}, fmt.Errorf("%w: modelUri host %q is invalid; %s", ErrInvalid, host, formsHelp)
			}
			p, err := cleanPath(p)
			if err != nil {
				return URI{}, err
			}
			return URI{Scheme: SchemeHTTPS, Host: host, Path: p}, nil
		case SchemeHF:
			return parseHF(rest)
		case SchemeOCI:
			return parseOCI(rest)
		default:
			return URI{}, fmt.Errorf("%w: modelUri scheme %q is not supported; %s", ErrInvalid, scheme, formsHelp)
		}
	}
	name, rest, ok := strings.Cut(s, ":")
	if !ok {
		return URI{}, fmt.Errorf("%w: modelUri %q has no remote or scheme; %s", ErrInvalid, s, formsHelp)
	}
	if strings.ContainsAny(name, ",=") || name == "" {
		// Not repeated: a connection string may hold credentials.
		return URI{}, fmt.Errorf("%w: modelUri is an rclone connection string, which is not accepted: define the remote with RCLONE_CONFIG_<REMOTE>_* keys in the node-publish secret; %s", ErrInvalid, formsHelp)
	}
	if !remoteName.MatchString(name) {
		// Also rejects rclone connection strings (":s3,key=...:" or "name,key=...:"),
		// which would let a volume attribute set backend options.
		return URI{}, fmt.Errorf("%w: modelUri remote name %q is invalid (letters, digits, '-' and '_' only; connection strings are not accepted); %s", ErrInvalid, name, formsHelp)
	}
	p, err := cleanPath(rest)
	if err != nil {
		return URI{}, err
	}
	return URI{Scheme: SchemeRemote, Remote: name, Path: p}, nil
}

// validHostPort accepts a DNS name or IPv4 address with an optional port.
func validHostPort(hp string) bool {
	if !hostPort.MatchString(hp) {
		return false
	}
	host, port, _ := strings.Cut(hp, ":")
	if !checkPort(port) || (port == "" && strings.HasSuffix(hp, ":")) {
		return false
	}
	if a, err := netip.ParseAddr(host); err == nil && a.Is4() {
		return true
	}
	return checkHostname(host) == ""
}

// cleanPath trims slashes and rejects paths that could escape a bucket or
// address something other than what was written.
func cleanPath(p string) (string, error) {
	p = strings.Trim(p, "/")
	if p == "" {
		return "", fmt.Errorf("%w: modelUri has no bucket or path; %s", ErrInvalid, formsHelp)
	}
	for _, seg := range strings.Split(p, "/") {
		switch seg {
		case "":
			return "", fmt.Errorf("%w: modelUri path %q has an empty segment (\"//\"); %s", ErrInvalid, p, formsHelp)
		case ".", "..":
			return "", fmt.Errorf("%w: modelUri path %q has a %q segment; %s", ErrInvalid, p, seg, formsHelp)
		case encodedDot, encodedDot + encodedDot:
			// rclone's encoding of a "." or ".." segment: see ValidateKey.
			return "", fmt.Errorf("%w: modelUri path %q has a %q segment; %s", ErrInvalid, p, strings.ReplaceAll(seg, encodedDot, "."), formsHelp)
		}
	}
	return p, nil
}
