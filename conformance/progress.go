package conformance

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// progress shows how far a runtime's sweep is: a redrawn bar with an ETA on
// a terminal, a log line every few seconds otherwise. Work is counted in
// tokens decoded, so the ETA weighs long prompts properly.
type progress struct {
	w         io.Writer
	tty       bool
	name      string
	total     float64
	done      float64
	start     time.Time
	last      time.Time
	lastLabel string
	drawn     bool
	logEvery  time.Duration
	clockNow  func() time.Time
	barWidth  int
}

func newProgress(w io.Writer, tty bool, name string, total float64) *progress {
	p := &progress{w: w, tty: tty, name: name, total: max(total, 1), logEvery: 10 * time.Second, clockNow: time.Now, barWidth: 28}
	p.start = p.clockNow()
	p.last = p.start
	return p
}

func (p *progress) advance(work float64, label string) {
	if p == nil || p.w == nil {
		return
	}
	p.done = min(p.done+work, p.total)
	if label != "" {
		p.lastLabel = label
	}
	now := p.clockNow()
	if p.tty {
		if now.Sub(p.last) < 100*time.Millisecond && p.done < p.total {
			return
		}
		p.last = now
		p.draw(now)
		return
	}
	if now.Sub(p.last) >= p.logEvery {
		p.last = now
		fmt.Fprintf(p.w, "conformance: %s\n", p.status(now))
	}
}

func (p *progress) status(now time.Time) string {
	frac := p.done / p.total
	el := now.Sub(p.start)
	eta := "?"
	if frac > 0.005 {
		eta = fmtDuration(time.Duration(float64(el) * (1 - frac) / frac))
	}
	return fmt.Sprintf("%s %5.1f%% elapsed %s ETA %s  %s", p.name, 100*frac, fmtDuration(el), eta, p.lastLabel)
}

func (p *progress) draw(now time.Time) {
	filled := int(p.done / p.total * float64(p.barWidth))
	bar := strings.Repeat("=", filled) + strings.Repeat(" ", p.barWidth-filled)
	if filled < p.barWidth {
		bar = bar[:filled] + ">" + bar[filled+1:]
	}
	fmt.Fprintf(p.w, "\r\033[K[%s] %s", bar, p.status(now))
	p.drawn = true
}

// logf prints a line, keeping the bar below it on a terminal.
func (p *progress) logf(format string, args ...any) {
	if p == nil || p.w == nil {
		return
	}
	if p.tty && p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
	}
	fmt.Fprintf(p.w, "conformance: "+format+"\n", args...)
	if p.tty && p.drawn {
		p.draw(p.clockNow())
	}
}

func (p *progress) finish() {
	if p == nil || p.w == nil {
		return
	}
	if p.tty && p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
	}
	fmt.Fprintf(p.w, "conformance: %s finished in %s\n", p.name, fmtDuration(p.clockNow().Sub(p.start)))
}

func fmtDuration(d time.Duration) string {
	d = d.Round(time.Second)
	h, m, s := int(d.Hours()), int(d.Minutes())%60, int(d.Seconds())%60
	if h > 0 {
		return fmt.Sprintf("%dh%02dm%02ds", h, m, s)
	}
	if m > 0 {
		return fmt.Sprintf("%dm%02ds", m, s)
	}
	return fmt.Sprintf("%ds", s)
}
