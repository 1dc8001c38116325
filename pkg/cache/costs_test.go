package cache_test

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/modelcache/modelcache/pkg/mount"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
)

// The state database transactions one publish or unpublish costs (a write
// is a disk sync), with the budget written down so that a change that adds
// one is seen. Before pkg/cache owned these paths they cost: cold publish
// 6 reads and 2 writes, warm publish 3 and 1, unpublish 2 and 2 (3 and 2
// at a tree's last mount, which also decoded every reference and tree).
// Another 20 cached models are mounted so that a scan would show.
func TestTransactions_PerCall(t *testing.T) {
	res := sourcetest.NewResolver()
	h := newHarness(t, t.TempDir(), res, mount.NewFake())
	for i := range 20 {
		uri := fmt.Sprintf("mys3:models/other-%d", i)
		res.SetModel(uri, map[string][]byte{"w": sourcetest.Bytes(uri, 64)})
		h.fetchAndMount(uri, filepath.Join(h.dir, "pods", fmt.Sprint("other-", i), "mount"))
	}
	res.SetModel(modelURI, files())
	tests := []struct {
		name          string
		call          func()
		reads, writes int64
	}{
		{"cold publish", func() { h.publish(filepath.Join(h.dir, "pods", "a", "mount")) }, 5, 2},
		{"warm publish", func() { h.publish(filepath.Join(h.dir, "pods", "b", "mount")) }, 2, 1},
		{"unpublish", func() { h.release(filepath.Join(h.dir, "pods", "b", "mount")) }, 0, 1},
		{"last unpublish", func() { h.release(filepath.Join(h.dir, "pods", "a", "mount")) }, 0, 1},
	}
	for _, tt := range tests {
		r0, w0 := h.state.Transactions()
		tt.call()
		r1, w1 := h.state.Transactions()
		t.Logf("%s: %d read and %d write transactions", tt.name, r1-r0, w1-w0)
		if r1-r0 > tt.reads || w1-w0 > tt.writes {
			t.Errorf("%s: %d read and %d write transactions, budget %d and %d", tt.name, r1-r0, w1-w0, tt.reads, tt.writes)
		}
	}
}
