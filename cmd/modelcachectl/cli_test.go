package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
)

// These are unit tests: a fake admin API on a unix socket in a temporary
// directory, replies built from pkg/admin's own types, and the CLI run
// in-process. No root needed.

const (
	kib = int64(1) << 10
	mib = kib << 10
	gib = mib << 10
)

var (
	testNow = time.Date(2025, 11, 25, 12, 0, 0, 0, time.UTC)
	dLlama  = "sha256:3f9a1c0d7e2b" + strings.Repeat("0", 52)
	dBert   = "sha256:77c0ffee1234" + strings.Repeat("1", 52)
	dOld    = "sha256:0123456789ab" + strings.Repeat("2", 52)
)

// fakeAPI serves canned replies on a unix socket and records requests.
type fakeAPI struct {
	socket string
	mu     sync.Mutex
	bodies map[string][]byte // last request body per route
	query  map[string]string // last raw query per route
}

func (f *fakeAPI) body(route string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bodies[route]
}

// startAPI serves routes ("POST /v1/evict" → handler) on a fresh socket.
func startAPI(t *testing.T, routes map[string]http.HandlerFunc) *fakeAPI {
	t.Helper()
	// Not t.TempDir(): unix socket paths are limited to 108 bytes and test
	// names make TempDir paths long.
	dir, err := os.MkdirTemp("", "mcctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fakeAPI{socket: filepath.Join(dir, "admin.sock"), bodies: map[string][]byte{}, query: map[string]string{}}
	mux := http.NewServeMux()
	for route, h := range routes {
		mux.HandleFunc(route, func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			f.mu.Lock()
			f.bodies[route], f.query[route] = b, r.URL.RawQuery
			f.mu.Unlock()
			r.Body = io.NopCloser(bytes.NewReader(b))
			h(w, r)
		})
	}
	l, err := net.Listen("unix", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(mux)
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return f
}

// reply answers as pkg/admin does: JSON of a pkg/admin value.
func reply(v any) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(v)
	}
}

// fail answers as pkg/admin does on an error.
func fail(code int, msg string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(adminapi.Error{Error: msg})
	}
}

// stream answers a prefetch with NDJSON events, checking the request as
// pkg/admin decodes it.
func stream(t *testing.T, events ...adminapi.PrefetchEvent) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req adminapi.PrefetchRequest
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			t.Errorf("server cannot decode the prefetch request: %v", err)
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		enc := json.NewEncoder(w)
		for _, ev := range events {
			_ = enc.Encode(ev)
			w.(http.Flusher).Flush()
		}
	}
}

type result struct {
	code           int
	stdout, stderr string
}

// runCLI runs modelcachectl in-process against socket (through
// MODELCACHE_ADMIN_SOCKET), at testNow, with stdout not a terminal.
func runCLI(t *testing.T, socket string, args ...string) result {
	t.Helper()
	return runCLIWith(t, socket, 0, args...)
}

// runCLIWith is runCLI with a clock that advances by step on every
// reading.
func runCLIWith(t *testing.T, socket string, step time.Duration, args ...string) result {
	t.Helper()
	var out, errb bytes.Buffer
	a := newApp(context.Background(), strings.NewReader(""), &out, &errb)
	a.getenv = func(k string) string {
		if k == "MODELCACHE_ADMIN_SOCKET" {
			return socket
		}
		return ""
	}
	clock := testNow
	a.now = func() time.Time {
		clock = clock.Add(step)
		return clock
	}
	code := a.run(args)
	return result{code, out.String(), errb.String()}
}

func cached(digest string, size int64, files int, uris []string, lastUsed time.Duration, refs ...adminapi.Ref) adminapi.Tree {
	return adminapi.Tree{Digest: digest, Size: size, Files: files, URIs: uris, LastUsed: testNow.Add(-lastUsed), Refs: refs}
}

