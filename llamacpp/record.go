//go:build cgo

package llamacpp

/*
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "kvn_llama.h"

// kvn_attn describes a "kq_soft_max-N" tensor for Go.
typedef struct {
	int layer;
	int type;
	int64_t ne0, ne1, ne2, ne3;
	int contiguous;
} kvn_attn;

static kvn_attn kvn_describe_attn(const struct ggml_tensor *t) {
	kvn_attn d;
	d.layer = -1;
	if (sscanf(t->name, "kq_soft_max-%d", &d.layer) != 1) d.layer = -1;
	d.type = (int)t->type;
	d.ne0 = t->ne[0]; d.ne1 = t->ne[1]; d.ne2 = t->ne[2]; d.ne3 = t->ne[3];
	d.contiguous = ggml_is_contiguous(t);
	return d;
}

// kvn_get_f32 copies n floats of a contiguous f32 tensor.
static void kvn_get_f32(const struct ggml_tensor *t, float *dst, size_t n) {
	ggml_backend_tensor_get(t, dst, 0, n * sizeof(float));
}

// kvn_rows copies the n row indices of a SET_ROWS node (its src[1], I64 or
// I32) as int64; it returns 0, or -1 when they are not n indices.
static int kvn_rows(const struct ggml_tensor *t, int64_t *dst, int64_t n) {
	const struct ggml_tensor *idx = t->src[1];
	if (idx == NULL || ggml_nelements(idx) != n || !ggml_is_contiguous(idx)) return -1;
	if (idx->type == GGML_TYPE_I64) {
		ggml_backend_tensor_get(idx, dst, 0, n * sizeof(int64_t));
		return 0;
	}
	if (idx->type == GGML_TYPE_I32) {
		int32_t *tmp = (int32_t *)dst; // widened in place, from the end
		ggml_backend_tensor_get(idx, tmp, 0, n * sizeof(int32_t));
		for (int64_t i = n - 1; i >= 0; i--) dst[i] = tmp[i];
		return 0;
	}
	return -1;
}

// kvn_rope_pos copies the n positions a ROPE node rotated by (its src[1],
// I32); it returns 0, or -1 when they are not n positions (e.g. M-RoPE).
static int kvn_rope_pos(const struct ggml_tensor *t, int32_t *dst, int64_t n) {
	const struct ggml_tensor *pos = t->src[1];
	if (pos == NULL || pos->type != GGML_TYPE_I32 || ggml_nelements(pos) != n || !ggml_is_contiguous(pos)) return -1;
	ggml_backend_tensor_get(pos, dst, 0, n * sizeof(int32_t));
	return 0;
}
*/
import "C"

import (
	"fmt"
	"slices"
	"unsafe"

	"github.com/kvnorm/kvnorm/hooks"
)

// RecordAttention makes the context pass f the attention probabilities of
// every layer of every batch it decodes from now on (through Decode,
// DecodeOutputs, Prompt and Generate; not through Raw); nil stops. f is
// called once llama_decode has returned, without the context's lock, after
// the batch's keys went to the observer; an error from f stops the decode
// and is returned. Each Attention is f's to keep.
//
// llama.cpp computes the probabilities ("kq_soft_max-N") only with flash
// attention off: a context created otherwise returns an error wrapping
// ErrNoAttention. Cells are mapped to positions through the cache rows each
// decode writes (the K cache's SET_ROWS indices), followed while an observer
// or a recorder is attached: a sequence that holds tokens decoded before
// either was attached (or changed through Raw) cannot be recorded until it is
// cleared (its decodes return an error wrapping ErrNoAttention).
//
// Memory: one batch holds layers × heads × tokens × n_kv float32 at once
// (n_kv: the used cells, padded to 256); lower NBatch for large models.
func (c *Context) RecordAttention(f func(*Attention) error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f == nil {
		c.attnF = nil
		c.setCallbacks()
		return nil
	}
	if err := c.liveLocked(); err != nil {
		return err
	}
	if c.opts.FlashAttn != FlashAttnOff {
		return fmt.Errorf("%w: the context uses flash attention %s, whose graph has no kq_soft_max node: create it with FlashAttnOff", ErrNoAttention, c.opts.FlashAttn)
	}
	c.attnF = f
	c.setCallbacks()
	return nil
}

// emptyCells is a cell map of n empty cells.
func emptyCells(n int) []hooks.Pos {
	s := make([]hooks.Pos, n)
	for i := range s {
		s[i] = -1
	}
	return s
}

// forgetCells empties the cells of seq whose positions are no longer live
// and returns how many cells still hold a position.
func (c *Context) forgetCells(seq hooks.SeqID) int {
	set, cells, n := &c.live[seq], c.cells[seq], 0
	for i, p := range cells {
		if p < 0 {
			continue
		}
		if set.has(p) {
			n++
		} else {
			cells[i] = -1
		}
	}
	return n
}

