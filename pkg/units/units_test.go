package units

import (
	"math"
	"testing"
)

func TestBytes(t *testing.T) {
	for _, tt := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{1024*1024 - 1, "1.0 MiB"}, // rounds up a unit, never "1024.0 KiB"
		{10 * 1024, "10.0 KiB"},
		{420 << 20, "420.0 MiB"},
		{3 << 40, "3.0 TiB"},
		{2600 << 20, "2.5 GiB"},
		{-2048, "-2.0 KiB"},
		{math.MaxInt64, "8.0 EiB"},
	} {
		if got := Bytes(tt.n); got != tt.want {
			t.Errorf("Bytes(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}
