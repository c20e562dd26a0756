package conformance

import (
	"errors"
	"io"

	"github.com/kvnorm/kvnorm/hooks"
)

// EngineOptions are what the suite asks of a runtime when it opens one.
type EngineOptions struct {
	// Model is a GGUF file, a llama2.c checkpoint, or a name the runtime
	// resolves itself (an Ollama model).
	Model string
	// Tokenizer is the llama2.c tokenizer file that goes with a llama2.c
	// checkpoint ("" otherwise).
	Tokenizer string
	// Context is the number of cells per sequence; 0 lets the runtime choose
	// (normally the model's trained context).
	Context int
	// Threads is the number of CPU threads a runtime may use (0: its default).
	Threads int
	// Attention is set when the suite will call RecordAttention: a runtime
	// that needs flash attention off to expose attention probabilities turns
	// it off.
	Attention bool
	// Log receives the runtime's notes (never nil when the suite opens it).
	Log io.Writer
}

// EngineFactory opens a runtime for the suite. Every runtime registers one
// under its name (see cmd/kvnorm/conformance.go). The engine must also
// implement hooks.PositionEvictor or hooks.HeadCompactor so that an
// adapter.Compressor can apply plans to it; a granularity it cannot apply is
// reported as n/a, not as an error.
type EngineFactory func(o EngineOptions) (hooks.Engine, error)

// Twinner is an engine that can open a second engine on its loaded weights,
// with a cache of its own (as large, of the same type, no observer). A
// comparison of two caches on twins runs both on the same weights in memory;
// two loads of one file need not place them alike, and the engine-to-engine
// difference that leaves is of the size of what compression changes in
// decode speed (docs/results.md). The twin is used from the same goroutine
// as the engine, and each is closed on its own.
type Twinner interface {
	Twin() (hooks.Engine, error)
}

// Runtime is a named factory the suite runs.
type Runtime struct {
	Name string
	Open EngineFactory
}

// ErrNoAttention is returned by a runtime that cannot expose attention
// probabilities in its current configuration (for example flash attention
// on); the attention task then reports n/a.
var ErrNoAttention = errors.New("conformance: runtime cannot record attention")

// AttentionBatch is the attention of one layer of one forward batch of one
// sequence: softmax probabilities of every query head of every token of the
// batch over the cache cells it could see.
//
// Cells are per KV head because a per-head cache holds different positions
// in each head (a cache whose cells are shared by all heads passes the same
// slice for every head). Query head h reads KV head h / (Heads / KVHeads).
type AttentionBatch struct {
	Layer int
	Seq   hooks.SeqID
	// Queries are the positions of the batch's tokens, in batch order.
	Queries []hooks.Pos
	// Heads and KVHeads are the numbers of query and KV heads.
	Heads, KVHeads int
	// Cells[g][c] is the position held by cell c of KV head g, or -1 for an
	// empty cell. Every KV head has the same number of cells.
	Cells [][]hooks.Pos
	// Weights is laid out [head][query][cell] (ggml's kq_soft_max tensor
	// [n_kv, n_tokens, n_head]); masked and empty cells weigh 0.
	Weights []float32
}

// NumCells is the number of cells per KV head.
func (b *AttentionBatch) NumCells() int {
	if len(b.Cells) == 0 {
		return 0
	}
	return len(b.Cells[0])
}

// Weight returns the attention query head h of query q pays to cell c.
func (b *AttentionBatch) Weight(h, q, c int) float32 {
	n := b.NumCells()
	return b.Weights[(h*len(b.Queries)+q)*n+c]
}

// AttentionRecorder is implemented by engines that can report attention
// probabilities (the reference engine; llama.cpp through its kq_soft_max
// node with flash attention off). The attention task needs it and reports
// n/a for engines without it.
type AttentionRecorder interface {
	// RecordAttention makes the engine pass f the attention of every layer
	// of every batch it decodes from now on; nil stops. The engine reports
	// a batch's keys to its observer before that batch's attention, and
	// stops decoding when f returns an error. It returns ErrNoAttention
	// (wrapped) when it cannot record in its configuration.
	RecordAttention(f func(*AttentionBatch) error) error
}
