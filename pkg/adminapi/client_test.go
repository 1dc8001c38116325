package adminapi_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
)

// serve runs handler on a unix socket in a fresh directory and returns the
// socket's path.
func serve(t *testing.T, handler http.Handler) string {
	t.Helper()
	// Not t.TempDir(): unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "adminapi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket := filepath.Join(dir, "admin.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(handler)
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return socket
}

// reply answers with body, as raw JSON.
func reply(status int, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, body)
	}
}

func TestClient_EachCallSendsItsRouteAndDecodesItsReply(t *testing.T) {
	tree := adminapi.Tree{Digest: "sha256:" + strings.Repeat("a", 64), Size: 5, Files: 1, URIs: []string{"mys3:m"}, Pinned: true, Present: true}
	for _, tc := range []struct {
		name     string
		route    string // method and path, query included
		wantBody string // the request body, "" for none
		reply    any
		call     func(context.Context, *adminapi.Client) (any, error)
	}{
		{"trees", "GET /v1/trees", "", []adminapi.Tree{tree},
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.Trees(ctx) }},
		{"tree", "GET /v1/tree?ref=mys3%3Am+x", "", adminapi.Inspection{Tree: tree, Contents: []adminapi.File{{Path: "a", Size: 5}}},
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.Tree(ctx, "mys3:m x") }},
		{"du", "GET /v1/du", "", adminapi.DiskUsage{BlobBytes: 5, Blobs: 1, Drained: true},
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.DU(ctx) }},
		{"pin", "POST /v1/pin", `{"ref":"mys3:m"}`, tree,
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.Pin(ctx, "mys3:m") }},
		{"unpin", "POST /v1/unpin", `{"ref":"mys3:m"}`, tree,
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.Unpin(ctx, "mys3:m") }},
		{"evict when unused", "POST /v1/evict", `{"ref":"sha256:aaaa","whenUnused":true}`, adminapi.EvictResult{Tree: tree.Digest, Pending: true},
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.Evict(ctx, "sha256:aaaa", true) }},
		{"gc dry run", "POST /v1/gc", `{"ref":"","dryRun":true}`, adminapi.GCResult{Evicted: []adminapi.Candidate{{Digest: tree.Digest, Size: 5}}, Freed: 5, DryRun: true},
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.GC(ctx, true) }},
		{"drain", "POST /v1/drain", "", adminapi.DrainResult{Drained: true, Removed: []string{tree.Digest}, Freed: 5},
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.Drain(ctx) }},
		{"undrain", "POST /v1/undrain", "", adminapi.DrainResult{},
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.Undrain(ctx) }},
		{"verify", "POST /v1/verify", "", adminapi.VerifyReport{Blobs: 1, Bytes: 5, Took: "1ms", OK: true},
			func(ctx context.Context, c *adminapi.Client) (any, error) { return c.Verify(ctx) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var gotRoute, gotBody string
			socket := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				b, _ := io.ReadAll(r.Body)
				gotRoute, gotBody = r.Method+" "+r.URL.RequestURI(), string(b)
				json.NewEncoder(w).Encode(tc.reply)
			}))
			c := adminapi.NewClient(socket)
			c.Strict = true
			got, err := tc.call(t.Context(), c)
			if err != nil {
				t.Fatal(err)
			}
			if gotRoute != tc.route || gotBody != tc.wantBody {
				t.Errorf("sent %s %s, want %s %s", gotRoute, gotBody, tc.route, tc.wantBody)
			}
			if !reflect.DeepEqual(got, tc.reply) {
				t.Errorf("decoded %+v, want %+v", got, tc.reply)
			}
		})
	}
}

func TestClient_ErrorsSayWhatFailed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		status  int
		foreign bool
		message string // all of err.Error()
	}{
		{"API error", reply(http.StatusConflict, `{"error":"the node is drained"}`), http.StatusConflict, false, "the node is drained"},
		{"older server", func(w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) }, http.StatusNotFound, true, "GET /v1/du: HTTP 404: 404 page not found"},
		{"empty error reply", reply(http.StatusBadGateway, ""), http.StatusBadGateway, true, "GET /v1/du: HTTP 502: Bad Gateway"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := adminapi.NewClient(serve(t, tc.handler)).DU(t.Context())
			var se *adminapi.StatusError
			if !errors.As(err, &se) || se.Status != tc.status || se.Foreign != tc.foreign || err.Error() != tc.message {
				t.Fatalf("err = %#v (%v), want a StatusError %d %q", err, err, tc.status, tc.message)
			}
			if adminapi.StatusCode(err) != tc.status {
				t.Errorf("StatusCode = %d, want %d", adminapi.StatusCode(err), tc.status)
			}
		})
	}

	t.Run("no socket", func(t *testing.T) {
		_, err := adminapi.NewClient(filepath.Join(t.TempDir(), "admin.sock")).DU(t.Context())
		if de := (*adminapi.DialError)(nil); !errors.As(err, &de) || !errors.Is(err, syscall.ENOENT) || adminapi.StatusCode(err) != 0 {
			t.Fatalf("err = %v, want a DialError of ENOENT", err)
		}
	})
	t.Run("nothing listening", func(t *testing.T) {
		socket := filepath.Join(t.TempDir(), "admin.sock")
		if err := os.WriteFile(socket, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := adminapi.NewClient(socket).DU(t.Context())
		if de := (*adminapi.DialError)(nil); !errors.As(err, &de) || de.Socket != socket || !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("err = %v, want a DialError of ECONNREFUSED naming %s", err, socket)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		socket := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
		c := adminapi.NewClient(socket)
		c.Timeout = 50 * time.Millisecond
		if _, err := c.Verify(t.Context()); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "POST /v1/verify") {
			t.Fatalf("err = %v, want the call's deadline", err)
		}
	})
}

