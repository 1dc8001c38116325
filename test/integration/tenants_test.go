package integration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The "authorized cache hits" invariant against real MinIO users: a cache hit is served only to
// credentials that can read the model themselves, checked with metadata
// requests (no object body is downloaded again), and recorded so the next
// publish with the same credentials asks the remote nothing.

// tenant is a MinIO user with its own policy and node-publish secret.
type tenant struct {
	name, user, secret string
	secrets            map[string]string
}

// addTenant creates a MinIO user with policyJSON whose secret points the
// driver at endpoint (the test's front), and removes it when the test ends.
func (e *env) addTenant(name, policyJSON, endpoint string) tenant {
	e.t.Helper()
	tn := tenant{name: name, user: name + "-" + randHex(4), secret: "tenant-secret-" + randHex(12)}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := testenv.AddUser(ctx, minio.Endpoint, tn.user, tn.secret, policyJSON); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if err := testenv.RemoveUser(context.Background(), minio.Endpoint, tn.user); err != nil {
			e.t.Logf("cleanup: %v", err)
		}
	})
	tn.secrets = testenv.RcloneSecret("mys3", endpoint)
	tn.secrets["RCLONE_CONFIG_MYS3_ACCESS_KEY_ID"] = tn.user
	tn.secrets["RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY"] = tn.secret
	return tn
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// tenantPublish publishes prefix at target with tn's secret and returns
// the error with its message checked for every tenant's secret.
func (e *env) tenantPublish(ctx context.Context, tn tenant, vol, target, prefix string, all []tenant) error {
	err := e.publish(ctx, vol, target, e.model(prefix), tn.secrets)
	if err != nil {
		msg := status.Convert(err).Message()
		for _, o := range all {
			if strings.Contains(msg, o.secret) {
				e.t.Errorf("the answer to %s leaks %s's secret key: %q", tn.name, o.name, msg)
			}
		}
	}
	return err
}

func (e *env) mustTenantPublish(tn tenant, vol, target, prefix string, all []tenant) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := e.tenantPublish(ctx, tn, vol, target, prefix, all); err != nil {
		e.t.Fatalf("tenant %s publishing %s: %v", tn.name, prefix, err)
	}
}

// wantDenied publishes as tn and wants PERMISSION_DENIED, no mount and no
// object body served by the remote.
func (e *env) wantDenied(tn tenant, vol, target, prefix string, all []tenant) {
	e.t.Helper()
	gets, bytes := e.proxy.ObjectGets(), e.proxy.ObjectBytes()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err := e.tenantPublish(ctx, tn, vol, target, prefix, all)
	wantCode(e.t, err, codes.PermissionDenied)
	e.notMounted(target)
	if d := e.proxy.ObjectGets() - gets; d != 0 {
		e.t.Fatalf("a refused publish by %s cost %d object GETs", tn.name, d)
	}
	if d := e.proxy.ObjectBytes() - bytes; d != 0 {
		e.t.Fatalf("a refused publish by %s cost %d object bytes", tn.name, d)
	}
}

func (e *env) notMounted(target string) {
	e.t.Helper()
	if opts := mountInfo(e.t, target); opts != "" {
		e.t.Fatalf("%s is mounted (%s) for a refused publish", target, opts)
	}
	if names := entries(e.t, target); len(names) != 0 {
		e.t.Fatalf("%s holds %v for a refused publish", target, names)
	}
}

// noTenantSecretsInLogs checks the "secrets stay in memory" invariant for every tenant: the driver runs
// at -v=10 and no log line may hold a tenant's secret or access key.
func (e *env) noTenantSecretsInLogs(all []tenant) {
	e.t.Helper()
	logs := e.driver.Logs()
	for _, tn := range all {
		if strings.Contains(logs, tn.secret) {
			e.t.Errorf("driver logs hold tenant %s's secret access key", tn.name)
		}
		if strings.Contains(logs, tn.user) {
			e.t.Errorf("driver logs hold tenant %s's access key id", tn.name)
		}
	}
}

// front sits between the driver and the test's counting proxy. It records
// every request by the MinIO user that signed it (the counting proxy sees
// object GETs only, not HEADs or listings), and can hold object downloads
// until released, keeping a download in flight for as long as a test needs.
type front struct {
	URL string
	srv *httptest.Server

	mu      sync.Mutex
	reqs    []frontRequest
	held    chan struct{} // non-nil: object GETs wait until it is closed
	waiting int           // object GETs waiting on held
}

type frontRequest struct {
	user, method string
	object       bool // on an object, not the bucket
	list         bool
	status       int
}

