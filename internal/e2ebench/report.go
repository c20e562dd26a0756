package e2ebench

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// WriteTable prints the rows as an aligned text table (markdown when md is
// set).
func WriteTable(w io.Writer, rows []*Row, md bool) error {
	head := []string{"runtime", "prompt", "keep", "cells", "KV MiB", "×KV", "prefill ms", "capture", "compress ms", "%prefill", "decode tok/s", "×decode", "×paired", "peak RSS MiB", "anon MiB", "load"}
	line := func(cells []string) string {
		if md {
			return "| " + strings.Join(cells, " | ") + " |\n"
		}
		return strings.Join(cells, "\t") + "\t\n"
	}
	var tw *tabwriter.Writer
	out := w
	if !md {
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		out = tw
	}
	fmt.Fprint(out, line(head))
	if md {
		sep := make([]string, len(head))
		for i := range sep {
			sep[i] = "---:"
		}
		sep[0] = "---"
		fmt.Fprint(out, line(sep))
	}
	for _, r := range rows {
		fmt.Fprint(out, line([]string{
			r.Runtime, fmt.Sprint(r.PromptTokens), fmt.Sprintf("%g", r.Keep),
			fmt.Sprint(r.KVCells), fmt.Sprintf("%.1f", mib(r.KVBytes)), ratio(r.RatioKVBytes),
			notMeasured(r, fmt.Sprintf("%.0f", r.PrefillMs)), notMeasured(r, fmt.Sprintf("%+.1f%%", 100*r.CaptureOverhead)),
			fmt.Sprintf("%.2f", r.CompressMs), notMeasured(r, fmt.Sprintf("%.3f%%", 100*r.CompressFrac)),
			fmt.Sprintf("%.2f", r.DecodeTokensPerS), ratio(r.RatioDecodeTPS), paired(r),
			fmt.Sprintf("%.0f", mib(r.PeakRSSBytes)), fmt.Sprintf("%.0f", mib(r.RSSAnonBytes)),
			fmt.Sprintf("%.1f→%.1f", r.LoadAvg1, r.LoadAvg1End),
		}))
	}
	if tw != nil {
		return tw.Flush()
	}
	return nil
}

// notMeasured is v, or "-" for the prefill columns a paired-only row does
// not measure.
func notMeasured(r *Row, v string) string {
	if r.PairedOnly {
		return "-"
	}
	return v
}

func paired(r *Row) string { return ratio(r.PairedRatio) }

// ratio prints a ratio, or "-" when it was not measured (0: no keep-1 row in
// the run, or no paired decode).
func ratio(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3f", x)
}

// observerCIText prints the row's interval of the observer's cost, when it has
// one.
func observerCIText(r *Row) string {
	if len(r.PairedObserverCI) != 2 {
		return ""
	}
	return fmt.Sprintf(" (95%% CI over the paired tokens %+.1f%% … %+.1f%%)", 100*r.PairedObserverCI[0], 100*r.PairedObserverCI[1])
}

func noObs(r *Row) string {
	if r.PairedNoObserverRatio == 0 {
		return ""
	}
	return fmt.Sprintf("; the same engine without the observer %.3f tok/s = ×%.3f", r.PairedNoObserverTokensPerS, r.PairedNoObserverRatio)
}

func control(r *Row) string {
	if r.PairedControlRatio == 0 {
		return ""
	}
	return fmt.Sprintf("; control, a second uncompressed engine: %.3f tok/s = ×%.3f (two identical engines)", r.PairedControlTokensPerS, r.PairedControlRatio)
}

// Target is one of the targets checked on measured rows.
type Target struct {
	Name   string `json:"name"`
	Holds  bool   `json:"holds"`
	Detail string `json:"detail"`
}

