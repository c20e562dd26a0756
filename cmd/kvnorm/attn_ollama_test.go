//go:build cgo

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/conformance/refengine"
	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/ollama"
	"github.com/kvnorm/kvnorm/synth"
)

// TestOllamaAttentionMatchesReference: the attention the Ollama engine
// reconstructs (queries tapped from attn_q and roped by the model, keys from
// the cache) equals the reference forward pass's attention for the same
// tokens, per layer, query head, query and key position: through a prompt in
// batches, a per-head compaction that leaves every KV head its own
// positions, a batched decode and single-token decodes.
func TestOllamaAttentionMatchesReference(t *testing.T) {
	ckpt, tok := storiesFiles(t)
	text, err := os.ReadFile(storyPrompt(t, t.TempDir(), 12))
	require.NoError(t, err)
	path, cleanup, err := ollamaModelPath(ckpt, tok, io.Discard)
	require.NoError(t, err)
	t.Cleanup(cleanup)

	for _, tc := range []struct {
		cache string
		tol   float64
	}{
		// f32 weights and keys on both sides. (With Ollama's f16 cache the
		// rows differ by up to 0.0055: keys and values rounded to f16
		// change the later layers' queries too; record_test.go checks the
		// f16 keys the recorder reads.)
		{"f32", 1e-5},
	} {
		t.Run("cache="+tc.cache, func(t *testing.T) {
			ref, err := refengine.Open(ckpt, tok, refengine.Options{Context: 512, Batch: 48})
			require.NoError(t, err)
			defer ref.Close()
			oe, err := ollama.OpenEngine(path, ollama.Config{Context: 512, Batch: 48, Threads: 1, FlashAttention: true, CacheType: tc.cache})
			require.NoError(t, err)
			ol := &ollamaEngine{Engine: oe, cleanup: func() {}}
			defer ol.Close()

			toks, err := ref.Tokenize(string(text), true)
			require.NoError(t, err)
			require.Greater(t, len(toks), 200)
			prompt, more, single := toks[:150], toks[150:195], toks[195:198]
			sh := ref.CacheShape()
			osh := ol.CacheShape()
			require.Equal(t, [3]int{sh.Layers, sh.KVHeads, sh.HeadDim}, [3]int{osh.Layers, osh.KVHeads, osh.HeadDim}, "same attention shape")

			// Layers 2-4: KV head h drops the positions p < 140 with p%4 == h%4.
			plan := &hooks.HeadPlan{Seq: 0, Layers: make([][][]hooks.Pos, sh.Layers)}
			for l := 2; l < sh.Layers; l++ {
				plan.Layers[l] = make([][]hooks.Pos, sh.KVHeads)
				for h := range sh.KVHeads {
					for p := range hooks.Pos(len(prompt)) {
						if p >= 140 || int(p)%4 != h%4 {
							plan.Layers[l][h] = append(plan.Layers[l][h], p)
						}
					}
				}
			}

			engs := []hooks.Engine{ref, ol}
			rows := []attnRows{{}, {}}
			for i, e := range engs {
				recordAttention(t, e, &rows[i])
				_, err := e.Prefill(0, prompt, false)
				require.NoError(t, err)
				require.NoError(t, e.(hooks.HeadCompactor).CompactHeads(plan))
				_, err = e.Decode(0, more)
				require.NoError(t, err)
				for _, tk := range single {
					_, err = e.Decode(0, []int32{tk})
					require.NoError(t, err)
				}
			}
			require.Len(t, rows[1], len(rows[0]))
			require.Len(t, rows[0], sh.Layers*8*198, "5 layers × 8 query heads × 198 queries")
			var worst float64
			for k, want := range rows[0] {
				got, ok := rows[1][k]
				require.True(t, ok, "Ollama has no attention for layer %d head %d query %d", k[0], k[1], k[2])
				require.Len(t, got, len(want), "layer %d head %d query %d: cells", k[0], k[1], k[2])
				for p, w := range want {
					g, ok := got[p]
					require.True(t, ok, "layer %d head %d query %d: Ollama has no cell for position %d", k[0], k[1], k[2], p)
					d := math.Abs(float64(w) - float64(g))
					worst = max(worst, d)
					require.LessOrEqual(t, d, tc.tol, "layer %d head %d query %d key %d: reference %g, Ollama %g", k[0], k[1], k[2], p, w, g)
				}
			}
			t.Logf("cache %s: %d attention rows, largest difference %.2g (tolerance %g)", tc.cache, len(rows[0]), worst, tc.tol)

			// Stopping puts the real weights back: nothing more arrives and
			// the logits are those of an engine that never recorded.
			n := len(rows[1])
			require.NoError(t, ol.RecordAttention(nil))
			_, err = ol.Decode(0, []int32{5})
			require.NoError(t, err)
			assert.Len(t, rows[1], n)
		})
	}
}

