package synth_test

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/synth"
)

func TestWriteTiny(t *testing.T) {
	for _, typ := range []gguf.TensorType{gguf.F32, gguf.F16, gguf.Q8_0} {
		t.Run(typ.String(), func(t *testing.T) {
			dir := t.TempDir()
			s := synth.Shapes["tiny"]
			a, b := filepath.Join(dir, "a.gguf"), filepath.Join(dir, "b.gguf")
			require.NoError(t, synth.Write(a, s, typ, 7))
			require.NoError(t, synth.Write(b, s, typ, 7))
			fa, err := gguf.Open(a)
			require.NoError(t, err)
			defer fa.Close()
			fb, err := gguf.Open(b)
			require.NoError(t, err)
			defer fb.Close()
			arch, err := fa.String("general.architecture")
			require.NoError(t, err)
			assert.Equal(t, "llama", arch)
			n, err := fa.Int("llama.attention.head_count_kv")
			require.NoError(t, err)
			assert.EqualValues(t, 2, n)
			toks, err := fa.Strings("tokenizer.ggml.tokens")
			require.NoError(t, err)
			assert.Len(t, toks, s.Vocab)
			assert.Len(t, fa.Tensors, 2+9*s.Layers)
			var params uint64
			for _, ti := range fa.Tensors {
				n := uint64(1)
				for _, d := range ti.Dims {
					n *= d
				}
				params += n
			}
			assert.EqualValues(t, s.Params(), params)
			wa, err := fa.F32("blk.1.attn_k.weight")
			require.NoError(t, err)
			wb, err := fb.F32("blk.1.attn_k.weight")
			require.NoError(t, err)
			assert.Equal(t, wa, wb, "deterministic by seed")
			wq, err := fa.F32("blk.1.attn_q.weight")
			require.NoError(t, err)
			assert.NotEqual(t, wa[:16], wq[:16], "tensors draw different values")
			norm, err := fa.F32("blk.0.attn_norm.weight")
			require.NoError(t, err)
			assert.Equal(t, float32(1), norm[0])
		})
	}
}

func TestShapes(t *testing.T) {
	for _, name := range synth.ShapeNames() {
		assert.NoError(t, synth.Shapes[name].Validate(), name)
	}
	assert.InDelta(t, 1.24e9, float64(synth.Shapes["llama-3.2-1b"].Params()), 0.02e9)
	assert.InDelta(t, 0.60e9, float64(synth.Shapes["qwen3-0.6b"].Params()), 0.05e9)
	bad := synth.Shapes["tiny"]
	bad.KVHeads = 3
	assert.ErrorContains(t, bad.Validate(), "kv heads=3")
	bad = synth.Shapes["tiny"]
	bad.Arch = "gpt2"
	assert.ErrorContains(t, bad.Validate(), `arch "gpt2"`)
	_, err := synth.Writer(bad, gguf.F16, 1)
	assert.Error(t, err)
}

func TestWriteQwen3Tokenizer(t *testing.T) {
	s := synth.Shapes["qwen3-0.6b"]
	s.Layers, s.Embd, s.FFN, s.Vocab, s.Heads, s.KVHeads, s.HeadDim = 1, 64, 64, 400, 2, 1, 64
	path := filepath.Join(t.TempDir(), "q.gguf")
	require.NoError(t, synth.Write(path, s, gguf.F16, 1))
	f, err := gguf.Open(path)
	require.NoError(t, err)
	defer f.Close()
	m, err := f.String("tokenizer.ggml.model")
	require.NoError(t, err)
	assert.Equal(t, "gpt2", m)
	_, ok := f.Tensor("blk.0.attn_k_norm.weight")
	assert.True(t, ok)
}