func testTrees() []adminapi.Tree {
	llama := cached(dLlama, 2600*mib, 3, []string{"mys3:models/llama", "s3://models/llama"}, 3*time.Minute,
		adminapi.Ref{VolumeID: "csi-1", Tree: dLlama, PodName: "llama-1", PodNS: "serving"},
		adminapi.Ref{VolumeID: "csi-2", Tree: dLlama, PodName: "llama-0", PodNS: "serving"},
		adminapi.Ref{VolumeID: "csi-3", Tree: dLlama, PodName: "llama-0", PodNS: "serving"})
	llama.Pinned, llama.PinnedAt = true, testNow.Add(-2*time.Hour)
	llama.From = adminapi.BytesFrom{Origin: 600 * mib, Peers: 2000 * mib,
		Nodes: []adminapi.NodeBytes{{Node: "node-b", Bytes: 1500 * mib}, {Node: "node-c", Bytes: 500 * mib}}}
	bert := cached(dBert, 512*mib, 2, []string{"gs://m/bert"}, 5*time.Hour, adminapi.Ref{VolumeID: "pv-bert", Tree: dBert})
	bert.Doomed = "operator"
	bert.From = adminapi.BytesFrom{Origin: 512 * mib}
	old := cached(dOld, 1536, 1, nil, 72*time.Hour)
	llama.Present, bert.Present = true, true
	return []adminapi.Tree{llama, bert, old}
}

func testInspection() adminapi.Inspection {
	return adminapi.Inspection{Tree: testTrees()[0], Contents: []adminapi.File{
		{Path: "config.json", Size: 612, Sha256: strings.Repeat("c", 64)},
		{Path: "model.safetensors", Size: 2600*mib - 612 - 2*mib, Sha256: strings.Repeat("d", 64)},
		{Path: "tokenizer/tokenizer.json", Size: 2 * mib, Sha256: ""},
	}}
}

func lines(s string) []string {
	return strings.Split(strings.TrimSuffix(s, "\n"), "\n")
}

type cliCase struct {
	name       string
	routes     map[string]http.HandlerFunc
	args       []string
	code       int
	stdout     []string // the whole of stdout, line by line; nil: not checked
	stdoutHas  []string
	stderrHas  []string
	stderrNone bool          // stderr must be empty
	clockStep  time.Duration // the clock advances this much per reading
	check      func(t *testing.T, f *fakeAPI, r result)
}

func runCases(t *testing.T, cases []cliCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := startAPI(t, tc.routes)
			r := runCLIWith(t, f.socket, tc.clockStep, tc.args...)
			if r.code != tc.code {
				t.Errorf("exit code %d, want %d\nstdout:\n%s\nstderr:\n%s", r.code, tc.code, r.stdout, r.stderr)
			}
			if tc.stdout != nil {
				got := lines(r.stdout)
				if strings.Join(got, "\n") != strings.Join(tc.stdout, "\n") {
					t.Errorf("stdout:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.stdout, "\n"))
				}
			}
			for _, s := range tc.stdoutHas {
				if !strings.Contains(r.stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, r.stdout)
				}
			}
			for _, s := range tc.stderrHas {
				if !strings.Contains(r.stderr, s) {
					t.Errorf("stderr lacks %q:\n%s", s, r.stderr)
				}
			}
			if tc.stderrNone && r.stderr != "" {
				t.Errorf("unexpected stderr:\n%s", r.stderr)
			}
			if tc.check != nil {
				tc.check(t, f, r)
			}
		})
	}
}

