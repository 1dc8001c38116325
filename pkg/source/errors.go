package source

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"strings"

	"github.com/modelcache/modelcache/pkg/egress"
	"github.com/modelcache/modelcache/pkg/source/remotespec"
	"github.com/rclone/rclone/fs"
	"google.golang.org/api/googleapi"
)

// Error kinds callers branch on with errors.Is. Every error this package
// returns wraps exactly one of them.
var (
	ErrInvalid     = remotespec.ErrInvalid                        // bad modelUri, secret or option
	ErrNotFound    = errors.New("model not found at the remote")  // no such bucket, prefix or object
	ErrDenied      = errors.New("remote refused the credentials") // 401/403
	ErrUnavailable = errors.New("remote unavailable")             // network, 5xx, timeouts: retryable
	ErrUnsafePath  = remotespec.ErrUnsafePath                     // would escape the tree
	ErrChanged     = errors.New("remote object changed during download")
	ErrCorrupt     = errors.New("object corrupted in transfer")                  // bytes differ from the remote's checksum: retryable
	ErrRefused     = errors.New("connection refused by the node's egress rules") // a redirect or DNS answer led to an address tenants may not reach
	ErrTooLarge    = errors.New("model exceeds the node's limits")               // more files than --max-files
)

// ErrNoRanges comes with ErrUnavailable from a ranged read the remote
// answered with the whole object (a registry without Range support): the
// store reads that file in one stream instead.
var ErrNoRanges = errors.New("the remote serves no byte ranges")

// kindError carries a message scrubbed of secrets and the kind it belongs to.
// The original rclone error is dropped on purpose: its text may hold
// credentials and callers only need the kind.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }

// classify maps an rclone or SDK error onto one of the kinds above and scrubs
// every secret value out of its text.
func classify(op string, err error, secrets map[string]string) error {
	if err == nil {
		return nil
	}
	kind := ErrUnavailable
	var httpErr interface{ HTTPStatusCode() int }
	var apiErr interface{ ErrorCode() string }
	var netErr net.Error
	var gErr *googleapi.Error
	if errors.As(err, &gErr) {
		httpErr = googleStatus{gErr}
	}
	switch {
	case errors.Is(err, egress.ErrRefused):
		// A client dialling through the Guard itself (Go's default
		// transport, which some of rclone's auth paths use).
		kind = ErrRefused
	case errors.Is(err, fs.ErrorObjectNotFound), errors.Is(err, fs.ErrorDirNotFound),
		errors.Is(err, fs.ErrorNotAFile), errors.Is(err, fs.ErrorIsDir):
		kind = ErrNotFound
	case errors.As(err, &apiErr) && deniedCode(apiErr.ErrorCode()):
		kind = ErrDenied
	case errors.As(err, &apiErr) && notFoundCode(apiErr.ErrorCode()):
		kind = ErrNotFound
	case httpErr != nil || errors.As(err, &httpErr):
		switch code := httpErr.HTTPStatusCode(); {
		case code == http.StatusUnauthorized || code == http.StatusForbidden:
			kind = ErrDenied
		case code == http.StatusNotFound:
			kind = ErrNotFound
		case code == http.StatusRequestedRangeNotSatisfiable || code == http.StatusPreconditionFailed:
			// A range past the end: the object shrank since it was listed.
			kind = ErrChanged
		case code == http.StatusRequestTimeout || code == http.StatusTooManyRequests:
			// Throttled or slow: retryable, stays ErrUnavailable.
		case code >= 400 && code < 500:
			kind = ErrInvalid
		}
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr):
		kind = ErrUnavailable
	}
	return &kindError{kind: kind, msg: op + ": " + Scrub(err.Error(), secrets)}
}

// googleStatus gives a Google API error's HTTP status as the AWS SDK's
// errors give theirs.
type googleStatus struct{ *googleapi.Error }

func (g googleStatus) HTTPStatusCode() int { return g.Code }

func deniedCode(c string) bool {
	switch c {
	case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
		"InvalidToken", "AuthorizationHeaderMalformed", "AllAccessDisabled", "AccountProblem":
		return true
	}
	return false
}

func notFoundCode(c string) bool {
	switch c {
	case "NoSuchBucket", "NoSuchKey", "NotFound":
		return true
	}
	return false
}

// Scrub replaces every secret value found in s. Short values are skipped:
// replacing "s3" or "true" would mangle the message without protecting anything.
// Longer values go first, so a value that starts with another one is not left
// half visible.
func Scrub(s string, secrets map[string]string) string {
	var vs []string
	for _, v := range secrets {
		if len(v) >= 6 {
			vs = append(vs, v)
		}
	}
	slices.SortFunc(vs, func(a, b string) int { return len(b) - len(a) })
	for _, v := range vs {
		s = strings.ReplaceAll(s, v, "[redacted]")
	}
	return s
}
