// Package statemode is kvnorm's state mode without cgo: it compresses a
// sequence of an app's llama.cpp context by reading its keys from
// llama_state_seq_get_data (ParseSeqState), recording their norms in an
// adapter.Compressor, planning, and freeing the evicted cells with
// llama_memory_seq_rm.
//
// It reaches llama.cpp only through a Funcs table that a provider fills for
// one llama.cpp: kvnorm/llamacpp.LinkedFuncs (the copy kvnorm links, through
// cgo), kvnorm/llamacpp/libllama (symbols of a shared library resolved at run
// time with purego), or an app's own wrappers. The data flow of Compress:
//
//	CheckMemory: every function present; not recurrent, hybrid or sliding-window
//	ReadBytes: pos_min/max, llama_state_seq_get_size/get_data, pos_min/max again
//	ParseSeqState -> per layer a hooks.KeyBatch -> adapter.Compressor.ObserveKeys
//	adapter plan (per token) -> evictor: pos_max unchanged? -> llama_memory_seq_rm per run
//
// Every refusal happens before anything is evicted and names what it found.
package statemode
