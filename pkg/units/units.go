// Package units formats byte counts the one way every message, event,
// log line and CLI output of modelcache prints them: binary units with one
// decimal ("512 B", "1.5 KiB", "2.6 GiB").
package units

import "fmt"

// Bytes formats n in binary units.
func Bytes(n int64) string {
	if n < 0 {
		return "-" + Bytes(-n)
	}
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v := float64(n) / unit
	exp := 0
	// Move up a unit when rounding to one decimal would print 1024.0.
	for v >= unit-0.05 && exp < len("KMGTPE")-1 {
		v /= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[exp])
}
