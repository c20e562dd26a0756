package conformance

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Write writes results.json, report.md and the PNG plots into dir (created
// if needed) and returns the paths it wrote.
func Write(dir string, res *Results) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var files []string
	js, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("conformance: encode results: %w", err)
	}
	p := filepath.Join(dir, "results.json")
	if err := os.WriteFile(p, append(js, '\n'), 0o644); err != nil {
		return nil, err
	}
	files = append(files, p)
	plots, err := WritePlots(dir, res)
	if err != nil {
		return files, err
	}
	var md strings.Builder
	WriteReport(&md, res, plots, dir)
	p = filepath.Join(dir, "report.md")
	if err := os.WriteFile(p, []byte(md.String()), 0o644); err != nil {
		return files, err
	}
	files = append(files, p)
	return append(files, plots...), nil
}

// WriteReport writes report.md: per runtime, a summary of every task
// (policy × keep, with verdicts), the detailed rows, and the attention
// analysis. plots (paths under dir) are linked.
func WriteReport(w io.Writer, res *Results, plots []string, dir string) {
	s := res.Settings
	fmt.Fprintf(w, "# kvnorm conformance report\n\n")
	fmt.Fprintf(w, "- model: `%s`", s.Model)
	if s.Tokenizer != "" {
		fmt.Fprintf(w, " (tokenizer `%s`)", s.Tokenizer)
	}
	fmt.Fprintf(w, "\n- text: %s\n- tasks: %s; seed %d%s\n", s.Text, strings.Join(s.Tasks, ", "), s.Seed, map[bool]string{true: "; quick sizes", false: ""}[s.Quick])
	fmt.Fprintf(w, "- policies: %s; granularities: %s; keep: %s; every run: %s; compression after prefill\n",
		strings.Join(s.Policies, ", "), strings.Join(s.Granularities, ", "), fmtKeeps(s.Keeps), s.BasePolicy)
	t := s.Tolerances
	fmt.Fprintf(w, "- tolerances: perplexity ≤ +%.3g%%", 100*t.MaxPPLIncrease)
	if t.MaxKL > 0 {
		fmt.Fprintf(w, ", KL ≤ %.3g nats/token", t.MaxKL)
	}
	fmt.Fprintf(w, ", passkey ≥ %.3g × baseline, needle ≥ %.3g × baseline, greedy match ≥ %.3g\n\n", t.MinPasskey, t.MinNeedle, t.MinGreedyMatch)
	fmt.Fprintf(w, "Verdicts are judged on %g%% bootstrap intervals over the instances (%d resamples, seeded): ✓ the whole interval within tolerance, ✗ the whole interval outside, ? the interval straddles the tolerance (more samples needed to tell), – cannot be judged", 100*CILevel, bootstrapN(s.Bootstrap))
	fmt.Fprintf(w, " (n/a: the runtime cannot apply that granularity, "+
		"or the uncompressed baseline itself fails the task). The baseline runs with no compressor attached; keep 1 must reproduce it exactly. "+
		"The numbers are what was measured: a policy losing to another on this model is reported as such.\n")

	for _, rr := range res.Runtimes {
		fmt.Fprintf(w, "\n## Runtime %s\n\n", rr.Runtime)
		if rr.Info != nil {
			fmt.Fprintf(w, "- engine: %s, arch %s, vocab %d, context %d, flash attention %v\n", rr.Info.Runtime, rr.Info.Arch, rr.Info.Vocab, rr.Info.Context, rr.Info.FlashAttn)
		}
		if rr.Sizes != nil {
			z := rr.Sizes
			fmt.Fprintf(w, "- sizes: lm %d×(%d prefill + %d scored); passkey/needle lengths %v × depths %v × %d seeds; greedy %d×(%d + %d generated); attention %d×(%d prefill + %d decoded)\n",
				z.LMSamples, z.LMPrefill, z.LMScore, z.Lengths, z.Depths, z.Seeds, z.GreedySamples, z.GreedyPrompt, z.GreedyTokens, z.AttentionSamples, z.AttentionLength, z.AttentionScore)
		}
		fmt.Fprintf(w, "- wall time: %.1f s\n", rr.Seconds)
		if rr.Error != "" {
			fmt.Fprintf(w, "\n**error:** %s\n", rr.Error)
			continue
		}
		for _, tr := range rr.Tasks {
			fmt.Fprintf(w, "\n### %s\n\n_%.1f s_\n\n", tr.Task, tr.Seconds)
			if tr.Status != StatusOK {
				fmt.Fprintf(w, "**%s:** %s\n", tr.Status, tr.Note)
				continue
			}
			if tr.Task == TaskAttention {
				writeAttention(w, tr.Attention)
			} else {
				WriteSummary(w, &tr)
				fmt.Fprintln(w)
				WriteComparisons(w, &tr)
				fmt.Fprintln(w)
				writeDetails(w, &tr)
			}
			for _, p := range plots {
				if strings.HasPrefix(filepath.Base(p), fileStem(rr.Runtime, tr.Task)) {
					rel, err := filepath.Rel(dir, p)
					if err != nil {
						rel = p
					}
					fmt.Fprintf(w, "\n![%s %s](%s)\n", rr.Runtime, tr.Task, rel)
				}
			}
		}
	}
}

