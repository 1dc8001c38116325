package csi

import (
	"context"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"github.com/modelcache/modelcache/pkg/klogtest"
	"github.com/modelcache/modelcache/pkg/store/storetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// socketDir returns a short directory for unix sockets: t.TempDir's paths
// can exceed the 108-byte limit of a socket address.
func socketDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mccsi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestListenRejectsOtherEndpoints(t *testing.T) {
	for _, ep := range []string{
		"",
		"/csi/csi.sock",
		"csi.sock",
		"tcp://127.0.0.1:10000",
		"http://localhost/csi.sock",
		"unix://",
		"unix://csi.sock", // a host, not a path
		"unix",
		"://bad",
	} {
		t.Run(ep, func(t *testing.T) {
			l, err := Listen(ep)
			if err == nil {
				l.Close()
				t.Fatalf("Listen(%q) succeeded, want an error", ep)
			}
			if !strings.Contains(err.Error(), "unix:///") {
				t.Errorf("error %q does not show the expected form", err)
			}
		})
	}
}

func TestListenReplacesStaleSocket(t *testing.T) {
	// The socket directory does not exist yet: Listen creates it.
	sock := filepath.Join(socketDir(t), "csi", "csi.sock")
	endpoint := "unix://" + sock

	// A previous run that died leaves its socket file behind.
	old, err := Listen(endpoint)
	if err != nil {
		t.Fatalf("first Listen: %v", err)
	}
	old.(*net.UnixListener).SetUnlinkOnClose(false)
	old.Close()
	fi, err := os.Lstat(sock)
	if err != nil || fi.Mode().Type() != fs.ModeSocket {
		t.Fatalf("no stale socket to replace: %v, %v", fi, err)
	}
	if _, err := net.Dial("unix", sock); err == nil {
		t.Fatal("stale socket still accepts connections")
	}

	l, err := Listen(endpoint)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	defer l.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dialing the new socket: %v", err)
	}
	c.Close()
	if err := recv(t, accepted, "Accept"); err != nil {
		t.Fatalf("Accept: %v", err)
	}
}

// captureKlog sends klog's output at verbosity v to a buffer for one test.
func captureKlog(t *testing.T, v int) *klogtest.Capture { return klogtest.Start(t, v) }

// loggedRequest is a publish request as kubelet sends it, secrets included.
func loggedRequest() *csi.NodePublishVolumeRequest {
	return publishReq("vol-logged", "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/model/mount", testURI, nil)
}

func wantNoSecrets(t *testing.T, out string) {
	t.Helper()
	for _, s := range secretValues {
		if strings.Contains(out, s) {
			t.Fatalf("log output contains secret %q:\n%s", s, out)
		}
	}
}

func TestLogCallsStripsSecrets(t *testing.T) {
	tests := []struct {
		v          int
		wantReq    bool // the request itself is logged
		wantFailed bool // the failure is logged
	}{
		{0, false, false},
		{2, false, true},
		{5, true, true},
		{10, true, true},
	}
	for _, tc := range tests {
		t.Run("v="+strconv.Itoa(tc.v), func(t *testing.T) {
			out := captureKlog(t, tc.v)
			req := loggedRequest()
			info := &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Node/NodePublishVolume"}
			handler := func(_ context.Context, got any) (any, error) {
				// The handler still gets the secrets: only the log copy is stripped.
				if r := got.(*csi.NodePublishVolumeRequest); r.GetSecrets()["RCLONE_CONFIG_MYS3_SECRET_ACCESS_KEY"] != secretKey {
					t.Errorf("handler got secrets %v, want them intact", r.GetSecrets())
				}
				return nil, status.Error(codes.NotFound, "no such model at the remote")
			}
			_, err := logCalls(context.Background(), req, info, handler)
			if status.Code(err) != codes.NotFound {
				t.Fatalf("logCalls changed the handler's error: %v", err)
			}
			s := out.String()
			wantNoSecrets(t, s)
			for want, ok := range map[string]bool{
				"vol-logged":        tc.wantReq,
				testURI:             tc.wantReq,
				"model-server-0":    tc.wantReq,
				"***stripped***":    tc.wantReq,
				"call failed":       tc.wantFailed,
				"NodePublishVolume": tc.wantReq || tc.wantFailed,
			} {
				if strings.Contains(s, want) != ok {
					t.Errorf("log output contains %q = %v, want %v:\n%s", want, !ok, ok, s)
				}
			}
		})
	}
}

