package csi

import (
	"testing"

	"github.com/modelcache/modelcache/pkg/store"
)

// The pod event says how a download's bytes were checked, each kind only
// when it happened.
func TestChecksText(t *testing.T) {
	for _, tt := range []struct {
		c    store.Checks
		want string
	}{
		{store.Checks{}, "every object linked from earlier downloads"},
		{store.Checks{MD5: 3}, "3 objects checked against the remote's MD5"},
		{store.Checks{Remote: 2}, "2 objects checked against a checksum asked of the remote (S3 x-amz-checksum-*, multipart ETag, GCS crc32c)"},
		{store.Checks{MD5: 1, Remote: 1, Unchecked: 1}, "1 objects checked against the remote's MD5; " +
			"1 objects checked against a checksum asked of the remote (S3 x-amz-checksum-*, multipart ETag, GCS crc32c); " +
			"1 had no checksum at the remote and were not checked"},
		{store.Checks{Unchecked: 2}, "2 had no checksum at the remote and were not checked"},
	} {
		if got := checksText(tt.c); got != tt.want {
			t.Errorf("checksText(%+v) = %q, want %q", tt.c, got, tt.want)
		}
	}
}
