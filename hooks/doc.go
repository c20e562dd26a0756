// Package hooks is the contract between an LLM runtime and the kvnorm compressor.
//
// Data flows one way:
//
//	runtime forward pass  --KeyBatch-->     Observer (the compressor in package adapter)
//	prompt decoded        --PrefillDone-->  Observer: plan = policy(recorded norms)
//	batch would not fit   --CachePressure-> Observer: plan to a smaller budget
//	                      <--EvictPositions  PositionEvictor (llama.cpp: cells shared by all heads)
//	                      <--CompactHeads    HeadCompactor   (Ollama engine: one keep set per KV head)
//
// A runtime reports, for every layer of every forward batch, either the
// post-RoPE keys of the batch (any dtype the kernels package reads) or their
// per-head L2 norms, together with the sequence and position of every token
// of the batch. The runtime knows its batch; the compressor never guesses.
//
// What a runtime must offer back depends on how its cache stores cells:
//
//   - A cache whose cells are shared by all heads and layers (llama.cpp)
//     implements PositionEvictor: it frees whole positions of one sequence.
//     Only per-token plans can be applied there.
//   - A cache that can hold a different set of positions in every KV head
//     (kvnorm's Ollama cache) implements HeadCompactor: it gathers, for every
//     layer and head, the kept positions into its first cells. It can apply
//     per-head plans (the paper's granularity) and per-token plans.
//
// Plans are plain data (TokenPlan, HeadPlan) so that both runtimes, the
// conformance suite and tests can inspect them. Compressing one sequence
// never touches another sequence's cells.
package hooks
