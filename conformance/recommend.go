package conformance

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// Candidate is one policy the recommendation considered on one runtime.
type Candidate struct {
	Policy adapter.Policy `json:"-"`
	Name   string         `json:"policy"`
	// KeptEntries is the largest mean fraction of KV entries kept over the
	// tasks' rows (what the policy costs in memory after prefill).
	KeptEntries float64 `json:"kept_entries"`
	// Within is true when every judged task's interval lies within its
	// tolerance; Why names the first task that is not.
	Within bool   `json:"within"`
	Why    string `json:"why,omitempty"`
	// Ran is false when no task could run the policy on the runtime (a
	// granularity it cannot apply); such candidates are listed last.
	Ran bool `json:"ran"`
}

// Recommendation is the most compressing policy whose intervals stay within
// every tolerance on one runtime, and the KV memory it saves.
type Recommendation struct {
	Runtime string `json:"runtime"`
	// Found is false when no compressed policy stays within the tolerances
	// (Note says why).
	Found      bool           `json:"found"`
	Policy     adapter.Policy `json:"-"`
	PolicyName string         `json:"policy,omitempty"`
	Note       string         `json:"note,omitempty"`
	// Candidates are every policy considered, most compressing first.
	Candidates []Candidate `json:"candidates"`
	// Memory at the user's context length.
	Memory *KVMemory `json:"memory,omitempty"`
}

// KVMemory is the K+V memory of one sequence at a context length, full and
// with the recommended policy (layers kept whole at the full context,
// compressed layers at keep × context, the sizing of kvnorm's Ollama cache;
// the one batch of headroom it adds per compressed layer is not counted).
type KVMemory struct {
	Context     int   `json:"context"`
	FullBytes   int64 `json:"full_bytes"`
	PolicyBytes int64 `json:"policy_bytes"`
}

// SavedBytes is the memory the policy saves.
func (m *KVMemory) SavedBytes() int64 { return m.FullBytes - m.PolicyBytes }

// Recommend runs the suite once per base policy (skip layers, sinks and
// window to try; the sweep adds method, granularity and keep) and returns,
// per runtime, the candidate that keeps the fewest KV entries while every
// task's interval lies within the tolerances (verdict pass; uncertain does
// not qualify). targetCtx is the context length the memory saving is
// computed for (0: each runtime's context).
func Recommend(ctx context.Context, cfg Config, bases []adapter.Policy, targetCtx int) ([]Recommendation, []*Results, error) {
	if len(bases) == 0 {
		bases = []adapter.Policy{cfg.Base}
	}
	var all []*Results
	for i, b := range bases {
		c := cfg
		c.Base = b
		if cfg.Progress != nil && len(bases) > 1 {
			fmt.Fprintf(cfg.Progress, "conformance: recommend: base policy %d/%d: skip=%s sinks=%d window=%d\n", i+1, len(bases), adapter.FormatLayers(b.SkipLayers), b.Sinks, b.Window)
		}
		res, err := Run(ctx, c)
		if res != nil {
			all = append(all, res)
		}
		if err != nil {
			return nil, all, err
		}
	}
	return recommendFrom(all, bases, targetCtx), all, nil
}

// recommendFrom picks the recommendation of every runtime from the results
// of one run per base policy.
func recommendFrom(all []*Results, bases []adapter.Policy, targetCtx int) []Recommendation {
	if len(all) == 0 {
		return nil
	}
	var out []Recommendation
	for ri, rr0 := range all[0].Runtimes {
		rec := Recommendation{Runtime: rr0.Runtime}
		var shape *hooks.CacheShape
		for bi, res := range all {
			if ri >= len(res.Runtimes) {
				continue
			}
			rr := &res.Runtimes[ri]
			if rr.Error != "" {
				rec.Note = "runtime error: " + rr.Error
				continue
			}
			if rr.Shape != nil {
				shape = rr.Shape
			}
			rec.Candidates = append(rec.Candidates, candidates(rr, bases[bi])...)
		}
		slices.SortStableFunc(rec.Candidates, func(a, b Candidate) int {
			switch {
			case a.Ran != b.Ran:
				if a.Ran {
					return -1
				}
				return 1
			case a.KeptEntries != b.KeptEntries:
				if a.KeptEntries < b.KeptEntries {
					return -1
				}
				return 1
			case a.Policy.Sinks+a.Policy.Window != b.Policy.Sinks+b.Policy.Window:
				return (a.Policy.Sinks + a.Policy.Window) - (b.Policy.Sinks + b.Policy.Window)
			}
			return 0
		})
		for _, c := range rec.Candidates {
			if c.Within && c.Policy.Keep < 1 {
				rec.Found, rec.Policy, rec.PolicyName = true, c.Policy, c.Name
				break
			}
		}
		if !rec.Found && rec.Note == "" {
			rec.Note = "no compressed policy stays within every tolerance on these samples: keep the cache whole, loosen a tolerance, or add samples to narrow the intervals"
		}
		if rec.Found && shape != nil {
			n := targetCtx
			if n <= 0 && rr0.Info != nil {
				n = rr0.Info.Context
			}
			if m, err := kvMemory(*shape, rec.Policy, n); err == nil {
				rec.Memory = m
			}
		}
		out = append(out, rec)
	}
	return out
}

