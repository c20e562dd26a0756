package ollama

import (
	"fmt"
	"math"
	"slices"

	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"

	"github.com/kvnorm/kvnorm/hooks"
)

// Remove deletes positions [begin, end) of seq (kvcache.Cache), in the
// runner's numbering.
//
//   - [0, end of sequence): the sequence is cleared.
//   - a tail [begin, end of sequence): removed in every layout, as long as
//     the heads of each layer drop the same count; refused for a sequence
//     the runner shifted after compressing it (CanResume already keeps the
//     runner from asking).
//   - the middle (a context shift): a sequence that holds every position it
//     was fed shifts as Ollama's own cache does (the range is dropped, later
//     positions renumbered and their keys re-roped). A compressed sequence
//     keeps its cells, which its own compressions bound: only its numbering
//     moves. Every key is re-roped by begin-end, so distances to later
//     queries stay true, and later tokens are stored end-begin positions
//     further on (seqCells.offset). Either way it needs the model's shift
//     function; on error the runner clears the sequence and decodes its
//     inputs again.
func (c *Cache) Remove(seq int, begin, end int32) error {
	if c.lay == nil {
		return nil
	}
	s := c.lay.seqs[seq]
	if s == nil {
		return nil
	}
	if begin <= 0 && end == math.MaxInt32 {
		c.clearSeq(seq)
		return nil
	}
	if end == math.MaxInt32 {
		if s.offset != 0 {
			return fmt.Errorf("%w: seq %d was compressed and shifted: its positions above %d cannot be told apart", kvcache.ErrNotSupported, seq, begin)
		}
		if err := c.lay.removeTail(s, begin); err != nil {
			return fmt.Errorf("ollama: seq %d: %w", seq, err)
		}
		k, _ := slices.BinarySearchFunc(s.fresh, begin, func(f freshNorm, p int32) int { return int(f.pos - p) })
		s.dropFresh(k)
		// What follows is a new prompt: compress it when it ends.
		s.prefilled, s.prefillDue = false, false
		if obs := c.observer(); obs != nil {
			obs.Forget(hooks.SeqID(seq), begin, -1)
		}
		return nil
	}
	if c.ext != nil && !s.unmanaged {
		return fmt.Errorf("%w: seq %d: kvnorm does not shift the context of a sequence an observer tracks", kvcache.ErrNotSupported, seq)
	}
	if c.opts.Shift == nil {
		return kvcache.ErrNotSupported
	}
	if err := c.checkShift(s, make([]int, c.opts.Layers), begin-end); err != nil {
		return err
	}
	if s.lossy {
		if err := c.shiftKeys(s, make([]int, c.opts.Layers), begin-end); err != nil {
			return err
		}
		s.offset += end - begin
		s.shifted = true
		return nil
	}
	keep, shifted, err := c.lay.removeMiddle(s, begin, end)
	if err != nil {
		return fmt.Errorf("%w: seq %d: %w", kvcache.ErrNotSupported, seq, err)
	}
	slab := s.slab
	var moves [][][]int32
	for _, cells := range keep {
		src := make([][]int32, c.opts.KVHeads)
		if len(cells) > 0 {
			for h := range src {
				src[h] = cells
			}
			if identity(src) {
				src = nil
			}
		}
		moves = append(moves, src)
	}
	c.queue(deviceOp{slab: slab, build: func(ctx ml.Context) (bool, error) {
		work := false
		for li, src := range moves {
			if c.keys[li] != nil && len(src) > 0 && len(src[0]) > 0 {
				c.gather(ctx, li, slab, src)
				work = true
			}
		}
		return work, nil
	}}, false)
	s.shifted = true
	// The positions were renumbered: so are the fresh ones and the norms
	// the compressor recorded (a key's norm does not change when it is
	// re-roped).
	move := func(p int32) (int32, bool) {
		switch {
		case p < begin:
			return p, true
		case p < end:
			return 0, false
		}
		return p - (end - begin), true
	}
	fresh := s.fresh[:0:0]
	for _, f := range s.fresh {
		if q, ok := move(f.pos); ok {
			f.pos = q
			fresh = append(fresh, f)
		} else {
			f.seg.release(f.row)
		}
	}
	s.fresh = fresh
	if c.comp != nil && c.ext == nil && !s.unmanaged {
		drop := func() { c.comp.DropSequence(hooks.SeqID(seq)) }
		if err := renumberNorms(c.comp, c.opts.Layers, c.opts.KVHeads, seq, seq, move, drop); err != nil {
			drop()
			return fmt.Errorf("ollama: seq %d: renumber key norms: %w", seq, err)
		}
	}
	return c.shiftKeys(s, shifted, begin-end)
}

// shiftKeys re-ropes cells [shifted[li], n) of every layer of s by offset:
// at once outside the runner's loop, else first in the next batch's graph
// (deferred.go).
func (c *Cache) shiftKeys(s *seqCells, shifted []int, offset int32) error {
	slab := s.slab
	ranges := make([][2]int, len(shifted)) // per layer: first cell, count
	for li, from := range shifted {
		ranges[li] = [2]int{from, s.layers[li].n() - from}
	}
	return c.queue(deviceOp{slab: slab, build: func(ctx ml.Context) (bool, error) {
		work := false
		for li, r := range ranges {
			if c.keys[li] == nil || r[1] <= 0 {
				continue
			}
			if err := c.ropeCells(ctx, li, slab, r[0], r[1], offset); err != nil {
				return work, err
			}
			work = true
		}
		return work, nil
	}}, true)
}

// checkShift builds, without computing it, the re-roping of the first layer
// a shift touches: an error of the model's shift function comes back from
// Remove (the runner then decodes the sequence again), not from a later
// batch.
func (c *Cache) checkShift(s *seqCells, shifted []int, offset int32) error {
	for li, from := range shifted {
		if c.keys[li] == nil || from >= s.layers[li].n() {
			continue
		}
		ctx := c.backend.NewContext()
		defer ctx.Close()
		return c.ropeCells(ctx, li, s.slab, from, s.layers[li].n()-from, offset)
	}
	return nil
}

// ropeCells adds to ctx the re-roping by offset of cells [from, from+m) of
// slab in layer li.
func (c *Cache) ropeCells(ctx ml.Context, li, slab, from, m int, offset int32) error {
	key := c.keys[li]
	offs := make([]int32, m)
	for i := range offs {
		offs[i] = offset
	}
	view := key.View(ctx, (c.lay.slabStart(slab, li)+from)*key.Stride(1),
		key.Dim(0), key.Stride(2),
		key.Dim(2), key.Stride(1),
		m)
	roped, err := c.opts.Shift(ctx, li, view, ctx.Input().FromInts(offs, m))
	if err != nil {
		return err
	}
	ctx.Forward(roped.Copy(ctx, view))
	return nil
}

func (c *Cache) clearSeq(seq int) {
	s := c.lay.seqs[seq]
	if s == nil {
		return
	}
	c.dropPending(s.slab)
	s.dropFresh(0)
	c.lay.free(seq)
	if c.ext != nil {
		c.ext.Forget(hooks.SeqID(seq), 0, -1)
	}
	if c.comp != nil {
		c.comp.DropSequence(hooks.SeqID(seq))
	}
}