func TestListAndInspect(t *testing.T) {
	treesJSON, _ := json.MarshalIndent(testTrees(), "", "  ")
	runCases(t, []cliCase{{
		name:   "ls table",
		routes: map[string]http.HandlerFunc{"GET /v1/trees": reply(testTrees())},
		args:   []string{"ls"},
		stdout: []string{
			"DIGEST         SIZE        FILES   FROM                    URIS                                  USED BY                           LAST USE   PINNED",
			"3f9a1c0d7e2b   2.5 GiB     3       origin 23%, peers 77%   mys3:models/llama,s3://models/llama   serving/llama-0,serving/llama-1   3m ago     yes",
			"77c0ffee1234   512.0 MiB   2       origin                  gs://m/bert                           pv-bert                           5h ago              DOOMED (operator)",
			"0123456789ab   1.5 KiB     1       -                       -                                     -                                 3d ago              MISSING",
		},
		stderrNone: true,
	}, {
		name:       "ls json is the server's array, indented",
		routes:     map[string]http.HandlerFunc{"GET /v1/trees": reply(testTrees())},
		args:       []string{"ls", "--output", "json"},
		stdout:     lines(string(treesJSON)),
		stderrNone: true,
	}, {
		name:       "ls empty",
		routes:     map[string]http.HandlerFunc{"GET /v1/trees": reply([]adminapi.Tree{})},
		args:       []string{"ls"},
		stdout:     []string{"no models cached on this node"},
		stderrNone: true,
	}, {
		name:      "ls bad output",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"ls", "--output", "yaml"},
		code:      2,
		stderrHas: []string{"--output must be table or json", "Usage: modelcachectl ls"},
	}, {
		name:   "inspect by URI",
		routes: map[string]http.HandlerFunc{"GET /v1/tree": reply(testInspection())},
		args:   []string{"inspect", "mys3:models/llama"},
		stdout: []string{
			"digest:     " + dLlama,
			"uris:       mys3:models/llama, s3://models/llama",
			"size:       2.5 GiB",
			"files:      3",
			"from:       600.0 MiB from the origin, 2.0 GiB from peers (node-b 1.5 GiB, node-c 500.0 MiB)",
			"pinned:     yes (since 2h ago)",
			"last use:   3m ago",
			"used by:    serving/llama-0, serving/llama-1",
			"",
			"PATH                       SIZE      SHA256",
			"config.json                612 B     " + strings.Repeat("c", 64),
			"model.safetensors          2.5 GiB   " + strings.Repeat("d", 64),
			"tokenizer/tokenizer.json   2.0 MiB   -",
		},
		check: func(t *testing.T, f *fakeAPI, _ result) {
			if q := f.query["GET /v1/tree"]; q != "ref=mys3%3Amodels%2Fllama" {
				t.Errorf("query %q", q)
			}
		},
		stderrNone: true,
	}, {
		name:   "inspect json, flag after the argument",
		routes: map[string]http.HandlerFunc{"GET /v1/tree": reply(testInspection())},
		args:   []string{"inspect", "3f9a1c0d7e2b", "--output", "json"},
		check: func(t *testing.T, f *fakeAPI, r result) {
			assertSameJSON(t, mustJSON(t, testInspection()), []byte(r.stdout))
			if !strings.HasPrefix(r.stdout, "{\n  \"digest\"") {
				t.Errorf("not indented:\n%s", r.stdout)
			}
			if q := f.query["GET /v1/tree"]; q != "ref=3f9a1c0d7e2b" {
				t.Errorf("query %q", q)
			}
		},
		stderrNone: true,
	}, {
		name:      "inspect unknown",
		routes:    map[string]http.HandlerFunc{"GET /v1/tree": fail(404, `no cached tree matches "nope" (see modelcachectl ls)`)},
		args:      []string{"inspect", "nope"},
		code:      1,
		stderrHas: []string{`modelcachectl inspect: no cached tree matches "nope" (see modelcachectl ls)`},
	}, {
		// Names a hostile remote chose (older caches may hold them: the
		// node refuses such keys now) print quoted, escapes visible.
		name: "inspect quotes names that could deceive",
		routes: map[string]http.HandlerFunc{"GET /v1/tree": reply(adminapi.Inspection{
			Tree: adminapi.Tree{Digest: dOld, Size: 3, Files: 3, URIs: []string{"mys3:m/\u202eevil", "mys3:m/ok"}, LastUsed: testNow, Present: true},
			Contents: []adminapi.File{
				{Path: "model\u202enib.exe", Size: 1, Sha256: strings.Repeat("a", 64)},
				{Path: "a\u009b2J\x1b[31m", Size: 1, Sha256: strings.Repeat("b", 64)},
				{Path: "fine/name.json", Size: 1, Sha256: strings.Repeat("c", 64)},
			},
		})},
		args: []string{"inspect", "0123456789ab"},
		stdout: []string{
			"digest:     " + dOld,
			`uris:       "mys3:m/\u202eevil", mys3:m/ok`,
			"size:       3 B",
			"files:      3",
			"from:       not recorded",
			"pinned:     no",
			"last use:   just now",
			"used by:    -",
			"",
			"PATH                   SIZE   SHA256",
			`"model\u202enib.exe"   1 B    ` + strings.Repeat("a", 64),
			`"a\u009b2J\x1b[31m"    1 B    ` + strings.Repeat("b", 64),
			"fine/name.json         1 B    " + strings.Repeat("c", 64),
		},
		stderrNone: true,
	}, {
		name: "ls names the revision a Hub modelUri resolved to",
		routes: map[string]http.HandlerFunc{
			"GET /v1/trees": reply([]adminapi.Tree{func() adminapi.Tree {
				t := cached(dOld, 1536, 1, []string{"hf://org/m@main"}, time.Hour)
				t.Revisions, t.Present = []string{strings.Repeat("1f", 20)}, true
				return t
			}()}),
		},
		args: []string{"ls"},
		stdout: []string{
			"DIGEST         SIZE      FILES   FROM   URIS                            USED BY   LAST USE   PINNED",
			"0123456789ab   1.5 KiB   1       -      hf://org/m@main @1f1f1f1f1f1f   -         1h ago",
		},
		stderrNone: true,
	}, {
		name:   "ls quotes URIs that could deceive",
		routes: map[string]http.HandlerFunc{"GET /v1/trees": reply([]adminapi.Tree{cached(dOld, 1536, 1, []string{"mys3:m/a\u0085b"}, time.Hour)})},
		args:   []string{"ls"},
		stdout: []string{
			"DIGEST         SIZE      FILES   FROM   URIS                USED BY   LAST USE   PINNED",
			`0123456789ab   1.5 KiB   1       -      "mys3:m/a\u0085b"   -         1h ago              MISSING`,
		},
		stderrNone: true,
	}, {
		// A remote's error body can reach the message; it cannot reach
		// the terminal.
		name:      "errors print escaped",
		routes:    map[string]http.HandlerFunc{"GET /v1/tree": fail(502, "listing mys3:m: AccessDenied: \x1b]0;owned\x07\u202eevil")},
		args:      []string{"inspect", "mys3:m"},
		code:      1,
		stderrHas: []string{`modelcachectl inspect: listing mys3:m: AccessDenied: \x1b]0;owned\a\u202eevil`},
		check: func(t *testing.T, _ *fakeAPI, r result) {
			if strings.ContainsAny(r.stderr, "\x1b\x07\u202e") {
				t.Errorf("stderr holds raw control characters: %q", r.stderr)
			}
		},
	}, {
		name:      "inspect without argument",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"inspect"},
		code:      2,
		stderrHas: []string{"missing argument", "Usage: modelcachectl inspect DIGEST|URI"},
	}})
}

