package statemode

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// fakeLlama is a llama.cpp behind a function table: one sequence (0) of
// f32 keys, one KV head of dim 2, every layer's key at position p being
// (norm[p], 0).
type fakeLlama struct {
	layers      int
	pos         []int32
	norm        map[int32]float32
	kType       uint32 // ggml type written in the state
	recurrent   bool
	hybrid      bool
	swa         int32
	nLayer      int32 // what llama_model_n_layer says; 0 = layers
	growOnRead  bool  // a decode lands while the state is read
	posMaxDelta int32 // llama_memory_seq_pos_max lies by this much
	rm          [][2]int32
}

const fakeCtx, fakeModel, fakeMem = uintptr(0x1000), uintptr(0x2000), uintptr(0x3000)

func newFake(n int) *fakeLlama {
	f := &fakeLlama{layers: 3, norm: map[int32]float32{}}
	for p := range int32(n) {
		f.pos = append(f.pos, p)
		f.norm[p] = float32((p*7)%11 + 1)
	}
	return f
}

func (f *fakeLlama) state() []byte {
	w := &stateBuilder{}
	w.u32(1)
	w.u32(uint32(len(f.pos)))
	if len(f.pos) == 0 {
		return w.b
	}
	for _, p := range f.pos {
		w.u32(uint32(p))
		w.u32(1)
		w.u32(0)
	}
	w.u32(0)
	w.u32(uint32(f.layers))
	for range f.layers {
		w.u32(f.kType)
		w.u64(8)
		for _, p := range f.pos {
			w.b = binary.LittleEndian.AppendUint32(w.b, math.Float32bits(f.norm[p]))
			w.b = binary.LittleEndian.AppendUint32(w.b, 0)
		}
	}
	for range f.layers {
		w.u32(0)
		w.u64(4)
		w.b = append(w.b, make([]byte, 4*len(f.pos))...)
	}
	return w.b
}

func (f *fakeLlama) posMax() int32 {
	if len(f.pos) == 0 {
		return -1
	}
	return f.pos[len(f.pos)-1] + f.posMaxDelta
}

func (f *fakeLlama) funcs() *Funcs {
	return &Funcs{
		Provider:        "fake",
		StateSeqGetSize: func(ctx uintptr, seq int32) uint64 { return uint64(len(f.state())) },
		StateSeqGetData: func(ctx uintptr, dst unsafe.Pointer, size uint64, seq int32) uint64 {
			b := f.state()
			n := copy(unsafe.Slice((*byte)(dst), size), b)
			if f.growOnRead {
				f.pos = append(f.pos, f.pos[len(f.pos)-1]+1)
			}
			return uint64(n)
		},
		GetModel:        func(ctx uintptr) uintptr { return fakeModel },
		GetMemory:       func(ctx uintptr) uintptr { return fakeMem },
		NCtxSeq:         func(ctx uintptr) uint32 { return 64 },
		MemorySeqPosMin: func(mem uintptr, seq int32) int32 { return f.pos[0] },
		MemorySeqPosMax: func(mem uintptr, seq int32) int32 { return f.posMax() },
		MemorySeqRm: func(mem uintptr, seq, p0, p1 int32) bool {
			f.rm = append(f.rm, [2]int32{p0, p1})
			f.pos = slices.DeleteFunc(f.pos, func(p int32) bool { return p >= p0 && p < p1 })
			return true
		},
		ModelNLayer: func(model uintptr) int32 {
			if f.nLayer != 0 {
				return f.nLayer
			}
			return int32(f.layers)
		},
		ModelNHeadKV:     func(model uintptr) int32 { return 1 },
		ModelNSwa:        func(model uintptr) int32 { return f.swa },
		ModelIsRecurrent: func(model uintptr) bool { return f.recurrent },
		ModelIsHybrid:    func(model uintptr) bool { return f.hybrid },
	}
}

