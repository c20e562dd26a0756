//go:build cgo

package llamacpp_test

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp"
)

// TestEvictionCompacts: after an eviction the sequence's cells are moved to
// the front of its stream, so the next token attends over the kept cells
// padded to 256 (n_kv), not over the width the sequence had; with KeepHoles
// the holes stay and the next token fills one. Both decode the same logits
// (flash attention adds the kept cells up in the same order; without it the
// masked columns only add zeros), and the other sequence of the context is
// not touched.
func TestEvictionCompacts(t *testing.T) {
	m := openStories(t, "f32")
	toks := storyTokens(t, m, 320)
	var evict []hooks.Pos
	for p := hooks.Pos(1); p < 299; p += 2 {
		evict = append(evict, p) // 149 of 300
	}
	type run struct {
		state  []byte      // seq 0's state right after the eviction
		nkv    int         // n_kv of the first decode after the eviction
		cells  []hooks.Pos // its cell map (layer 0)
		logits [][]float32
	}
	decode := func(t *testing.T, fa llamacpp.FlashAttn, keepHoles bool) run {
		c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 512, NBatch: 64, Seqs: 2, FlashAttn: fa,
			KType: llamacpp.CacheF32, VType: llamacpp.CacheF32, KeepHoles: keepHoles})
		var r run
		recording := false
		if fa == llamacpp.FlashAttnOff {
			// From the first token, so that the context knows every cell.
			require.NoError(t, c.RecordAttention(func(a *llamacpp.Attention) error {
				if recording && r.cells == nil {
					r.nkv, r.cells = len(a.Cells), a.Cells
				}
				return nil
			}))
		}
		_, err := c.Decode(1, toks[:40])
		require.NoError(t, err)
		other, err := c.SeqState(1)
		require.NoError(t, err)
		_, err = c.Decode(0, toks[:300])
		require.NoError(t, err)
		require.NoError(t, c.EvictPositions(0, evict))
		assert.Equal(t, 151, c.Cells(0))
		r.state, err = c.SeqState(0)
		require.NoError(t, err)
		recording = true
		for _, tok := range toks[300:316] {
			l, err := c.Decode(0, []llamacpp.Token{tok})
			require.NoError(t, err)
			r.logits = append(r.logits, l)
		}
		after, err := c.SeqState(1)
		require.NoError(t, err)
		assert.Equal(t, other, after, "the other sequence's cells, keys and values")
		return r
	}
	t.Run("cells", func(t *testing.T) {
		compact := decode(t, llamacpp.FlashAttnOff, false)
		holes := decode(t, llamacpp.FlashAttnOff, true)
		assert.Equal(t, 256, compact.nkv, "152 cells in use, padded to 256")
		assert.Equal(t, 512, holes.nkv, "cells up to 300 in use, padded to 512")
		var kept []hooks.Pos // the even positions below 299, 299 (the last), 300 (the new token)
		for p := hooks.Pos(0); p < 299; p += 2 {
			kept = append(kept, p)
		}
		kept = append(kept, 299, 300)
		require.Len(t, kept, 152)
		assert.Equal(t, kept, compact.cells[:152], "the kept positions in order, then the new token")
		for _, p := range compact.cells[152:] {
			assert.Equal(t, hooks.Pos(-1), p)
		}
		assert.Equal(t, hooks.Pos(300), holes.cells[1], "without compaction the new token fills the first hole")
		assert.Equal(t, holes.state, compact.state, "the same cells (in the same order), keys and values")
		d := maxDiff(compact.logits, holes.logits)
		t.Logf("largest logit difference, compacted vs holes, no flash attention: %.3g", d)
		assert.Less(t, d, 1e-4, "the masked columns add zeros; only the order of sums moves")
	})
	t.Run("flash attention", func(t *testing.T) {
		compact := decode(t, llamacpp.FlashAttnOn, false)
		holes := decode(t, llamacpp.FlashAttnOn, true)
		assert.Equal(t, holes.state, compact.state)
		// The new tokens sit in other cells (after the kept ones, or in the
		// first holes), so flash attention adds them up in another order,
		// and at f16 precision (llama.cpp casts an f32 cache to f16 for it,
		// and ggml's CPU kernel accumulates f16 values in f16): logits moved
		// by 0.0036 to 0.029 over these 16 tokens. A cell of the wrong keys or
		// values moves them by whole units.
		d := maxDiff(compact.logits, holes.logits)
		t.Logf("largest logit difference, compacted vs holes, flash attention: %.3g", d)
		assert.Less(t, d, 0.1)
	})
}

// maxDiff is the largest |a - b| over rows of logits.
func maxDiff(a, b [][]float32) float64 {
	d := 0.0
	for i := range a {
		for j := range a[i] {
			d = max(d, math.Abs(float64(a[i][j]-b[i][j])))
		}
	}
	return d
}
