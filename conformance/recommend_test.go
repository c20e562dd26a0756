package conformance

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// syntheticRuntime builds one runtime's results as runSweep would, from
// planted per-instance values: at keep 0.5 every task loses a little, at
// keep 0.25 a lot, so each tolerance can be set to admit or reject keep
// 0.25 on its own.
func syntheticRuntime(tol Tolerances) RuntimeResult {
	const n = 12
	keeps := []float64{1, 0.5, 0.25}
	// Loss increase (nats), accuracy drop and greedy match per keep.
	dLoss := map[float64]float64{1: 0, 0.5: 0.004, 0.25: 0.05}
	dKL := map[float64]float64{1: 0, 0.5: 0.01, 0.25: 0.2}
	miss := map[float64]int{1: 0, 0.5: 0, 0.25: 8} // instances that lose the answer
	match := map[float64]float64{1: 1, 0.5: 0.98, 0.25: 0.6}
	inst := func(task string, keep float64, i int) InstanceResult {
		m := Metrics{"kept_entries": Num(keep), "kept_positions": Num(keep), "identical": b2n(keep == 1)}
		switch task {
		case TaskLM:
			m["loss"] = Num(1.4 + 0.01*float64(i%5) + dLoss[keep] + 0.0005*float64(i%3)*b2f(keep < 1))
			m["kl"], m["top1"] = Num(dKL[keep]), 1
		case TaskPasskey, TaskNeedle:
			m["correct"], m["digits"] = b2n(i >= miss[keep]), 1
			m["match_rate"] = 1
		case TaskGreedy:
			m["match_rate"], m["first_divergence"] = Num(match[keep]), 8
		}
		return InstanceResult{ID: fmt.Sprint(i), Metrics: m}
	}
	rr := RuntimeResult{Runtime: "fake", Info: &hooks.EngineInfo{Context: 1000},
		Shape: &hooks.CacheShape{Layers: 4, KVHeads: 2, HeadDim: 8, KType: kernels.F32, VType: kernels.F32}}
	for _, task := range []string{TaskLM, TaskPasskey, TaskNeedle, TaskGreedy} {
		base := Row{Baseline: true, Policy: "baseline", Granularity: "none", Keep: 1, Status: StatusOK}
		var rows []Row
		for _, k := range keeps {
			rows = append(rows, Row{Policy: "knorm", Granularity: "per-head", Keep: k, Status: StatusOK})
		}
		for i := range n {
			base.Instances = append(base.Instances, inst(task, 1, i))
			for j, k := range keeps {
				rows[j].Instances = append(rows[j].Instances, inst(task, k, i))
			}
		}
		rr.Tasks = append(rr.Tasks, TaskResult{Task: task, Status: StatusOK, Rows: finishRows(task, base, rows, tol, 500, 1)})
	}
	return rr
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// TestRecommendHonoursEachTolerance: with loose tolerances the most
// compressing keep is recommended; tightening any one tolerance so that keep
// 0.25 violates it moves the recommendation to keep 0.5; tightening it so
// that nothing compressed qualifies gives no recommendation.
func TestRecommendHonoursEachTolerance(t *testing.T) {
	loose := Tolerances{MaxPPLIncrease: 0.2, MaxKL: 1, MinPasskey: 0, MinNeedle: 0, MinGreedyMatch: 0.5}
	cases := []struct {
		name string
		tol  func(*Tolerances)
		keep float64 // 0: none
		why  string
	}{
		{"loose", func(*Tolerances) {}, 0.25, ""},
		{"perplexity", func(t *Tolerances) { t.MaxPPLIncrease = 0.01 }, 0.5, "lm"},
		{"kl", func(t *Tolerances) { t.MaxKL = 0.05 }, 0.5, "lm"},
		{"passkey", func(t *Tolerances) { t.MinPasskey = 0.95 }, 0.5, "passkey"},
		{"needle", func(t *Tolerances) { t.MinNeedle = 0.95 }, 0.5, "needle"},
		{"greedy", func(t *Tolerances) { t.MinGreedyMatch = 0.9 }, 0.5, "greedy"},
		{"greedy strict", func(t *Tolerances) { t.MinGreedyMatch = 0.99 }, 0, "greedy"},
		{"perplexity strict", func(t *Tolerances) { t.MaxPPLIncrease = 0.001 }, 0, "lm"},
	}
	base := adapter.DefaultPolicy()
	base.Granularity = hooks.PerHead
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tol := loose
			c.tol(&tol)
			res := &Results{Runtimes: []RuntimeResult{syntheticRuntime(tol)}}
			recs := recommendFrom([]*Results{res}, []adapter.Policy{base}, 4096)
			require.Len(t, recs, 1)
			rec := recs[0]
			require.Len(t, rec.Candidates, 3)
			assert.Equal(t, 0.25, rec.Candidates[0].KeptEntries, "most compressing first")
			assert.True(t, rec.Candidates[0].Ran)
			if c.keep == 0 {
				require.False(t, rec.Found, "%+v", rec.Candidates)
				assert.NotEmpty(t, rec.Note)
				return
			}
			require.True(t, rec.Found, "%+v", rec.Candidates)
			assert.Equal(t, c.keep, rec.Policy.Keep)
			assert.Equal(t, adapter.KNorm, rec.Policy.Method)
			assert.Equal(t, hooks.PerHead, rec.Policy.Granularity)
			if c.why != "" {
				assert.True(t, strings.HasPrefix(rec.Candidates[0].Why, c.why+":"), rec.Candidates[0].Why)
			}
			// Memory: 4 layers × 2 heads × (8+8)×4 bytes per position; layers
			// 0 and 1 whole, 2 and 3 at keep × 4096.
			require.NotNil(t, rec.Memory)
			per := int64(2 * 64)
			assert.Equal(t, 4*4096*per, rec.Memory.FullBytes)
			assert.Equal(t, 2*4096*per+2*int64(rec.Policy.Target(4096))*per, rec.Memory.PolicyBytes)

			var out strings.Builder
			WriteRecommendation(&out, rec, tol)
			for _, want := range []string{fmt.Sprintf("OLLAMA_KV_NORM_KEEP=%g", c.keep), "OLLAMA_KV_NORM_SKIP_LAYERS=0,1",
				fmt.Sprintf("adapter.Policy{Method: adapter.KNorm, Keep: %g, Granularity: hooks.PerHead, SkipLayers: []int{0, 1}}", c.keep), "saved"} {
				assert.Contains(t, out.String(), want)
			}
		})
	}
}