// Targets checks the row targets: compression ≤ 2% of prefill, key
// capture ≤ 5% of prefill, KV bytes proportional to kept positions, decode
// tokens/s at keep 0.5 ≥ the uncompressed row at the same context.
func Targets(rows []*Row) []Target {
	var out []Target
	for _, r := range rows {
		id := fmt.Sprintf("%s %d tokens keep %g", r.Runtime, r.PromptTokens, r.Keep)
		if r.Keep < 1 && !r.PairedOnly {
			out = append(out, Target{"compress ≤ 2% of prefill: " + id, r.CompressFrac <= 0.02,
				fmt.Sprintf("%.2f ms of %.0f ms = %.3f%%", r.CompressMs, r.PrefillMs, 100*r.CompressFrac)})
		}
		if !r.PairedOnly {
			out = append(out, Target{"capture ≤ 5% of prefill: " + id, r.CaptureOverhead <= 0.05,
				fmt.Sprintf("%.0f ms vs %.0f ms = %+.2f%% (%.1f ms inside the observer = %.2f%%)",
					r.PrefillCaptureMs, r.PrefillMs, 100*r.CaptureOverhead, r.ObserveMs, 100*r.ObserveMs/r.PrefillMs)})
		}
		if r.KVEntries > 0 && r.KVCellsBefore > 0 {
			// Bytes are entries × entry bytes; entries follow the kept
			// positions (per-token: cells × layers × heads; per-head: the
			// skipped layers keep all).
			want := float64(r.KVBytesBefore) * float64(r.KVEntries) / float64(r.KVEntriesBefore)
			ok := r.KVBytes == r.KVEntries*r.EntryBytes && abs(float64(r.KVBytes)-want) <= float64(r.EntryBytes)
			out = append(out, Target{"KV bytes ∝ kept: " + id, ok,
				fmt.Sprintf("%d cells of %d (%.3f), %d entries × %d B = %.2f MiB (%s of the uncompressed row)",
					r.KVCells, r.KVCellsBefore, float64(r.KVCells)/float64(r.KVCellsBefore), r.KVEntries, r.EntryBytes, mib(r.KVBytes), ratio(r.RatioKVBytes))})
		}
		if r.Keep < 1 && r.PairedNoObserverRatio > 0 {
			// What the observer may cost while decoding: the same engine with
			// and without it, token by token in the compressed engine's
			// blocks (issue 14).
			rel := r.PairedRatio / r.PairedNoObserverRatio
			out = append(out, Target{"decode with the observer ≥ without it − 2%: " + id, rel >= 0.98,
				fmt.Sprintf("paired: ×%.3f with, ×%.3f without = %+.1f%%%s%s", r.PairedRatio, r.PairedNoObserverRatio, 100*(rel-1), observerCIText(r), control(r))})
		}
		switch {
		case r.Keep != 0.5:
		case r.PairedRatio > 0:
			// The paired measurement is the one the target is judged by: both
			// sides in one process, alternating, at the same context.
			out = append(out, Target{"decode at keep 0.5 ≥ uncompressed: " + id, r.PairedRatio >= 1,
				fmt.Sprintf("paired, %d tokens each in alternating blocks: %.3f tok/s vs %.3f = ×%.3f (median latency ×%.3f)%s; separate rows: ×%s",
					r.PairedTokens, r.PairedTokensPerS, r.PairedBaseTokensPerS, r.PairedRatio, r.PairedMedianRatio, noObs(r)+control(r), ratio(r.RatioDecodeTPS))})
		case r.RatioDecodeTPS > 0:
			out = append(out, Target{"decode at keep 0.5 ≥ uncompressed: " + id, r.RatioDecodeTPS >= 1,
				fmt.Sprintf("separate rows: %.3f tok/s vs %.3f = ×%.3f", r.DecodeTokensPerS, r.DecodeTokensPerS/r.RatioDecodeTPS, r.RatioDecodeTPS)})
		}
	}
	return out
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

// WriteChunked prints the RSS curve of a chunked run (markdown when md is
// set).
func WriteChunked(w io.Writer, c *Chunked, md bool) error {
	fmt.Fprintf(w, "%s: %d prompt tokens through a cache of %d cells (%s), %d chunks, %d compressions (%.1f ms), prefill %.1f s; KV at the end: %d cells, %.1f MiB of %.1f MiB allocated\n",
		c.Runtime, c.PromptTokens, c.Ctx, c.Policy, len(c.Samples), c.Compressions, c.CompressMs, c.PrefillMs/1000, c.KVCells, mib(c.KVBytes), mib(c.KVBytesAllocated))
	if md {
		fmt.Fprintln(w)
	}
	head := []string{"chunk", "tokens fed", "positions", "cells/head", "compressions", "RSS MiB", "peak RSS MiB", "anon MiB", "Go heap MiB", "Go total MiB", "file MiB"}
	var tw *tabwriter.Writer
	out := w
	line := func(cells []string) string {
		if md {
			return "| " + strings.Join(cells, " | ") + " |\n"
		}
		return strings.Join(cells, "\t") + "\t\n"
	}
	if !md {
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		out = tw
	}
	fmt.Fprint(out, line(head))
	if md {
		fmt.Fprint(out, line(strings.Split(strings.Repeat("---:,", len(head)-1)+"---:", ",")))
	}
	row := func(name string, fed, live int, perHead float64, comps int, m Mem, goHeap, goTotal int64) {
		gh, gt := "-", "-"
		if goTotal > 0 { // not sampled (the ends, or a run before these columns)
			gh, gt = fmt.Sprintf("%.1f", mib(goHeap)), fmt.Sprintf("%.1f", mib(goTotal))
		}
		ph := fmt.Sprintf("%.0f", perHead)
		if perHead == 0 && live > 0 {
			ph = "-" // a run before this column
		}
		fmt.Fprint(out, line([]string{name, fmt.Sprint(fed), fmt.Sprint(live), ph, fmt.Sprint(comps),
			fmt.Sprintf("%.1f", mib(m.RSS)), fmt.Sprintf("%.1f", mib(m.HWM)), fmt.Sprintf("%.1f", mib(m.Anon)),
			gh, gt, fmt.Sprintf("%.1f", mib(m.File))}))
	}
	row("before", 0, 0, 0, 0, c.Before, 0, 0)
	for _, s := range c.Samples {
		row(fmt.Sprint(s.Chunk), s.TokensFed, s.LiveCells, s.CellsPerHead, s.Compressions, s.Mem, s.GoHeapBytes, s.GoTotalBytes)
	}
	row("end", c.PromptTokens, c.KVCells, float64(c.KVBytes)/float64(max(1, c.KVBytesAllocated))*float64(c.Ctx), c.Compressions, c.End, 0, 0)
	if tw != nil {
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if md {
		fmt.Fprintln(w)
	}
	if c.FullAt >= 0 {
		fmt.Fprintf(w, "peak RSS growth from the chunk that filled the cache (chunk %d, %d tokens) to the end (%d tokens): %+.1f MiB (%+.2f%%); anonymous RSS %+.1f MiB\n",
			c.FullAt, c.Samples[c.FullAt].TokensFed, c.PromptTokens, mib(c.HWMGrowthBytes), 100*c.HWMGrowthFrac, mib(c.AnonGrowth))
	}
	if b := c.Baseline; b != nil {
		fmt.Fprintf(w, "uncompressed baseline: the same %d tokens in a cache of %d cells: peak RSS %.1f MiB (anon %.1f MiB), KV %.1f MiB, prefill %.1f s; compressed/baseline peak RSS ×%.3f\n",
			b.PromptTokens, b.Ctx, mib(b.PeakRSSBytes), mib(b.End.Anon), mib(b.KVBytes), b.PrefillMs/1000, float64(c.PeakRSSBytes)/float64(b.PeakRSSBytes))
	}
	return nil
}
