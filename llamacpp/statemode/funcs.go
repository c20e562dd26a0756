package statemode

import (
	"errors"
	"fmt"
	"reflect"
	"unsafe"
)

// Sentinel errors; every error of this package wraps one of them (or an error
// of hooks or adapter) with a message naming what was wrong.
var (
	// ErrBadInput reports an argument out of range: a nil context, a
	// negative sequence, positions outside the sequence.
	ErrBadInput = errors.New("statemode: bad input")
	// ErrState reports a sequence state (llama_state_seq_get_data) that
	// cannot be parsed, does not match the model, or changed while it was
	// read (the context was decoding).
	ErrState = errors.New("statemode: bad sequence state")
	// ErrMissingFunc reports a llama.cpp function the provider could not
	// supply (a symbol absent from the library, a nil entry of Funcs).
	ErrMissingFunc = errors.New("statemode: llama.cpp function missing")
	// ErrMemoryType reports a context whose memory state mode cannot
	// compress: recurrent, hybrid (attention + recurrent) or sliding-window
	// (iSWA) caches, whose state holds more than one K cache per layer or
	// none at all.
	ErrMemoryType = errors.New("statemode: unsupported llama.cpp memory type")
)

// Funcs is the table of llama.cpp functions state mode calls, filled by a
// provider for one llama.cpp: package llamacpp fills it with the copy it
// links (LinkedFuncs there), package libllama with symbols resolved at run
// time in a libllama shared library the app loaded. ctx, mem and model are
// the C pointers of that llama.cpp (struct llama_context *, llama_memory_t,
// const struct llama_model *) as uintptr, as run-time bindings such as yzma
// hold them; they never point to Go memory. Each field has the llama.h
// signature of the function it names.
type Funcs struct {
	// Provider names where the functions come from, for error messages.
	Provider string

	StateSeqGetSize  func(ctx uintptr, seq int32) uint64                                  // llama_state_seq_get_size
	StateSeqGetData  func(ctx uintptr, dst unsafe.Pointer, size uint64, seq int32) uint64 // llama_state_seq_get_data
	GetModel         func(ctx uintptr) uintptr                                            // llama_get_model
	GetMemory        func(ctx uintptr) uintptr                                            // llama_get_memory
	NCtxSeq          func(ctx uintptr) uint32                                             // llama_n_ctx_seq
	MemorySeqPosMin  func(mem uintptr, seq int32) int32                                   // llama_memory_seq_pos_min
	MemorySeqPosMax  func(mem uintptr, seq int32) int32                                   // llama_memory_seq_pos_max
	MemorySeqRm      func(mem uintptr, seq, p0, p1 int32) bool                            // llama_memory_seq_rm
	ModelNLayer      func(model uintptr) int32                                            // llama_model_n_layer
	ModelNHeadKV     func(model uintptr) int32                                            // llama_model_n_head_kv
	ModelNSwa        func(model uintptr) int32                                            // llama_model_n_swa
	ModelIsRecurrent func(model uintptr) bool                                             // llama_model_is_recurrent
	ModelIsHybrid    func(model uintptr) bool                                             // llama_model_is_hybrid
}

// FuncSymbols maps each function field of Funcs to the llama.h symbol it
// calls, in field order.
var FuncSymbols = []struct{ Field, Symbol string }{
	{"StateSeqGetSize", "llama_state_seq_get_size"},
	{"StateSeqGetData", "llama_state_seq_get_data"},
	{"GetModel", "llama_get_model"},
	{"GetMemory", "llama_get_memory"},
	{"NCtxSeq", "llama_n_ctx_seq"},
	{"MemorySeqPosMin", "llama_memory_seq_pos_min"},
	{"MemorySeqPosMax", "llama_memory_seq_pos_max"},
	{"MemorySeqRm", "llama_memory_seq_rm"},
	{"ModelNLayer", "llama_model_n_layer"},
	{"ModelNHeadKV", "llama_model_n_head_kv"},
	{"ModelNSwa", "llama_model_n_swa"},
	{"ModelIsRecurrent", "llama_model_is_recurrent"},
	{"ModelIsHybrid", "llama_model_is_hybrid"},
}

// Check returns an error wrapping ErrMissingFunc naming the first function
// of the table that is nil.
func (f *Funcs) Check() error {
	if f == nil {
		return fmt.Errorf("%w: nil function table", ErrMissingFunc)
	}
	v := reflect.ValueOf(f).Elem()
	for _, s := range FuncSymbols {
		if v.FieldByName(s.Field).IsNil() {
			return fmt.Errorf("%w: %s (Funcs.%s) not provided by %s", ErrMissingFunc, s.Symbol, s.Field, f.provider())
		}
	}
	return nil
}

func (f *Funcs) provider() string {
	if f.Provider == "" {
		return "the provider"
	}
	return f.Provider
}
