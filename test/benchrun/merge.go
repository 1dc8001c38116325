package main

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// mergeOut is --merge: the report at path with the numbered sections of
// fresh, and their goals, in place of its own, so that one section can be
// measured again (on a quieter machine, or after a change to it) without
// replacing the figures of the others with numbers from another run.
func mergeOut(path, fresh string, rep *Report) (string, error) {
	old, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--merge reads the report to merge into: %w", err)
	}
	note := fmt.Sprintf("*Measured on %s in a run of its own (`--only=%s`), merged into this report with `--merge`; load average (1, 5, 15 min) at its start / end: %s / %s.*",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), strings.Join(rep.Options.Only, ","), rep.Machine.LoadStart, rep.Machine.LoadEnd)
	return mergeReport(string(old), fresh, note)
}

// block is one "## " section of a report, its heading line included; the
// first block of a report is what precedes its first heading.
type block struct{ heading, text string }

func splitBlocks(md string) []block {
	var out []block
	cur := block{}
	var b strings.Builder
	for line := range strings.SplitAfterSeq(md, "\n") {
		if strings.HasPrefix(line, "## ") {
			cur.text = b.String()
			out = append(out, cur)
			b.Reset()
			cur = block{heading: strings.TrimSpace(line)}
		}
		b.WriteString(line)
	}
	cur.text = b.String()
	return append(out, cur)
}

// number is a numbered section's number ("## 8. Scale" is 8), or 0.
func (b block) number() int {
	rest, ok := strings.CutPrefix(b.heading, "## ")
	if !ok {
		return 0
	}
	n, err := strconv.Atoi(strings.SplitN(rest, ".", 2)[0])
	if err != nil {
		return 0
	}
	return n
}

// mergeReport puts fresh's numbered sections, each with note under its
// heading, in old's place for them (or in number order, before Method,
// where old has none) and fresh's goals for those sections in place of
// old's. Everything else in old stays as it was.
func mergeReport(old, fresh, note string) (string, error) {
	blocks, add := splitBlocks(old), splitBlocks(fresh)
	measured := map[int]bool{}
	var freshGoals string
	for _, nb := range add {
		if nb.heading == "## Goals" {
			freshGoals = nb.text
		}
		n := nb.number()
		if n == 0 {
			continue
		}
		measured[n] = true
		head, body, _ := strings.Cut(nb.text, "\n")
		nb.text = head + "\n\n" + note + "\n" + body
		at := slices.IndexFunc(blocks, func(b block) bool { return b.number() == n })
		if at >= 0 {
			blocks[at] = nb
			continue
		}
		at = slices.IndexFunc(blocks, func(b block) bool { return b.number() > n || b.heading == "## Method" })
		if at < 0 {
			at = len(blocks)
		}
		blocks = slices.Insert(blocks, at, nb)
	}
	if len(measured) == 0 {
		return "", fmt.Errorf("--merge: this run's report has no numbered section")
	}
	g := slices.IndexFunc(blocks, func(b block) bool { return b.heading == "## Goals" })
	if g < 0 || freshGoals == "" {
		return "", fmt.Errorf("--merge: a report lacks its Goals table")
	}
	blocks[g].text = mergeGoals(blocks[g].text, freshGoals, measured)
	var b strings.Builder
	for _, bl := range blocks {
		b.WriteString(bl.text)
	}
	return b.String(), nil
}

// mergeGoals is old's Goals table with the rows of the measured sections
// taken from fresh's, ordered by section.
func mergeGoals(old, fresh string, measured map[int]bool) string {
	section := func(row string) int {
		f := strings.SplitN(row, "|", 3)
		if len(f) < 3 {
			return 0
		}
		n, _ := strconv.Atoi(strings.TrimSpace(f[1]))
		return n
	}
	var head, rows, tail []string
	seen := false // a row of the table, kept or not
	for line := range strings.SplitAfterSeq(old, "\n") {
		switch n := section(line); {
		case n > 0:
			seen = true
			if !measured[n] {
				rows = append(rows, line)
			}
		case !seen:
			head = append(head, line)
		default:
			tail = append(tail, line)
		}
	}
	// A table with no rows yet ends at its |---| line.
	for !seen && len(head) > 0 && !strings.HasPrefix(head[len(head)-1], "|") {
		tail = append([]string{head[len(head)-1]}, tail...)
		head = head[:len(head)-1]
	}
	for line := range strings.SplitAfterSeq(fresh, "\n") {
		if measured[section(line)] {
			rows = append(rows, line)
		}
	}
	slices.SortStableFunc(rows, func(a, b string) int { return section(a) - section(b) })
	return strings.Join(head, "") + strings.Join(rows, "") + strings.Join(tail, "")
}