func TestStripSecretsOnPublishRequest(t *testing.T) {
	s := protosanitizer.StripSecrets(loggedRequest()).String()
	wantNoSecrets(t, s)
	for _, want := range []string{"vol-logged", testURI, "csi.storage.k8s.io/pod.name", "***stripped***"} {
		if !strings.Contains(s, want) {
			t.Errorf("sanitized request %s lacks %q", s, want)
		}
	}
}

// TestServeOverUnixSocket runs the gRPC server the driver runs, on a unix
// socket, and checks what kubelet sees and what the log holds.
func TestServeOverUnixSocket(t *testing.T) {
	out := captureKlog(t, 10)
	h := newHarness(t)
	l, err := Listen("unix://" + filepath.Join(socketDir(t), "csi.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(&Identity{Version: "test"}, h.node, nil)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, srv, l, waitLimit) }()
	defer func() {
		cancel()
		if err := recv(t, served, "Serve to return"); err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()

	conn, err := grpc.NewClient("unix://"+l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rpcCtx, rpcCancel := context.WithTimeout(context.Background(), waitLimit)
	defer rpcCancel()

	info, err := csi.NewIdentityClient(conn).GetPluginInfo(rpcCtx, &csi.GetPluginInfoRequest{})
	if err != nil || info.GetName() != DriverName {
		t.Fatalf("GetPluginInfo = %v, %v", info, err)
	}
	node := csi.NewNodeClient(conn)
	target := h.target("pod-a")
	if _, err := node.NodePublishVolume(rpcCtx, publishReq("vol-a", target, testURI, nil)); err != nil {
		t.Fatalf("NodePublishVolume over gRPC: %v", err)
	}
	h.wantMounted(target, storetest.TreeDigestOf(irisFiles()))
	_, err = node.NodePublishVolume(rpcCtx, publishReq("vol-b", h.target("pod-b"), "mys3:models/missing", nil))
	wantCode(t, err, codes.NotFound, "mys3:models/missing")

	// No controller service was registered.
	_, err = csi.NewControllerClient(conn).ControllerGetCapabilities(rpcCtx, &csi.ControllerGetCapabilitiesRequest{})
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("Controller call on a node-only server = %v, want Unimplemented", err)
	}

	s := out.String()
	wantNoSecrets(t, s)
	for _, want := range []string{"vol-a", "vol-b", "***stripped***", "call failed", "published"} {
		if !strings.Contains(s, want) {
			t.Errorf("log output lacks %q:\n%s", want, s)
		}
	}
}

func TestSanitizeRedactsTokenLikeValues(t *testing.T) {
	tests := []struct {
		name   string
		req    any
		secret string
	}{
		{"user info in modelUri", &csi.NodePublishVolumeRequest{VolumeContext: map[string]string{"modelUri": "https://admin:hunter2-pw@models.example/m"}}, "hunter2-pw"},
		{"signed query", &csi.NodePublishVolumeRequest{VolumeContext: map[string]string{"modelUri": "https://models.example/m?X-Amz-Signature=abcd1234sig"}}, "abcd1234sig"},
		{"token parameter", &csi.CreateVolumeRequest{Parameters: map[string]string{"modelUri": "https://h/m?token=tok-98765"}}, "tok-98765"},
		{"validate context", &csi.ValidateVolumeCapabilitiesRequest{VolumeContext: map[string]string{"modelUri": "https://u:pw-5555@h/m"}}, "pw-5555"},
		{"secrets field", &csi.NodePublishVolumeRequest{Secrets: map[string]string{"AWS_SECRET_ACCESS_KEY": "aws-secret-777"}}, "aws-secret-777"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := sanitize(tt.req).String()
			if strings.Contains(got, tt.secret) {
				t.Fatalf("sanitized request %s still holds %q", got, tt.secret)
			}
		})
	}
	// The request itself is left as it was: only the logged copy is redacted.
	req := &csi.NodePublishVolumeRequest{VolumeContext: map[string]string{"modelUri": "https://u:pw@h/m", "pullPolicy": "Always"}}
	out := sanitize(req).String()
	if req.VolumeContext["modelUri"] != "https://u:pw@h/m" || !strings.Contains(out, "Always") {
		t.Fatalf("sanitize changed the request or dropped harmless values: %v / %s", req.VolumeContext, out)
	}
}
