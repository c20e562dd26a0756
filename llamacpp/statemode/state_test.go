package statemode

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// stateBuilder writes the llama_state_seq_get_data layout (see SeqState).
type stateBuilder struct{ b []byte }

func (w *stateBuilder) u32(v uint32) { w.b = binary.LittleEndian.AppendUint32(w.b, v) }
func (w *stateBuilder) u64(v uint64) { w.b = binary.LittleEndian.AppendUint64(w.b, v) }

type synthStream struct {
	pos   []int32
	seqs  [][]int32
	kType uint32
	kRow  int   // bytes per K row
	vRow  int   // bytes per V row (or element size when transposed)
	vEmbd int   // transposed V: elements per cell
	fill  uint8 // K byte pattern seed
}

func synthState(vtrans bool, layers int, streams ...synthStream) []byte {
	w := &stateBuilder{}
	w.u32(uint32(len(streams)))
	for _, s := range streams {
		w.u32(uint32(len(s.pos)))
		if len(s.pos) == 0 {
			continue
		}
		for i, p := range s.pos {
			w.u32(uint32(p))
			w.u32(uint32(len(s.seqs[i])))
			for _, q := range s.seqs[i] {
				w.u32(uint32(q))
			}
		}
		vt := uint32(0)
		if vtrans {
			vt = 1
		}
		w.u32(vt)
		w.u32(uint32(layers))
		for l := range layers {
			w.u32(s.kType)
			w.u64(uint64(s.kRow))
			for i := range len(s.pos) * s.kRow {
				w.b = append(w.b, s.fill+byte(l*7+i))
			}
		}
		for range layers {
			w.u32(s.kType)
			if !vtrans {
				w.u64(uint64(s.vRow))
				w.b = append(w.b, make([]byte, len(s.pos)*s.vRow)...)
				continue
			}
			w.u32(uint32(s.vRow))
			w.u32(uint32(s.vEmbd))
			w.b = append(w.b, make([]byte, len(s.pos)*s.vRow*s.vEmbd)...)
		}
	}
	return w.b
}

func TestParseSeqStateSynthetic(t *testing.T) {
	one := func(n int, seq int32) ([]int32, [][]int32) {
		var pos []int32
		var seqs [][]int32
		for i := range n {
			pos = append(pos, int32(n-i)) // cell order is not position order
			seqs = append(seqs, []int32{seq})
		}
		return pos, seqs
	}
	pos, seqs := one(5, 3)
	for _, vtrans := range []bool{false, true} {
		b := synthState(vtrans, 2,
			synthStream{},
			synthStream{pos: pos, seqs: seqs, kType: ggmlF16, kRow: 16, vRow: 2, vEmbd: 8},
			synthStream{})
		st, err := ParseSeqState(b)
		require.NoError(t, err)
		assert.Equal(t, 3, st.Streams)
		assert.Equal(t, vtrans, st.VTrans)
		assert.Equal(t, []hooks.Pos{5, 4, 3, 2, 1}, st.Positions())
		require.Len(t, st.Layers, 2)
		assert.Equal(t, int32(ggmlF16), st.Layers[1].KType)
		assert.Equal(t, 16, st.Layers[1].RowBytes)
		assert.Len(t, st.Layers[1].Rows, 5*16)
		for _, c := range st.Cells {
			assert.Equal(t, 1, c.Stream)
			assert.Equal(t, []hooks.SeqID{3}, c.Seqs)
		}
		kb, hd, err := st.keyBatch(1, 2, 3)
		require.NoError(t, err)
		assert.Equal(t, 4, hd) // 16 bytes of f16 = 8 elements over 2 heads
		assert.Equal(t, kernels.F16, kb.DType)
		require.NoError(t, kb.Validate(hooks.CacheShape{Layers: 2, KVHeads: 2, HeadDim: 4, KType: kernels.F16, VType: kernels.F16}))
	}

	// Two streams with cells (seq -1 states): rows are concatenated.
	p2, s2 := one(2, 0)
	b := synthState(false, 1,
		synthStream{pos: pos, seqs: seqs, kType: ggmlF32, kRow: 8, vRow: 8, fill: 1},
		synthStream{pos: p2, seqs: s2, kType: ggmlF32, kRow: 8, vRow: 8, fill: 100})
	st, err := ParseSeqState(b)
	require.NoError(t, err)
	assert.Len(t, st.Cells, 7)
	assert.Len(t, st.Layers[0].Rows, 7*8)
	assert.Equal(t, byte(100), st.Layers[0].Rows[5*8])
	// Layer types must agree across streams.
	bad := synthState(false, 1,
		synthStream{pos: pos, seqs: seqs, kType: ggmlF32, kRow: 8, vRow: 8},
		synthStream{pos: p2, seqs: s2, kType: ggmlF16, kRow: 8, vRow: 8})
	_, err = ParseSeqState(bad)
	assert.ErrorIs(t, err, ErrState)

	// An empty sequence.
	st, err = ParseSeqState(synthState(false, 1, synthStream{}))
	require.NoError(t, err)
	assert.Empty(t, st.Cells)
}

