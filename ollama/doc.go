// Package ollama is kvnorm's adapter for Ollama's Go engine (Ollama v0.24.0,
// the last release with kvcache/, model/ and runner/ollamarunner): a KV cache
// that evicts by key norm, per KV head as in Devoto et al. 2024, or per token.
//
// Data flow through one forward pass of the runner:
//
//	Cache.StartForward(batch)   compress sequences whose prompt ended in an
//	                            earlier batch (after reading their norms
//	                            back) and sequences the batch would not fit
//	                            (cache pressure); place the batch after each
//	                            sequence's kept cells; build masks
//	Cache.Put(key, value)       store K/V with set_rows, and sqrt(sum(k²))
//	                            per head into the batch's rows of the
//	                            layer's norm ring (one batch of rows)
//	Cache.Get()                 views over the kept cells of the sequences of
//	                            the batch, and the mask of this layer's layout
//	Compressor -> CompactHeads  get_rows/set_rows gather every head's own kept
//	                            cells (keys and values) to the front of
//	                            its slab, in one op per layer and tensor
//
// With a policy, each layer's tensors are allocated for what the policy
// keeps: layers kept whole hold num_ctx cells per slot, compressed layers
// Target(num_ctx) plus one batch. Norms are read back only when a compression
// is due or the ring is full (in the runner's pipelined mode, only those of
// batches known to have run on the device: see norms.go).
//
// Install puts a Cache in place of the causal cache of a model loaded with
// model.New (before the cache's Init), as kvnorm's Ollama fork does in its
// runner. Session loads a GGUF model in the engine for tools, tests and the
// conformance suite: tokenize, decode with logits, greedy generation.
//
// What differs from Ollama's kvcache.Causal: each sequence slot owns a slab
// of cells per layer (no cells shared between sequences; CopyPrefix
// copies), keys are laid out [headDim, cells, kvHeads], a context shift of a
// compressed sequence keeps its cells and moves its numbering (keys are
// re-roped), a compressed or shifted sequence is never resumed as a prefix
// (CanResume), and the cache needs no sliding window. Architectures whose
// cache is a *kvcache.WrapperCache (gemma2/3/3n, llama4, mllama, gpt-oss,
// olmo3, ...) or holds latent vectors (deepseek2) are refused by Install.
//
// Engine.RecordAttention (llama models) reconstructs the attention
// probabilities of every forward pass, which Ollama's engine computes inside
// the model and never exposes: the layers' attn_q weights are wrapped to keep
// the pass's roped queries, and softmax(q·k/√d) is computed on the host from
// them and the cache's keys (record.go).
//
// Everything that loads a model needs cgo; without it Open returns ErrNoCgo.
package ollama
