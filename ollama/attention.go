package ollama

import (
	"errors"

	"github.com/kvnorm/kvnorm/hooks"
)

// ErrNoAttention is wrapped by Engine.RecordAttention's error for a model
// whose attention probabilities kvnorm cannot reconstruct (an architecture
// other than those listed in record.go).
var ErrNoAttention = errors.New("ollama: cannot record attention")

// Attention is the attention of one layer of one forward pass of one
// sequence: the softmax probabilities of every query head of every token of
// the pass over the cells the sequence holds in that layer.
//
// Ollama's engine computes attention inside the model's forward pass and,
// with flash attention, never materialises the probabilities; Engine
// reconstructs them from the pass's queries (the product of the layer's
// attn_q weight, roped by the model's own rotary embedding) and the keys in
// the cache: softmax(q·k/√headDim) over the cells the mask lets the token
// see. See record.go.
type Attention struct {
	Layer int
	Seq   hooks.SeqID
	// Queries are the positions of the pass's tokens of Seq, in batch order.
	Queries []hooks.Pos
	// Heads and KVHeads are the numbers of query and KV heads; query head h
	// reads KV head h / (Heads / KVHeads).
	Heads, KVHeads int
	// Cells[g][c] is the position held by cell c of KV head g (each head of
	// a layer compacted per head holds its own positions); every head has
	// the same number of cells.
	Cells [][]hooks.Pos
	// Weights is laid out [head][query][cell]; cells a query may not see
	// (later positions) weigh 0.
	Weights []float32
}

// NumCells is the number of cells per KV head.
func (a *Attention) NumCells() int {
	if len(a.Cells) == 0 {
		return 0
	}
	return len(a.Cells[0])
}

// Weight returns the attention query head h of query q pays to cell c.
func (a *Attention) Weight(h, q, c int) float32 {
	return a.Weights[(h*len(a.Queries)+q)*a.NumCells()+c]
}
