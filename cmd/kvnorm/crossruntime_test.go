//go:build cgo

package main

import (
	"cmp"
	"io"
	"math"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llama2c"
)

// crossPrompt is long enough for a keep-0.5 plan to matter.
const crossPrompt = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. One day, Lily saw a big red ball under a tree. She ran to the ball and picked it up."

// storiesF32GGUF converts stories260K to an F32 GGUF in a temporary
// directory, or skips when ../shared/models is absent.
func storiesF32GGUF(t *testing.T) string {
	t.Helper()
	ckpt, tok := storiesFiles(t)
	p := filepath.Join(t.TempDir(), "stories260K.gguf")
	require.NoError(t, llama2c.ConvertFile(ckpt, tok, p, "f32"))
	return p
}

// openEngine opens a registered runtime on a GGUF file, one thread.
func openEngine(t *testing.T, runtime, gguf string) hooks.Engine {
	t.Helper()
	open, ok := engines[runtime]
	require.True(t, ok, "runtime %s is not registered", runtime)
	e, err := open(conformance.EngineOptions{Model: gguf, Threads: 1, Log: io.Discard})
	require.NoError(t, err, runtime)
	t.Cleanup(func() { e.Close() })
	return e
}

// greedy prefills prompt into seq 0 and generates n tokens greedily (lowest
// id on ties), returning them and the logits each was chosen from.
func greedy(t *testing.T, e hooks.Engine, prompt []int32, n int) ([]int32, [][]float32) {
	t.Helper()
	rows, err := e.Prefill(0, prompt, false)
	require.NoError(t, err)
	logits := slices.Clone(rows[len(rows)-1])
	var toks []int32
	var all [][]float32
	for i := range n {
		all = append(all, logits)
		next := argmaxID(logits)
		toks = append(toks, next)
		if i == n-1 {
			break
		}
		rows, err := e.Decode(0, []int32{next})
		require.NoError(t, err)
		logits = slices.Clone(rows[0])
	}
	return toks, all
}

func argmaxID(l []float32) int32 {
	best := 0
	for i, v := range l {
		if v > l[best] {
			best = i
		}
	}
	return int32(best)
}

// topIDs returns the ids of the k largest logits, largest first.
func topIDs(l []float32, k int) []int {
	ids := make([]int, len(l))
	for i := range ids {
		ids[i] = i
	}
	slices.SortStableFunc(ids, func(a, b int) int { return cmp.Compare(l[b], l[a]) })
	return ids[:k]
}

// topDiff is the largest |a[i]-b[i]| over the k largest logits of a and of b.
func topDiff(a, b []float32, k int) float64 {
	d := 0.0
	for _, i := range append(topIDs(a, k), topIDs(b, k)...) {
		d = max(d, math.Abs(float64(a[i])-float64(b[i])))
	}
	return d
}

// crossTolF16 bounds the top logits of the two runtimes after the same
// eviction: each rounds keys and values to f16 (relative error up to 2^-11)
// and its flash attention accumulates values in f16, in a different cell
// order; about 1e-2 on logits of magnitude ~10, allowed with a margin. A
// different plan moves them by more than 2 (see TestOracleAgreement).
const crossTolF16 = 5e-2

// planRecorder is an observer that records the plan its compressor is about
// to apply when the prompt ends, then lets it apply.
type planRecorder struct {
	*adapter.Compressor
	plans []*adapter.Plan
}

func (r *planRecorder) PrefillDone(seq hooks.SeqID) (hooks.Stats, error) {
	p, err := r.PlanFor(seq, -1)
	if err != nil {
		return hooks.Stats{}, err
	}
	r.plans = append(r.plans, p)
	return r.Compressor.PrefillDone(seq)
}

