// Package llamacpp runs llama.cpp through cgo and compresses its KV cache by
// key norm (Devoto et al. 2024) through the shared hooks/adapter contract.
//
// llama.cpp and ggml are compiled from the pinned Ollama module (blank
// imports of its llama.cpp/src and ggml/src packages). No llama.h is needed:
// kvn_llama.h holds kvnorm's own declarations of the functions and types the
// package calls, checked against the pinned llama.h by
// TestDeclarationsMatchLlamaH, so an app that requires kvnorm builds it with
// a plain `go build`. Nothing of llama.cpp is copied here. Without cgo the
// package still compiles and every entry point returns an error wrapping
// ErrNoCgo.
//
// # Callback mode (a Context of this package)
//
//	m, _ := llamacpp.Open("model.gguf")
//	ctx, _ := m.NewContext(llamacpp.ContextOptions{NCtx: 4096})
//	comp, _ := ctx.EnableCompression(adapter.DefaultPolicy()) // adapter.New(ctx, p) + SetObserver
//	g, _ := ctx.Generate(context.Background(), 0, prompt, llamacpp.GenerateOptions{MaxTokens: 128})
//
// The data flow of one decode:
//
//	Decode(seq, tokens) -- chunks of BatchSize, one llama_decode (one ubatch) each
//	  free cells < chunk?  -> observer.CachePressure -> plan -> EvictPositions
//	  llama_decode
//	    cb_eval (C) asks for the ROPE node "Kcur-N" of every layer N (and, when
//	    recording attention, "kq_soft_max-N" and the K cache's SET_ROWS)
//	    -> kvnormObserveKeys (Go) copies it with ggml_backend_tensor_get
//	       ([head_dim, n_kv_heads, n_tokens] f32) into a reused buffer and
//	       reduces it to per-head L2 norms (kernels.NormsF32)
//	  observer.ObserveKeys(layer, norms, seqs and positions of the chunk),
//	    once llama_decode has returned and the context lock is released
//	    (the observer may evict, which takes that lock)
//	Prompt/Generate: after the prompt -> observer.PrefillDone -> plan -> evict
//
// Eviction is per token (llama.cpp cells hold every layer and head of a
// position): llama_memory_seq_rm(mem, seq, p0, p1) per run of evicted
// positions. Positions keep their holes; the last position is never evicted,
// so decoding continues at llama_memory_seq_pos_max+1 and no RoPE shift is
// needed. Each sequence has its own cells (kv_unified off), so compressing
// one never touches another. Flash attention is on by default; eviction works
// with it on or off and with f16, q8_0 and q4_0 caches.
//
// # Attention (flash attention off)
//
// RecordAttention(f) passes f, per layer and batch, the softmax
// probabilities of the SOFT_MAX node "kq_soft_max-N" ([n_kv, n_tokens,
// n_head] f32; llama.cpp builds it only with flash attention off). Its
// columns are the cells 0..n_kv-1 of the sequence's stream, not positions:
// cb_eval also captures the first SET_ROWS into a "cache_k_l*" tensor of each
// decode, whose indices are the cache rows the batch is written to (row =
// seq × cells per sequence + cell), and the context keeps a cell -> position
// map per sequence from them (holes left by eviction are refilled by later
// tokens, so cells are not in position order). f gets the batch after the
// observer got its keys. cmd/kvnorm adapts it to conformance.AttentionRecorder
// (this package does not import the suite).
//
// # State mode (an app's own llama_context)
//
// Compress(unsafe.Pointer(lctx), seq, policy) reads the sequence's keys back
// from llama_state_seq_get_data (ParseSeqState documents the layout; f32, f16,
// bf16 and q8_0 keys), plans, and evicts with llama_memory_seq_rm. See
// ExampleCompress. The logic lives in package statemode behind a table of
// llama.cpp functions (statemode.Funcs): LinkedFuncs fills it with the copy
// this package links; package libllama fills it with a libllama the app
// loaded at run time (purego, no cgo), so a context is always read and
// evicted by the llama.cpp that created it.
//
// # Ownership
//
// A Model owns its llama_model and a Context its llama_context, batch and
// callback state (C memory plus a cgo.Handle). Close is explicit, idempotent
// and mutex-guarded; there are no finalizers. Closing a Model closes its
// contexts first. Every C string is freed; Go memory handed to C lives only
// for the duration of the call.
package llamacpp
