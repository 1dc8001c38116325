package source

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/rclone/rclone/fs"
)

// statusError looks like an AWS SDK v2 response error (HTTPStatusCode).
type statusError struct {
	code int
	msg  string
}

func (e *statusError) Error() string       { return e.msg }
func (e *statusError) HTTPStatusCode() int { return e.code }

// apiError looks like a smithy API error (ErrorCode).
type apiError struct {
	code string
	msg  string
}

func (e *apiError) Error() string     { return e.msg }
func (e *apiError) ErrorCode() string { return e.code }

// apiStatusError carries both, as the SDK's wrapped errors do.
type apiStatusError struct {
	apiError
	status int
}

func (e *apiStatusError) HTTPStatusCode() int { return e.status }

// timeoutError is a net.Error that is not an *net.OpError.
type timeoutError struct{ msg string }

func (e timeoutError) Error() string   { return e.msg }
func (e timeoutError) Timeout() bool   { return true }
func (e timeoutError) Temporary() bool { return true }

var allKinds = []error{ErrInvalid, ErrNotFound, ErrDenied, ErrUnavailable, ErrUnsafePath, ErrChanged}

func TestClassify(t *testing.T) {
	secrets := map[string]string{
		"AWS_ACCESS_KEY_ID":     secretKeyID,
		"AWS_SECRET_ACCESS_KEY": secretAccessKey,
		"SHORT":                 "abc12", // under 6 bytes: left alone
	}
	leaky := func(s string) string {
		return s + " (key " + secretKeyID + ", signed with " + secretAccessKey + ", id abc12)"
	}
	tests := []struct {
		name string
		err  error
		want error
	}{
		{"object not found", fs.ErrorObjectNotFound, ErrNotFound},
		{"dir not found", fs.ErrorDirNotFound, ErrNotFound},
		{"wrapped dir not found", fmt.Errorf("list %s: %w", secretAccessKey, fs.ErrorDirNotFound), ErrNotFound},
		{"not a file", fs.ErrorNotAFile, ErrNotFound},
		{"is a dir", fs.ErrorIsDir, ErrNotFound},
		{"HTTP 401", &statusError{401, leaky("401 Unauthorized")}, ErrDenied},
		{"HTTP 403", &statusError{403, leaky("403 Forbidden")}, ErrDenied},
		{"wrapped HTTP 403", fmt.Errorf("operation error S3: ListObjectsV2: %w", &statusError{403, leaky("Forbidden")}), ErrDenied},
		{"HTTP 404", &statusError{404, leaky("404 Not Found")}, ErrNotFound},
		{"HTTP 400", &statusError{400, leaky("400 Bad Request")}, ErrInvalid},
		{"HTTP 408 is retryable", &statusError{408, leaky("408 Request Timeout")}, ErrUnavailable},
		{"HTTP 429 is retryable", &statusError{429, leaky("429 Too Many Requests")}, ErrUnavailable},
		{"HTTP 500", &statusError{500, leaky("500 Internal Server Error")}, ErrUnavailable},
		{"HTTP 503", &statusError{503, leaky("503 Slow Down")}, ErrUnavailable},
		{"AccessDenied", &apiError{"AccessDenied", leaky("Access Denied")}, ErrDenied},
		{"InvalidAccessKeyId", &apiError{"InvalidAccessKeyId", leaky("bad key")}, ErrDenied},
		{"SignatureDoesNotMatch", &apiError{"SignatureDoesNotMatch", leaky("bad signature")}, ErrDenied},
		{"ExpiredToken", &apiError{"ExpiredToken", leaky("expired")}, ErrDenied},
		{"NoSuchBucket", &apiError{"NoSuchBucket", leaky("no bucket")}, ErrNotFound},
		{"NoSuchKey", &apiError{"NoSuchKey", leaky("no key")}, ErrNotFound},
		{"NotFound", &apiError{"NotFound", leaky("not found")}, ErrNotFound},
		{"unknown code", &apiError{"InternalError", leaky("oops")}, ErrUnavailable},
		{"code wins over status", &apiStatusError{apiError{"NoSuchBucket", leaky("no bucket")}, 400}, ErrNotFound},
		{"unknown code falls back to status", &apiStatusError{apiError{"SomethingNew", leaky("new")}, 403}, ErrDenied},
		{"net.OpError", &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", errors.New(leaky("connection refused")))}, ErrUnavailable},
		{"DNS error", &net.DNSError{Err: "no such host", Name: "minio." + secretAccessKey + ".svc", IsNotFound: true}, ErrUnavailable},
		{"wrapped timeout", fmt.Errorf("read: %w", timeoutError{leaky("i/o timeout")}), ErrUnavailable},
		{"deadline", fmt.Errorf("%s: %w", leaky("waiting"), context.DeadlineExceeded), ErrUnavailable},
		{"canceled", context.Canceled, ErrUnavailable},
		{"unknown error", errors.New(leaky("something odd")), ErrUnavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := classify("listing mys3:bucket/m", tc.err, secrets)
			if !errors.Is(got, tc.want) {
				t.Fatalf("classify(%v) = %v, want kind %v", tc.err, got, tc.want)
			}
			for _, k := range allKinds {
				if k != tc.want && errors.Is(got, k) {
					t.Errorf("classify(%v) is also %v; want exactly one kind", tc.err, k)
				}
			}
			msg := got.Error()
			if !strings.HasPrefix(msg, "listing mys3:bucket/m: ") {
				t.Errorf("classify message %q does not start with the operation", msg)
			}
			for _, v := range []string{secretKeyID, secretAccessKey} {
				if strings.Contains(msg, v) {
					t.Errorf("classify message leaks a secret: %q", msg)
				}
			}
			if strings.Contains(tc.err.Error(), secretAccessKey) && !strings.Contains(msg, "[redacted]") {
				t.Errorf("classify message %q does not mark what it removed", msg)
			}
			if strings.Contains(tc.err.Error(), "abc12") && !strings.Contains(msg, "abc12") {
				t.Errorf("classify scrubbed a value shorter than 6 bytes: %q", msg)
			}
			// The original error is dropped: nothing can dig its text out.
			if errors.Is(got, tc.err) {
				t.Errorf("classify result still wraps the original error %v", tc.err)
			}
			var se *statusError
			var ae *apiError
			if errors.As(got, &se) || errors.As(got, &ae) {
				t.Errorf("classify result exposes the SDK error")
			}
		})
	}

	t.Run("nil", func(t *testing.T) {
		if got := classify("op", nil, secrets); got != nil {
			t.Errorf("classify(nil) = %v, want nil", got)
		}
	})
}

