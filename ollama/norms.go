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
// When may a norm be read? Ollama's backend offers one way to wait for it:
// computing a graph on its scheduler and reading the result. In the runner's
// pipelined mode that is not allowed at StartForward: the previous batch may
// still be computing, and once it has, its outputs (the logits the runner
// samples from) live in the scheduler's buffers until the runner reads them,
// after StartForward; any graph computed in between overwrites them. So in
// pipelined mode the cache reads, of a sequence, only the norms of batches
// placed before the sequence's newest one (which may be the last one): the
// runner starts computing a batch only after the one before has finished on
// the CPU (their computes are serialised), so those norms are written. On
// backends whose compute returns before the device is done (CUDA, Metal), a
// batch without outputs may still be running then: the runner gives no safe
// point to wait for it (issue 13, item 1, stays open for those backends).
// Without pipelining (Session, Engine, Flush) every placed batch has been
// computed and its outputs read: the cache waits for the backend (sync) and
// reads everything.
//
// Known gap: a compaction in the graph of the last batch moves the fresh
// cells' norms, and a compression of the same sequence at the very next
// batch (pressure at two batches in a row: a compressed layer smaller than
// about three batches, or a prompt close to num_ctx) reads them before that
// graph ran, so its plan may use stale norms for those positions. Refusing
// to read them instead starves: the sequence cannot compress and the batch
// fails. Norms kept by position rather than by cell would close it.

// readable returns how many of the fresh positions of s may be read now.
// In pipelined mode the positions of the sequence's newest batch are not
// read, even when a later batch (of other sequences) has been placed since:
// what a compression of a sequence plans over must not depend on whether
// the runner batched other sequences beside it (see prefillReady).
func (c *Cache) readable(s *seqCells, all bool) int {
	if all || !c.opts.Pipelined {
		return len(s.fresh)
	}
	return len(s.fresh) - s.newest
}

// report gives the observer the norms of the readable fresh positions of
// seqs (nil: every sequence) and forgets them as fresh; all reads every
// fresh position (the caller knows every batch has been computed).
func (c *Cache) report(all bool, seqs ...int) error {
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
	count := map[int]int{}
	for _, seq := range seqs {
		s := c.lay.seqs[seq]
		if s == nil || len(s.fresh) == 0 {
			continue
		}
		if obs == nil || s.unmanaged {
			s.fresh, s.newest = nil, 0
			continue
		}
		if n := c.readable(s, all); n > 0 {
			todo = append(todo, seq)
			count[seq] = n
		}
	}
	if len(todo) == 0 {
		return nil
	}
	if all || !c.opts.Pipelined {
		c.sync()
	}
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
			f := count[seq]
			first := c.lay.slabStart(s.slab, li) + s.layers[li].n() - len(s.fresh)
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
			if err := obs.ObserveKeys(&hooks.KeyBatch{Layer: li, Seqs: ids, Positions: s.fresh[:f], Norms: norms}); err != nil {
				if err := c.fail(fmt.Errorf("ollama: report key norms of seq %d, layer %d: %w", seq, li, err)); err != nil {
					return err
				}
			}
		}
	}
	for _, seq := range todo {
		s := c.lay.seqs[seq]
		s.fresh = s.fresh[count[seq]:]
		if len(s.fresh) < s.newest {
			s.newest = len(s.fresh)
		}
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
// decoded. Call it after computing a batch (and reading its outputs) to
// compress before the next one; the runner does not need it.
func (c *Cache) Flush() error {
	if c.lay == nil {
		return nil
	}
	c.flushing = true
	defer func() { c.flushing = false }()
	if err := c.report(true); err != nil {
		return err
	}
	c.runCopies()
	return c.prefillReady(nil)
}
