package csi

import (
	"context"
	"errors"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

func TestGetPluginInfo(t *testing.T) {
	resp, err := (&Identity{Version: "v1.2.3"}).GetPluginInfo(context.Background(), &csi.GetPluginInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetName() != "modelcache.csi.dev" || resp.GetVendorVersion() != "v1.2.3" {
		t.Errorf("GetPluginInfo = %q %q, want modelcache.csi.dev v1.2.3", resp.GetName(), resp.GetVendorVersion())
	}
}

func TestGetPluginCapabilities(t *testing.T) {
	for _, controller := range []bool{false, true} {
		resp, err := (&Identity{Controller: controller}).GetPluginCapabilities(context.Background(), &csi.GetPluginCapabilitiesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		has := false
		for _, c := range resp.GetCapabilities() {
			if c.GetService().GetType() == csi.PluginCapability_Service_CONTROLLER_SERVICE {
				has = true
			}
		}
		if has != controller {
			t.Errorf("Controller=%v: CONTROLLER_SERVICE advertised = %v", controller, has)
		}
	}
}

func TestProbe(t *testing.T) {
	tests := []struct {
		name  string
		ready func() error
		want  bool
	}{
		{"no readiness check", nil, true},
		{"ready", func() error { return nil }, true},
		{"not ready", func() error { return errors.New("state database not open") }, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := (&Identity{Ready: tc.ready}).Probe(context.Background(), &csi.ProbeRequest{})
			if err != nil {
				t.Fatalf("Probe: %v", err)
			}
			if resp.GetReady() == nil || resp.GetReady().GetValue() != tc.want {
				t.Errorf("Probe ready = %v, want %v", resp.GetReady(), tc.want)
			}
		})
	}
}