// TestClient_StrictRefusesWhatItDoesNotKnow: tests run strict so a field
// the server adds without the client fails them; modelcachectl runs
// lenient so it still talks to a newer node plugin.
func TestClient_StrictRefusesWhatItDoesNotKnow(t *testing.T) {
	socket := serve(t, reply(http.StatusOK, `{"blobs":3,"shinyNewField":1}`))
	lenient := adminapi.NewClient(socket)
	if du, err := lenient.DU(t.Context()); err != nil || du.Blobs != 3 {
		t.Errorf("lenient DU = %+v, %v; want 3 blobs", du, err)
	}
	strict := adminapi.NewClient(socket)
	strict.Strict = true
	if _, err := strict.DU(t.Context()); err == nil || !strings.Contains(err.Error(), "shinyNewField") {
		t.Errorf("strict DU = %v, want an error naming the unknown field", err)
	}
	raw, err := lenient.Raw(t.Context(), "/v1/du", nil)
	if err != nil || string(raw) != `{"blobs":3,"shinyNewField":1}` {
		t.Errorf("Raw = %s, %v; want the reply unchanged", raw, err)
	}
}

func TestClient_PrefetchFollowsTheStream(t *testing.T) {
	progress := `{"event":"progress","done":1,"total":4}` + "\n"
	done := `{"event":"done","done":4,"total":4,"tree":"sha256:t","files":1,"fetched":true,"took":"1s"}` + "\n"
	for _, tc := range []struct {
		name        string
		contentType string
		stream      string
		strict      bool
		progressed  int
		want        adminapi.PrefetchEvent
		wantErr     string // "" for none
		incomplete  bool
	}{
		{name: "done", stream: progress + progress + done, progressed: 2,
			want: adminapi.PrefetchEvent{Event: "done", Done: 4, Total: 4, Tree: "sha256:t", Files: 1, Fetched: true, Took: "1s"}},
		{name: "error event", stream: progress + `{"event":"error","error":"downloading mys3:m: access denied"}` + "\n", progressed: 1,
			want: adminapi.PrefetchEvent{Event: "error", Error: "downloading mys3:m: access denied"}, wantErr: "downloading mys3:m: access denied"},
		{name: "ends early", stream: progress, progressed: 1, wantErr: "reading the progress of mys3:m", incomplete: true},
		{name: "ends mid-line", stream: progress + `{"event":"do`, progressed: 1, wantErr: "reading the progress of mys3:m", incomplete: true},
		{name: "unknown event skipped", stream: `{"event":"retrying"}` + "\n" + done,
			want: adminapi.PrefetchEvent{Event: "done", Done: 4, Total: 4, Tree: "sha256:t", Files: 1, Fetched: true, Took: "1s"}},
		{name: "unknown event, strict", strict: true, stream: `{"event":"retrying"}` + "\n" + done,
			want: adminapi.PrefetchEvent{Event: "retrying"}, wantErr: `unknown event "retrying"`},
		{name: "unknown field, strict", strict: true, stream: `{"event":"progress","eta":"1s"}` + "\n", wantErr: "eta"},
		{name: "not a stream", contentType: "application/json", stream: done, wantErr: `Content-Type "application/json"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var req adminapi.PrefetchRequest
			socket := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
					t.Errorf("decoding the request: %v", err)
				}
				w.Header().Set("Content-Type", "application/x-ndjson")
				if tc.contentType != "" {
					w.Header().Set("Content-Type", tc.contentType)
				}
				io.WriteString(w, tc.stream)
			}))
			c := adminapi.NewClient(socket)
			c.Strict = tc.strict
			progressed := 0
			secrets := map[string]string{"RCLONE_CONFIG_MYS3_TYPE": "s3"}
			ev, err := c.Prefetch(t.Context(), adminapi.PrefetchRequest{URI: "mys3:m", Secrets: secrets}, func(adminapi.PrefetchEvent) { progressed++ })
			if req.URI != "mys3:m" || !reflect.DeepEqual(req.Secrets, secrets) {
				t.Errorf("server got %+v", req)
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Prefetch: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("Prefetch error %v, want one containing %q", err, tc.wantErr)
			}
			if errors.Is(err, adminapi.ErrIncomplete) != tc.incomplete {
				t.Errorf("errors.Is(%v, ErrIncomplete) = %t, want %t", err, !tc.incomplete, tc.incomplete)
			}
			if ev != tc.want || progressed != tc.progressed {
				t.Errorf("Prefetch = %+v after %d progress events, want %+v after %d", ev, progressed, tc.want, tc.progressed)
			}
		})
	}

	t.Run("refused", func(t *testing.T) {
		socket := serve(t, reply(http.StatusForbidden, `{"error":"the secret does not open mys3:m"}`))
		_, err := adminapi.NewClient(socket).Prefetch(t.Context(), adminapi.PrefetchRequest{URI: "mys3:m"}, nil)
		if adminapi.StatusCode(err) != http.StatusForbidden || err.Error() != "the secret does not open mys3:m" {
			t.Fatalf("err = %v, want the 403's message", err)
		}
	})
}