func TestPrefetch(t *testing.T) {
	done := adminapi.PrefetchEvent{Event: "done", Done: 100 * mib, Total: 100 * mib, Tree: dLlama, Files: 3, Fetched: true, Took: "10.4321s"}
	runCases(t, []cliCase{{
		// The fake clock steps 2s per event at 10 MiB/s; plain lines are
		// printed at most every 5s.
		name: "progress when stdout is not a terminal",
		routes: map[string]http.HandlerFunc{"POST /v1/prefetch": stream(t,
			adminapi.PrefetchEvent{Event: "progress", Done: 0, Total: 100 * mib},
			adminapi.PrefetchEvent{Event: "progress", Done: 20 * mib, Total: 100 * mib},
			adminapi.PrefetchEvent{Event: "progress", Done: 40 * mib, Total: 100 * mib},
			adminapi.PrefetchEvent{Event: "progress", Done: 60 * mib, Total: 100 * mib},
			adminapi.PrefetchEvent{Event: "progress", Done: 80 * mib, Total: 100 * mib},
			done)},
		args:      []string{"prefetch", "mys3:models/llama"},
		clockStep: 2 * time.Second,
		stdout: []string{
			"prefetch mys3:models/llama: 0% (0 B of 100.0 MiB, -- B/s, ETA --)",
			"prefetch mys3:models/llama: 60% (60.0 MiB of 100.0 MiB, 10.0 MiB/s, ETA 4s)",
			"cached mys3:models/llama as " + dLlama + " (3 files, 100.0 MiB) in 10.4s",
		},
		stderrNone: true,
		check: func(t *testing.T, f *fakeAPI, _ result) {
			var req adminapi.PrefetchRequest
			if err := json.Unmarshal(f.body("POST /v1/prefetch"), &req); err != nil {
				t.Fatal(err)
			}
			if req.URI != "mys3:models/llama" || req.Secrets == nil || len(req.Secrets) != 0 {
				t.Errorf("request %+v, want the URI and an empty secrets map", req)
			}
		},
	}, {
		name: "already cached",
		routes: map[string]http.HandlerFunc{"POST /v1/prefetch": stream(t,
			adminapi.PrefetchEvent{Event: "done", Done: 2 * gib, Total: 2 * gib, Tree: dLlama, Files: 1, Took: "12ms"})},
		args:       []string{"prefetch", "mys3:models/llama"},
		stdout:     []string{"already cached as " + dLlama + " (1 file, 2.0 GiB)"},
		stderrNone: true,
	}, {
		name: "a Hub model names the commit its revision resolved to",
		routes: map[string]http.HandlerFunc{"POST /v1/prefetch": stream(t,
			adminapi.PrefetchEvent{Event: "done", Done: mib, Total: mib, Tree: dLlama, Revision: strings.Repeat("7a", 20), Files: 2, Fetched: true, Took: "1.5s"})},
		args:       []string{"prefetch", "hf://org/llama"},
		stdout:     []string{"cached hf://org/llama at " + strings.Repeat("7a", 20) + " as " + dLlama + " (2 files, 1.0 MiB) in 1.5s"},
		stderrNone: true,
	}, {
		name: "error event",
		routes: map[string]http.HandlerFunc{"POST /v1/prefetch": stream(t,
			adminapi.PrefetchEvent{Event: "progress", Done: 1 * mib, Total: 100 * mib},
			adminapi.PrefetchEvent{Event: "error", Error: "downloading mys3:models/llama: remote refused the credentials"})},
		args:      []string{"prefetch", "mys3:models/llama"},
		code:      1,
		stderrHas: []string{"modelcachectl prefetch: downloading mys3:models/llama: remote refused the credentials"},
	}, {
		name: "stream ends without a result",
		routes: map[string]http.HandlerFunc{"POST /v1/prefetch": stream(t,
			adminapi.PrefetchEvent{Event: "progress", Done: 1 * mib, Total: 100 * mib})},
		args:      []string{"prefetch", "mys3:models/llama"},
		code:      1,
		stderrHas: []string{"closed the connection before mys3:models/llama was cached; run the same prefetch again"},
	}, {
		name:      "refused before streaming",
		routes:    map[string]http.HandlerFunc{"POST /v1/prefetch": fail(409, "the node is drained and starts no downloads; run modelcachectl undrain first")},
		args:      []string{"prefetch", "mys3:models/llama"},
		code:      1,
		stderrHas: []string{"modelcachectl prefetch: the node is drained and starts no downloads; run modelcachectl undrain first"},
	}, {
		name:      "missing URI",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"prefetch", "--secret-file", "x"},
		code:      2,
		stderrHas: []string{"missing argument", "Usage: modelcachectl prefetch URI"},
	}, {
		name:      "unreadable secret file",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"prefetch", "mys3:m", "--secret-file", "/nonexistent/secret.yaml"},
		code:      1,
		stderrHas: []string{"reading the secret file", "/nonexistent/secret.yaml"},
	}})
}