// TestOllamaAttentionErrors: a callback's error stops the decode; an
// architecture other than llama is refused as conformance.ErrNoAttention,
// naming it; a closed engine refuses to start recording.
func TestOllamaAttentionErrors(t *testing.T) {
	ckpt, tok := storiesFiles(t)
	e, err := engines["ollama"](conformance.EngineOptions{Model: ckpt, Tokenizer: tok, Threads: 1, Log: io.Discard})
	require.NoError(t, err)
	rec := e.(conformance.AttentionRecorder)
	stop := fmt.Errorf("stop")
	calls := 0
	require.NoError(t, rec.RecordAttention(func(*conformance.AttentionBatch) error { calls++; return stop }))
	_, err = e.Prefill(0, []int32{1, 5, 6, 7}, false)
	assert.ErrorIs(t, err, stop)
	assert.Equal(t, 1, calls, "the first layer's error stops the pass's reports")
	require.NoError(t, rec.RecordAttention(nil))
	_, err = e.Decode(0, []int32{8})
	require.NoError(t, err, "no recording after nil")
	require.NoError(t, e.Close())
	assert.Error(t, rec.RecordAttention(func(*conformance.AttentionBatch) error { return nil }), "closed")
	assert.NoError(t, rec.RecordAttention(nil))

	shape := synth.Shapes["tiny"]
	shape.Arch, shape.Name = "qwen3", "tiny-qwen3"
	qpath := filepath.Join(t.TempDir(), "qwen3.gguf")
	require.NoError(t, synth.Write(qpath, shape, gguf.F32, 1))
	q, err := engines["ollama"](conformance.EngineOptions{Model: qpath, Context: 64, Threads: 1, Log: io.Discard})
	require.NoError(t, err)
	defer q.Close()
	err = q.(conformance.AttentionRecorder).RecordAttention(func(*conformance.AttentionBatch) error { return nil })
	assert.ErrorIs(t, err, conformance.ErrNoAttention)
	assert.ErrorIs(t, err, ollama.ErrNoAttention)
	assert.ErrorContains(t, err, `"qwen3"`)
}

// TestConformanceAttentionOllama: the suite's attention task reports numbers
// for the Ollama runtime, and they agree with the reference on the same text.
func TestConformanceAttentionOllama(t *testing.T) {
	ckpt, tok := storiesFiles(t)
	attentionAgreesWithReference(t, "ollama", "Ollama", ckpt, tok)
}

// attentionAgreesWithReference runs the suite's attention task on the
// reference and runtime rt over the same text and checks that every layer's
// numbers are there and agree: the runtimes' caches are f16 in the suite.
func attentionAgreesWithReference(t *testing.T, rt, name, ckpt, tok string) conformance.RuntimeResult {
	t.Helper()
	dir := t.TempDir()
	text := storyPrompt(t, dir, 40)
	code, out, log := runCLI(t, "conformance", "--model", ckpt, "--tokenizer", tok, "--runtime", "reference,"+rt,
		"--tasks", "attention", "--quick", "--text", text, "--threads", "1", "--json", "--out", filepath.Join(dir, "out"))
	require.Equal(t, 0, code, log)
	var res conformance.Results
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	require.Len(t, res.Runtimes, 2)
	var layers [2][]conformance.LayerAttention
	for i, r := range res.Runtimes {
		require.Len(t, r.Tasks, 1)
		tr := r.Tasks[0]
		require.Equal(t, conformance.StatusOK, tr.Status, "%s: %s", r.Runtime, tr.Note)
		require.NotNil(t, tr.Attention)
		require.Len(t, tr.Attention.Layers, 5)
		for _, la := range tr.Attention.Layers {
			assert.False(t, math.IsNaN(float64(la.Spearman)), "%s layer %d", r.Runtime, la.Layer)
			assert.False(t, math.IsNaN(float64(la.ShareLowHalf)), "%s layer %d", r.Runtime, la.Layer)
		}
		layers[i] = tr.Attention.Layers
	}
	assert.Equal(t, rt, res.Runtimes[1].Runtime)
	for l := range layers[0] {
		assert.InDelta(t, float64(layers[0][l].Spearman), float64(layers[1][l].Spearman), 0.02, "layer %d", l)
		assert.InDelta(t, float64(layers[0][l].ShareLowHalf), float64(layers[1][l].ShareLowHalf), 0.005, "layer %d", l)
		t.Logf("layer %d: spearman reference %+.3f %s %+.3f", l, layers[0][l].Spearman, name, layers[1][l].Spearman)
	}
	return res.Runtimes[1]
}
