package hooks_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

var shape = hooks.CacheShape{Layers: 2, KVHeads: 4, HeadDim: 64, KType: kernels.Q8_0, VType: kernels.F16}

func TestCacheShape(t *testing.T) {
	require.NoError(t, shape.Validate())
	b, err := shape.EntryBytes()
	require.NoError(t, err)
	assert.Equal(t, int64(2*34+64*2), b, "q8_0 key row (2 blocks of 34 bytes) + f16 value row")
	for _, bad := range []hooks.CacheShape{
		{Layers: 0, KVHeads: 1, HeadDim: 1},
		{Layers: 1, KVHeads: 0, HeadDim: 1},
		{Layers: 1, KVHeads: 1, HeadDim: 0},
		{Layers: 1, KVHeads: 1, HeadDim: 8, Capacity: -1},
		{Layers: 1, KVHeads: 1, HeadDim: 8, KType: kernels.Q8_0},
	} {
		assert.Error(t, bad.Validate(), "%+v", bad)
	}
}

func TestKeyBatchValidate(t *testing.T) {
	ok := hooks.KeyBatch{Layer: 1, Seqs: []hooks.SeqID{0, 0}, Positions: []hooks.Pos{0, 1}, DType: kernels.F32, Keys: make([]byte, 2*4*64*4)}
	require.NoError(t, ok.Validate(shape))
	assert.Equal(t, 2, ok.Len())
	norms := hooks.KeyBatch{Layer: 0, Seqs: []hooks.SeqID{3}, Positions: []hooks.Pos{9}, Norms: make([]float32, 4)}
	require.NoError(t, norms.Validate(shape))

	bad := ok
	bad.Keys = bad.Keys[:100]
	assert.ErrorContains(t, bad.Validate(shape), "100 key bytes, want tokens*kvHeads*rowBytes = 2*4*256 = 2048")
	bad = ok
	bad.DType = kernels.Q8_0
	bad.Keys = make([]byte, 2*4*68)
	assert.NoError(t, bad.Validate(shape))
	bad.DType = kernels.DType(99)
	assert.ErrorIs(t, bad.Validate(shape), hooks.ErrBadBatch)
}

func TestF32Bytes(t *testing.T) {
	assert.Nil(t, hooks.F32Bytes(nil))
	b := hooks.F32Bytes([]float32{1})
	assert.Equal(t, []byte{0, 0, 0x80, 0x3f}, b)
}

func TestNames(t *testing.T) {
	for _, g := range []hooks.Granularity{hooks.PerToken, hooks.PerHead} {
		got, err := hooks.ParseGranularity(g.String())
		require.NoError(t, err)
		assert.Equal(t, g, got)
	}
	// Any case, like the policy names.
	for in, want := range map[string]hooks.Granularity{"PER-HEAD": hooks.PerHead, " Per-Token ": hooks.PerToken, "Head": hooks.PerHead} {
		got, err := hooks.ParseGranularity(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	assert.Equal(t, "prefill", hooks.TriggerPrefill.String())
	assert.Equal(t, "pressure", hooks.TriggerPressure.String())
	assert.Equal(t, "explicit", hooks.TriggerExplicit.String())
	hp := hooks.HeadPlan{Layers: [][][]hooks.Pos{nil, {{1, 2}, {3, 4}}, {}}}
	assert.Equal(t, -1, hp.KeepCount(0))
	assert.Equal(t, 2, hp.KeepCount(1))
	assert.Equal(t, 0, hp.KeepCount(2))
	assert.Equal(t, -1, hp.KeepCount(5))
}

// A runtime reports the keys of one layer of a batch of two tokens of
// sequence 0, as ggml lays them out: token-major, then head, then head dim.
func ExampleKeyBatch() {
	shape := hooks.CacheShape{Layers: 1, KVHeads: 2, HeadDim: 4, KType: kernels.F16, VType: kernels.F16}
	keys := []float32{
		1, 0, 0, 0, 0, 3, 4, 0, // token 0: head 0, head 1
		0, 0, 0, 2, 1, 1, 1, 1, // token 1
	}
	b := hooks.KeyBatch{Layer: 0, Seqs: []hooks.SeqID{0, 0}, Positions: []hooks.Pos{7, 8}, DType: kernels.F32, Keys: hooks.F32Bytes(keys)}
	fmt.Println(b.Validate(shape))
	norms := make([]float32, 4)
	_ = kernels.Norms(norms, b.Keys, b.DType, shape.HeadDim)
	fmt.Println(norms)
	// Output:
	// <nil>
	// [1 5 2 2]
}
