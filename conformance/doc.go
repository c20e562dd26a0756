// Package conformance is kvnorm's conformance suite: it measures, for one
// model on one or more runtimes, how outputs change when the KV cache is
// compressed after prefill, and judges each policy, granularity and keep
// ratio against the user's tolerances.
//
// The suite reaches a runtime only through hooks.Engine, opened by an
// EngineFactory registered under the runtime's name (the reference engine in
// conformance/refengine; llama.cpp and Ollama register theirs in
// cmd/kvnorm/conformance.go). For every task it builds seeded instances,
// runs each one once without any compressor (the baseline), then once per
// policy × granularity × keep ratio with a fresh adapter.Compressor attached
// as the engine's observer, so compression happens exactly as in production:
// the engine reports keys, PrefillDone triggers the plan, the compressor
// applies it through the engine's PositionEvictor or HeadCompactor. A
// granularity the engine cannot apply is reported as n/a.
//
//	tasks      lm         prefill, compress, teacher-forced scoring: loss, perplexity, KL(baseline ‖ compressed), top-1 agreement
//	           passkey    the published instruction line, filler, "The pass key is N..." at a depth, question; exact match
//	           needle     a fact sentence at a depth of a haystack text; does the answer contain the fact
//	           greedy     greedy generation: first divergence from the baseline and match rate
//	           attention  uncompressed, needs AttentionRecorder: per layer and KV head, Spearman(key norm, attention
//	                      received) and the share of attention on the lowest-norm half, for the decoding phase
//	                      (continuation queries -> prefill keys, Devoto et al.'s measure) and prompt-internally
//	chunked    lm and greedy also run knorm under pressure: the prompt decoded into a cache of keep × prompt + the
//	           tokens after it (CachePressure), paired against knorm once after prefill (Config.Chunked)
//	statistics every cell has a seeded percentile bootstrap interval over the task's instances; rows are compared
//	           with the baseline and with knorm on the same instances (paired bootstrap of the difference,
//	           "not distinguishable" when it spans 0); verdicts are judged on intervals (pass, FAIL, uncertain)
//	recommend  Recommend: the most compressing policy whose intervals stay within every tolerance, as
//	           OLLAMA_KV_NORM_* lines, a Go adapter.Policy literal and the KV memory saved
//	outputs    Results -> Write: results.json (every number), report.md (tables, intervals, comparisons,
//	           verdicts), PNG plots (error bars; the attention measures and a layer × head heatmap of ρ)
//
// Text comes from the model under test, sampled at temperature 1 with fixed
// seeds (in-distribution for any model), or from the user's file. Every
// random choice is seeded, so a run is repeatable number for number.
//
// The suite reports what it measures and sets no threshold from a policy's
// result: on a small model knorm may lose to random or streaming, and the
// report shows it.
package conformance