func startFront(t *testing.T, upstream string) *front {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1
	// Requests the driver cancels (the HEADs still running when one is
	// refused) are expected here; the proxy would log each one.
	rp.ErrorLog = log.New(io.Discard, "", 0)
	f := &front{}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		object := strings.Contains(strings.Trim(r.URL.Path, "/"), "/")
		req := frontRequest{user: signer(r), method: r.Method, object: object,
			list: r.Method == http.MethodGet && !object && r.URL.Query().Has("list-type")}
		if r.Method == http.MethodGet && object {
			f.mu.Lock()
			held := f.held
			if held != nil {
				f.waiting++
			}
			f.mu.Unlock()
			if held != nil {
				select {
				case <-held:
				case <-r.Context().Done():
				}
				f.mu.Lock()
				f.waiting--
				f.mu.Unlock()
			}
		}
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		rp.ServeHTTP(sw, r)
		req.status = sw.status
		f.mu.Lock()
		f.reqs = append(f.reqs, req)
		f.mu.Unlock()
	}))
	t.Cleanup(func() { f.release(); f.srv.Close() })
	f.URL = f.srv.URL
	return f
}

// signer is the access key of a SigV4 Authorization header.
func signer(r *http.Request) string {
	_, cred, ok := strings.Cut(r.Header.Get("Authorization"), "Credential=")
	if !ok {
		return ""
	}
	user, _, _ := strings.Cut(cred, "/")
	return user
}

// hold makes object GETs wait until release.
func (f *front) hold() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.held == nil {
		f.held = make(chan struct{})
	}
}

func (f *front) release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.held != nil {
		close(f.held)
		f.held = nil
	}
}

func (f *front) waitingGets() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.waiting
}

// count returns how many finished requests by user match.
func (f *front) count(user string, match func(frontRequest) bool) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, r := range f.reqs {
		if r.user == user && match(r) {
			n++
		}
	}
	return n
}

func anyRequest(frontRequest) bool { return true }

func heads(r frontRequest) bool { return r.method == http.MethodHead && r.object }

func objectGets(r frontRequest) bool { return r.method == http.MethodGet && r.object }

func listsWith(status int) func(frontRequest) bool {
	return func(r frontRequest) bool { return r.list && r.status == status }
}

func headsWith(status int) func(frontRequest) bool {
	return func(r frontRequest) bool { return heads(r) && r.status == status }
}

type statusWriter struct {
	http.ResponseWriter
	status int
	wrote  bool
}

