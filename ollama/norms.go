package ollama

import (
	"fmt"
	"slices"

	"github.com/kvnorm/kvnorm/hooks"
)

// Reading key norms back.
//
// Put adds each key's norm per head to the graph, into the layer's norm
// tensor at the key's cell; gathers and copies move the norms with the
// cells. A sequence's fresh positions (seqCells.fresh) are those whose norms
// the observer has not been given: the last cells of every layer. They are
// read only when something needs them (a compression is due, Flush), so a
// decode step with nothing due transfers nothing.
//
// In Ollama's runner the batch built last may still be computing when the
// next one is built (and on CUDA or Metal a batch without outputs may still
// run on the device after its compute call returned): report waits for every
// submitted batch before reading (sync), so it never reads a norm that has
// not been written.

// report gives the observer the norms of the fresh positions of seqs (nil:
// every sequence) and forgets them as fresh.
func (c *Cache) report(seqs ...int) error {
	obs := c.observer()
	if c.lay == nil {
		return nil
	}
	if seqs == nil {
		for seq := range c.lay.seqs {
			seqs = append(seqs, seq)
		}
		slices.Sort(seqs)
	}
	var todo []int
	for _, seq := range seqs {
		s := c.lay.seqs[seq]
		if s == nil || len(s.fresh) == 0 {
			continue
		}
		if obs == nil || s.unmanaged {
			s.fresh = nil
			continue
		}
		todo = append(todo, seq)
	}
	if len(todo) == 0 {
		return nil
	}
	c.sync()
	h := c.opts.KVHeads
	for li := range c.opts.Layers {
		nt := c.norms[li]
		if nt == nil {
			continue
		}
		all := c.fetch(nt)
		total := c.lay.total(li)
		for _, seq := range todo {
			s := c.lay.seqs[seq]
			f := len(s.fresh)
			first := c.lay.slabStart(s.slab, li) + s.layers[li].n() - f
			norms := make([]float32, f*h)
			for j := range f {
				for head := range h {
					norms[j*h+head] = all[head*total+first+j]
				}
			}
			ids := make([]hooks.SeqID, f)
			for j := range ids {
				ids[j] = hooks.SeqID(seq)
			}
			if err := obs.ObserveKeys(&hooks.KeyBatch{Layer: li, Seqs: ids, Positions: s.fresh, Norms: norms}); err != nil {
				if err := c.fail(fmt.Errorf("ollama: report key norms of seq %d, layer %d: %w", seq, li, err)); err != nil {
					return err
				}
			}
		}
	}
	for _, seq := range todo {
		c.lay.seqs[seq].fresh = nil
	}
	return nil
}

// sync waits for the graphs already submitted to the backend: computing on
// the backend orders after them, and reading the result waits for it.
func (c *Cache) sync() {
	for _, nt := range c.norms {
		ctx := c.backend.NewContext()
		t := nt.View(ctx, 0, 1).Contiguous(ctx)
		ctx.Forward(t).Compute(t)
		t.Floats()
		ctx.Close()
		c.syncs++
		return
	}
}

// fetch copies a norm tensor (the cache's own: reading it computes nothing)
// to the host.
func (c *Cache) fetch(nt interface{ BackendGet() []float32 }) []float32 {
	c.fetches++
	return nt.BackendGet()
}

// Flush gives the observer the norms of every fresh position, applies
// deferred copies and compresses every sequence whose prompt has been
// decoded. Call it after computing a batch to compress before the next one;
// the runner does not need it.
func (c *Cache) Flush() error {
	if c.lay == nil {
		return nil
	}
	if err := c.report(); err != nil {
		return err
	}
	c.runCopies()
	return c.prefillReady()
}