func TestCompressThroughTable(t *testing.T) {
	f := newFake(16)
	fn := f.funcs()
	comp, err := NewCompressor(fn, fakeCtx, 0, adapter.DefaultPolicy())
	require.NoError(t, err)
	plan, err := comp.PlanFor(0, -1)
	require.NoError(t, err)
	st, err := comp.Compress(0, -1)
	require.NoError(t, err)
	assert.Equal(t, 16, st.PositionsBefore)
	assert.Equal(t, 8, st.PositionsAfter)
	got := make([]hooks.Pos, len(f.pos))
	for i, p := range f.pos {
		got[i] = hooks.Pos(p)
	}
	assert.Equal(t, plan.Token.Keep, got, "the fake holds what the plan kept")
	assert.Equal(t, int32(15), f.posMax(), "the last position stays")
	for _, r := range f.rm {
		assert.Less(t, r[0], r[1])
	}
}

// TestRefusals: each case is refused before anything is evicted, with an
// error naming what was wrong.
func TestRefusals(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(f *fakeLlama, fn *Funcs) uintptr
		want  error
		msg   string
	}{
		{"missing function", func(f *fakeLlama, fn *Funcs) uintptr { fn.MemorySeqRm = nil; return fakeCtx }, ErrMissingFunc, "llama_memory_seq_rm"},
		{"nil table entry first", func(f *fakeLlama, fn *Funcs) uintptr { fn.StateSeqGetSize = nil; return fakeCtx }, ErrMissingFunc, "llama_state_seq_get_size (Funcs.StateSeqGetSize) not provided by fake"},
		{"nil context", func(f *fakeLlama, fn *Funcs) uintptr { return 0 }, ErrBadInput, "nil llama_context"},
		{"recurrent", func(f *fakeLlama, fn *Funcs) uintptr { f.recurrent = true; return fakeCtx }, ErrMemoryType, "recurrent memory (llama_model_is_recurrent)"},
		{"hybrid", func(f *fakeLlama, fn *Funcs) uintptr { f.hybrid = true; return fakeCtx }, ErrMemoryType, "hybrid"},
		{"sliding window", func(f *fakeLlama, fn *Funcs) uintptr { f.swa = 4096; return fakeCtx }, ErrMemoryType, "sliding-window memory (llama_model_n_swa=4096"},
		{"decoding while read", func(f *fakeLlama, fn *Funcs) uintptr { f.growOnRead = true; return fakeCtx }, ErrState, "while its state was read: the context is decoding"},
		{"state and memory disagree", func(f *fakeLlama, fn *Funcs) uintptr { f.posMaxDelta = 1; return fakeCtx }, ErrState, "llama_memory_seq_pos_max says 16"},
		{"layer count", func(f *fakeLlama, fn *Funcs) uintptr { f.nLayer = 5; return fakeCtx }, ErrState, "llama_model_n_layer returned 5"},
		{"unknown key type", func(f *fakeLlama, fn *Funcs) uintptr { f.kType = 2; return fakeCtx }, hooks.ErrUnsupported, "ggml type 2 (q4_0)"},
		{"not a state", func(f *fakeLlama, fn *Funcs) uintptr {
			fn.StateSeqGetSize = func(uintptr, int32) uint64 { return 4 }
			fn.StateSeqGetData = func(_ uintptr, dst unsafe.Pointer, size uint64, _ int32) uint64 {
				copy(unsafe.Slice((*byte)(dst), size), []byte{9, 9, 9, 9})
				return 4
			}
			return fakeCtx
		}, ErrState, "n_stream=151587081"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(16)
			fn := f.funcs()
			ctx := tc.setup(f, fn)
			_, err := Compress(fn, ctx, 0, adapter.DefaultPolicy())
			require.ErrorIs(t, err, tc.want)
			assert.Contains(t, err.Error(), tc.msg)
			assert.Empty(t, f.rm, "nothing evicted")
		})
	}
}

// TestStalePlan: a compressor whose sequence grew after its state was read
// refuses to evict.
func TestStalePlan(t *testing.T) {
	f := newFake(16)
	comp, err := NewCompressor(f.funcs(), fakeCtx, 0, adapter.DefaultPolicy())
	require.NoError(t, err)
	f.pos = append(f.pos, 16) // the app decoded one more token
	_, err = comp.Compress(0, -1)
	require.ErrorIs(t, err, ErrState)
	assert.Contains(t, err.Error(), "now ends at position 16, not 15")
	assert.Empty(t, f.rm)
}