func (s *statusWriter) WriteHeader(code int) {
	if !s.wrote {
		s.status, s.wrote = code, true
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *statusWriter) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// poll waits until cond holds, failing after a minute.
func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// One node, one private model, four tenants: the owner downloads it once;
// a tenant without access, and one that may list but not read, are refused
// before any mount; a tenant with read access of its own is served from the
// cache after a metadata-only check, which is recorded, so its next publish
// contacts the remote not at all; the record covers that model only.
func TestTenant_CacheHitIsAuthorized_RealMinIO(t *testing.T) {
	e := newEnv(t)
	f := startFront(t, e.proxy.URL)
	files := randomModel(40, map[string]int{"w.bin": 1 << 20, "config.json": 200, "tok/vocab.json": 4 << 10})
	other := randomModel(41, map[string]int{"w.bin": 64 << 10})
	e.upload("private", files)
	e.upload("other", other)

	a := e.addTenant("a", testenv.ReadOnlyPolicy(e.bucket, ""), f.URL)
	b := e.addTenant("b", testenv.NoAccessPolicy(), f.URL)
	b2 := e.addTenant("b2", testenv.ReadOnlyPolicy(e.bucket, "private"), f.URL)
	c := e.addTenant("c", testenv.ListOnlyPolicy(e.bucket, ""), f.URL)
	all := []tenant{a, b, b2, c}

	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"a/owner downloads once", func(t *testing.T) {
			e.mustTenantPublish(a, "vol-a", e.target("pod-a"), "private", all)
			sameFiles(t, e.target("pod-a"), files)
			if got := e.proxy.ObjectGets(); got != int64(len(files)) {
				t.Fatalf("the remote served %d object GETs, want %d (one per file)", got, len(files))
			}
			if got, want := e.proxy.ObjectBytes(), total(files); got != want {
				t.Fatalf("the remote served %d object bytes, want one copy of the model (%d)", got, want)
			}
		}},
		{"b/no access is refused", func(t *testing.T) {
			e.wantDenied(b, "vol-b", e.target("pod-b"), "private", all)
			if n := f.count(b.user, objectGets); n != 0 {
				t.Fatalf("tenant b sent %d object GETs", n)
			}
		}},
		{"b2/read access is served from the cache, checked by HEADs only", func(t *testing.T) {
			gets, bytes := e.proxy.ObjectGets(), e.proxy.ObjectBytes()
			e.mustTenantPublish(b2, "vol-b2", e.target("pod-b2"), "private", all)
			sameFiles(t, e.target("pod-b2"), files)
			if d := e.proxy.ObjectGets() - gets; d != 0 {
				t.Fatalf("a cache hit for b2 cost %d object GETs", d)
			}
			if d := e.proxy.ObjectBytes() - bytes; d != 0 {
				t.Fatalf("a cache hit for b2 cost %d object bytes", d)
			}
			if n := f.count(b2.user, headsWith(http.StatusOK)); n < len(files) {
				t.Fatalf("b2's credentials were checked with %d successful HEADs, want at least one per file (%d)", n, len(files))
			}
		}},
		{"b2/second publish is recorded: no request at all", func(t *testing.T) {
			before := f.count(b2.user, anyRequest)
			gets := e.proxy.ObjectGets()
			e.mustTenantPublish(b2, "vol-b2-again", e.target("pod-b2-again"), "private", all)
			sameFiles(t, e.target("pod-b2-again"), files)
			if d := f.count(b2.user, anyRequest) - before; d != 0 {
				t.Fatalf("b2's second publish sent %d requests to the remote, want none (its check was recorded)", d)
			}
			if d := e.proxy.ObjectGets() - gets; d != 0 {
				t.Fatalf("b2's second publish cost %d object GETs", d)
			}
		}},
		{"c/list without read is refused", func(t *testing.T) {
			e.wantDenied(c, "vol-c", e.target("pod-c"), "private", all)
			// The listing was allowed, so the refusal came from the HEADs:
			// the path a cache hit takes, not the one a failed listing takes.
			if n := f.count(c.user, listsWith(http.StatusOK)); n == 0 {
				t.Fatalf("tenant c's listing was not allowed; the test proves nothing about the HEAD check")
			}
			if n := f.count(c.user, headsWith(http.StatusForbidden)); n == 0 {
				t.Fatalf("tenant c was refused without a HEAD being refused")
			}
			if n := f.count(c.user, objectGets); n != 0 {
				t.Fatalf("tenant c sent %d object GETs", n)
			}
		}},
		{"b2/record covers one model only", func(t *testing.T) {
			e.mustTenantPublish(a, "vol-a-other", e.target("pod-a-other"), "other", all)
			e.wantDenied(b2, "vol-b2-other", e.target("pod-b2-other"), "other", all)
		}},
	}
	for _, s := range steps {
		ok := t.Run(s.name, func(t *testing.T) {
			s.run(t)
			e.noTenantSecretsInLogs(all)
		})
		if !ok {
			return // later steps build on this one
		}
	}
	for _, p := range []string{"a", "b2", "b2-again", "a-other"} {
		e.mustUnpublish("vol-"+p, e.target("pod-"+p))
	}
}

