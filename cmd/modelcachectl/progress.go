package main

import (
	"fmt"
	"io"
	"math"
	"strings"
	"time"

	"github.com/modelcache/modelcache/pkg/units"
)

// rateWindow is the time constant of the smoothed download rate: a change
// of pace shows fully after a few of these.
const rateWindow = 4 * time.Second

// progress shows a prefetch's progress events. On a terminal it redraws
// one line with a bar; otherwise (a log, a pipe) it prints a plain line at
// most every interval, so logs stay short.
type progress struct {
	w        io.Writer
	uri      string
	tty      bool
	width    func() int // terminal columns, 0 when unknown
	now      func() time.Time
	interval time.Duration // between plain lines

	lastDone int64
	lastAt   time.Time
	rate     float64 // smoothed bytes per second
	haveRate bool
	printed  time.Time // when the last plain line was printed
	drawn    int       // length of the line drawn on the terminal
}

// update takes one progress event.
func (p *progress) update(done, total int64) {
	now := p.now()
	p.sample(now, done)
	if p.tty {
		p.draw(done, total)
		return
	}
	if !p.printed.IsZero() && now.Sub(p.printed) < p.interval {
		return
	}
	p.printed = now
	fmt.Fprintf(p.w, "prefetch %s: %s\n", p.uri, p.plain(done, total))
}

// clear removes the progress line from the terminal, before the final
// message or an error.
func (p *progress) clear() {
	if p.tty && p.drawn > 0 {
		fmt.Fprintf(p.w, "\r%s\r", strings.Repeat(" ", p.drawn))
		p.drawn = 0
	}
}

// sample folds the bytes done since the previous event into the rate, an
// exponentially weighted average over rateWindow.
func (p *progress) sample(now time.Time, done int64) {
	if p.lastAt.IsZero() || done < p.lastDone {
		// First event, or the download restarted: a new baseline.
		p.lastAt, p.lastDone = now, done
		return
	}
	dt := now.Sub(p.lastAt)
	if dt <= 0 {
		return
	}
	inst := float64(done-p.lastDone) / dt.Seconds()
	if !p.haveRate {
		p.rate, p.haveRate = inst, true
	} else {
		alpha := 1 - math.Exp(-dt.Seconds()/rateWindow.Seconds())
		p.rate += alpha * (inst - p.rate)
	}
	p.lastAt, p.lastDone = now, done
}

// eta is the time left at the current rate, or -1 when unknown.
func (p *progress) eta(done, total int64) time.Duration {
	if !p.haveRate || p.rate <= 0 || total <= 0 {
		return -1
	}
	left := float64(max(total-done, 0)) / p.rate
	if left > float64(1000*time.Hour/time.Second) {
		return -1
	}
	return time.Duration(left * float64(time.Second))
}

func (p *progress) rateText() string {
	if !p.haveRate {
		return "-- B/s"
	}
	return humanRate(p.rate)
}

func percent(done, total int64) int {
	if total <= 0 {
		return 0
	}
	return int(min(max(done*100/total, 0), 100))
}

// plain is "45% (1.2 GiB of 2.6 GiB, 85.3 MiB/s, ETA 16s)".
func (p *progress) plain(done, total int64) string {
	if total <= 0 {
		return fmt.Sprintf("%s so far (%s)", units.Bytes(done), p.rateText())
	}
	return fmt.Sprintf("%d%% (%s of %s, %s, ETA %s)", percent(done, total),
		units.Bytes(done), units.Bytes(total), p.rateText(), formatETA(p.eta(done, total)))
}

// line is "[=========>        ]  45%  1.2 GiB / 2.6 GiB  85.3 MiB/s  ETA 16s",
// fitted to width columns when width is known.
func (p *progress) line(done, total int64, width int) string {
	if total <= 0 {
		return fmt.Sprintf("%s so far  %s", units.Bytes(done), p.rateText())
	}
	rest := fmt.Sprintf("%4s  %s / %s  %s  ETA %s", fmt.Sprintf("%d%%", percent(done, total)),
		units.Bytes(done), units.Bytes(total), p.rateText(), formatETA(p.eta(done, total)))
	bw := 20
	if width > 0 {
		// Keep the last column free: writing into it wraps on some terminals.
		bw = min(40, width-1-len(rest)-3)
	}
	line := strings.TrimLeft(rest, " ")
	if bw >= 10 {
		line = "[" + bar(done, total, bw) + "] " + rest
	}
	if width > 1 && len(line) > width-1 {
		line = line[:width-1]
	}
	return line
}

// bar is a progress bar of width cells: "=========>          ".
func bar(done, total int64, width int) string {
	filled := int(min(max(done*int64(width)/total, 0), int64(width)))
	if filled >= width {
		return strings.Repeat("=", width)
	}
	if filled == 0 {
		return strings.Repeat(" ", width)
	}
	return strings.Repeat("=", filled-1) + ">" + strings.Repeat(" ", width-filled)
}

func (p *progress) draw(done, total int64) {
	width := 0
	if p.width != nil {
		width = p.width()
	}
	line := p.line(done, total, width)
	pad := max(p.drawn-len(line), 0)
	fmt.Fprintf(p.w, "\r%s%s", line, strings.Repeat(" ", pad))
	p.drawn = len(line)
}
