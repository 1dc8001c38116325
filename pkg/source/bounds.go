package source

import (
	"errors"
	"fmt"
)

// DefaultMaxFiles is the most files a model may have: real models have at
// most a few thousand (sharded weights, tokenizers, configs); far more is a
// listing meant to exhaust the node's memory and inodes.
const DefaultMaxFiles = 100_000

// WithMaxFiles bounds the files of a model: a listing that finds more stops
// there and fails with ErrTooLarge, before anything is downloaded (0:
// DefaultMaxFiles).
func WithMaxFiles(n int) Option {
	return func(r *Sources) { r.maxFiles = n }
}

// errWalkStop ends a listing's walk from its callback.
var errWalkStop = errors.New("listing stopped")

// maxFilesOr is the limit a remote lists under.
func maxFilesOr(n int) int {
	if n <= 0 {
		return DefaultMaxFiles
	}
	return n
}

// tooManyFiles is the error of a listing stopped at the limit.
func tooManyFiles(uri URI, limit int) error {
	return fmt.Errorf("%w: %s has more than %d files; nothing was downloaded. Raise --max-files on the node plugin and the controller if the model is meant to have that many", ErrTooLarge, uri, limit)
}
