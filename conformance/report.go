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
	fmt.Fprintf(w, "Verdicts: ✓ within tolerance, ✗ outside, – cannot be judged (n/a: the runtime cannot apply that granularity, "+
		"or the uncompressed baseline itself fails the task). The baseline runs with no compressor attached; keep 1 must reproduce it exactly. "+
		"The numbers are what was measured: a policy losing to another on this model is reported as such.\n")

	for _, rr := range res.Runtimes {
		fmt.Fprintf(w, "\n## Runtime %s\n\n", rr.Runtime)
		if rr.Info != nil {
			fmt.Fprintf(w, "- engine: %s, arch %s, vocab %d, context %d, flash attention %v\n", rr.Info.Runtime, rr.Info.Arch, rr.Info.Vocab, rr.Info.Context, rr.Info.FlashAttn)
		}
		if rr.Sizes != nil {
			z := rr.Sizes
			fmt.Fprintf(w, "- sizes: lm %d×(%d prefill + %d scored); passkey/needle lengths %v × depths %v × %d seeds; greedy %d×(%d + %d generated); attention %d×%d\n",
				z.LMSamples, z.LMPrefill, z.LMScore, z.Lengths, z.Depths, z.Seeds, z.GreedySamples, z.GreedyPrompt, z.GreedyTokens, z.AttentionSamples, z.AttentionLength)
		}
		fmt.Fprintf(w, "- wall time: %.1f s\n", rr.Seconds)
		if rr.Error != "" {
			fmt.Fprintf(w, "\n**error:** %s\n", rr.Error)
			continue
		}
		for _, tr := range rr.Tasks {
			fmt.Fprintf(w, "\n### %s\n\n", tr.Task)
			if tr.Status != StatusOK {
				fmt.Fprintf(w, "**%s:** %s\n", tr.Status, tr.Note)
				continue
			}
			if tr.Task == TaskAttention {
				writeAttention(w, tr.Attention)
			} else {
				WriteSummary(w, &tr)
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
		if s := (series{r.Policy, r.Granularity}); !slices.Contains(ss, s) {
			ss = append(ss, s)
		}
	}
	bv := "—"
	if base != nil {
		bv = fmtNum(base.Metrics[metric])
	}
	fmt.Fprintf(w, "%s by keep ratio (baseline %s):\n\n| policy | granularity |", metric, bv)
	for _, k := range keeps {
		fmt.Fprintf(w, " %g |", k)
	}
	fmt.Fprintf(w, "\n|---|---|%s\n", strings.Repeat("---|", len(keeps)))
	for _, s := range ss {
		fmt.Fprintf(w, "| %s | %s |", s.policy, s.gran)
		for _, k := range keeps {
			r := tr.Row(s.policy, s.gran, k)
			switch {
			case r == nil:
				fmt.Fprint(w, " |")
			case r.Status != StatusOK:
				fmt.Fprintf(w, " %s |", r.Status)
			default:
				fmt.Fprintf(w, " %s %s |", fmtNum(r.Metrics[metric]), mark(r.Verdict))
			}
		}
		fmt.Fprintln(w)
	}
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
	fmt.Fprintf(w, "<details><summary>every row</summary>\n\n| policy | granularity | keep | %s | verdict | note |\n|---|---|---|%s---|---|\n",
		strings.Join(cols, " | "), strings.Repeat("---|", len(cols)))
	for _, r := range tr.Rows {
		fmt.Fprintf(w, "| %s | %s | %g |", r.Policy, r.Granularity, r.Keep)
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
	fmt.Fprintf(w, "Uncompressed model, %d samples of %d tokens. ρ: Spearman correlation, per KV head, between a position's key L2 norm and the mean attention it receives from later queries (negative: low-norm keys receive more). "+
		"Low-half share: mean share of a query's attention on the lowest-norm half of the keys it sees (uniform attention would give the last column).\n\n", a.Samples, a.Length)
	fmt.Fprintf(w, "| layer | ρ mean | ρ per KV head | low-half share | per KV head | uniform share |\n|---|---|---|---|---|---|\n")
	for _, l := range a.Layers {
		fmt.Fprintf(w, "| %d | %s | %s | %s | %s | %s |\n", l.Layer, fmtNum(l.Spearman), fmtNums(l.HeadSpearman), fmtNum(l.ShareLowHalf), fmtNums(l.HeadShareLowHalf), fmtNum(l.ShareUniform))
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
