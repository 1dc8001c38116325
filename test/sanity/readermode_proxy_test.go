package sanity

import (
	"errors"
	"net"
	"slices"
	"sync/atomic"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// readerModeProxy forwards csi-sanity's calls to the driver unchanged except
// for one thing: the access mode of CreateVolume and
// ValidateVolumeCapabilities. csi-sanity v5 hard-codes SINGLE_NODE_WRITER
// there with no option to change it, and a modelcache volume is a read-only
// model cache that refuses writer modes by design. The proxy turns writer
// modes into MULTI_NODE_READER_ONLY (what a ReadOnlyMany claim sends), so
// the specs that create volumes exercise the driver's real controller and
// node paths instead of being skipped. Node calls keep their access mode
// (kubelet itself sends SINGLE_NODE_WRITER for inline volumes); publishes
// gain the pod keys kubelet adds with podInfoOnMount, which csi-sanity
// cannot send and the driver requires.
type readerModeProxy struct {
	conn      *grpc.ClientConn
	srv       *grpc.Server
	rewritten atomic.Int64 // capabilities rewritten, so the test knows the proxy was in the path
}

// startReaderModeProxy listens on socket and forwards to the driver at target.
func startReaderModeProxy(socket, target string) (*readerModeProxy, error) {
	conn, err := grpc.NewClient("unix://"+target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		conn.Close()
		return nil, err
	}
	p := &readerModeProxy{conn: conn}
	p.srv = grpc.NewServer(grpc.ForceServerCodec(rawCodec{}), grpc.UnknownServiceHandler(p.forward))
	go func() { _ = p.srv.Serve(l) }()
	return p, nil
}

// Stop stops the proxy and closes its connection to the driver.
func (p *readerModeProxy) Stop() {
	p.srv.Stop()
	p.conn.Close()
}

func (p *readerModeProxy) forward(_ any, ss grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(ss)
	if !ok {
		return status.Error(codes.Internal, "proxy: no method in stream")
	}
	var in []byte
	if err := ss.RecvMsg(&in); err != nil {
		return err
	}
	in, err := p.rewrite(method, in)
	if err != nil {
		return status.Errorf(codes.Internal, "proxy: %v", err)
	}
	var out []byte
	if err := p.conn.Invoke(ss.Context(), method, &in, &out, grpc.ForceCodec(rawCodec{})); err != nil {
		return err
	}
	return ss.SendMsg(&out)
}

func (p *readerModeProxy) rewrite(method string, in []byte) ([]byte, error) {
	if method == csi.Node_NodePublishVolume_FullMethodName {
		return addPodInfo(in)
	}
	var msg interface {
		proto.Message
		GetVolumeCapabilities() []*csi.VolumeCapability
	}
	switch method {
	case csi.Controller_CreateVolume_FullMethodName:
		msg = &csi.CreateVolumeRequest{}
	case csi.Controller_ValidateVolumeCapabilities_FullMethodName:
		msg = &csi.ValidateVolumeCapabilitiesRequest{}
	default:
		return in, nil
	}
	if err := proto.Unmarshal(in, msg); err != nil {
		return nil, err
	}
	for _, c := range msg.GetVolumeCapabilities() {
		if m := c.GetAccessMode(); m != nil && slices.Contains(writerModes, m.Mode) {
			m.Mode = csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY
			p.rewritten.Add(1)
		}
	}
	return proto.Marshal(msg)
}

// addPodInfo adds the pod keys kubelet sends when the CSIDriver has
// podInfoOnMount (the driver requires them); csi-sanity sends none.
func addPodInfo(in []byte) ([]byte, error) {
	var req csi.NodePublishVolumeRequest
	if err := proto.Unmarshal(in, &req); err != nil {
		return nil, err
	}
	if req.VolumeContext == nil {
		req.VolumeContext = map[string]string{}
	}
	for k, v := range map[string]string{
		"csi.storage.k8s.io/pod.name":      "csi-sanity",
		"csi.storage.k8s.io/pod.namespace": "default",
		"csi.storage.k8s.io/pod.uid":       "5a1e0000-0000-4000-8000-000000000001",
	} {
		if _, ok := req.VolumeContext[k]; !ok {
			req.VolumeContext[k] = v
		}
	}
	return proto.Marshal(&req)
}

var writerModes = []csi.VolumeCapability_AccessMode_Mode{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER,
	csi.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER,
	csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER,
}

// rawCodec moves messages as bytes so the proxy needs no knowledge of the
// services it forwards.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, errors.New("rawCodec: not *[]byte")
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return errors.New("rawCodec: not *[]byte")
	}
	*b = slices.Clone(data)
	return nil
}

func (rawCodec) Name() string { return "proto" }
