package ollama

import (
	"fmt"
	"slices"

	"github.com/ollama/ollama/ml"

	"github.com/kvnorm/kvnorm/hooks"
)

// CopyPrefix makes dstSeq hold the positions [0, length) of srcSeq
// (kvcache.Cache). The cells are copied (each sequence owns its slab) once
// the batches built so far have been computed; their key norms, kept by
// batch rather than by cell, are shared where the device still holds them
// and copied on the host where the observer already has them.
//
// A source the runner shifted after compressing it copies nothing (its
// numbering no longer says which cells lie below length); CanResume then
// tells the runner to decode the prompt. A source compressed per head is cut
// to the count every head holds below length, and the copy is not
// compressed again. Either way a copy of a compressed source is not reused
// as a prefix again (CanResume).
func (c *Cache) CopyPrefix(srcSeq, dstSeq int, length int32) {
	if c.lay == nil {
		return
	}
	c.clearSeq(dstSeq)
	src := c.lay.seqs[srcSeq]
	if src == nil || src.offset != 0 {
		return
	}
	dst, err := c.lay.seq(dstSeq, true)
	if err != nil {
		c.log.Warn("kvnorm: copy prefix", "src", srcSeq, "dst", dstSeq, "error", err)
		return
	}
	cells := make([]int, c.opts.Layers)
	uniform := !src.unmanaged
	for li := range src.layers {
		var exact bool
		dst.layers[li], exact = prefixOf(&src.layers[li], length)
		cells[li] = dst.layers[li].n()
		if !exact || dst.layers[li].perHead() || !slices.Equal(dst.layers[li].shared, dst.layers[0].shared) {
			uniform = false
		}
	}
	// Deferred until the batches built before it have been computed.
	from, to := src.slab, dst.slab
	c.queue(deviceOp{slab: to, build: func(ctx ml.Context) (bool, error) { return c.copyCells(ctx, from, to, cells), nil }}, false)
	dst.lossy, dst.shifted = src.lossy, src.shifted
	dst.prefilled = src.prefilled
	switch {
	case c.ext != nil:
		// The observer's record is not ours to copy.
		dst.unmanaged = true
	case !c.tracking():
	case !uniform:
		dst.unmanaged = true
	default:
		// Every head of every layer holds the same positions.
		if err := c.copyNorms(src, dst, srcSeq, dstSeq, length); err != nil {
			c.log.Warn("kvnorm: copy prefix: the copy is not compressed", "src", srcSeq, "dst", dstSeq, "error", err)
			dst.dropFresh(0)
			dst.unmanaged = true
		}
	}
}

// copyNorms gives dst the norms of its positions below length: the fresh
// ones of src share their rows, those the compressor has recorded for src
// are recorded for dst.
func (c *Cache) copyNorms(src, dst *seqCells, srcSeq, dstSeq int, length int32) error {
	for _, f := range src.fresh {
		if f.pos < length {
			dst.fresh = append(dst.fresh, f)
			f.seg.ref(f.row)
		}
	}
	if c.comp == nil {
		return nil
	}
	return renumberNorms(c.comp, c.opts.Layers, c.opts.KVHeads, srcSeq, dstSeq, func(p int32) (int32, bool) { return p, p < length }, nil)
}

// renumberNorms records for seq to the norms comp has recorded for seq
// from, at the positions move gives (ok false: dropped), calling before
// (if set) once they are read and before they are recorded. Every head of a
// layer must hold the same positions.
func renumberNorms(comp interface {
	Norms(hooks.SeqID, int, int) ([]hooks.Pos, []float32, error)
	ObserveKeys(*hooks.KeyBatch) error
}, layers, heads, from, to int, move func(int32) (int32, bool), before func()) error {
	var batches []*hooks.KeyBatch
	for li := range layers {
		var pos []int32
		var norms []float32
		var ids []hooks.SeqID
		var lanes [][]float32
		for h := range heads {
			p, n, err := comp.Norms(hooks.SeqID(from), li, h)
			if err != nil {
				// Nothing recorded for from yet.
				if before != nil {
					before()
				}
				return nil
			}
			if h == 0 {
				pos = p
			} else if !slices.Equal(p, pos) {
				return fmt.Errorf("layer %d: heads 0 and %d hold different positions", li, h)
			}
			lanes = append(lanes, n)
		}
		var out []int32
		for i, p := range pos {
			q, ok := move(p)
			if !ok {
				continue
			}
			out = append(out, q)
			ids = append(ids, hooks.SeqID(to))
			for h := range heads {
				norms = append(norms, lanes[h][i])
			}
		}
		if len(out) > 0 {
			batches = append(batches, &hooks.KeyBatch{Layer: li, Seqs: ids, Positions: out, Norms: norms})
		}
	}
	if before != nil {
		before()
	}
	for _, b := range batches {
		if err := comp.ObserveKeys(b); err != nil {
			return err
		}
	}
	return nil
}

// copyCells adds to ctx the copy of the first cells[li] cells of every layer
// from slab src to slab dst, and reports whether there was anything to copy.
func (c *Cache) copyCells(ctx ml.Context, src, dst int, cells []int) bool {
	work := false
	for li, n := range cells {
		if n == 0 || c.keys[li] == nil {
			continue
		}
		work = true
		from, to := c.lay.slabStart(src, li), c.lay.slabStart(dst, li)
		k := c.keys[li]
		ctx.Forward(k.View(ctx, from*k.Stride(1), k.Dim(0), k.Stride(1), n, k.Stride(2), k.Dim(2)).
			Copy(ctx, k.View(ctx, to*k.Stride(1), k.Dim(0), k.Stride(1), n, k.Stride(2), k.Dim(2))))
		v := c.values[li]
		if c.config.PermutedV {
			ctx.Forward(v.View(ctx, from*v.Stride(0), n, v.Stride(1), v.Dim(1), v.Stride(2), v.Dim(2)).
				Copy(ctx, v.View(ctx, to*v.Stride(0), n, v.Stride(1), v.Dim(1), v.Stride(2), v.Dim(2))))
		} else {
			ctx.Forward(v.View(ctx, from*v.Stride(1), v.Dim(0), v.Stride(1), n, v.Stride(2), v.Dim(2)).
				Copy(ctx, v.View(ctx, to*v.Stride(1), v.Dim(0), v.Stride(1), n, v.Stride(2), v.Dim(2))))
		}
	}
	return work
}
