package ollama

import "slices"

// copyOp is a prefix copy between slabs, deferred until the batches built
// before it have been computed.
type copyOp struct {
	src, dst int // slabs
	cells    []int
}

// CopyPrefix makes dstSeq hold the positions [0, length) of srcSeq
// (kvcache.Cache). The cells are copied (each sequence owns its slab), with
// their key norms, once the batches built so far have been computed.
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
	op := copyOp{src: src.slab, dst: dst.slab, cells: make([]int, c.opts.Layers)}
	uniform := !src.unmanaged
	for li := range src.layers {
		var exact bool
		dst.layers[li], exact = prefixOf(&src.layers[li], length)
		op.cells[li] = dst.layers[li].n()
		if !exact || dst.layers[li].perHead() || !slices.Equal(dst.layers[li].shared, dst.layers[0].shared) {
			uniform = false
		}
	}
	c.copies = append(c.copies, op)
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
		// Every head of every layer holds the same positions: their norms
		// came with the cells.
		dst.fresh = slices.Clone(dst.layers[0].shared)
	}
}

// runCopies performs the deferred prefix copies, in the graph being built or
// at once.
func (c *Cache) runCopies() {
	if len(c.copies) == 0 {
		return
	}
	ops := c.copies
	c.copies = nil
	ctx, done := c.opContext()
	defer done()
	work := false
	for _, op := range ops {
		for li, n := range op.cells {
			if n == 0 || c.keys[li] == nil {
				continue
			}
			work = true
			from, to := c.lay.slabStart(op.src, li), c.lay.slabStart(op.dst, li)
			k := c.keys[li]
			ctx.Forward(k.View(ctx, from*k.Stride(1), k.Dim(0), k.Stride(1), n, k.Stride(2), k.Dim(2)).
				Copy(ctx, k.View(ctx, to*k.Stride(1), k.Dim(0), k.Stride(1), n, k.Stride(2), k.Dim(2))))
			if nt := c.norms[li]; nt != nil {
				ctx.Forward(nt.View(ctx, from*nt.Stride(1), nt.Dim(0), nt.Stride(1), n, nt.Stride(2), nt.Dim(2)).
					Copy(ctx, nt.View(ctx, to*nt.Stride(1), nt.Dim(0), nt.Stride(1), n, nt.Stride(2), nt.Dim(2))))
			}
			v := c.values[li]
			if c.config.PermutedV {
				ctx.Forward(v.View(ctx, from*v.Stride(0), n, v.Stride(1), v.Dim(1), v.Stride(2), v.Dim(2)).
					Copy(ctx, v.View(ctx, to*v.Stride(0), n, v.Stride(1), v.Dim(1), v.Stride(2), v.Dim(2))))
			} else {
				ctx.Forward(v.View(ctx, from*v.Stride(1), v.Dim(0), v.Stride(1), n, v.Stride(2), v.Dim(2)).
					Copy(ctx, v.View(ctx, to*v.Stride(1), v.Dim(0), v.Stride(1), n, v.Stride(2), v.Dim(2))))
			}
		}
	}
	if work && ctx != c.graph {
		ctx.Compute()
	}
}
