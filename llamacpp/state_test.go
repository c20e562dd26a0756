package llamacpp

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

func TestPosSet(t *testing.T) {
	var s posSet
	assert.Equal(t, hooks.Pos(-1), s.max())
	for _, p := range []hooks.Pos{0, 1, 2, 63, 64, 65, 200, 130} {
		s.add(p)
	}
	s.add(2)
	s.add(-1)
	assert.Equal(t, 8, s.n)
	assert.Equal(t, hooks.Pos(200), s.max())
	s.del(200)
	assert.Equal(t, hooks.Pos(130), s.max())
	s.del(130)
	s.del(65)
	assert.Equal(t, hooks.Pos(64), s.max())
	s.del(7) // absent
	assert.Equal(t, []hooks.Pos{0, 1, 2, 63, 64}, s.list())
	assert.True(t, s.has(63))
	assert.False(t, s.has(65))
	assert.False(t, s.has(100000))
	for _, p := range s.list() {
		s.del(p)
	}
	assert.Equal(t, 0, s.n)
	assert.Equal(t, hooks.Pos(-1), s.max())
}

func TestSampler(t *testing.T) {
	logits := []float32{0.1, 3, float32(math.NaN()), 3, -1}
	assert.Equal(t, Token(1), Greedy().Sample(logits), "ties go to the lower id")
	var nilSampler *Sampler
	assert.Equal(t, Token(1), nilSampler.Sample(logits))
	assert.Equal(t, Token(-1), Greedy().Sample(nil))
	assert.Equal(t, Token(0), Greedy().Sample([]float32{float32(math.NaN())}))

	s1, s2 := NewSampler(1, 0, 0, 9), NewSampler(1, 0, 0, 9)
	counts := map[Token]int{}
	for range 2000 {
		a, b := s1.Sample(logits), s2.Sample(logits)
		require.Equal(t, a, b)
		require.NotEqual(t, Token(2), a, "NaN never sampled")
		counts[a]++
	}
	assert.InDelta(t, counts[1], counts[3], 200, "equal logits, equal odds")
	assert.Greater(t, counts[1], counts[0])
	// top-k 1 is greedy; a tiny top-p keeps the best.
	k1 := NewSampler(5, 1, 0, 1)
	p := NewSampler(5, 0, 1e-9, 1)
	for range 50 {
		assert.Equal(t, Token(1), k1.Sample(logits))
		assert.Equal(t, Token(1), p.Sample(logits))
	}
}

func TestCacheTypes(t *testing.T) {
	for i, n := range cacheTypeNames {
		ct, err := ParseCacheType(n)
		require.NoError(t, err)
		assert.Equal(t, CacheType(i), ct)
		assert.Equal(t, n, ct.String())
	}
	_, err := ParseCacheType("q5_1")
	assert.ErrorIs(t, err, ErrBadInput)
	d, ok := CacheQ8_0.dtype(32)
	assert.True(t, ok)
	assert.Equal(t, kernels.Q8_0, d)
	_, ok = CacheQ8_0.dtype(8)
	assert.False(t, ok)
	_, ok = CacheQ4_0.dtype(32)
	assert.False(t, ok)
}

func TestCError(t *testing.T) {
	err := decodeError(1, "seq 0")
	assert.ErrorIs(t, err, ErrContextFull)
	var ce *CError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, 1, ce.Code)
	assert.Equal(t, "llama_decode", ce.Func)
	assert.Contains(t, err.Error(), "llama_decode returned 1")
	assert.ErrorIs(t, decodeError(-1, ""), ErrBadInput)
	assert.ErrorIs(t, decodeError(-3, ""), ErrDecode)
}

// TestKeysReadable: EnableCompression refuses models whose graph has no
// RoPE'd Kcur-N node before any token enters the cache (issue 13, item 4).
func TestKeysReadable(t *testing.T) {
	for _, tc := range []struct {
		name string
		info ModelInfo
		msg  string
	}{
		{"llama", ModelInfo{Arch: "llama"}, ""},
		{"alibi", ModelInfo{Arch: "bloom", Path: "b.gguf", NoRoPE: true}, "has no RoPE (llama_model_rope_type: none"},
		{"mla", ModelInfo{Arch: "deepseek2", Path: "d.gguf", MLA: true}, "multi-head latent attention (deepseek2.attention.kv_lora_rank)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.info.keysReadable()
			if tc.msg == "" {
				assert.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, hooks.ErrUnsupported)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
}