// Tenants that arrive while the owner's download is in flight: one without
// access is refused at once; one that may list but not read joins the
// download (it is answered "still downloading") and is refused when it
// ends; one with read access joins and is served. The remote serves the
// model's bodies once, to the owner only. The front holds every object GET
// until the test releases it, so the download cannot end early.
func TestTenant_JoinersOfRunningDownload_Authorized_RealMinIO(t *testing.T) {
	e := newEnv(t)
	f := startFront(t, e.proxy.URL)
	files := randomModel(42, map[string]int{"w.bin": 2 << 20, "config.json": 300})
	e.upload("private", files)

	a := e.addTenant("a", testenv.ReadOnlyPolicy(e.bucket, ""), f.URL)
	b := e.addTenant("b", testenv.NoAccessPolicy(), f.URL)
	b2 := e.addTenant("b2", testenv.ReadOnlyPolicy(e.bucket, "private"), f.URL)
	c := e.addTenant("c", testenv.ListOnlyPolicy(e.bucket, ""), f.URL)
	all := []tenant{a, b, b2, c}

	f.hold()
	start := func(tn tenant, vol, pod string) <-chan error {
		ch := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			ch <- e.tenantPublish(ctx, tn, vol, e.target(pod), "private", all)
		}()
		return ch
	}
	aDone := start(a, "vol-a", "pod-a")
	poll(t, "a's download asks for object bodies", func() bool { return f.waitingGets() > 0 })

	t.Run("b/no access is refused while the download runs", func(t *testing.T) {
		e.wantDenied(b, "vol-b", e.target("pod-b"), "private", all)
		if f.waitingGets() == 0 {
			t.Fatalf("a's download is no longer held; the test proves nothing")
		}
	})

	t.Run("c/list-only joins the running download", func(t *testing.T) {
		// Object GETs are held, so the download cannot end while c waits: c
		// reaching "still downloading" proves it listed and joined.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := e.tenantPublish(ctx, c, "vol-c", e.target("pod-c"), "private", all)
		wantCode(t, err, codes.Aborted)
		e.notMounted(e.target("pod-c"))
	})

	cDone := start(c, "vol-c", "pod-c")
	b2Done := start(b2, "vol-b2", "pod-b2")
	poll(t, "c and b2 have listed the model", func() bool {
		return f.count(c.user, listsWith(http.StatusOK)) >= 2 && f.count(b2.user, listsWith(http.StatusOK)) >= 1
	})
	if n := f.count(a.user, objectGets); n != 0 {
		t.Fatalf("%d object GETs finished while they were held", n)
	}
	f.release()

	if err := <-aDone; err != nil {
		t.Fatalf("owner a: %v", err)
	}
	sameFiles(t, e.target("pod-a"), files)
	wantCode(t, <-cDone, codes.PermissionDenied)
	e.notMounted(e.target("pod-c"))
	if n := f.count(c.user, headsWith(http.StatusForbidden)); n == 0 {
		t.Fatalf("tenant c was refused without a HEAD being refused")
	}
	if err := <-b2Done; err != nil {
		t.Fatalf("tenant b2 with read access: %v", err)
	}
	sameFiles(t, e.target("pod-b2"), files)

	if got := e.proxy.ObjectGets(); got != int64(len(files)) {
		t.Fatalf("the remote served %d object GETs, want %d: one download, by the owner", got, len(files))
	}
	if got, want := e.proxy.ObjectBytes(), total(files); got != want {
		t.Fatalf("the remote served %d object bytes, want one copy (%d)", got, want)
	}
	for _, tn := range []tenant{b, b2, c} {
		if n := f.count(tn.user, objectGets); n != 0 {
			t.Fatalf("tenant %s sent %d object GETs", tn.name, n)
		}
	}
	e.noTenantSecretsInLogs(all)
	e.mustUnpublish("vol-a", e.target("pod-a"))
	e.mustUnpublish("vol-b2", e.target("pod-b2"))
}

// --verify-credentials=Always: a recorded check is not trusted; every
// publish stats the objects again (still no object body), so access revoked
// at the remote is refused at the next publish.
func TestTenant_VerifyAlways_ChecksEveryPublish_RealMinIO(t *testing.T) {
	e := newEnv(t)
	e.driver.Stop()
	e.start("--verify-credentials=Always")
	f := startFront(t, e.proxy.URL)
	files := randomModel(43, map[string]int{"w.bin": 512 << 10, "config.json": 100})
	e.upload("private", files)

	a := e.addTenant("a", testenv.ReadOnlyPolicy(e.bucket, ""), f.URL)
	b2 := e.addTenant("b2", testenv.ReadOnlyPolicy(e.bucket, "private"), f.URL)
	all := []tenant{a, b2}

	e.mustTenantPublish(a, "vol-a", e.target("pod-a"), "private", all)
	e.mustTenantPublish(b2, "vol-b2", e.target("pod-b2"), "private", all)
	gets := e.proxy.ObjectGets()
	before := f.count(b2.user, headsWith(http.StatusOK))
	if before < len(files) {
		t.Fatalf("b2's first publish sent %d successful HEADs, want at least %d", before, len(files))
	}

	e.mustTenantPublish(b2, "vol-b2-again", e.target("pod-b2-again"), "private", all)
	sameFiles(t, e.target("pod-b2-again"), files)
	if d := f.count(b2.user, headsWith(http.StatusOK)) - before; d < len(files) {
		t.Fatalf("b2's second publish under Always sent %d successful HEADs, want at least one per file (%d)", d, len(files))
	}
	if d := e.proxy.ObjectGets() - gets; d != 0 {
		t.Fatalf("b2's second publish cost %d object GETs", d)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := testenv.SetUserPolicy(ctx, minio.Endpoint, b2.user, testenv.ListOnlyPolicy(e.bucket, "")); err != nil {
		t.Fatal(err)
	}
	e.wantDenied(b2, "vol-b2-revoked", e.target("pod-b2-revoked"), "private", all)
	e.noTenantSecretsInLogs(all)
	for _, p := range []string{"a", "b2", "b2-again"} {
		e.mustUnpublish("vol-"+p, e.target("pod-"+p))
	}
}
