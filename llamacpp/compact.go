//go:build cgo

package llamacpp

/*
#include <stdlib.h>
#include "kvn_llama.h"
*/
import "C"

import (
	"fmt"

	"github.com/kvnorm/kvnorm/hooks"
)

// compactLocked moves the cells of seq to the front of its stream, keeping
// their order and positions (c.mu held; after an eviction).
//
// Why: llama.cpp attends, for every decoded token, over the cells of the
// stream up to the highest one in use (llama_kv_cache::get_n_kv, padded to
// 256), masking the empty ones. Eviction by llama_memory_seq_rm leaves holes
// where the evicted tokens were, so a sequence evicted to half keeps the
// width it had: flash attention then skips the masked cells one by one, a
// branch per cell, which on a host with fast dot products (AVX-512) cost more
// than the halved work saved (keep 0.5 decoded ×0.91 of uncompressed at 8192
// tokens, issue 14). llama.cpp v0.24.0's cache has no defragmentation, and
// its API has no call that moves a cell. A sequence's state does: it is
// written in cell order (llama_state_seq_get_data) and read back
// (llama_state_seq_set_data) into the free cells from the start of the
// stream, which are all of them once the sequence's own are removed (each
// sequence has its own stream, kv_unified off): the same keys, values and
// positions, contiguous. The kept cells keep their relative order, so flash
// attention adds them up in the same order as before.
//
// It costs one copy of the sequence's cells out and back, in a buffer of
// C memory that is freed before it returns (at 8192 tokens kept to 4096 of
// the Llama-3.2-1B shape, 128 MiB). A failed read changes nothing and is not
// an error (the cache is only left wider); a failed write back has lost the
// sequence (llama.cpp removes it), which is reported as an error and leaves
// the context's account of seq empty.
func (c *Context) compactLocked(seq hooks.SeqID) error {
	if c.opts.KeepHoles || c.model.info.MRoPE || c.live[seq].n == 0 {
		return nil
	}
	id := C.llama_seq_id(seq)
	n := C.llama_state_seq_get_size(c.c, id)
	if n == 0 {
		return nil
	}
	buf := C.malloc(n)
	if buf == nil {
		return nil
	}
	defer C.free(buf)
	if got := C.llama_state_seq_get_data(c.c, (*C.uint8_t)(buf), n, id); got != n {
		return nil
	}
	if got := C.llama_state_seq_set_data(c.c, (*C.uint8_t)(buf), n, id); got != n {
		lost := c.live[seq].n
		c.dropSeqLocked(seq)
		return &CError{Func: "llama_state_seq_set_data", Code: int(got),
			Msg: fmt.Sprintf("seq %d: compacting %d cells after an eviction failed; llama.cpp removed the sequence", seq, lost), Err: ErrDecode}
	}
	if c.cellsKnown[seq] {
		cells, k := c.cells[seq], 0
		for _, p := range cells {
			if p >= 0 {
				cells[k] = p
				k++
			}
		}
		for i := k; i < len(cells); i++ {
			cells[i] = -1
		}
	}
	return nil
}
