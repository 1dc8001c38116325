package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/modelcache/modelcache/pkg/adminapi"
)

func TestDurations(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{-1, "--"},
		{0, "0s"},
		{16*time.Second + 400*time.Millisecond, "16s"},
		{59*time.Second + 600*time.Millisecond, "1m00s"},
		{2*time.Minute + 5*time.Second, "2m05s"},
		{time.Hour + 2*time.Minute + 10*time.Second, "1h02m"},
		{200 * time.Hour, "--"},
	} {
		if got := formatETA(tc.d); got != tc.want {
			t.Errorf("formatETA(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
	for in, want := range map[string]string{"10.4321s": "10.4s", "12ms": "12ms", "1m2.345s": "1m2.3s", "soon": "soon"} {
		if got := formatTook(in); got != want {
			t.Errorf("formatTook(%q) = %q, want %q", in, got, want)
		}
	}
	now := testNow
	for _, tc := range []struct {
		t    time.Time
		want string
	}{
		{time.Time{}, "-"},
		{now.Add(time.Minute), "just now"},
		{now.Add(-500 * time.Millisecond), "just now"},
		{now.Add(-45 * time.Second), "45s ago"},
		{now.Add(-3*time.Minute - 59*time.Second), "3m ago"},
		{now.Add(-5 * time.Hour), "5h ago"},
		{now.Add(-47 * time.Hour), "47h ago"},
		{now.Add(-12 * 24 * time.Hour), "12d ago"},
	} {
		if got := relTime(tc.t, now); got != tc.want {
			t.Errorf("relTime(now-%v) = %q, want %q", now.Sub(tc.t), got, tc.want)
		}
	}
}

func TestProgressTerminal(t *testing.T) {
	var out bytes.Buffer
	clock := testNow
	p := &progress{w: &out, uri: "mys3:b/m", tty: true, width: func() int { return 0 },
		now: func() time.Time { clock = clock.Add(time.Second); return clock }}
	total := int64(2662 * mib)
	p.update(0, total)
	p.update(85*mib+300*kib, total)
	// Constant rate: the smoothed rate is that rate.
	p.update(2*(85*mib+300*kib), total)
	want := "\r[                    ]   0%  0 B / 2.6 GiB  -- B/s  ETA --" +
		"\r[                    ]   3%  85.3 MiB / 2.6 GiB  85.3 MiB/s  ETA 30s" +
		"\r[>                   ]   6%  170.6 MiB / 2.6 GiB  85.3 MiB/s  ETA 29s"
	if got := out.String(); got != want {
		t.Errorf("terminal output\n%q\nwant\n%q", got, want)
	}
	out.Reset()
	p.update(total*45/100+1, total)
	if got := out.String(); !strings.HasPrefix(got, "\r[========>           ]  45%  1.2 GiB / 2.6 GiB  ") || !strings.Contains(got, "  ETA ") {
		t.Errorf("at 45%%: %q", got)
	}
	out.Reset()
	drawn := p.drawn
	p.clear()
	if got := out.String(); drawn == 0 || got != "\r"+strings.Repeat(" ", drawn)+"\r" {
		t.Errorf("clear wrote %q", got)
	}
}

func TestProgressFitsTerminalWidth(t *testing.T) {
	p := &progress{}
	for _, width := range []int{0, 30, 60, 80, 200} {
		line := p.line(45, 100, width)
		if width > 0 && len(line) >= width {
			t.Errorf("width %d: line %q is %d long", width, line, len(line))
		}
		if width >= 80 && !strings.HasPrefix(line, "[") {
			t.Errorf("width %d: no bar in %q", width, line)
		}
	}
}

func TestProgressRateSmoothing(t *testing.T) {
	clock := testNow
	p := &progress{w: &bytes.Buffer{}, interval: time.Hour, now: func() time.Time { clock = clock.Add(time.Second); return clock }}
	p.update(0, 100*mib)
	p.update(10*mib, 100*mib) // 10 MiB/s
	p.update(40*mib, 100*mib) // a 30 MiB/s burst moves the rate, not all the way
	if p.rate <= 10*float64(mib) || p.rate >= 30*float64(mib) {
		t.Errorf("rate %s after a burst, want between 10 and 30 MiB/s", humanRate(p.rate))
	}
	p.update(5*mib, 100*mib) // restarted: a new baseline, the rate is kept
	if p.lastDone != 5*mib || p.rate <= 0 {
		t.Errorf("after a restart: lastDone %d, rate %v", p.lastDone, p.rate)
	}
}

// TestQuoteName: names from a remote cannot hide characters, reorder the
// text around them or act on the terminal; ordinary names print as they are.
func TestQuoteName(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
	}{
		{"plain", "tokenizer/tokenizer.json", "tokenizer/tokenizer.json"},
		{"URI", "mys3:models/llama", "mys3:models/llama"},
		{"non-ASCII letters", "modèle/权重/🤗.bin", "modèle/权重/🤗.bin"},
		{"right-to-left script", "نموذج.bin", "نموذج.bin"},
		{"empty", "", `""`},
		{"space", "my model.bin", `"my model.bin"`},
		{"quote", `a"b`, `"a\"b"`},
		{"backslash", `a\b`, `"a\\b"`},
		{"newline", "a\nINFO forged", `"a\nINFO forged"`},
		{"escape sequence", "\x1b[2Jx", `"\x1b[2Jx"`},
		{"C1 control sequence introducer", "\u009b2Jx", `"\u009b2Jx"`},
		{"C1 next line", "a\u0085b", `"a\u0085b"`},
		{"right-to-left override", "model\u202enib.exe", `"model\u202enib.exe"`},
		{"isolate", "a\u2066b\u2069", `"a\u2066b\u2069"`},
		{"arabic letter mark", "a\u061cb", `"a\u061cb"`},
		{"zero-width space", "a\u200bb", `"a\u200bb"`},
		{"no-break space", "a\u00a0b", `"a\u00a0b"`},
		{"invalid UTF-8", "a\xffb", `"a\xffb"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := quoteName(tc.in); got != tc.want {
				t.Errorf("quoteName(%q) = %s, want %s", tc.in, got, tc.want)
			}
		})
	}
}

// TestEscapeInvisible: messages keep their words and lose their power over
// the terminal.
func TestEscapeInvisible(t *testing.T) {
	for in, want := range map[string]string{
		`model "a b" not found: 404`:       `model "a b" not found: 404`,
		"modèle 权重 نموذج":                  "modèle 权重 نموذج",
		"S3: \x1b]0;owned\x07AccessDenied": `S3: \x1b]0;owned\aAccessDenied`,
		"line\nforged":                     `line\nforged`,
		"a\u009b2Jb":                       `a\u009b2Jb`,
		"evil\u202etxt.exe":                `evil\u202etxt.exe`,
		"bad \xff byte, real \ufffd":       `bad \xff byte, real ` + "\ufffd",
	} {
		if got := escapeInvisible(in); got != want {
			t.Errorf("escapeInvisible(%q) = %q, want %q", in, got, want)
		}
	}
}

// Where a tree's bytes came from, as ls's column and inspect's line say it.
func TestFromShareAndDetail(t *testing.T) {
	nodes := func(n ...adminapi.NodeBytes) []adminapi.NodeBytes { return n }
	for _, tc := range []struct {
		name          string
		f             adminapi.BytesFrom
		share, detail string
	}{
		{"nothing recorded", adminapi.BytesFrom{}, "-", "not recorded"},
		{"origin only", adminapi.BytesFrom{Origin: 3 * mib}, "origin", "3.0 MiB from the origin"},
		{"peers only", adminapi.BytesFrom{Peers: 3 * mib, Nodes: nodes(adminapi.NodeBytes{Node: "node-a", Bytes: 3 * mib})},
			"peers", "0 B from the origin, 3.0 MiB from peers (node-a 3.0 MiB)"},
		{"half and half", adminapi.BytesFrom{Origin: mib, Peers: mib, Nodes: nodes(adminapi.NodeBytes{Node: "node-a", Bytes: mib})},
			"origin 50%, peers 50%", "1.0 MiB from the origin, 1.0 MiB from peers (node-a 1.0 MiB)"},
		{"a byte from a peer is not 0%", adminapi.BytesFrom{Origin: gib, Peers: 1, Nodes: nodes(adminapi.NodeBytes{Node: "node-a", Bytes: 1})},
			"origin 99%, peers 1%", "1.0 GiB from the origin, 1 B from peers (node-a 1 B)"},
		{"a byte from the origin is not 0%", adminapi.BytesFrom{Origin: 1, Peers: gib, Nodes: nodes(adminapi.NodeBytes{Node: "node-a", Bytes: gib})},
			"origin 1%, peers 99%", "1 B from the origin, 1.0 GiB from peers (node-a 1.0 GiB)"},
		{"more peers than named, a name quoted", adminapi.BytesFrom{Peers: 3 * mib, Nodes: nodes(adminapi.NodeBytes{Node: "node\u202ea", Bytes: 2 * mib})},
			"peers", `0 B from the origin, 3.0 MiB from peers ("node\u202ea" 2.0 MiB, other nodes 1.0 MiB)`},
	} {
		if got := fromShare(tc.f); got != tc.share {
			t.Errorf("%s: fromShare = %q, want %q", tc.name, got, tc.share)
		}
		if got := fromDetail(tc.f); got != tc.detail {
			t.Errorf("%s: fromDetail = %q, want %q", tc.name, got, tc.detail)
		}
	}
}
