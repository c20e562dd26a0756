//go:build cgo

package llamacpp

/*
#include <stdint.h>
#include "kvn_llama.h"

// The table holds C pointers as uintptr; C converts them back.
static struct llama_context *kvn_ctx(uintptr_t p) { return (struct llama_context *)p; }
static const struct llama_model *kvn_model(uintptr_t p) { return (const struct llama_model *)p; }
static llama_memory_t kvn_mem(uintptr_t p) { return (llama_memory_t)p; }
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp/statemode"
)

func cctx(p uintptr) *C.struct_llama_context { return C.kvn_ctx(C.uintptr_t(p)) }
func cmodel(p uintptr) *C.struct_llama_model { return C.kvn_model(C.uintptr_t(p)) }
func cmem(p uintptr) C.llama_memory_t        { return C.kvn_mem(C.uintptr_t(p)) }

// LinkedFuncs is state mode's function table filled with the llama.cpp this
// package links (provider a): the functions an app built with this package
// calls when it drives llama.cpp through its own cgo code.
var LinkedFuncs = &statemode.Funcs{
	Provider: "the llama.cpp linked by kvnorm/llamacpp",
	StateSeqGetSize: func(ctx uintptr, seq int32) uint64 {
		return uint64(C.llama_state_seq_get_size(cctx(ctx), C.llama_seq_id(seq)))
	},
	StateSeqGetData: func(ctx uintptr, dst unsafe.Pointer, size uint64, seq int32) uint64 {
		return uint64(C.llama_state_seq_get_data(cctx(ctx), (*C.uint8_t)(dst), C.size_t(size), C.llama_seq_id(seq)))
	},
	GetModel: func(ctx uintptr) uintptr {
		return uintptr(unsafe.Pointer(C.llama_get_model(cctx(ctx))))
	},
	GetMemory: func(ctx uintptr) uintptr {
		return uintptr(unsafe.Pointer(C.llama_get_memory(cctx(ctx))))
	},
	NCtxSeq: func(ctx uintptr) uint32 { return uint32(C.llama_n_ctx_seq(cctx(ctx))) },
	MemorySeqPosMin: func(mem uintptr, seq int32) int32 {
		return int32(C.llama_memory_seq_pos_min(cmem(mem), C.llama_seq_id(seq)))
	},
	MemorySeqPosMax: func(mem uintptr, seq int32) int32 {
		return int32(C.llama_memory_seq_pos_max(cmem(mem), C.llama_seq_id(seq)))
	},
	MemorySeqRm: func(mem uintptr, seq, p0, p1 int32) bool {
		return bool(C.llama_memory_seq_rm(cmem(mem), C.llama_seq_id(seq), C.llama_pos(p0), C.llama_pos(p1)))
	},
	ModelNLayer:      func(m uintptr) int32 { return int32(C.llama_model_n_layer(cmodel(m))) },
	ModelNHeadKV:     func(m uintptr) int32 { return int32(C.llama_model_n_head_kv(cmodel(m))) },
	ModelNSwa:        func(m uintptr) int32 { return int32(C.llama_model_n_swa(cmodel(m))) },
	ModelIsRecurrent: func(m uintptr) bool { return bool(C.llama_model_is_recurrent(cmodel(m))) },
	ModelIsHybrid:    func(m uintptr) bool { return bool(C.llama_model_is_hybrid(cmodel(m))) },
}

// checkStateArgs keeps this package's errors for its own bad input.
func checkStateArgs(ctx unsafe.Pointer, seq int32) error {
	if ctx == nil {
		return fmt.Errorf("%w: nil llama_context", ErrBadInput)
	}
	if seq < 0 {
		return fmt.Errorf("%w: sequence %d must be >= 0", ErrBadInput, seq)
	}
	return nil
}

// ReadState returns the parsed state of seq of a llama.cpp context: ctx is a
// *llama_context (from an app's own cgo code, or Context.Raw).
func ReadState(ctx unsafe.Pointer, seq int32) (*SeqState, error) {
	if err := checkStateArgs(ctx, seq); err != nil {
		return nil, err
	}
	return statemode.Read(LinkedFuncs, uintptr(ctx), seq)
}

// NewStateCompressor reads the keys of seq from the state of an app's
// llama.cpp context (ctx is a *llama_context) and returns a compressor that
// has recorded their norms and evicts from ctx. Use it to inspect a plan
// (PlanFor, Norms) before applying it with Compress(seq, -1); Compress (the
// package function) does both at once.
//
// The keys are read as the cache stores them (f32, f16, bf16 or q8_0). The
// context must be one of the llama.cpp linked into this binary (an app built
// with this package links llama.cpp through it) and must not be decoding. A
// llama.cpp the app loads at run time is compressed through
// kvnorm/llamacpp/libllama instead.
func NewStateCompressor(ctx unsafe.Pointer, seq int32, policy adapter.Policy) (*adapter.Compressor, error) {
	if err := checkStateArgs(ctx, seq); err != nil {
		return nil, err
	}
	return statemode.NewCompressor(LinkedFuncs, uintptr(ctx), seq, policy)
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
// It copies the sequence's K and V to host memory once (see the README for
// the cost at 2048 and 8192 tokens).
func Compress(ctx unsafe.Pointer, seq int32, policy adapter.Policy) (hooks.Stats, error) {
	if err := checkStateArgs(ctx, seq); err != nil {
		return hooks.Stats{}, err
	}
	return statemode.Compress(LinkedFuncs, uintptr(ctx), seq, policy)
}