// candidates lists the compressed rows of one run as candidates: a policy
// (method, granularity, keep on this base) qualifies when every task judged
// it pass. A task whose baseline cannot do it (verdict n/a on an ok row) does
// not constrain; a row the runtime could not run disqualifies.
func candidates(rr *RuntimeResult, base adapter.Policy) []Candidate {
	type key struct {
		policy, gran string
		keep         float64
	}
	byKey := map[key]*Candidate{}
	var order []key
	for ti := range rr.Tasks {
		tr := &rr.Tasks[ti]
		if tr.Task == TaskAttention {
			continue
		}
		for _, r := range tr.Rows {
			if r.Baseline || r.Mode != "" {
				continue
			}
			k := key{r.Policy, r.Granularity, r.Keep}
			c := byKey[k]
			if c == nil {
				p := base
				m, err1 := adapter.ParseMethod(r.Policy)
				g, err2 := hooks.ParseGranularity(r.Granularity)
				if err1 != nil || err2 != nil {
					continue
				}
				p.Method, p.Granularity, p.Keep, p.Budget, p.Seed = m, g, r.Keep, 0, 0
				c = &Candidate{Policy: p, Name: p.String(), Within: true}
				byKey[k] = c
				order = append(order, k)
			}
			if tr.Status != StatusOK || r.Status != StatusOK {
				if c.Within {
					c.Within, c.Why = false, fmt.Sprintf("%s: %s %s", tr.Task, r.Status, r.Note)
				}
				continue
			}
			c.Ran = true
			c.KeptEntries = max(c.KeptEntries, float64(r.Metrics["kept_entries"]))
			switch r.Verdict {
			case VerdictPass, VerdictNA:
			default:
				if c.Within {
					c.Within, c.Why = false, fmt.Sprintf("%s: %s (%s)", tr.Task, r.Verdict, r.Reason)
				}
			}
		}
	}
	out := make([]Candidate, 0, len(order))
	for _, k := range order {
		out = append(out, *byKey[k])
	}
	return out
}

// kvMemory is the K+V memory of one sequence of n positions, full and with
// p: layers p keeps whole (skip layers in per-head mode) at n, the others at
// p's target of n.
func kvMemory(shape hooks.CacheShape, p adapter.Policy, n int) (*KVMemory, error) {
	entry, err := shape.EntryBytes()
	if err != nil {
		return nil, err
	}
	if n <= 0 {
		return nil, fmt.Errorf("conformance: context %d", n)
	}
	per := int64(shape.KVHeads) * entry
	m := &KVMemory{Context: n, FullBytes: int64(shape.Layers) * int64(n) * per}
	kept := int64(p.Target(n))
	for l := range shape.Layers {
		if p.Granularity == hooks.PerHead && slices.Contains(p.SkipLayers, l) {
			m.PolicyBytes += int64(n) * per
		} else {
			m.PolicyBytes += kept * per
		}
	}
	return m, nil
}

// OllamaEnv returns the OLLAMA_KV_NORM_* lines that configure p in
// kvnorm's Ollama build.
func OllamaEnv(p adapter.Policy) []string {
	lines := []string{
		"OLLAMA_KV_NORM_KEEP=" + strconv.FormatFloat(p.Keep, 'g', -1, 64),
		"OLLAMA_KV_NORM_POLICY=" + p.Method.String(),
		"OLLAMA_KV_NORM_GRANULARITY=" + p.Granularity.String(),
		"OLLAMA_KV_NORM_SKIP_LAYERS=" + adapter.FormatLayers(p.SkipLayers),
		"OLLAMA_KV_NORM_SINKS=" + strconv.Itoa(p.Sinks),
		"OLLAMA_KV_NORM_WINDOW=" + strconv.Itoa(p.Window),
	}
	if p.Granularity == hooks.PerToken {
		lines = append(lines, "OLLAMA_KV_NORM_AGGREGATE="+p.Aggregate.String())
	}
	if p.MinPrompt > 0 {
		lines = append(lines, "OLLAMA_KV_NORM_MIN_PROMPT="+strconv.Itoa(p.MinPrompt))
	}
	return lines
}