func TestPrefetchSecretFile(t *testing.T) {
	want := map[string]string{
		"RCLONE_CONFIG_MYS3_TYPE":              "s3",
		"RCLONE_CONFIG_MYS3_PROVIDER":          "Minio",
		"RCLONE_CONFIG_MYS3_ENDPOINT":          "http://minio.minio-system.svc.cluster.local:9000",
		"RCLONE_CONFIG_MYS3_ACCESS_KEY_ID":     "AKIAsuperSecretId42",
		"RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": "wJalr-very-secret-key=/+",
	}
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	files := []struct{ name, content string }{
		{"secret.env", `# seldon-rclone-secret as an env file
RCLONE_CONFIG_MYS3_TYPE=s3
RCLONE_CONFIG_MYS3_PROVIDER="Minio"

export RCLONE_CONFIG_MYS3_ENDPOINT=http://minio.minio-system.svc.cluster.local:9000
RCLONE_CONFIG_MYS3_ACCESS_KEY_ID = 'AKIAsuperSecretId42'
RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY=wJalr-very-secret-key=/+
`},
		{"secret.yaml", `apiVersion: v1
kind: Secret
metadata:
  name: seldon-rclone-secret
type: Opaque
data:
  RCLONE_CONFIG_MYS3_ACCESS_KEY_ID: ` + b64("AKIAsuperSecretId42") + `
  RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY: ` + b64("wJalr-very-secret-key=/+") + `
  RCLONE_CONFIG_MYS3_TYPE: ` + b64("overridden by stringData") + `
stringData:
  RCLONE_CONFIG_MYS3_TYPE: s3
  RCLONE_CONFIG_MYS3_PROVIDER: Minio
  RCLONE_CONFIG_MYS3_ENDPOINT: http://minio.minio-system.svc.cluster.local:9000
`},
		{"secret.json", `{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
 "data": {"RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY": "` + b64("wJalr-very-secret-key=/+") + `",
          "RCLONE_CONFIG_MYS3_ACCESS_KEY_ID": "` + b64("AKIAsuperSecretId42") + `"},
 "stringData": {"RCLONE_CONFIG_MYS3_TYPE": "s3", "RCLONE_CONFIG_MYS3_PROVIDER": "Minio",
                "RCLONE_CONFIG_MYS3_ENDPOINT": "http://minio.minio-system.svc.cluster.local:9000"}}`},
	}
	for _, file := range files {
		for _, outcome := range []string{"done", "error"} {
			t.Run(file.name+" "+outcome, func(t *testing.T) {
				path := filepath.Join(t.TempDir(), file.name)
				if err := os.WriteFile(path, []byte(file.content), 0o600); err != nil {
					t.Fatal(err)
				}
				last := adminapi.PrefetchEvent{Event: "done", Done: mib, Total: mib, Tree: dLlama, Files: 1, Fetched: true, Took: "1s"}
				if outcome == "error" {
					last = adminapi.PrefetchEvent{Event: "error", Error: "listing mys3:models/llama: access denied"}
				}
				f := startAPI(t, map[string]http.HandlerFunc{"POST /v1/prefetch": stream(t,
					adminapi.PrefetchEvent{Event: "progress", Done: 1, Total: mib}, last)})
				r := runCLI(t, f.socket, "prefetch", "--secret-file", path, "mys3:models/llama")
				if wantCode := map[string]int{"done": 0, "error": 1}[outcome]; r.code != wantCode {
					t.Errorf("exit code %d, want %d; stderr: %s", r.code, wantCode, r.stderr)
				}
				var req adminapi.PrefetchRequest
				if err := json.Unmarshal(f.body("POST /v1/prefetch"), &req); err != nil {
					t.Fatal(err)
				}
				if req.URI != "mys3:models/llama" || !reflect.DeepEqual(req.Secrets, want) {
					t.Errorf("server got %q with secrets %v, want %v", req.URI, req.Secrets, want)
				}
				for k, v := range want {
					if strings.Contains(r.stdout+r.stderr, v) && len(v) > 5 {
						t.Errorf("output shows the value of %s:\n%s%s", k, r.stdout, r.stderr)
					}
				}
			})
		}
	}
}

