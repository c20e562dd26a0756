package llamacpp

import "github.com/kvnorm/kvnorm/hooks"

// Attention is the attention of one layer of one decoded batch of one
// sequence: the softmax probabilities of every query head of every token of
// the batch over the cache cells the batch's graph read (llama.cpp's
// "kq_soft_max-<layer>" node, computed only with flash attention off).
//
// A llama.cpp cell holds every layer and KV head of one position, so one
// Cells list describes all heads. The cells are those of the sequence's own
// stream (kv_unified off), in cache order, padded by llama.cpp to a multiple
// of 256 (n_kv): cells beyond the last used one, and cells freed by eviction,
// are empty (-1) and weigh 0, as do cells a query may not see (later
// positions).
type Attention struct {
	Layer int
	Seq   hooks.SeqID
	// Queries are the positions of the batch's tokens, in batch order.
	Queries []hooks.Pos
	// Heads and KVHeads are the numbers of query and KV heads; query head h
	// reads KV head h / (Heads / KVHeads).
	Heads, KVHeads int
	// Cells[c] is the position held by cell c (column c of Weights), -1 for
	// an empty cell.
	Cells []hooks.Pos
	// Weights is laid out [head][query][cell], as ggml's kq_soft_max tensor
	// [n_kv, n_tokens, n_head].
	Weights []float32
}

// Weight returns the attention query head h of query q pays to cell c.
func (a *Attention) Weight(h, q, c int) float32 {
	return a.Weights[(h*len(a.Queries)+q)*len(a.Cells)+c]
}
