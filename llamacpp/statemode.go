//go:build cgo

package llamacpp

/*
#cgo CPPFLAGS: -I${SRCDIR}/.ollama/llama/llama.cpp/include -I${SRCDIR}/.ollama/ml/backend/ggml/ggml/include
#if !__has_include("llama.h")
#error "kvnorm/llamacpp: llama.h not found: run 'make headers' (links llamacpp/.ollama to the ollama module) or 'make build'"
#else
#include <stdint.h>
#include "llama.h"
#endif
*/
import "C"

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// stateBytes copies llama_state_seq_get_data of seq.
func stateBytes(ctx *C.struct_llama_context, seq hooks.SeqID) ([]byte, error) {
	n := C.llama_state_seq_get_size(ctx, C.llama_seq_id(seq))
	if n == 0 {
		return nil, &CError{Func: "llama_state_seq_get_size", Code: 0, Msg: fmt.Sprintf("seq %d", seq), Err: ErrState}
	}
	if uint64(n) > 1<<40 {
		return nil, fmt.Errorf("%w: seq %d: state of %d bytes", ErrState, seq, uint64(n))
	}
	buf := make([]byte, int(n))
	got := C.llama_state_seq_get_data(ctx, (*C.uint8_t)(unsafe.Pointer(&buf[0])), n, C.llama_seq_id(seq))
	if got != n {
		return nil, &CError{Func: "llama_state_seq_get_data", Code: int(got), Msg: fmt.Sprintf("seq %d: wrote %d of %d bytes", seq, uint64(got), uint64(n)), Err: ErrState}
	}
	return buf, nil
}

// ReadState returns the parsed state of seq of a llama.cpp context: ctx is a
// *llama_context (from an app's own cgo code, or Context.Raw).
func ReadState(ctx unsafe.Pointer, seq int32) (*SeqState, error) {
	if ctx == nil {
		return nil, fmt.Errorf("%w: nil llama_context", ErrBadInput)
	}
	if seq < 0 {
		return nil, fmt.Errorf("%w: sequence %d must be >= 0", ErrBadInput, seq)
	}
	b, err := stateBytes((*C.struct_llama_context)(ctx), seq)
	if err != nil {
		return nil, err
	}
	return ParseSeqState(b)
}

// stateRuntime is the hooks.PositionEvictor of an app's context: it evicts
// with llama_memory_seq_rm, one run of consecutive positions at a time.
type stateRuntime struct {
	mu    sync.Mutex
	ctx   *C.struct_llama_context
	shape hooks.CacheShape
}

func (r *stateRuntime) CacheShape() hooks.CacheShape { return r.shape }

func (r *stateRuntime) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	mem := C.llama_get_memory(r.ctx)
	last := hooks.Pos(C.llama_memory_seq_pos_max(mem, C.llama_seq_id(seq)))
	for i := 0; i < len(positions); {
		j := i + 1
		for j < len(positions) && positions[j] == positions[j-1]+1 {
			j++
		}
		p0, p1 := positions[i], positions[j-1]+1
		if p0 < 0 || p1 > last {
			return fmt.Errorf("%w: evict seq %d: positions [%d,%d) reach the last position %d", ErrBadInput, seq, p0, p1, last)
		}
		if !C.llama_memory_seq_rm(mem, C.llama_seq_id(seq), C.llama_pos(p0), C.llama_pos(p1)) {
			return &CError{Func: "llama_memory_seq_rm", Msg: fmt.Sprintf("seq %d positions [%d,%d)", seq, p0, p1), Err: ErrDecode}
		}
		i = j
	}
	return nil
}

// NewStateCompressor reads the keys of seq from the state of an app's
// llama.cpp context (ctx is a *llama_context) and returns a compressor that
// has recorded their norms and evicts from ctx. Use it to inspect a plan
// (PlanFor, Norms) before applying it with Compress(seq, -1); Compress (the
// package function) does both at once.
//
// The keys are read as the cache stores them (f32, f16, bf16 or q8_0). The
// context must be one of the llama.cpp linked into this binary (an app built
// with this package links llama.cpp through it) and must not be decoding.
func NewStateCompressor(ctx unsafe.Pointer, seq int32, policy adapter.Policy) (*adapter.Compressor, error) {
	st, err := ReadState(ctx, seq)
	if err != nil {
		return nil, err
	}
	if len(st.Cells) == 0 {
		return nil, fmt.Errorf("%w: seq %d has no cells", hooks.ErrUnknownSequence, seq)
	}
	cctx := (*C.struct_llama_context)(ctx)
	model := C.llama_get_model(cctx)
	kvHeads := int(C.llama_model_n_head_kv(model))
	if kvHeads <= 0 {
		return nil, fmt.Errorf("%w: model reports %d kv heads", ErrState, kvHeads)
	}
	for _, cell := range st.Cells {
		if !containsSeq(cell.Seqs, seq) {
			return nil, fmt.Errorf("%w: cell at position %d does not belong to seq %d", ErrState, cell.Pos, seq)
		}
	}
	batches := make([]*hooks.KeyBatch, len(st.Layers))
	headDim := 0
	for l := range st.Layers {
		b, hd, err := st.keyBatch(l, kvHeads, seq)
		if err != nil {
			return nil, err
		}
		if l > 0 && hd != headDim {
			return nil, fmt.Errorf("%w: layer %d has head dim %d, layer 0 has %d", hooks.ErrUnsupported, l, hd, headDim)
		}
		headDim, batches[l] = hd, b
	}
	rt := &stateRuntime{ctx: cctx, shape: hooks.CacheShape{
		Layers: len(st.Layers), KVHeads: kvHeads, HeadDim: headDim,
		Capacity: int(C.llama_n_ctx_seq(cctx)),
	}}
	// Only bytes are counted with these: a type the kernels cannot size per
	// head is counted as the type the keys were read in.
	rt.shape.KType, rt.shape.VType = batches[0].DType, batches[0].DType
	if _, err := rt.shape.EntryBytes(); err != nil {
		return nil, err
	}
	comp, err := adapter.New(rt, policy)
	if err != nil {
		return nil, err
	}
	for _, b := range batches {
		if err := comp.ObserveKeys(b); err != nil {
			return nil, fmt.Errorf("llamacpp: state of seq %d: %w", seq, err)
		}
	}
	return comp, nil
}

// Compress compresses sequence seq of an app's llama.cpp context in place:
// it reads the keys from llama_state_seq_get_data, plans by policy (which
// must be per-token: llama.cpp cells are shared by all heads) and frees the
// evicted cells with llama_memory_seq_rm. The last position always stays, so
// decoding continues at llama_memory_seq_pos_max+1 as before.
//
// ctx is the app's *llama_context as an unsafe.Pointer; from cgo code:
//
//	stats, err := llamacpp.Compress(unsafe.Pointer(cctx), 0, adapter.DefaultPolicy())
//
// Call it after llama_decode of the prompt returned and before the next one.
func Compress(ctx unsafe.Pointer, seq int32, policy adapter.Policy) (hooks.Stats, error) {
	comp, err := NewStateCompressor(ctx, seq, policy)
	if err != nil {
		return hooks.Stats{}, err
	}
	return comp.Compress(seq, -1)
}

func containsSeq(s []hooks.SeqID, seq hooks.SeqID) bool {
	for _, x := range s {
		if x == seq {
			return true
		}
	}
	return false
}
