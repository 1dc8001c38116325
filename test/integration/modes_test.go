package integration

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Each --mode serves exactly its services on the socket and advertises the
// Controller service only when it serves it: the external-provisioner and
// kubelet decide what to call from GetPluginCapabilities.
func TestModes_ServeAndAdvertiseTheirServices_RealBinary(t *testing.T) {
	for _, c := range []struct {
		mode             string
		node, controller bool
	}{
		{"node", true, false},
		{"controller", false, true},
		{"all", true, true},
	} {
		t.Run(c.mode, func(t *testing.T) {
			e := newEnv(t)
			e.driver.Stop()
			e.start("--mode=" + c.mode)
			ctx := context.Background()

			caps, err := e.driver.Identity.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
			if err != nil {
				t.Fatal(err)
			}
			advertised := false
			for _, pc := range caps.GetCapabilities() {
				if pc.GetService().GetType() == csi.PluginCapability_Service_CONTROLLER_SERVICE {
					advertised = true
				}
			}
			if advertised != c.controller {
				t.Fatalf("CONTROLLER_SERVICE advertised = %v, want %v", advertised, c.controller)
			}

			_, err = e.driver.Controller.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
			if served := status.Code(err) != codes.Unimplemented; served != c.controller || (served && err != nil) {
				t.Fatalf("ControllerGetCapabilities: %v; want served=%v", err, c.controller)
			}
			_, err = e.driver.Node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
			if served := status.Code(err) != codes.Unimplemented; served != c.node || (served && err != nil) {
				t.Fatalf("NodeGetInfo: %v; want served=%v", err, c.node)
			}
		})
	}
}
