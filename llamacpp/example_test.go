package llamacpp_test

import (
	"context"
	"fmt"
	"log"
	"unsafe"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/llamacpp"
)

// Callback mode: the context streams every layer's post-RoPE keys to the
// compressor while it decodes the prompt, compresses the cache to half after
// prefill, and again whenever generation fills it.
func Example() {
	m, err := llamacpp.Open("model.gguf")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	ctx, err := m.NewContext(llamacpp.ContextOptions{NCtx: 2048, Threads: 4})
	if err != nil {
		log.Fatal(err)
	}
	defer ctx.Close()
	policy := adapter.DefaultPolicy() // knorm, keep 0.5, per-token, skip layers 0 and 1
	if _, err := ctx.EnableCompression(policy); err != nil {
		log.Fatal(err)
	}
	prompt, err := m.Tokenize("Once upon a time", true)
	if err != nil {
		log.Fatal(err)
	}
	g, err := ctx.Generate(context.Background(), 0, prompt, llamacpp.GenerateOptions{MaxTokens: 64})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s\n(KV cells %d -> %d)\n", g.Text, g.CellsBefore, g.CellsAfter)
}

// State mode, for an application that already drives llama.cpp through its
// own cgo code: after llama_decode of the prompt, hand the *llama_context to
// Compress. It reads the sequence's keys from llama_state_seq_get_data, plans
// with the policy and frees the evicted cells with llama_memory_seq_rm; the
// next token still goes at llama_memory_seq_pos_max+1.
//
// In the application's cgo file (its own llama.cpp must be the one this
// package links: import llamacpp and do not link a second copy):
//
//	var lctx *C.struct_llama_context = ... // llama_init_from_model(...)
//	// ... llama_decode(lctx, promptBatch) ...
//	stats, err := llamacpp.Compress(unsafe.Pointer(lctx), 0, adapter.DefaultPolicy())
//
// Here Context.Raw stands in for the application's pointer.
func ExampleCompress() {
	m, err := llamacpp.Open("model.gguf")
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	c, err := m.NewContext(llamacpp.ContextOptions{NCtx: 2048})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	prompt, _ := m.Tokenize("Once upon a time, there was a little girl named Lily.", true)
	if _, err := c.Decode(0, prompt); err != nil { // the app's own llama_decode
		log.Fatal(err)
	}

	var lctx unsafe.Pointer = c.Raw() // the app's *llama_context
	stats, err := llamacpp.Compress(lctx, 0, adapter.DefaultPolicy())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("KV cells %d -> %d\n", stats.PositionsBefore, stats.PositionsAfter)
	_ = c.Resync(0) // only because c is also a Context: an app's own context needs nothing
}
