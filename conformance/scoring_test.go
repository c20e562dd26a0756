package conformance

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

func TestScoreCountsCorrectAndIncorrectAnswers(t *testing.T) {
	in := &instance{gen: 4, check: func(s string) (bool, float64) { return ScorePasskey(s, "48960") }}
	base := &output{tokens: []int32{5, 6, 7, 8}, text: "48960. R", kept: Metrics{}}
	right := &output{tokens: []int32{5, 6, 7, 8}, text: "48960. R", kept: Metrics{"kept_entries": 0.5}}
	wrong := &output{tokens: []int32{5, 6, 9, 9}, text: "48911 is", kept: Metrics{"kept_entries": 0.5}}
	r := score(TaskPasskey, in, base, right)
	w := score(TaskPasskey, in, base, wrong)
	assert.Equal(t, Num(1), r.Metrics["correct"])
	assert.Equal(t, Num(1), r.Metrics["identical"])
	assert.Equal(t, Num(0), w.Metrics["correct"])
	assert.Equal(t, Num(0.6), w.Metrics["digits"])
	assert.Equal(t, Num(0.5), w.Metrics["match_rate"])
	assert.Equal(t, Num(2), w.Metrics["first_divergence"])
	assert.Equal(t, Num(0), w.Metrics["identical"])
	m := aggregate(TaskPasskey, []InstanceResult{r, w})
	assert.Equal(t, Num(0.5), m["accuracy"])
	assert.Equal(t, Num(0.8), m["digit_accuracy"])
	assert.Equal(t, Num(0.5), m["identical"])

	needle := &instance{gen: 3, check: func(s string) (bool, float64) {
		if ScoreNeedle(s, "red box") {
			return true, 1
		}
		return false, 0
	}}
	assert.Equal(t, Num(1), score(TaskNeedle, needle, base, &output{text: "red box and"}).Metrics["correct"])
	assert.Equal(t, Num(0), score(TaskNeedle, needle, base, &output{text: "box and"}).Metrics["correct"])
}

func TestScoreLM(t *testing.T) {
	in := &instance{cont: []int32{0, 1}}
	base := &output{logits: [][]float32{{2, 0, 0}, {0, 2, 0}}}
	same := score(TaskLM, in, base, &output{logits: [][]float32{{2, 0, 0}, {0, 2, 0}}})
	assert.Equal(t, Num(0), same.Metrics["kl"])
	assert.Equal(t, Num(1), same.Metrics["top1"])
	assert.Equal(t, Num(1), same.Metrics["identical"])
	// log softmax of {2,0,0} at 0: 2 - log(e^2+2).
	want := -(2 - math.Log(math.Exp(2)+2))
	assert.InDelta(t, want, float64(same.Metrics["loss"]), 1e-12)
	diff := score(TaskLM, in, base, &output{logits: [][]float32{{2, 0, 0}, {0, 0, 2}}})
	assert.Equal(t, Num(0.5), diff.Metrics["top1"])
	assert.Positive(t, float64(diff.Metrics["kl"]))
	assert.Equal(t, Num(2), diff.Metrics["max_abs_logit_diff"])
	assert.Equal(t, Num(0), diff.Metrics["identical"])
	m := aggregate(TaskLM, []InstanceResult{same, diff})
	assert.InDelta(t, math.Exp(float64(m["loss"])), float64(m["ppl"]), 1e-12)
}

func TestJudge(t *testing.T) {
	tol := DefaultTolerances()
	base := &Row{Baseline: true, Status: StatusOK, Metrics: Metrics{"ppl": 4, "accuracy": 0.8, "match_rate": 1, "identical": 1}}
	row := func(keep float64, m Metrics) *Row { return &Row{Keep: keep, Status: StatusOK, Metrics: m} }

	r := row(0.5, Metrics{"ppl": 4.03, "identical": 0})
	judge(TaskLM, r, base, tol, nil)
	assert.Equal(t, VerdictPass, r.Verdict)
	assert.InDelta(t, 0.0075, float64(r.Metrics["ppl_increase"]), 1e-12)
	r = row(0.5, Metrics{"ppl": 4.1, "identical": 0})
	judge(TaskLM, r, base, tol, nil)
	assert.Equal(t, VerdictFail, r.Verdict)
	r = row(1, Metrics{"ppl": 4, "identical": 0})
	judge(TaskLM, r, base, tol, nil)
	assert.Equal(t, VerdictFail, r.Verdict, "keep 1 must be identical")

	r = row(0.5, Metrics{"accuracy": 0.76, "identical": 0})
	judge(TaskPasskey, r, base, tol, nil)
	assert.Equal(t, VerdictPass, r.Verdict)
	r = row(0.5, Metrics{"accuracy": 0.7, "identical": 0})
	judge(TaskPasskey, r, base, tol, nil)
	assert.Equal(t, VerdictFail, r.Verdict)
	zero := &Row{Baseline: true, Status: StatusOK, Metrics: Metrics{"accuracy": 0}}
	r = row(0.5, Metrics{"accuracy": 0, "identical": 0})
	judge(TaskNeedle, r, zero, tol, nil)
	assert.Equal(t, VerdictNA, r.Verdict, "a baseline that retrieves nothing cannot judge")

	r = row(0.5, Metrics{"match_rate": 0.95, "identical": 0})
	judge(TaskGreedy, r, base, tol, nil)
	assert.Equal(t, VerdictPass, r.Verdict)
	r = &Row{Keep: 0.5, Status: StatusNA}
	judge(TaskGreedy, r, base, tol, nil)
	assert.Equal(t, VerdictNA, r.Verdict)
}

