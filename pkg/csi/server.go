package csi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"k8s.io/klog/v2"
)

// Listen opens a unix socket endpoint ("unix:///csi/csi.sock"), replacing a
// stale socket left by a previous run.
func Listen(endpoint string) (net.Listener, error) {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "unix" || u.Path == "" {
		return nil, fmt.Errorf("endpoint %q must look like unix:///path/to/csi.sock", endpoint)
	}
	if err := os.MkdirAll(filepath.Dir(u.Path), 0o750); err != nil {
		return nil, fmt.Errorf("creating socket directory: %w", err)
	}
	if err := os.Remove(u.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket: %w", err)
	}
	l, err := net.Listen("unix", u.Path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", u.Path, err)
	}
	return l, nil
}

// NewServer returns a gRPC server with the given services registered. nil
// services are left out.
func NewServer(ids csi.IdentityServer, node csi.NodeServer, ctrl csi.ControllerServer) *grpc.Server {
	s := grpc.NewServer(grpc.UnaryInterceptor(logCalls))
	csi.RegisterIdentityServer(s, ids)
	if node != nil {
		csi.RegisterNodeServer(s, node)
	}
	if ctrl != nil {
		csi.RegisterControllerServer(s, ctrl)
	}
	return s
}

// Serve runs s on l until ctx ends, then stops gracefully, giving in-flight
// calls up to grace to finish.
func Serve(ctx context.Context, s *grpc.Server, l net.Listener, grace time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	done := make(chan struct{})
	go func() { s.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		s.Stop()
	}
	return nil
}

// logCalls logs every call with secrets stripped (the "secrets stay in memory" invariant): requests are
// only ever printed through protosanitizer.
func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	klog.V(5).InfoS("call", "method", info.FullMethod, "request", sanitize(req))
	resp, err := handler(ctx, req)
	if err != nil {
		klog.V(2).InfoS("call failed", "method", info.FullMethod, "code", status.Code(err), "err", err, "took", time.Since(start))
	} else {
		klog.V(4).InfoS("call done", "method", info.FullMethod, "took", time.Since(start))
	}
	return resp, err
}

// tokenLike matches values that carry a credential even though they are not
// secrets fields: user:password@ in a URL, or a signed or tokened query.
var tokenLike = regexp.MustCompile(`(?i)://[^/@\s]*:[^/@\s]*@|[?&](x-amz-signature|x-amz-credential|sig|signature|token|access_token|api_key|key)=`)

// sanitize strips the secrets fields (protosanitizer) and redacts
// token-like volume_context and parameter values, which validation would
// refuse but which must not reach the log on their way there.
func sanitize(req any) fmt.Stringer {
	msg, ok := req.(proto.Message)
	if !ok {
		return protosanitizer.StripSecrets(req)
	}
	msg = proto.Clone(msg)
	switch r := msg.(type) {
	case *csi.NodePublishVolumeRequest:
		redact(r.VolumeContext)
	case *csi.CreateVolumeRequest:
		redact(r.Parameters)
	case *csi.ValidateVolumeCapabilitiesRequest:
		redact(r.VolumeContext)
		redact(r.Parameters)
	}
	return protosanitizer.StripSecrets(msg)
}

func redact(m map[string]string) {
	for k, v := range m {
		if tokenLike.MatchString(v) {
			m[k] = "***redacted***"
		}
	}
}
