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

// The pod event says where a download's bytes came from when peers sent
// any, and nothing more when the origin sent them all.
func TestFromText(t *testing.T) {
	const mib = 1 << 20
	for _, tt := range []struct {
		name string
		f    store.BytesFrom
		want string
	}{
		{"nothing read", store.BytesFrom{}, ""},
		{"origin only", store.BytesFrom{Origin: 3 * mib}, ""},
		{"peer only", store.BytesFrom{Peers: 3 * mib, Nodes: []store.NodeBytes{{Node: "node-a", Bytes: 3 * mib}}},
			"0 B from the origin, 3.0 MiB from peers (node-a 3.0 MiB)"},
		{"peers and the origin", store.BytesFrom{Origin: mib, Peers: 3 * mib, Nodes: []store.NodeBytes{{Node: "node-a", Bytes: 2 * mib}, {Node: "node-b", Bytes: mib}}},
			"1.0 MiB from the origin, 3.0 MiB from peers (node-a 2.0 MiB, node-b 1.0 MiB)"},
		{"more peers than the record names", store.BytesFrom{Peers: 3 * mib, Nodes: []store.NodeBytes{{Node: "node-a", Bytes: 2 * mib}}},
			"0 B from the origin, 3.0 MiB from peers (node-a 2.0 MiB, other nodes 1.0 MiB)"},
	} {
		if got := fromText(tt.f); got != tt.want {
			t.Errorf("%s: fromText = %q, want %q", tt.name, got, tt.want)
		}
	}
}
