package main

import "testing"

// TestDefaultMinFreeAboveKubeletEviction pins --min-free's default above
// kubelet's default hard eviction thresholds, with a margin: at the
// threshold itself a full cache would put the node into DiskPressure.
func TestDefaultMinFreeAboveKubeletEviction(t *testing.T) {
	const margin = 0.05
	b, err := parseBudget("", defaultMinFree)
	if err != nil {
		t.Fatalf("parsing the default --min-free=%s: %v", defaultMinFree, err)
	}
	if b.MinFreeBytes != 0 {
		t.Fatalf("default --min-free=%s is absolute bytes; kubelet's thresholds are fractions of the filesystem, so it must be a percentage", defaultMinFree)
	}
	for _, tc := range []struct {
		signal    string
		threshold float64
	}{
		{"nodefs.available", kubeletNodefsAvailable},
		{"imagefs.available", kubeletImagefsAvailable},
	} {
		if b.MinFreeFraction < tc.threshold+margin {
			t.Errorf("default --min-free=%s keeps %.0f%% free, want at least %.0f%%: kubelet evicts pods at %s<%.0f%%", defaultMinFree, b.MinFreeFraction*100, (tc.threshold+margin)*100, tc.signal, tc.threshold*100)
		}
	}
}