func TestScrub(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		secrets map[string]string
		want    string
	}{
		{"no secrets", "error talking to minio", nil, "error talking to minio"},
		{"every occurrence", "k=SECRET1 and again SECRET1", map[string]string{"K": "SECRET1"}, "k=[redacted] and again [redacted]"},
		{"several values", "id AKIA1234 key abcdef123", map[string]string{"ID": "AKIA1234", "KEY": "abcdef123"}, "id [redacted] key [redacted]"},
		{"exactly 6 bytes", "v=123456", map[string]string{"V": "123456"}, "v=[redacted]"},
		{"short values are kept", "type s3 enabled true", map[string]string{"TYPE": "s3", "ENV": "true", "R": "12345"}, "type s3 enabled true"},
		{"empty value", "nothing here", map[string]string{"E": ""}, "nothing here"},
		{"value that extends another", "token SECRETSECRETLONGER!", map[string]string{"A": "SECRET", "B": "SECRETSECRETLONGER"}, "token [redacted]!"},
		{"value inside another", "k=xxSECRETxx", map[string]string{"A": "SECRET", "B": "xxSECRETxx"}, "k=[redacted]"},
		{"multi-line JSON value", "bad creds: {\n\"k\": 1}\n", map[string]string{"G": "{\n\"k\": 1}"}, "bad creds: [redacted]\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Map order is random; repeat so an order dependence shows.
			for i := 0; i < 50; i++ {
				if got := Scrub(tc.in, tc.secrets); got != tc.want {
					t.Fatalf("Scrub(%q) = %q, want %q", tc.in, got, tc.want)
				}
			}
		})
	}
}