func fmtKeeps(k []float64) string {
	parts := make([]string, len(k))
	for i, v := range k {
		parts[i] = fmt.Sprintf("%g", v)
	}
	return strings.Join(parts, ",")
}

func mark(v string) string {
	switch v {
	case VerdictPass:
		return "✓"
	case VerdictFail:
		return "✗"
	case VerdictUncertain:
		return "?"
	}
	return "–"
}

// fmtNum formats a metric with 4 significant digits ("—" for NaN).
func fmtNum(n Num) string {
	f := float64(n)
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return "—"
	}
	return fmt.Sprintf("%.4g", f)
}

// WriteSummary writes one sweep task's policy × keep table: its main metric
// with the verdict of each row.
func WriteSummary(w io.Writer, tr *TaskResult) {
	metric := MainMetric(tr.Task)
	base := tr.BaselineRow()
	var keeps []float64
	type series struct{ policy, gran string }
	var ss []series
	for _, r := range tr.Rows {
		if r.Baseline {
			continue
		}
		if !slices.Contains(keeps, r.Keep) {
			keeps = append(keeps, r.Keep)
		}
		if s := (series{r.Label(), r.Granularity}); !slices.Contains(ss, s) {
			ss = append(ss, s)
		}
	}
	bv := "—"
	if base != nil {
		bv = fmtNum(base.Metrics[metric]) + fmtCI(base.CI, metric)
	}
	fmt.Fprintf(w, "%s [%g%% bootstrap interval over the %d instances] by keep ratio (baseline %s):\n\n| policy | granularity |", metric, 100*CILevel, instances(base), bv)
	for _, k := range keeps {
		fmt.Fprintf(w, " %g |", k)
	}
	fmt.Fprintf(w, "\n|---|---|%s\n", strings.Repeat("---|", len(keeps)))
	for _, s := range ss {
		fmt.Fprintf(w, "| %s | %s |", s.policy, s.gran)
		for _, k := range keeps {
			r := tr.labelRow(s.policy, s.gran, k)
			switch {
			case r == nil:
				fmt.Fprint(w, " |")
			case r.Status != StatusOK:
				fmt.Fprintf(w, " %s |", r.Status)
			default:
				fmt.Fprintf(w, " %s%s %s |", fmtNum(r.Metrics[metric]), fmtCI(r.CI, metric), mark(r.Verdict))
			}
		}
		fmt.Fprintln(w)
	}
}

func instances(r *Row) int {
	if r == nil {
		return 0
	}
	return len(r.Instances)
}

// fmtCI formats the interval of a metric as " [lo, hi]" ("" without one).
func fmtCI(ci map[string]Interval, metric string) string {
	iv, ok := ci[metric]
	if !ok || !iv.Valid() {
		return ""
	}
	return fmt.Sprintf(" [%s, %s]", fmtNum(iv.Lo), fmtNum(iv.Hi))
}

// WriteComparisons writes the paired comparisons of a sweep task: each
// row's main metric against the baseline and against knorm at the same
// granularity and keep, with the paired bootstrap interval of the
// difference and whether it excludes zero.
func WriteComparisons(w io.Writer, tr *TaskResult) {
	metric := MainMetric(tr.Task)
	delta := "Δ" + metric
	if tr.Task == TaskLM {
		delta = "relative Δppl"
	}
	var lines []string
	for _, r := range tr.Rows {
		if r.Baseline || r.Status != StatusOK || r.Keep == 1 {
			continue
		}
		line := fmt.Sprintf("| %s | %s | %g |", r.Label(), r.Granularity, r.Keep)
		cells := map[string]string{}
		for _, c := range r.Compare {
			against := "knorm"
			if c.Against == "baseline" {
				against = "baseline"
			}
			if strings.HasSuffix(c.Against, " after prefill") {
				against = "knorm"
			}
			cells[against] = fmtDelta(tr.Task, c)
		}
		line += fmt.Sprintf(" %s | %s |", orDash(cells["baseline"]), orDash(cells["knorm"]))
		lines = append(lines, line)
	}
	if len(lines) == 0 {
		return
	}
	fmt.Fprintf(w, "Paired comparisons (%s = row − other on the same instances, %g%% paired bootstrap interval; "+
		"\"not distinguishable\": the interval contains 0):\n\n| policy | granularity | keep | %s vs baseline | %s vs knorm (chunked rows: vs knorm once after prefill) |\n|---|---|---|---|---|\n",
		delta, 100*CILevel, delta, delta)
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
}

