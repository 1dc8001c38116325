package csi

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"

	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/store"
	"google.golang.org/grpc/codes"
)

// TestPublishError checks the one place that chooses CSI codes for the
// publish path against docs/design.md "Error mapping (CSI)". Every error is wrapped
// once more, as callers up the stack do.
func TestPublishError(t *testing.T) {
	const uri = "mys3:models/iris"
	pin := "sha256:" + strings.Repeat("a", 64)
	got := "sha256:" + strings.Repeat("b", 64)
	tests := []struct {
		name  string
		err   error
		want  codes.Code
		hints []string
	}{
		{"not found", source.ErrNotFound, codes.NotFound, []string{uri, "check the modelUri"}},
		{"denied", source.ErrDenied, codes.PermissionDenied, []string{uri, "node-publish secret"}},
		{"egress refused", fmt.Errorf("%w: opening mys3:models/iris/w.bin: connecting to 169.254.169.254 is refused by the rule link-local", source.ErrRefused), codes.PermissionDenied, []string{uri, "169.254.169.254", "rule link-local", "nothing was kept"}},
		{"unavailable", source.ErrUnavailable, codes.Unavailable, []string{uri, "retry"}},
		{"changed during download", source.ErrChanged, codes.Unavailable, []string{uri}},
		{"corrupted in transfer", fmt.Errorf("%w: w.bin: the remote's MD5 is aa but the bytes that arrived hash to bb", source.ErrCorrupt), codes.Unavailable, []string{uri, "w.bin", "aa", "bb", "retries"}},
		{"unsafe path", source.ErrUnsafePath, codes.InvalidArgument, []string{uri, "rename or remove"}},
		{"invalid", fmt.Errorf("%w: remote \"mys3\" has no type: add RCLONE_CONFIG_MYS3_TYPE", source.ErrInvalid), codes.InvalidArgument, []string{"RCLONE_CONFIG_MYS3_TYPE"}},
		{"no space", fmt.Errorf("%w: %w", store.ErrNoSpace, syscall.ENOSPC), codes.ResourceExhausted, []string{uri, "free space"}},
		{"too many files", fmt.Errorf("%w: %s has more than 10 files; raise --max-files", source.ErrTooLarge, uri), codes.ResourceExhausted, []string{uri, "more than 10 files", "--max-files"}},
		{"in progress", &store.InProgressError{Done: 512 << 20, Total: 1 << 30}, codes.Aborted, []string{uri, "512.0 MiB of 1.0 GiB (50%)", "retry"}},
		{"in progress, nothing yet", &store.InProgressError{Total: 1 << 30}, codes.Aborted, []string{"(0%)"}},
		{"not cached", cache.ErrNotCached, codes.FailedPrecondition, []string{uri, "pullPolicy", "IfNotPresent"}},
		{"digest mismatch", fmt.Errorf("%w: the digest attribute pins %s but the model's content digest is %s", cache.ErrDigestMismatch, pin, got), codes.FailedPrecondition, []string{uri, pin, got}},
		{"deadline", context.DeadlineExceeded, codes.DeadlineExceeded, []string{uri, "retry"}},
		{"cancelled", context.Canceled, codes.DeadlineExceeded, []string{uri, "retry"}},
		{"anything else", errors.New("tree record is corrupt"), codes.Internal, []string{uri, "tree record is corrupt"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := publishError(uri, fmt.Errorf("publishing: %w", tc.err))
			wantCode(t, err, tc.want, tc.hints...)
		})
	}
}

// A model with more files than --max-files is RESOURCE_EXHAUSTED at
// provisioning too, the limit and the flag named.
func TestProvisionErrorTooLarge(t *testing.T) {
	const uri = "mys3:models/many"
	err := provisionError(uri, fmt.Errorf("listing: %w: %s has more than 10 files; raise --max-files", source.ErrTooLarge, uri))
	wantCode(t, err, codes.ResourceExhausted, uri, "more than 10 files", "--max-files")
}

// A download still running must never become a final error, even when the
// error chain also carries a retryable or final kind.
func TestPublishErrorInProgressWins(t *testing.T) {
	for _, other := range []error{source.ErrUnavailable, source.ErrNotFound, context.DeadlineExceeded} {
		err := publishError("mys3:m", errors.Join(&store.InProgressError{Done: 1, Total: 2}, other))
		wantCode(t, err, codes.Aborted, "still downloading")
	}
}