// GoLiteral returns p as a Go adapter.Policy composite literal.
func GoLiteral(p adapter.Policy) string {
	method := map[adapter.Method]string{adapter.KNorm: "KNorm", adapter.Random: "Random", adapter.Streaming: "Streaming", adapter.Inverse: "Inverse"}[p.Method]
	gran := map[hooks.Granularity]string{hooks.PerHead: "PerHead", hooks.PerToken: "PerToken"}[p.Granularity]
	agg := map[adapter.Aggregation]string{adapter.MeanRank: "MeanRank", adapter.MeanNorm: "MeanNorm", adapter.MinNorm: "MinNorm", adapter.MaxNorm: "MaxNorm"}[p.Aggregate]
	var b strings.Builder
	fmt.Fprintf(&b, "adapter.Policy{Method: adapter.%s, Keep: %s, Granularity: hooks.%s", method, strconv.FormatFloat(p.Keep, 'g', -1, 64), gran)
	if len(p.SkipLayers) > 0 {
		parts := make([]string, len(p.SkipLayers))
		for i, l := range p.SkipLayers {
			parts[i] = strconv.Itoa(l)
		}
		fmt.Fprintf(&b, ", SkipLayers: []int{%s}", strings.Join(parts, ", "))
	}
	if p.Sinks > 0 {
		fmt.Fprintf(&b, ", Sinks: %d", p.Sinks)
	}
	if p.Window > 0 {
		fmt.Fprintf(&b, ", Window: %d", p.Window)
	}
	if p.Granularity == hooks.PerToken {
		fmt.Fprintf(&b, ", Aggregate: adapter.%s", agg)
	}
	if p.MinPrompt > 0 {
		fmt.Fprintf(&b, ", MinPrompt: %d", p.MinPrompt)
	}
	b.WriteString("}")
	return b.String()
}

// WriteRecommendation prints a recommendation for a user: the policy, the
// Ollama environment, the Go literal and the memory saved.
func WriteRecommendation(w io.Writer, rec Recommendation, tol Tolerances) {
	fmt.Fprintf(w, "== recommendation for %s (tolerances: perplexity ≤ +%.3g%%", rec.Runtime, 100*tol.MaxPPLIncrease)
	if tol.MaxKL > 0 {
		fmt.Fprintf(w, ", KL ≤ %.3g", tol.MaxKL)
	}
	fmt.Fprintf(w, ", passkey ≥ %.3g×, needle ≥ %.3g×, greedy match ≥ %.3g; judged on %g%% intervals)\n", tol.MinPasskey, tol.MinNeedle, tol.MinGreedyMatch, 100*CILevel)
	if !rec.Found {
		fmt.Fprintf(w, "no recommendation: %s\n", rec.Note)
	} else {
		fmt.Fprintf(w, "policy: %s\n\n# Ollama (kvnorm's build):\n", rec.PolicyName)
		for _, l := range OllamaEnv(rec.Policy) {
			fmt.Fprintf(w, "export %s\n", l)
		}
		fmt.Fprintf(w, "\n// Go:\n%s\n", GoLiteral(rec.Policy))
		if m := rec.Memory; m != nil {
			fmt.Fprintf(w, "\nKV memory of one sequence at %d tokens (this runtime's cache types): %s full, %s with this policy: %s saved (%.1f%%)\n"+
				"(kvnorm's Ollama cache allocates this: layers kept whole at the full context, the others at keep × context, plus one batch; "+
				"llama.cpp allocates n_ctx cells whatever the policy and fits more context in them instead)\n",
				m.Context, FormatBytes(m.FullBytes), FormatBytes(m.PolicyBytes), FormatBytes(m.SavedBytes()), 100*float64(m.SavedBytes())/float64(m.FullBytes))
		}
	}
	fmt.Fprintf(w, "\ncandidates, most compressing first:\n")
	var unrun []Candidate
	for _, c := range rec.Candidates {
		if !c.Ran {
			unrun = append(unrun, c)
			continue
		}
		status := "within"
		if !c.Within {
			status = "outside: " + c.Why
		}
		fmt.Fprintf(w, "  kept %.3f  %s  %s\n", c.KeptEntries, c.Name, status)
	}
	if len(unrun) > 0 {
		fmt.Fprintf(w, "  and %d the runtime could not run (first: %s: %s)\n", len(unrun), unrun[0].Name, unrun[0].Why)
	}
}

// FormatBytes prints a byte count in B, KiB, MiB or GiB.
func FormatBytes(b int64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.2f MiB", float64(b)/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%d B", b)
}
