package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/admin"
	"github.com/modelcache/modelcache/pkg/cache"
	"github.com/modelcache/modelcache/pkg/cache/cachetest"
	"github.com/modelcache/modelcache/pkg/source/sourcetest"
)

// TestAgainstRealAdminServer runs the commands that need no remote against
// pkg/admin's real handler, store and state on an empty cache in a
// temporary directory (unit tier: no root, no network).
func TestAgainstRealAdminServer(t *testing.T) {
	dir, err := os.MkdirTemp("", "mcctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := cachetest.Open(t, filepath.Join(dir, "cache"), cache.Options{}).Cache
	socket := serveAdmin(t, dir, &admin.Server{Cache: c})

	for _, tc := range []struct {
		args      []string
		code      int
		stdoutHas string
		stderrHas string
	}{
		{[]string{"ls"}, 0, "no models cached on this node", ""},
		{[]string{"ls", "--output", "json"}, 0, "[]", ""},
		{[]string{"du"}, 0, "drained          no", ""},
		{[]string{"gc", "--dry-run"}, 0, "nothing to evict", ""},
		{[]string{"verify"}, 0, "checked 0 blobs (0 B) in", ""},
		{[]string{"inspect", "mys3:nope"}, 1, "", `no cached tree matches "mys3:nope"`},
		{[]string{"pin", "sha256:0123456789ab"}, 1, "", "no cached tree matches"},
		{[]string{"evict", "mys3:nope", "--when-unused"}, 1, "", "no cached tree matches"},
		{[]string{"drain"}, 0, "node drained: removed 0 models", ""},
		{[]string{"drain"}, 0, "node drained: removed 0 models", ""},
		{[]string{"du"}, 0, "drained          yes", ""},
		{[]string{"undrain"}, 0, "node undrained", ""},
		{[]string{"undrain"}, 0, "node undrained", ""},
	} {
		r := runCLI(t, socket, tc.args...)
		if r.code != tc.code || !strings.Contains(r.stdout, tc.stdoutHas) || !strings.Contains(r.stderr, tc.stderrHas) {
			t.Errorf("%v: exit %d (want %d)\nstdout:\n%s\nstderr:\n%s", tc.args, r.code, tc.code, r.stdout, r.stderr)
		}
	}
}

// A model downloaded through the real cache is listed as read from the
// origin, with the bytes in inspect: the record the download wrote, as the
// API and the CLI show it (with fake peers, pkg/cache's tests show peers).
func TestAgainstRealAdminServer_WhereBytesCameFrom(t *testing.T) {
	dir, err := os.MkdirTemp("", "mcctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	const uri = "mys3:models/iris"
	res := sourcetest.NewResolver()
	files := map[string][]byte{"model.joblib": sourcetest.Bytes("iris", 3000), "config.json": []byte(`{"a":1}`)}
	res.SetModel(uri, files)
	c := cachetest.Open(t, filepath.Join(dir, "cache"), cache.Options{}).Cache
	remote, err := res.Resolve(context.Background(), uri, sourcetest.Secrets())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Prefetch(context.Background(), cache.FetchRequest{URI: uri, Remote: remote}); err != nil {
		t.Fatal(err)
	}
	socket := serveAdmin(t, dir, &admin.Server{Cache: c, Resolver: res})
	for _, tc := range []struct {
		args []string
		has  string
	}{
		{[]string{"ls"}, "   origin   " + uri},
		{[]string{"inspect", uri}, "from:       2.9 KiB from the origin\n"},
		{[]string{"ls", "--output", "json"}, `"from": {
      "origin": 3007,
      "peers": 0
    }`},
	} {
		r := runCLI(t, socket, tc.args...)
		if r.code != 0 || !strings.Contains(r.stdout, tc.has) {
			t.Errorf("%v: exit %d, stdout:\n%s\nwant it to hold %q; stderr:\n%s", tc.args, r.code, r.stdout, tc.has, r.stderr)
		}
	}
}

// serveAdmin serves srv on a socket in dir until the test ends.
func serveAdmin(t *testing.T, dir string, srv *admin.Server) (socket string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	socket = filepath.Join(dir, "admin.sock")
	served := make(chan error, 1)
	go func() {
		served <- admin.Serve(ctx, socket, srv.Handler())
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Error(err)
		}
	})
	for i := 0; ; i++ {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		if i == 100 {
			t.Fatal("the admin socket did not appear")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return socket
}