func TestParseSeqStateMalformed(t *testing.T) {
	pos := []int32{0, 1, 2}
	seqs := [][]int32{{0}, {0}, {0}}
	good := synthState(false, 2, synthStream{pos: pos, seqs: seqs, kType: ggmlF16, kRow: 16, vRow: 16})
	_, err := ParseSeqState(good)
	require.NoError(t, err)
	for n := range len(good) {
		_, err := ParseSeqState(good[:n])
		require.ErrorIs(t, err, ErrState, "truncated to %d", n)
	}
	patch := func(off int, v uint32) []byte {
		b := slices.Clone(good)
		binary.LittleEndian.PutUint32(b[off:], v)
		return b
	}
	cases := map[string][]byte{
		"no streams":         patch(0, 0),
		"too many streams":   patch(0, 1000),
		"huge cell count":    patch(4, math.MaxUint32),
		"huge n_seq":         patch(12, 1<<30),
		"negative position":  patch(8, 0xffffffff),
		"v_trans 7":          patch(8+3*12, 7),
		"zero layers":        patch(8+3*12+4, 0),
		"huge layers":        patch(8+3*12+4, 1<<20),
		"trailing byte":      append(slices.Clone(good), 0),
		"huge row bytes":     binary.LittleEndian.AppendUint64(slices.Clone(good[:8+3*12+12]), math.MaxUint64),
		"row bytes overflow": binary.LittleEndian.AppendUint64(slices.Clone(good[:8+3*12+12]), 1<<29),
	}
	for name, b := range cases {
		_, err := ParseSeqState(b)
		assert.ErrorIs(t, err, ErrState, name)
	}
}

func TestKeyBatchTypes(t *testing.T) {
	pos := []int32{4, 7}
	seqs := [][]int32{{1}, {1}}
	// q8_0 rows of 2 heads of 32: read as they are.
	b := synthState(false, 1, synthStream{pos: pos, seqs: seqs, kType: ggmlQ8_0, kRow: 68, vRow: 4})
	st, err := ParseSeqState(b)
	require.NoError(t, err)
	kb, hd, err := st.keyBatch(0, 2, 1)
	require.NoError(t, err)
	assert.Equal(t, 32, hd)
	assert.Equal(t, kernels.Q8_0, kb.DType)

	// q8_0 rows whose one block spans 4 heads of 8: dequantized to f32.
	w := &stateBuilder{}
	w.u32(1)
	w.u32(1)
	w.u32(9)
	w.u32(1)
	w.u32(0)
	w.u32(0) // v_trans
	w.u32(1) // n_layer
	w.u32(ggmlQ8_0)
	w.u64(34)
	w.b = binary.LittleEndian.AppendUint16(w.b, kernels.F32ToF16(0.5))
	for i := range 32 {
		w.b = append(w.b, byte(int8(i-16)))
	}
	w.u32(ggmlF16)
	w.u64(2)
	w.b = append(w.b, 0, 0)
	st, err = ParseSeqState(w.b)
	require.NoError(t, err)
	kb, hd, err = st.keyBatch(0, 4, 0)
	require.NoError(t, err)
	assert.Equal(t, 8, hd)
	require.Equal(t, kernels.F32, kb.DType)
	require.NoError(t, kb.Validate(hooks.CacheShape{Layers: 1, KVHeads: 4, HeadDim: 8, KType: kernels.F32, VType: kernels.F32}))
	f := make([]float32, 32)
	for i := range f {
		f[i] = math.Float32frombits(binary.LittleEndian.Uint32(kb.Keys[4*i:]))
	}
	assert.Equal(t, float32(-8), f[0])
	assert.Equal(t, float32(7.5), f[31])

	// Unsupported and inconsistent types.
	for _, tc := range []struct {
		kType   uint32
		kRow    int
		heads   int
		wantErr error
	}{
		{ggmlQ4_0, 18, 1, hooks.ErrUnsupported},
		{99, 8, 1, hooks.ErrUnsupported},
		{ggmlF32, 6, 1, ErrState},
		{ggmlF16, 16, 3, ErrState},
		{ggmlQ8_0, 33, 1, ErrState},
	} {
		b := synthState(false, 1, synthStream{pos: pos, seqs: seqs, kType: tc.kType, kRow: tc.kRow, vRow: 2})
		st, err := ParseSeqState(b)
		require.NoError(t, err)
		_, _, err = st.keyBatch(0, tc.heads, 1)
		assert.ErrorIs(t, err, tc.wantErr, "k_type %d row %d heads %d", tc.kType, tc.kRow, tc.heads)
	}
	_, _, err = st.keyBatch(5, 1, 1)
	assert.ErrorIs(t, err, ErrState)
}

func FuzzParseSeqState(f *testing.F) {
	pos := []int32{2, 0, 1}
	seqs := [][]int32{{0}, {0, 1}, {0}}
	f.Add(synthState(false, 2, synthStream{pos: pos, seqs: seqs, kType: ggmlF16, kRow: 16, vRow: 16}))
	f.Add(synthState(true, 1, synthStream{}, synthStream{pos: pos, seqs: seqs, kType: ggmlQ8_0, kRow: 34, vRow: 2, vEmbd: 4}))
	f.Add([]byte{1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ParseSeqState(b)
		if err != nil {
			if st != nil {
				t.Fatal("state and error")
			}
			return
		}
		for l := range st.Layers {
			if len(st.Layers[l].Rows) != len(st.Cells)*st.Layers[l].RowBytes {
				t.Fatalf("layer %d: %d row bytes for %d cells of %d", l, len(st.Layers[l].Rows), len(st.Cells), st.Layers[l].RowBytes)
			}
			for _, heads := range []int{1, 2, 4} {
				if kb, _, err := st.keyBatch(l, heads, 0); err == nil && len(kb.Positions) != len(st.Cells) {
					t.Fatal("key batch length")
				}
			}
		}
	})
}
