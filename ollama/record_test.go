//go:build cgo

package ollama

import (
	"testing"
	"unsafe"

	"github.com/ollama/ollama/model/models/llama"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/kernels"
)

// TestRecorderKeys: the keys the recorder reads for a sequence's cells are
// the cache's, element for element (f16 decoded on the host as the oracle).
func TestRecorderKeys(t *testing.T) {
	for _, ct := range []string{"f32", "f16"} {
		t.Run("cache="+ct, func(t *testing.T) {
			e, err := OpenEngine(storiesGGUF(t), Config{Context: 256, Batch: 32, CacheType: ct})
			require.NoError(t, err)
			defer e.Close()
			require.NoError(t, e.RecordAttention(func(*Attention) error { return nil }))
			toks := make([]int32, 70)
			for i := range toks {
				toks[i] = int32(10 + i*7%400)
			}
			_, err = e.Prefill(0, toks, false)
			require.NoError(t, err)
			c := e.c
			s := c.lay.seqs[0]
			all, err := e.rec.keys([]int{0})
			require.NoError(t, err)
			for l := range c.opts.Layers {
				got := all[[2]int{0, l}]
				key := c.keys[l]
				raw := key.BackendGet() // the tensor's bytes, whatever its type
				d, total, n := key.Dim(0), key.Dim(1), s.layers[l].n()
				require.Len(t, got, d*n*c.opts.KVHeads)
				first := c.lay.slabStart(s.slab, l)
				half := unsafe.Slice((*uint16)(unsafe.Pointer(&raw[0])), 2*len(raw))
				bad := 0
				for g := range c.opts.KVHeads {
					for cell := range n {
						for i := range d {
							at := (g*total+first+cell)*d + i
							want := raw[at]
							if ct == "f16" {
								want = kernels.F16ToF32(half[at])
							}
							if got[(g*n+cell)*d+i] != want {
								bad++
							}
						}
					}
				}
				assert.Zero(t, bad, "layer %d: %d of %d keys differ", l, bad, len(got))
			}
		})
	}
}

// TestRecordingChangesNothing: recording taps the queries without changing
// what the model computes (logits bit-identical), and stopping puts the
// real attn_q weights back.
func TestRecordingChangesNothing(t *testing.T) {
	path := storiesGGUF(t)
	toks := []int32{1, 403, 407, 261, 378, 1, 300, 312, 45, 98, 121, 7, 19}
	run := func(record bool) ([][]float32, int) {
		e, err := OpenEngine(path, Config{Context: 64, Batch: 8})
		require.NoError(t, err)
		defer e.Close()
		calls := 0
		if record {
			require.NoError(t, e.RecordAttention(func(*Attention) error { calls++; return nil }))
		}
		rows, err := e.Prefill(0, toks, true)
		require.NoError(t, err)
		more, err := e.Decode(0, []int32{9, 10})
		require.NoError(t, err)
		return append(rows, more...), calls
	}
	plain, _ := run(false)
	recorded, calls := run(true)
	assert.Equal(t, plain, recorded)
	assert.Equal(t, 3*5, calls, "two prompt passes and one decode pass × 5 layers")

	e, err := OpenEngine(path, Config{Context: 64})
	require.NoError(t, err)
	defer e.Close()
	m := e.s.m.(*llama.Model)
	w := m.Layers[2].SelfAttention.Query.Weight
	require.NoError(t, e.RecordAttention(func(*Attention) error { return nil }))
	assert.IsType(t, &queryTap{}, m.Layers[2].SelfAttention.Query.Weight)
	require.NoError(t, e.RecordAttention(nil))
	assert.Same(t, w, m.Layers[2].SelfAttention.Query.Weight)
}