func TestMutations(t *testing.T) {
	llama := testTrees()[0]
	unpinned := llama
	unpinned.Pinned, unpinned.PinnedAt = false, time.Time{}
	refBody := func(want adminapi.RefRequest, route string) func(*testing.T, *fakeAPI, result) {
		return func(t *testing.T, f *fakeAPI, _ result) {
			var got adminapi.RefRequest
			dec := json.NewDecoder(bytes.NewReader(f.body(route)))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&got); err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("request %+v, want %+v", got, want)
			}
		}
	}
	inUse := "tree " + dLlama + " is mounted by serving/llama-0; it cannot be removed under running pods: pass --when-unused to remove it when its last mount goes"
	runCases(t, []cliCase{{
		name:       "pin",
		routes:     map[string]http.HandlerFunc{"POST /v1/pin": reply(llama)},
		args:       []string{"pin", "mys3:models/llama"},
		stdout:     []string{"pinned " + dLlama + " (mys3:models/llama, s3://models/llama, 2.5 GiB)"},
		stderrNone: true,
		check:      refBody(adminapi.RefRequest{Ref: "mys3:models/llama"}, "POST /v1/pin"),
	}, {
		name:       "unpin",
		routes:     map[string]http.HandlerFunc{"POST /v1/unpin": reply(unpinned)},
		args:       []string{"unpin", "3f9a1c0d7e2b"},
		stdout:     []string{"unpinned " + dLlama + " (mys3:models/llama, s3://models/llama, 2.5 GiB)"},
		stderrNone: true,
		check:      refBody(adminapi.RefRequest{Ref: "3f9a1c0d7e2b"}, "POST /v1/unpin"),
	}, {
		name:       "evict",
		routes:     map[string]http.HandlerFunc{"POST /v1/evict": reply(adminapi.EvictResult{Tree: dBert, Removed: true, Freed: 512 * mib})},
		args:       []string{"evict", "gs://m/bert"},
		stdout:     []string{"evicted " + dBert + " (freed 512.0 MiB)"},
		stderrNone: true,
		check:      refBody(adminapi.RefRequest{Ref: "gs://m/bert"}, "POST /v1/evict"),
	}, {
		name:       "evict --when-unused in use",
		routes:     map[string]http.HandlerFunc{"POST /v1/evict": reply(adminapi.EvictResult{Tree: dLlama, Pending: true})},
		args:       []string{"evict", "--when-unused", "mys3:models/llama"},
		stdout:     []string{dLlama + " is in use; it will be removed when its last mount goes"},
		stderrNone: true,
		check:      refBody(adminapi.RefRequest{Ref: "mys3:models/llama", WhenUnused: true}, "POST /v1/evict"),
	}, {
		name:      "evict in use without --when-unused",
		routes:    map[string]http.HandlerFunc{"POST /v1/evict": fail(http.StatusConflict, inUse)},
		args:      []string{"evict", "mys3:models/llama"},
		code:      1,
		stdout:    []string{""},
		stderrHas: []string{"modelcachectl evict: " + inUse + "\n"},
	}, {
		name:   "gc",
		routes: map[string]http.HandlerFunc{"POST /v1/gc": reply(adminapi.GCResult{Evicted: []adminapi.Candidate{{Digest: dOld, Size: 1536}, {Digest: dBert, Size: 512 * mib}}, Freed: 512*mib + 1536})},
		args:   []string{"gc"},
		stdout: []string{
			"evicted " + dOld + " (1.5 KiB)",
			"evicted " + dBert + " (512.0 MiB)",
			"freed 512.0 MiB from 2 models",
		},
		stderrNone: true,
		check:      refBody(adminapi.RefRequest{}, "POST /v1/gc"),
	}, {
		name: "gc dry run still over budget",
		routes: map[string]http.HandlerFunc{"POST /v1/gc": reply(adminapi.GCResult{
			Evicted: []adminapi.Candidate{{Digest: dOld, Size: 1536}}, Freed: 1536, Over: gib,
			DryRun: true, Warning: "no space: 1 in-use trees hold 2.5 GiB and 1 pinned trees hold 2.5 GiB, and nothing else can be evicted",
		})},
		args: []string{"gc", "--dry-run"},
		stdout: []string{
			"would evict " + dOld + " (1.5 KiB)",
			"would free 1.5 KiB from 1 model",
		},
		stderrHas: []string{"warning: no space: 1 in-use trees hold"},
		check:     refBody(adminapi.RefRequest{DryRun: true}, "POST /v1/gc"),
	}, {
		name:   "drain",
		routes: map[string]http.HandlerFunc{"POST /v1/drain": reply(adminapi.DrainResult{Drained: true, Removed: []string{dOld, dBert}, Freed: 512*mib + 1536, Pending: []string{dLlama}})},
		args:   []string{"drain"},
		stdout: []string{
			"removed " + dOld,
			"removed " + dBert,
			"pending " + dLlama + ": in use; removed when its last mount goes",
			"node drained: removed 2 models (freed 512.0 MiB), 1 pending; no downloads start until 'modelcachectl undrain'",
		},
		stderrNone: true,
	}, {
		name:       "drain again",
		routes:     map[string]http.HandlerFunc{"POST /v1/drain": reply(adminapi.DrainResult{Drained: true, Removed: []string{}, Pending: []string{}})},
		args:       []string{"drain"},
		stdout:     []string{"node drained: removed 0 models (freed 0 B), 0 pending; no downloads start until 'modelcachectl undrain'"},
		stderrNone: true,
	}, {
		name:       "undrain",
		routes:     map[string]http.HandlerFunc{"POST /v1/undrain": reply(adminapi.DrainResult{Removed: []string{}, Pending: []string{}})},
		args:       []string{"undrain"},
		stdout:     []string{"node undrained: models are downloaded again"},
		stderrNone: true,
	}})
}

