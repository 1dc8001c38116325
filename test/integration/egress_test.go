package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/modelcache/modelcache/test/testenv"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// metadataStandIn is a cloud metadata service handing out "credentials" on
// an address the driver must never reach for a tenant: 127.0.0.2, refused
// by the loopback rule as 169.254.169.254 is by the link-local one (the
// driver under test allows only 127.0.0.1, where MinIO is). It counts TCP
// connections, not requests, so a refused connect is told from a refused
// request.
type metadataStandIn struct {
	url      string
	accepted atomic.Int64
}

func startMetadataStandIn(t *testing.T) *metadataStandIn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatalf("listening on 127.0.0.2: %v", err)
	}
	m := &metadataStandIn{url: "http://" + ln.Addr().String() + "/latest/meta-data/iam/security-credentials/node-role"}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, `{"Code":"Success","AccessKeyId":"ASIANODEROLE","SecretAccessKey":"node-role-secret","Token":"node-role-token"}`)
	})}
	go srv.Serve(&acceptCounter{Listener: ln, n: &m.accepted})
	t.Cleanup(func() { srv.Close() })
	return m
}

type acceptCounter struct {
	net.Listener
	n *atomic.Int64
}

func (l *acceptCounter) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// redirectingEndpoint is an S3 endpoint on an allowed address that serves
// listings from MinIO and answers GETs of objects named like weights with
// a redirect to target: a tenant's endpoint leading the node elsewhere.
func redirectingEndpoint(t *testing.T, backend string, code int, target string) *httptest.Server {
	t.Helper()
	u, err := url.Parse(backend)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/weights.bin") {
			http.Redirect(w, r, target, code)
			return
		}
		rp.ServeHTTP(w, r) // the Host header stays the signed one
	}))
	t.Cleanup(srv.Close)
	return srv
}

// The "tenant configuration cannot reach the node" invariant at connect
// time: an endpoint that passes the check when the model is resolved, and
// then redirects the download to the metadata service, gets no connection
// there. The publish fails with PERMISSION_DENIED naming the host and the
// rule, and nothing is committed.
func TestEgress_RedirectToMetadata_RefusedNothingKept_RealMinIO(t *testing.T) {
	for _, code := range []int{http.StatusFound, http.StatusTemporaryRedirect} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			e := newEnv(t)
			files := randomModel(byte(code), map[string]int{"config.json": 300, "weights.bin": 2 << 20})
			e.upload("m", files)
			meta := startMetadataStandIn(t)
			front := redirectingEndpoint(t, minio.Endpoint, code, meta.url)

			target := e.target("pod-egress")
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			err := e.publish(ctx, "vol-egress", target, e.model("m"), testenv.RcloneSecret("mys3", front.URL))
			if status.Code(err) != codes.PermissionDenied {
				t.Fatalf("publish through a redirect to the metadata address = %v, want PERMISSION_DENIED", err)
			}
			msg := status.Convert(err).Message()
			for _, want := range []string{"127.0.0.2", "rule loopback", "--allow-endpoint"} {
				if !strings.Contains(msg, want) {
					t.Errorf("message %q does not name %q", msg, want)
				}
			}
			if n := meta.accepted.Load(); n != 0 {
				t.Errorf("%d connections reached the metadata stand-in, want none", n)
			}
			nothingKept(t, e, target, files["config.json"], files["weights.bin"])

			// The same model through an endpoint that does not redirect is
			// served: the refusal was the redirect's, not the model's.
			e.mustPublish("vol-egress", target, e.model("m"))
			sameFiles(t, target, files)
		})
	}
}
