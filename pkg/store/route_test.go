package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/source"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
	"github.com/modelcache/modelcache/pkg/store"
)

// router reads w.bin from a peer when the store checks it, everything else
// from the remote, as the cache's peer fetcher does.
type router struct {
	*sourcetest.Remote // the remote (origin)
	peer               *sourcetest.Remote
	named              string
	sending            *sendingFetcher // when set, the peer's bodies name their node
	mu                 sync.Mutex
	asked              map[string]bool // Route's checked, by path
}

func (r *router) Route(_ context.Context, e source.Entry, checked bool) (store.Fetcher, string) {
	r.mu.Lock()
	r.asked[e.Path] = checked
	r.mu.Unlock()
	if e.Path != "w.bin" || !checked {
		return r.Remote, ""
	}
	if r.sending != nil {
		return r.sending, r.named
	}
	return r.peer, r.named
}

// Bytes a peer sends pass the remote's own checksum and the sha256 the
// peer named, in one stream and in ranges; a wrong byte or a wrong name is
// refused; an object the remote keeps no checksum of is read from the
// remote, never from a peer.
func TestRoute_PeerBytesCheckedAgainstTheRemote(t *testing.T) {
	for _, size := range []int{300, 3 * rangeCutoff} {
		want := sourcetest.Bytes(fmt.Sprint("w", size), size)
		for _, tt := range []struct {
			name     string
			served   []byte
			named    string
			unlisted bool // the listing has no MD5 and the remote no checksum
			wantErr  error
			fromPeer bool
		}{
			{name: "right bytes, right name", served: want, named: sha256Hex(want), fromPeer: true},
			{name: "a flipped byte", served: flipAt(want, size/2), named: sha256Hex(want), wantErr: source.ErrCorrupt},
			{name: "right bytes, wrong name", served: want, named: sha256Hex([]byte("other")), wantErr: source.ErrCorrupt},
			{name: "no checksum at the remote", served: flipAt(want, 0), named: sha256Hex(want), unlisted: true},
		} {
			t.Run(fmt.Sprintf("%d bytes, %s", size, tt.name), func(t *testing.T) {
				s := openRanged(t)
				files := map[string][]byte{"w.bin": want, "config.json": []byte("{}")}
				r := &router{Remote: sourcetest.NewFetcher(files), peer: sourcetest.NewFetcher(map[string][]byte{"w.bin": tt.served}),
					named: tt.named, asked: map[string]bool{}}
				m := sourcetest.ManifestOf(files, time.Unix(1700000000, 0))
				if tt.unlisted {
					for i := range m {
						m[i].Hash = ""
					}
				}
				ens, err := s.EnsureGated(context.Background(), "key", m, r, nil)
				if tt.wantErr != nil {
					if !errors.Is(err, tt.wantErr) {
						t.Fatalf("Ensure = %v, want %v", err, tt.wantErr)
					}
					checkNoTrees(t, s.Dir())
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				checkTree(t, s, ens.Tree, files)
				if checked := r.asked["w.bin"]; checked == tt.unlisted {
					t.Errorf("Route was told checked=%v for w.bin", checked)
				}
				if peerOpens := r.peer.OpenCount("w.bin"); (peerOpens > 0) != tt.fromPeer {
					t.Errorf("%d opens at the peer, want from the peer: %v", peerOpens, tt.fromPeer)
				}
				if tt.fromPeer && r.OpenCount("w.bin") != 0 {
					t.Errorf("w.bin read from the remote %d times as well", r.OpenCount("w.bin"))
				}
			})
		}
	}
}