// observeCells is called by cb_eval (c.mu held) with the first SET_ROWS of
// the decode into the K cache: its indices are the rows, in the cache of all
// streams, the batch's tokens are written to. The sequence's stream starts
// at row seq × capacity (kv_unified off, stream s holds sequence s).
func (c *Context) observeCells(t unsafe.Pointer) {
	if !c.decoding || c.cbErr != nil {
		return
	}
	n := len(c.curPos)
	rows := make([]int64, n)
	if C.kvn_rows((*C.struct_ggml_tensor)(t), (*C.int64_t)(unsafe.Pointer(&rows[0])), C.int64_t(n)) != 0 {
		c.cbErr = fmt.Errorf("%w: the K cache write of the batch does not index %d rows", hooks.ErrBadBatch, n)
		return
	}
	seq := c.curSeqs[0]
	base := int64(seq) * int64(c.capacity)
	for i, r := range rows {
		cell := r - base
		if cell < 0 || cell >= int64(c.capacity) {
			c.cbErr = fmt.Errorf("%w: token %d of seq %d written to cache row %d, outside its stream's rows [%d, %d)", hooks.ErrBadBatch, i, seq, r, base, base+int64(c.capacity))
			return
		}
		c.curCells = append(c.curCells, int(cell))
	}
}

// checkOrder checks, on layer 0's keys, that llama.cpp kept the batch in our
// order (the rows of kq_soft_max and of the cache writes follow it).
func (c *Context) checkOrder(t unsafe.Pointer) {
	n := len(c.curPos)
	pos := make([]int32, n)
	if C.kvn_rope_pos((*C.struct_ggml_tensor)(t), (*C.int32_t)(unsafe.Pointer(&pos[0])), C.int64_t(n)) != 0 {
		return // positions of another shape: nothing to compare
	}
	for i, p := range pos {
		if hooks.Pos(p) != c.curPos[i] {
			c.cbErr = fmt.Errorf("%w: llama.cpp reordered the batch: token %d has position %d, want %d", hooks.ErrBadBatch, i, p, c.curPos[i])
			return
		}
	}
}

// observeAttention is called by cb_eval (c.mu held) with a computed
// "kq_soft_max-N" tensor [n_kv, n_tokens, n_head, 1]: it copies it for
// attentionLocked.
func (c *Context) observeAttention(t unsafe.Pointer) {
	if !c.decoding || c.cbErr != nil || c.attnF == nil {
		return
	}
	d := C.kvn_describe_attn((*C.struct_ggml_tensor)(t))
	n, heads := len(c.curPos), c.model.info.Heads
	switch {
	case d.layer < 0 || int(d.layer) >= c.shape.Layers:
		c.cbErr = fmt.Errorf("%w: attention tensor of layer %d outside %d layers", hooks.ErrBadBatch, d.layer, c.shape.Layers)
	case d._type != C.GGML_TYPE_F32 || d.contiguous == 0:
		c.cbErr = fmt.Errorf("%w: layer %d: attention tensor of ggml type %d (contiguous %d): want contiguous f32", hooks.ErrBadBatch, d.layer, d._type, d.contiguous)
	case d.ne0 < 1 || int(d.ne0) > c.capacity || int(d.ne1) != n || int(d.ne2) != heads || d.ne3 != 1:
		c.cbErr = fmt.Errorf("%w: layer %d: attention tensor [%d %d %d %d], want [n_kv <= %d, tokens %d, heads %d, 1]",
			hooks.ErrBadBatch, d.layer, d.ne0, d.ne1, d.ne2, d.ne3, c.capacity, n, heads)
	}
	if c.cbErr != nil {
		return
	}
	l, nkv := int(d.layer), int(d.ne0)
	w := make([]float32, nkv*n*heads)
	C.kvn_get_f32((*C.struct_ggml_tensor)(t), (*C.float)(unsafe.Pointer(&w[0])), C.size_t(len(w)))
	c.attnW[l], c.attnNKV[l] = w, nkv
}

// attentionLocked lays out the attention the callback recorded in the decode
// that just returned.
func (c *Context) attentionLocked(seq hooks.SeqID) ([]*Attention, error) {
	if !c.cellsKnown[seq] {
		return nil, fmt.Errorf("%w: seq %d: the positions of its cells are unknown (tokens decoded before an observer or recorder was attached, or through Raw): Clear it before recording", ErrNoAttention, seq)
	}
	if mapped, live := c.forgetCells(seq), c.live[seq].n; mapped != live {
		return nil, fmt.Errorf("%w: seq %d: %d cells mapped to positions, %d live", hooks.ErrBadBatch, seq, mapped, live)
	}
	out := make([]*Attention, c.shape.Layers)
	var cells []hooks.Pos
	for l := range out {
		if c.attnW[l] == nil {
			return nil, fmt.Errorf("%w: seq %d: no kq_soft_max-%d node in the graph (flash attention on, or %s names it otherwise)", ErrNoAttention, seq, l, c.model.info.Arch)
		}
		nkv := c.attnNKV[l]
		if len(cells) != nkv {
			cells = slices.Clone(c.cells[seq][:nkv])
		}
		out[l] = &Attention{
			Layer: l, Seq: seq, Queries: slices.Clone(c.curPos), Heads: c.model.info.Heads, KVHeads: c.shape.KVHeads,
			Cells: cells, Weights: c.attnW[l],
		}
		c.attnW[l] = nil
	}
	return out, nil
}