// Cross-runtime (issue 4): for the same GGUF and prompt, Ollama's Go engine
// with kvnorm's cache and the llama.cpp adapter, both driven through
// hooks.Engine only, give the same greedy tokens and top logits within 1e-3
// without compression, and with per-token knorm at keep 0.5 the same plan and
// the same continuation.
//
// Both engines run an f16 KV cache (each runtime's default, checked below)
// with flash attention on, so without eviction the same ggml kernels see the
// same rounded keys and values: the tolerance 1e-3 is the (measured:
// 0 on stories260K). After eviction the cells differ in order: llama.cpp
// writes generated tokens into the freed cells (holes), Ollama appends them
// after the compacted ones, and ggml's flash attention accumulates values in
// f16 in cell order; the compressed logits are then held to crossTolF16
// (measured ~1e-2; 0 with flash attention off).
func TestCrossRuntime(t *testing.T) {
	gguf := storiesF32GGUF(t)
	lc := openEngine(t, "llamacpp", gguf)
	ol := openEngine(t, "ollama", gguf)
	const tol = 1e-3
	const n, k = 32, 10

	shL, shO := lc.CacheShape(), ol.CacheShape()
	require.Equal(t, shL.KType, shO.KType, "the same K cache type on both runtimes")
	require.Equal(t, shL.VType, shO.VType, "the same V cache type on both runtimes")
	require.Equal(t, shL.Layers, shO.Layers)
	require.Equal(t, shL.KVHeads, shO.KVHeads)
	require.Equal(t, lc.Info().FlashAttn, ol.Info().FlashAttn)
	t.Logf("cache %s/%s on both, flash attention %v", shL.KType, shL.VType, lc.Info().FlashAttn)

	promptL, err := lc.Tokenize(crossPrompt, true)
	require.NoError(t, err)
	promptO, err := ol.Tokenize(crossPrompt, true)
	require.NoError(t, err)
	require.Equal(t, promptL, promptO, "both runtimes tokenize alike")
	prompt := promptL

	t.Run("uncompressed", func(t *testing.T) {
		defer func() { lc.RemoveSequence(0); ol.RemoveSequence(0) }()
		tl, ll := greedy(t, lc, prompt, n)
		to, lo := greedy(t, ol, prompt, n)
		assert.Equal(t, tl, to, "the same greedy tokens")
		worst := 0.0
		for i := range ll {
			worst = max(worst, topDiff(ll[i], lo[i], k))
		}
		t.Logf("max |Δ logit| over the top %d of %d steps: %.3g", k, n, worst)
		assert.LessOrEqual(t, worst, tol)
	})

	t.Run("per-token knorm keep 0.5", func(t *testing.T) {
		pol := adapter.DefaultPolicy()
		pol.Granularity, pol.Keep = hooks.PerToken, 0.5
		var recs []*planRecorder
		var toks [][]int32
		var logits [][][]float32
		for _, e := range []hooks.Engine{lc, ol} {
			comp, err := adapter.New(e, pol)
			require.NoError(t, err)
			rec := &planRecorder{Compressor: comp}
			e.SetObserver(rec)
			tk, lg := greedy(t, e, prompt, n)
			require.Len(t, rec.plans, 1, "%s: one prefill plan", e.Info().Runtime)
			recs, toks, logits = append(recs, rec), append(toks, tk), append(logits, lg)
			pos, entries, err := e.Live(0)
			require.NoError(t, err)
			t.Logf("%s: kept %d of %d prompt positions, %d entries at the end (+%d generated)", e.Info().Runtime,
				len(rec.plans[0].Token.Keep), len(prompt), entries, n-1)
			assert.Equal(t, len(rec.plans[0].Token.Keep)+n-1, pos, "%s holds the kept and the generated positions", e.Info().Runtime)
			e.SetObserver(nil)
			require.NoError(t, e.RemoveSequence(0))
		}
		pl, po := recs[0].plans[0].Token, recs[1].plans[0].Token
		require.NotNil(t, pl)
		require.NotNil(t, po)
		assert.Len(t, pl.Keep, (len(prompt)+1)/2)
		assert.Equal(t, pl.Keep, po.Keep, "the same kept positions")
		assert.Equal(t, pl.Evict, po.Evict, "the same evicted positions")
		assert.Equal(t, toks[0], toks[1], "the same continuation")
		worst := 0.0
		for i := range logits[0] {
			worst = max(worst, topDiff(logits[0][i], logits[1][i], k))
		}
		t.Logf("compressed: max |Δ logit| over the top %d of %d steps: %.3g (f16 tolerance %g)", k, n, worst, crossTolF16)
		assert.LessOrEqual(t, worst, crossTolF16)
	})
}
