package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/modelcache/modelcache/pkg/adminapi"
	"github.com/modelcache/modelcache/pkg/units"
)

// table aligns tab-separated cells into columns, and drops the trailing
// blanks that empty last cells leave. Call Flush when done.
type table struct {
	tw  *tabwriter.Writer
	buf bytes.Buffer
	out io.Writer
}

func newTable(w io.Writer) *table {
	t := &table{out: w}
	t.tw = tabwriter.NewWriter(&t.buf, 0, 0, 3, ' ', 0)
	return t
}

func (t *table) Write(p []byte) (int, error) { return t.tw.Write(p) }

// Flush writes the table out.
func (t *table) Flush() error {
	if err := t.tw.Flush(); err != nil {
		return err
	}
	var out bytes.Buffer
	for line := range strings.Lines(t.buf.String()) {
		out.WriteString(strings.TrimRight(line, " \n"))
		out.WriteByte('\n')
	}
	t.buf.Reset()
	_, err := t.out.Write(out.Bytes())
	return err
}

// writeJSON prints a reply as the server sent it, indented.
func writeJSON(w io.Writer, raw []byte) error {
	var buf bytes.Buffer
	if err := json.Indent(&buf, bytes.TrimSpace(raw), "", "  "); err != nil {
		return fmt.Errorf("the reply is not JSON: %w", err)
	}
	buf.WriteByte('\n')
	_, err := w.Write(buf.Bytes())
	return err
}

// humanRate formats bytes per second: "85.3 MiB/s".
func humanRate(bps float64) string {
	if bps <= 0 || math.IsNaN(bps) || math.IsInf(bps, 0) {
		return "-- B/s"
	}
	return units.Bytes(int64(bps)) + "/s"
}

// formatETA formats a remaining time: "16s", "2m05s", "1h02m"; "--" when
// unknown.
func formatETA(d time.Duration) string {
	if d < 0 {
		return "--"
	}
	d = d.Round(time.Second)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 100*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	default:
		return "--"
	}
}

// formatTook tidies a duration the server sent as a Go duration string
// ("1m2.345s" → "1m2.3s"); anything else is printed as it came.
func formatTook(s string) string {
	d, err := time.ParseDuration(s)
	if err != nil {
		return s
	}
	if d >= time.Second {
		d = d.Round(100 * time.Millisecond)
	}
	return d.String()
}

// relTime formats t relative to now: "45s ago", "3m ago", "5h ago",
// "12d ago"; "-" for the zero time.
func relTime(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := now.Sub(t)
	switch {
	case d < time.Second:
		return "just now"
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	default:
		return fmt.Sprintf("%dd ago", int(d.Hours()/24))
	}
}

// shortDigest is the first 12 hex digits of a sha256 digest, which the
// API accepts wherever a tree is named.
func shortDigest(d string) string {
	h := strings.TrimPrefix(d, "sha256:")
	if len(h) > 12 {
		h = h[:12]
	}
	return h
}

// fromShare says, in a column of ls, where a tree's bytes came from:
// "origin", "peers", both with their shares ("origin 25%, peers 75%"), or
// "-" when nothing was recorded. A share that is not nothing never shows
// as 0%.
func fromShare(f adminapi.BytesFrom) string {
	switch {
	case f.IsZero():
		return "-"
	case f.Peers == 0:
		return "origin"
	case f.Origin == 0:
		return "peers"
	}
	peers := int(math.Round(100 * float64(f.Peers) / float64(f.Origin+f.Peers)))
	peers = min(max(peers, 1), 99)
	return fmt.Sprintf("origin %d%%, peers %d%%", 100-peers, peers)
}

// fromDetail says, for inspect, how many bytes came from the origin and
// how many from which peers.
func fromDetail(f adminapi.BytesFrom) string {
	switch {
	case f.IsZero():
		return "not recorded"
	case f.Peers == 0:
		return units.Bytes(f.Origin) + " from the origin"
	}
	var nodes []string
	named := int64(0)
	for _, n := range f.Nodes {
		nodes = append(nodes, quoteName(n.Node)+" "+units.Bytes(n.Bytes))
		named += n.Bytes
	}
	if others := f.Peers - named; others > 0 {
		nodes = append(nodes, "other nodes "+units.Bytes(others))
	}
	return fmt.Sprintf("%s from the origin, %s from peers (%s)", units.Bytes(f.Origin), units.Bytes(f.Peers), strings.Join(nodes, ", "))
}

// usersOf names who mounts a tree: "namespace/pod" when the pod is known,
// else the volume ID; sorted, without repeats.
func usersOf(refs []adminapi.Ref) []string {
	var out []string
	for _, r := range refs {
		if r.PodName != "" {
			out = append(out, r.PodNS+"/"+r.PodName)
		} else {
			out = append(out, r.VolumeID)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// quoteName shows a name that came from a remote (a file path, a model URI)
// so that it cannot pass for another or act on the terminal: as it is when
// every character is printable and none is a space, quote or backslash,
// else Go-quoted, with control, bidirectional and other invisible
// characters escaped ("model\u202enib.exe"). Ordinary names stay unquoted,
// so tables read as before.
func quoteName(s string) string {
	plain := s != "" && !strings.ContainsFunc(s, func(r rune) bool {
		return r == utf8.RuneError || r == ' ' || r == '"' || r == '\\' || !strconv.IsPrint(r)
	})
	if plain {
		return s
	}
	return strconv.Quote(s)
}

// escapeInvisible shows a message with every character that is not
// printable (controls, bidirectional and other format characters, invalid
// UTF-8) escaped as Go would quote it, and the rest as it is: a message
// stays readable, and a remote's words in it cannot act on the terminal or
// reorder the line.
func escapeInvisible(s string) string {
	var b strings.Builder
	for i, r := range s {
		switch {
		case r == utf8.RuneError && !strings.HasPrefix(s[i:], "\uFFFD"):
			fmt.Fprintf(&b, "\\x%02x", s[i])
		case strconv.IsPrint(r):
			b.WriteRune(r)
		default:
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		}
	}
	return b.String()
}

// quoteNames applies quoteName to each name.
func quoteNames(names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = quoteName(n)
	}
	return out
}

// orDash joins items with sep, or is "-" when there are none.
func orDash(items []string, sep string) string {
	if len(items) == 0 {
		return "-"
	}
	return strings.Join(items, sep)
}

// plural is "1 file", "3 files".
func plural(n int, noun string) string {
	if n == 1 {
		return fmt.Sprintf("%d %s", n, noun)
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
