package source

import "github.com/modelcache/modelcache/pkg/source/remotespec"

// The names of package remotespec, which checks what a tenant writes and
// what a remote lists, are this package's to its callers: they resolve and
// download with them here.
type (
	URI      = remotespec.URI
	Scheme   = remotespec.Scheme
	Entry    = remotespec.Entry
	Manifest = remotespec.Manifest
)

// The modelUri forms (remotespec.Scheme*).
const (
	SchemeRemote = remotespec.SchemeRemote
	SchemeS3     = remotespec.SchemeS3
	SchemeGCS    = remotespec.SchemeGCS
	SchemeHTTPS  = remotespec.SchemeHTTPS
	SchemeHF     = remotespec.SchemeHF
	SchemeOCI    = remotespec.SchemeOCI

	DefaultHFRevision = remotespec.DefaultHFRevision
	DefaultOCITag     = remotespec.DefaultOCITag
)

// ParseURI is remotespec.ParseURI.
func ParseURI(s string) (URI, error) { return remotespec.ParseURI(s) }

// ValidateKey is remotespec.ValidateKey.
func ValidateKey(key string) error { return remotespec.ValidateKey(key) }

// ContentKey is remotespec.ContentKey.
func ContentKey(identity string, m Manifest) string { return remotespec.ContentKey(identity, m) }

// ObjectKey is remotespec.ObjectKey.
func ObjectKey(identity string, e Entry) string { return remotespec.ObjectKey(identity, e) }