func TestVerifyAndDu(t *testing.T) {
	usage := adminapi.DiskUsage{
		BlobBytes: 2600*mib + 2*mib, Blobs: 6, TreeBytes: 3112 * mib, Trees: 3, IngestBytes: 300 * mib, Quarantined: 1, FSSize: 100 * gib, FSFree: 40 * gib,
		SavedBytes: 510 * mib,
	}
	runCases(t, []cliCase{{
		name: "verify ok",
		routes: map[string]http.HandlerFunc{"POST /v1/verify": reply(adminapi.VerifyReport{
			Blobs: 6, Bytes: 2602 * mib, Took: "3.217s",
			Removed: []string{}, Invalidated: []string{}, OK: true,
		})},
		args:       []string{"verify"},
		stdout:     []string{"checked 6 blobs (2.5 GiB) in 3.2s", "no corruption found"},
		stderrNone: true,
	}, {
		name: "verify found corruption",
		routes: map[string]http.HandlerFunc{"POST /v1/verify": reply(adminapi.VerifyReport{
			Blobs: 6, Bytes: 2602 * mib, Took: "3.217s",
			Corrupt: []string{strings.Repeat("e", 64)}, Damaged: []string{dLlama, dOld}, Quarantined: []string{strings.Repeat("e", 64) + "-1764072000"},
			Removed: []string{dOld}, Invalidated: []string{dLlama}, OK: false,
		})},
		args: []string{"verify"},
		code: 1,
		stdout: []string{
			"checked 6 blobs (2.5 GiB) in 3.2s",
			"corrupt blob " + strings.Repeat("e", 64) + ": quarantined as " + strings.Repeat("e", 64) + "-1764072000",
			"removed damaged model " + dOld + " (no pod used it)",
			"invalidated damaged model " + dLlama + ": pods using it keep their mount; its next download repairs it",
		},
		stderrHas: []string{"modelcachectl verify: found 1 corrupt blob;"},
	}, {
		name:   "du table",
		routes: map[string]http.HandlerFunc{"GET /v1/du": reply(usage)},
		args:   []string{"du"},
		stdout: []string{
			"blobs            2.5 GiB     (6 blobs)",
			"models           3.0 GiB     (3 models, as presented to pods)",
			"saved by dedup   510.0 MiB",
			"downloading      300.0 MiB",
			"quarantined      1 blob",
			"filesystem       100.0 GiB   (40.0 GiB free)",
			"drained          no",
		},
		stderrNone: true,
	}, {
		name:   "du json",
		routes: map[string]http.HandlerFunc{"GET /v1/du": reply(usage)},
		args:   []string{"du", "--output=json"},
		check: func(t *testing.T, _ *fakeAPI, r result) {
			assertSameJSON(t, mustJSON(t, usage), []byte(r.stdout))
		},
		stderrNone: true,
	}})
}