func orDash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

// fmtDelta formats a comparison: "+2.9% [+1.2%, +4.4%] higher".
func fmtDelta(task string, c Comparison) string {
	f := func(n Num) string { return fmt.Sprintf("%+.3g", float64(n)) }
	if task == TaskLM {
		f = func(n Num) string { return fmt.Sprintf("%+.2f%%", 100*float64(n)) }
	}
	return fmt.Sprintf("%s [%s, %s] %s", f(c.Delta), f(c.CI.Lo), f(c.CI.Hi), c.Verdict)
}

func writeDetails(w io.Writer, tr *TaskResult) {
	var cols []string
	switch tr.Task {
	case TaskLM:
		cols = []string{"loss", "ppl", "ppl_increase", "kl", "top1", "max_abs_logit_diff"}
	case TaskPasskey:
		cols = []string{"accuracy", "digit_accuracy", "match_rate"}
	case TaskNeedle:
		cols = []string{"accuracy", "match_rate"}
	case TaskGreedy:
		cols = []string{"match_rate", "first_divergence"}
	}
	cols = append(cols, "identical", "kept_entries", "kept_positions")
	if slices.ContainsFunc(tr.Rows, func(r Row) bool { return r.Mode != "" }) {
		cols = append(cols, chunkedMetrics...)
	}
	fmt.Fprintf(w, "<details><summary>every row</summary>\n\n| policy | granularity | keep | %s | verdict | note |\n|---|---|---|%s---|---|\n",
		strings.Join(cols, " | "), strings.Repeat("---|", len(cols)))
	for _, r := range tr.Rows {
		fmt.Fprintf(w, "| %s | %s | %g |", r.Label(), r.Granularity, r.Keep)
		for _, c := range cols {
			if r.Status != StatusOK {
				fmt.Fprint(w, " |")
				continue
			}
			fmt.Fprintf(w, " %s |", fmtNum(r.Metrics[c]))
		}
		note := r.Reason
		if r.Status != StatusOK || note == "" {
			note = strings.TrimSpace(r.Status + ": " + r.Note)
			if r.Status == StatusOK {
				note = r.Note
			}
		}
		fmt.Fprintf(w, " %s | %s |\n", r.Verdict, strings.ReplaceAll(note, "|", "/"))
	}
	fmt.Fprintf(w, "\n</details>\n")
}

func writeAttention(w io.Writer, a *AttentionResult) {
	if a == nil {
		return
	}
	fmt.Fprintf(w, "Uncompressed model, %d samples, each a prefill of %d tokens then %d teacher-forced continuation tokens. "+
		"ρ: Spearman correlation, per KV head, between a key's L2 norm and the mean attention it receives (negative: low-norm keys receive more), "+
		"averaged over KV heads, with a %g%% bootstrap interval over samples. "+
		"Low-half share: mean share of a query's attention (among the keys counted) on their lowest-norm half; uniform attention would give the last column.\n\n",
		a.Samples, a.Length, a.Decode, 100*CILevel)
	for _, m := range []struct {
		title  string
		layers []LayerAttention
	}{
		{"Decoding phase (Devoto et al.'s measure): the continuation's queries, attending to the prefill's keys", a.Layers},
		{"Prompt-internal: every prefill query, attending to the earlier prefill keys", a.Prompt},
	} {
		if len(m.layers) == 0 {
			continue
		}
		fmt.Fprintf(w, "**%s**\n\n", m.title)
		fmt.Fprintf(w, "| layer | ρ mean [CI] | ρ per KV head | low-half share [CI] | per KV head | uniform share |\n|---|---|---|---|---|---|\n")
		for _, l := range m.layers {
			fmt.Fprintf(w, "| %d | %s [%s, %s] | %s | %s [%s, %s] | %s | %s |\n", l.Layer,
				fmtNum(l.Spearman), fmtNum(l.SpearmanCI.Lo), fmtNum(l.SpearmanCI.Hi), fmtNums(l.HeadSpearman),
				fmtNum(l.ShareLowHalf), fmtNum(l.ShareLowHalfCI.Lo), fmtNum(l.ShareLowHalfCI.Hi), fmtNums(l.HeadShareLowHalf), fmtNum(l.ShareUniform))
		}
		fmt.Fprintln(w)
	}
}

func fmtNums(v []Num) string {
	parts := make([]string, len(v))
	for i, n := range v {
		f := float64(n)
		if math.IsNaN(f) {
			parts[i] = "—"
		} else {
			parts[i] = fmt.Sprintf("%.2f", f)
		}
	}
	return strings.Join(parts, " ")
}

// fileStem is the prefix of a runtime's plot files for a task.
func fileStem(runtime, task string) string { return runtime + "-" + task }
