package admin_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/modelcache/modelcache/pkg/adminapi"
	"github.com/modelcache/modelcache/pkg/store"
)

// ls and inspect say where each tree's bytes came from, as the state
// database recorded it; a tree with no record has no "from" at all.
func TestTreesSayWhereBytesCameFrom(t *testing.T) {
	for _, tt := range []struct {
		name     string
		recorded store.BytesFrom
		want     adminapi.BytesFrom
	}{
		{name: "nothing recorded"},
		{name: "origin only", recorded: store.BytesFrom{Origin: 900}, want: adminapi.BytesFrom{Origin: 900}},
		{name: "peers and the origin",
			recorded: store.BytesFrom{Origin: 100, Peers: 800, Nodes: []store.NodeBytes{{Node: "node-a", Bytes: 500}, {Node: "node-b", Bytes: 300}}},
			want:     adminapi.BytesFrom{Origin: 100, Peers: 800, Nodes: []adminapi.NodeBytes{{Node: "node-a", Bytes: 500}, {Node: "node-b", Bytes: 300}}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			digest := h.build(bertURI, bertFiles)
			if tr, ok, err := h.db.Tree(digest); err != nil || !ok {
				t.Fatalf("Tree = %v, %v", ok, err)
			} else if err := h.db.RecordTreeObjects("key-"+bertURI, tr.Tree, nil, tt.recorded); err != nil {
				t.Fatal(err)
			}
			var trees []adminapi.Tree
			h.call("GET", "/v1/trees", nil, 200, &trees)
			if len(trees) != 1 || !reflect.DeepEqual(trees[0].From, tt.want) {
				t.Errorf("ls = %+v, want one tree from %+v", trees, tt.want)
			}
			var in adminapi.Inspection
			h.call("GET", treeURL(bertURI), nil, 200, &in)
			if !reflect.DeepEqual(in.From, tt.want) {
				t.Errorf("inspect says from %+v, want %+v", in.From, tt.want)
			}
			raw := h.do("GET", "/v1/trees", nil).Body.String()
			if has := strings.Contains(raw, `"from"`); has == tt.want.IsZero() {
				t.Errorf("ls JSON %s: \"from\" present %v, want %v", raw, has, !tt.want.IsZero())
			}
		})
	}
}
