package main

import (
	"strings"
	"testing"
)

// --multi-thread-span takes whole 4Mi chunks; anything else is refused
// with a message that names the flag and a valid value.
func TestDownloadOptions_Span(t *testing.T) {
	base := options{multiThreadCutoff: "256Mi", resumeEvery: "16Mi", minStreamRate: "64Ki", multiThreadStreams: 8}
	for _, tc := range []struct {
		span string
		want int64 // 0: refused
	}{
		{"16Mi", 16 << 20},
		{"4Mi", 4 << 20},
		{"64Mi", 64 << 20},
		{"10Mi", 0},
		{"1Mi", 0},
		{"0", 0},
		{"lots", 0},
	} {
		o := base
		o.multiThreadSpan = tc.span
		got, err := downloadOptions(o)
		switch {
		case tc.want == 0 && err == nil:
			t.Errorf("--multi-thread-span=%s accepted (span %d)", tc.span, got.RangeSpan)
		case tc.want == 0 && !strings.Contains(err.Error(), "--multi-thread-span"):
			t.Errorf("--multi-thread-span=%s: %v does not name the flag", tc.span, err)
		case tc.want != 0 && (err != nil || got.RangeSpan != tc.want):
			t.Errorf("--multi-thread-span=%s = %d, %v; want %d", tc.span, got.RangeSpan, err, tc.want)
		}
	}
}
