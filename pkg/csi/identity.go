// Package csi serves the CSI Identity, Node and Controller services over
// gRPC. It validates requests, calls pkg/source, pkg/store, pkg/mount,
// pkg/state and pkg/kube, and maps their errors onto CSI codes in one place
// (errors.go). It does no I/O of its own.
package csi

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/modelcache/modelcache/pkg/names"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// DriverName is the CSI driver name (docs/design.md "Names").
const DriverName = names.DriverName

// Identity serves the CSI Identity service.
type Identity struct {
	csi.UnimplementedIdentityServer
	Version string
	// Controller says whether this process also serves the Controller service.
	Controller bool
	// Ready reports whether the plugin can serve; nil means always.
	Ready func() error
}

// GetPluginInfo implements csi.IdentityServer.
func (i *Identity) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: DriverName, VendorVersion: i.Version}, nil
}

// GetPluginCapabilities implements csi.IdentityServer.
func (i *Identity) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	resp := &csi.GetPluginCapabilitiesResponse{}
	if i.Controller {
		resp.Capabilities = append(resp.Capabilities, &csi.PluginCapability{
			Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{
				Type: csi.PluginCapability_Service_CONTROLLER_SERVICE,
			}},
		})
	}
	return resp, nil
}

// Probe implements csi.IdentityServer.
func (i *Identity) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	ready := true
	if i.Ready != nil && i.Ready() != nil {
		ready = false
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(ready)}, nil
}