func TestUsageAndConnection(t *testing.T) {
	runCases(t, []cliCase{{
		name:      "no command",
		routes:    map[string]http.HandlerFunc{},
		args:      nil,
		code:      2,
		stderrHas: []string{"Usage:\n  modelcachectl [--socket PATH] <command>", "  prefetch   download a model"},
	}, {
		name:      "unknown command",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"frobnicate"},
		code:      2,
		stderrHas: []string{`modelcachectl: unknown command "frobnicate"`, "Usage:\n  modelcachectl"},
	}, {
		name:      "unknown flag",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"evict", "--force", "x"},
		code:      2,
		stderrHas: []string{"flag provided but not defined: -force", "Usage: modelcachectl evict DIGEST|URI [--when-unused]"},
	}, {
		name:      "extra argument",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"gc", "now"},
		code:      2,
		stderrHas: []string{`unexpected argument "now"`},
	}, {
		name:      "command help",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"evict", "-h"},
		code:      0,
		stderrHas: []string{"Usage: modelcachectl evict", "--when-unused\n", "--socket PATH"},
	}, {
		name:      "help command",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"help", "verify"},
		code:      0,
		stdoutHas: []string{"Usage: modelcachectl verify", "Exits 1 when anything was corrupt"},
	}, {
		name:      "non-JSON error from an older server",
		routes:    map[string]http.HandlerFunc{},
		args:      []string{"du"},
		code:      1,
		stderrHas: []string{"GET /v1/du: HTTP 404: 404 page not found (is the node plugin older than modelcachectl?)"},
	}})

	t.Run("server unreachable", func(t *testing.T) {
		socket := filepath.Join(t.TempDir(), "admin.sock")
		r := runCLI(t, "", "--socket", socket, "ls")
		if r.code != 1 {
			t.Errorf("exit code %d, want 1", r.code)
		}
		for _, s := range []string{socket, "run modelcachectl as root on the node"} {
			if !strings.Contains(r.stderr, s) {
				t.Errorf("stderr lacks %q:\n%s", s, r.stderr)
			}
		}
	})
	t.Run("socket not listening", func(t *testing.T) {
		socket := filepath.Join(t.TempDir(), "admin.sock")
		if err := os.WriteFile(socket, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		r := runCLI(t, socket, "du")
		if r.code != 1 || !strings.Contains(r.stderr, socket) || !strings.Contains(r.stderr, "as root on the node") {
			t.Errorf("exit %d, stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("--socket after the command", func(t *testing.T) {
		f := startAPI(t, map[string]http.HandlerFunc{"GET /v1/trees": reply([]adminapi.Tree{})})
		r := runCLI(t, "/nonexistent.sock", "ls", "--socket", f.socket)
		if r.code != 0 || r.stdout != "no models cached on this node\n" {
			t.Errorf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
		}
	})
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// assertSameJSON fails unless want and got decode to the same value.
func assertSameJSON(t *testing.T, want, got []byte) {
	t.Helper()
	var w, g any
	if err := json.Unmarshal(want, &w); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(w, g) {
		t.Errorf("shapes differ:\nserver: %s\ncli:    %s", want, got)
	}
}
