//go:build cgo

package llamacpp

import (
	"fmt"
	"unsafe"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp/statemode"
)

// holdBelow is the length of a Decode call below which an observed decode
// does not read its keys. Asking cb_eval for a node makes ggml's scheduler split the graph
// there, and each piece is a ggml_graph_compute that starts and joins its
// worker threads: for a one-token decode that cost a quarter of the decode
// time on a 2-core host (issue 14), while a batch of a prompt amortises it.
// Prompts are read as they are decoded (the plan after prefill needs them
// anyway); generated tokens are read from the state when a compression is
// due, which copies the sequence's cells once per compression instead of
// splitting every decode.
const holdBelow = 32

// eagerKeys (tests) reads the keys of every decode, as before holding back.
var eagerKeys = false

// holdKeys says whether the batches of a Decode call of n tokens hold their
// keys back (c.mu held). A prompt is read as it is decoded, its last short
// chunk too.
func (c *Context) holdKeys(n int) bool {
	return c.obs != nil && c.attnF == nil && n < holdBelow && !eagerKeys
}

var _ hooks.DeferredKeys = (*Context)(nil)

// ReportDeferredKeys reports to obs the keys of seq's tokens decoded without
// their keys read (short batches, see holdBelow), reading them from the
// sequence's state (llama_state_seq_get_data) as the cache stores them. The
// compressor calls it before every plan; it implements hooks.DeferredKeys.
func (c *Context) ReportDeferredKeys(seq hooks.SeqID, obs hooks.Observer) error {
	if err := c.lockSeq(seq); err != nil {
		return err
	}
	held := c.held[seq]
	if held.n == 0 {
		c.mu.Unlock()
		return nil
	}
	b, err := statemode.ReadBytes(LinkedFuncs, uintptr(unsafe.Pointer(c.c)), seq)
	if err == nil {
		c.held[seq] = posSet{}
	}
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("llamacpp: seq %d: read %d held-back keys: %w", seq, held.n, err)
	}
	st, err := ParseSeqState(b)
	if err != nil {
		return fmt.Errorf("llamacpp: seq %d: read %d held-back keys: %w", seq, held.n, err)
	}
	if len(st.Layers) != c.shape.Layers {
		return fmt.Errorf("%w: seq %d: state has %d layers, the model %d", ErrState, seq, len(st.Layers), c.shape.Layers)
	}
	for l := range st.Layers {
		all, headDim, err := st.KeyBatch(l, c.shape.KVHeads, seq)
		if err != nil {
			return err
		}
		if headDim != c.shape.HeadDim {
			return fmt.Errorf("%w: seq %d layer %d: state rows of head dim %d, the model %d", ErrState, seq, l, headDim, c.shape.HeadDim)
		}
		kb := heldRows(all, &held)
		if kb == nil {
			return nil // none of them is in the cache any more
		}
		if err := obs.ObserveKeys(kb); err != nil {
			return fmt.Errorf("llamacpp: seq %d: held-back keys of layer %d: %w", seq, l, err)
		}
	}
	return nil
}

// heldRows is the part of a state key batch at the positions of held; nil
// when there is none.
func heldRows(all *hooks.KeyBatch, held *posSet) *hooks.KeyBatch {
	n := len(all.Positions)
	if n == 0 {
		return nil
	}
	row := len(all.Keys) / n
	kb := &hooks.KeyBatch{Layer: all.Layer, DType: all.DType}
	for i, p := range all.Positions {
		if !held.has(p) {
			continue
		}
		kb.Positions = append(kb.Positions, p)
		kb.Seqs = append(kb.Seqs, all.Seqs[i])
		kb.Keys = append(kb.Keys, all.Keys[i*row:(i+1)*row]...)
	}
	if len(kb.Positions) == 0 {
		return nil
	}
	return kb
}