// TestAttentionAccumulator feeds one hand-made batch: one layer, one KV
// head, two query heads, three positions with norms 3, 1, 2.
func TestAttentionAccumulator(t *testing.T) {
	shape := hooks.CacheShape{Layers: 1, KVHeads: 1, HeadDim: 1, KType: kernels.F32, VType: kernels.F32}
	obs := newNormObserver(shape)
	require.NoError(t, obs.ObserveKeys(&hooks.KeyBatch{Layer: 0, Seqs: []hooks.SeqID{0, 0, 0}, Positions: []hooks.Pos{0, 1, 2},
		DType: kernels.F32, Keys: hooks.F32Bytes([]float32{-3, 1, 2})}))
	acc := newAttnAccumulator(obs, 0, math.MaxInt32, math.MaxInt32)
	// [head][query][cell]: one row per (head, query).
	w := []float32{
		1, 0, 0, // head 0
		0.25, 0.75, 0,
		0.2, 0.5, 0.3,
		1, 0, 0, // head 1
		0.5, 0.5, 0,
		0.1, 0.6, 0.3,
	}
	require.NoError(t, acc.add(&AttentionBatch{Layer: 0, Seq: 0, Queries: []hooks.Pos{0, 1, 2}, Heads: 2, KVHeads: 1,
		Cells: [][]hooks.Pos{{0, 1, 2}}, Weights: w}))
	rho, share, uni := acc.result()
	// Received from later queries: pos 0 mean(0.25,0.2,0.5,0.1)=0.2625,
	// pos 1 mean(0.5,0.6)=0.55; norms 3, 1: ρ = -1.
	assert.InDelta(t, -1, rho[0], 1e-12)
	// Low half: query 1 sees {0,1}, low = pos 1 (norm 1): 0.75, 0.5; query
	// 2 sees 3 keys, low = pos 1: 0.5, 0.6. Mean 0.5875. Uniform: 1/2, 1/3.
	assert.InDelta(t, 0.5875, share[0], 1e-6)
	assert.InDelta(t, (0.5+1.0/3)/2, uni[0], 1e-12)

	// The decoding-phase measure with a prompt of 2 (positions 0, 1): only
	// query 2 counts, on keys 0 and 1 only, its weights renormalised.
	dec := newAttnAccumulator(obs, 2, math.MaxInt32, 2)
	require.NoError(t, dec.add(&AttentionBatch{Layer: 0, Seq: 0, Queries: []hooks.Pos{0, 1, 2}, Heads: 2, KVHeads: 1,
		Cells: [][]hooks.Pos{{0, 1, 2}}, Weights: w}))
	rho, share, uni = dec.result()
	// Received: pos 0 mean(0.2, 0.1) = 0.15, pos 1 mean(0.5, 0.6) = 0.55;
	// norms 3, 1: ρ = -1. Low half = pos 1: 0.5/0.7 and 0.6/0.7.
	assert.InDelta(t, -1, rho[0], 1e-12)
	assert.InDelta(t, (0.5/0.7+0.6/0.7)/2, share[0], 1e-6)
	assert.InDelta(t, 0.5, uni[0], 1e-12)

	bad := &AttentionBatch{Layer: 0, Queries: []hooks.Pos{3}, Heads: 2, KVHeads: 1, Cells: [][]hooks.Pos{{3}}, Weights: []float32{1, 1}}
	bad.Cells[0] = []hooks.Pos{0}
	require.NoError(t, acc.add(bad), "one visible key: nothing to compare")
	bad.Cells[0], bad.Weights = []hooks.Pos{0, 9}, []float32{0.5, 0.5, 0.5, 0.5}
	bad.Queries = []hooks.Pos{9}
	assert.Error(t, acc.add(bad), "position 9's key was never reported")
	bad.Weights = bad.Weights[:3]
	assert.Error(t, acc.add(bad), "weights do not match the shape")
}
