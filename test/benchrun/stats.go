package main

import (
	"fmt"
	"slices"
	"time"
)

// durations summarises one figure measured once per run.
type durations []time.Duration

func (d durations) sorted() durations {
	s := slices.Clone(d)
	slices.Sort(s)
	return s
}

// Median is the middle value (the mean of the two middle values for an
// even count); 0 for no values.
func (d durations) Median() time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := d.sorted()
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (d durations) Min() time.Duration {
	if len(d) == 0 {
		return 0
	}
	return slices.Min(d)
}

func (d durations) Max() time.Duration {
	if len(d) == 0 {
		return 0
	}
	return slices.Max(d)
}

// Percentile is the nearest-rank percentile p (0 < p ≤ 100).
func (d durations) Percentile(p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := d.sorted()
	rank := int(float64(len(s))*p/100+0.999999999) - 1
	return s[max(0, min(rank, len(s)-1))]
}

// numbers summarises a figure that is not a duration (bytes, MB/s, ratios).
type numbers []float64

func (n numbers) Median() float64 {
	if len(n) == 0 {
		return 0
	}
	s := slices.Clone(n)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (n numbers) Min() float64 {
	if len(n) == 0 {
		return 0
	}
	return slices.Min(n)
}

func (n numbers) Max() float64 {
	if len(n) == 0 {
		return 0
	}
	return slices.Max(n)
}

// unit picks one unit for a median and its range, so they read alike.
func unit(d time.Duration) (string, float64) {
	switch {
	case d >= time.Second:
		return "s", float64(time.Second)
	case d >= time.Millisecond:
		return "ms", float64(time.Millisecond)
	default:
		return "µs", float64(time.Microsecond)
	}
}

func num(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

// fmtDur formats one duration.
func fmtDur(d time.Duration) string {
	u, f := unit(d)
	return num(float64(d)/f) + " " + u
}

// fmtDurs formats "median (min–max)" in the median's unit; a single run
// prints its value alone.
func fmtDurs(d durations) string {
	if len(d) == 0 {
		return "—"
	}
	u, f := unit(d.Median())
	if len(d) == 1 {
		return num(float64(d[0])/f) + " " + u
	}
	return fmt.Sprintf("%s %s (%s–%s)", num(float64(d.Median())/f), u, num(float64(d.Min())/f), num(float64(d.Max())/f))
}

// fmtNums formats "median (min–max)" followed by suffix.
func fmtNums(n numbers, suffix string) string {
	if len(n) == 0 {
		return "—"
	}
	if len(n) == 1 {
		return num(n[0]) + suffix
	}
	return fmt.Sprintf("%s%s (%s–%s)", num(n.Median()), suffix, num(n.Min()), num(n.Max()))
}

// mib converts bytes to MiB.
func mib(b int64) float64 { return float64(b) / (1 << 20) }

// mbps is bytes per second in MB/s (10^6 bytes).
func mbps(bytes int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(bytes) / d.Seconds() / 1e6
}
