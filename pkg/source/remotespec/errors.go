package remotespec

import "errors"

// Error kinds, which package source returns as its own: ErrInvalid is a
// bad modelUri, secret or option, which the tenant must fix; ErrUnsafePath
// an object key that would escape the tree (ValidateKey).
var (
	ErrInvalid    = errors.New("invalid model reference")
	ErrUnsafePath = errors.New("remote object key is not a safe path")
)