// TestGoLiteralAndEnvRoundTrip: the printed settings parse back to the
// policy (the Ollama lines through adapter's own parsers).
func TestGoLiteralAndEnv(t *testing.T) {
	p := adapter.Policy{Method: adapter.Streaming, Keep: 0.3, Granularity: hooks.PerToken, Aggregate: adapter.MinNorm, Sinks: 4, Window: 16, MinPrompt: 32}
	assert.Equal(t, "adapter.Policy{Method: adapter.Streaming, Keep: 0.3, Granularity: hooks.PerToken, Sinks: 4, Window: 16, Aggregate: adapter.MinNorm, MinPrompt: 32}", GoLiteral(p))
	env := strings.Join(OllamaEnv(p), "\n")
	for _, want := range []string{"OLLAMA_KV_NORM_KEEP=0.3", "OLLAMA_KV_NORM_POLICY=streaming", "OLLAMA_KV_NORM_GRANULARITY=per-token",
		"OLLAMA_KV_NORM_SKIP_LAYERS=none", "OLLAMA_KV_NORM_SINKS=4", "OLLAMA_KV_NORM_WINDOW=16", "OLLAMA_KV_NORM_AGGREGATE=min-norm", "OLLAMA_KV_NORM_MIN_PROMPT=32"} {
		assert.Contains(t, env, want)
	}
}

// TestRecommendListsUnrunnableLast: a granularity the runtime cannot apply
// is never recommended and is listed after every candidate that ran.
func TestRecommendListsUnrunnableLast(t *testing.T) {
	tol := DefaultTolerances()
	rr := syntheticRuntime(tol)
	lm := &rr.Tasks[0]
	lm.Rows = append(lm.Rows, Row{Policy: "knorm", Granularity: "per-token", Keep: 0.25, Status: StatusNA, Note: "per-token unsupported"})
	recs := recommendFrom([]*Results{{Runtimes: []RuntimeResult{rr}}}, []adapter.Policy{adapter.DefaultPolicy()}, 0)
	require.Len(t, recs, 1)
	c := recs[0].Candidates
	require.Len(t, c, 4)
	last := c[len(c)-1]
	assert.False(t, last.Ran)
	assert.False(t, last.Within)
	assert.Contains(t, last.Why, "per-token unsupported")
	assert.Equal(t, hooks.PerToken, last.Policy.Granularity)
	require.NotNil(t, recs[0].Memory, "the runtime's own context (1000) when no target is given")
	assert.Equal(t, 1000, recs[0].Memory.Context)
}
