package ollama

import (
	"fmt"
	"slices"

	"github.com/ollama/ollama/ml"

	"github.com/kvnorm/kvnorm/hooks"
)

// Key norms on the device, until the observer has them.
//
// Put adds each key's norm per head to the graph of its batch. The norms
// are kept by batch, not by cell: every batch writes them into rows of a
// small per-layer buffer (normSeg, [1, rows, kvHeads] f32) that the cache
// hands out in batch order, and a sequence's fresh positions
// (seqCells.fresh, the positions whose norms the observer has not been
// given) each remember their row. Once the observer has a position's norm
// (the adapter keeps norms on the host), its row is free again. So the
// buffer needs to hold only what can be fresh at once: the ring holds one
// batch (num_batch rows per layer, whatever num_ctx is), and when a batch
// does not fit in its free rows the cache first gives the observer the
// norms it may read (those of the batches before: the batch being placed
// is now its sequences' newest); a batch that still does not fit (a vision batch
// larger than num_batch, or norms that cannot be read yet) gets a buffer of
// its own (a spill), freed once read and computed. Compactions, copies and
// shifts move cells, never norms: a compaction in the graph of the last
// batch cannot move norms another batch is about to read.
//
// Norms are read back only when something needs them (a compression is
// due, the ring is full, Flush), so a decode step with nothing due
// transfers nothing.
//
// What a compression of a sequence plans over must not depend on what the
// runner batched beside it: in pipelined mode the norms of a sequence's
// newest batch are not read, even when later batches (of other sequences)
// have been placed since, and its prompt is compressed at its own second
// batch after the prompt (prefillReady).
//
// When may a norm be read? Only once the graph that wrote it has run on
// the device. Ollama's backend offers two ways to know: a graph computed on
// its scheduler and read back waits for everything submitted before it
// (sync), and the runner reading a batch's outputs does the same. In the
// runner's pipelined mode, while batch b is built (StartForward) batch b-1
// may still be computing, and once it has, its outputs (the logits the
// runner samples from) live in the scheduler's buffers until the runner
// reads them: a graph computed then overwrites them. So, pipelined:
//
//   - the cache syncs only when the last batch placed has no outputs (a
//     prompt chunk): nothing of it is to be read, and the sync orders after
//     it, so every norm placed so far becomes readable;
//   - otherwise it reads only the norms of batches known to have run
//     (synced): the runner starts computing batch b-1 only after it has read
//     the outputs of batch b-2, which waited for the device, so when b-2 had
//     outputs every batch up to b-2 has run, even on backends whose compute
//     returns before the device is done (CUDA, Metal). The norms of a batch
//     without outputs followed by one with outputs wait for a later sync.
//
// Positions whose norms cannot be read yet stay in the cache (the planner
// has not seen them) and count against the room a compression makes.
// Without pipelining (Session, Engine) every placed batch has been computed
// and its outputs read: the cache syncs and reads everything.

// normSeg is device storage for the norms of fresh positions: per layer a
// [1, rows, kvHeads] f32 tensor, rows handed out to batches.
type normSeg struct {
	rows int
	t    map[int]ml.Tensor
	// ctxs holds a spill's own contexts (the ring's tensors live in the
	// layers' cache contexts).
	ctxs map[int]ml.Context
	refs []int32 // per row: fresh positions whose norm it holds
	used int     // rows with refs > 0
	next int     // where the ring looks for free rows first
	last uint64  // the last batch that wrote it
}

func newNormSeg(rows int, own bool) *normSeg {
	g := &normSeg{rows: rows, t: map[int]ml.Tensor{}, refs: make([]int32, rows)}
	if own {
		g.ctxs = map[int]ml.Context{}
	}
	return g
}

// take hands out n free rows, or nil when fewer are free.
func (g *normSeg) take(n int) []int32 {
	if g.rows-g.used < n {
		return nil
	}
	out := make([]int32, 0, n)
	for i := 0; len(out) < n; i++ {
		r := (g.next + i) % g.rows
		if g.refs[r] == 0 {
			out = append(out, int32(r))
		}
	}
	g.next = (int(out[n-1]) + 1) % g.rows
	return out
}

func (g *normSeg) ref(row int32) {
	if g.refs[row] == 0 {
		g.used++
	}
	g.refs[row]++
}

func (g *normSeg) release(row int32) {
	g.refs[row]--
	if g.refs[row] == 0 {
		g.used--
	}
}

func (g *normSeg) close() {
	for _, ctx := range g.ctxs {
		ctx.Close()
	}
	clear(g.ctxs)
	clear(g.t)
}

// freshNorm is a fresh position and where its norms are: row of seg,
// written by batch.
type freshNorm struct {
	pos   int32
	seg   *normSeg
	row   int32
	batch uint64
}

// freshPositions returns the fresh positions of s, ascending.
func (s *seqCells) freshPositions() []int32 {
	out := make([]int32, len(s.fresh))
	for i, f := range s.fresh {
		out[i] = f.pos
	}
	return out
}

// dropFresh forgets the fresh positions of s from index i on.
func (s *seqCells) dropFresh(i int) {
	for _, f := range s.fresh[i:] {
		f.seg.release(f.row)
	}
	s.fresh = s.fresh[:i]
}

// forgetFresh forgets the first k fresh positions of s (read).
func (s *seqCells) forgetFresh(k int) {
	for _, f := range s.fresh[:k] {
		f.seg.release(f.row)
	}
	s.fresh = slices.Delete(s.fresh, 0, k)
}

// ringRows is the size of the norm ring: one batch. When a batch does not
// fit, the norms of the batches before it are read first (normRows): in
// the runner's pipelined loop the batch before may still be computing, but
// a prompt chunk has no outputs, so the cache may wait for it (report).
func ringRows(maxBatch int) int { return maxBatch }

// normRows returns where the norms of a batch of n tokens go: rows of the
// ring, after reading what may be read if it is full, or of a spill.
func (c *Cache) normRows(n int) (*normSeg, []int32, error) {
	if rows := c.ring.take(n); rows != nil {
		return c.ring, rows, nil
	}
	if err := c.report(false); err != nil {
		return nil, nil, err
	}
	if rows := c.ring.take(n); rows != nil {
		return c.ring, rows, nil
	}
	g := newNormSeg(n, true)
	c.spills = append(c.spills, g)
	return g, g.take(n), nil
}

// normTensor returns the norm tensor of layer li in g, allocating a spill's
// on first use.
func (c *Cache) normTensor(g *normSeg, li, kvHeads int) ml.Tensor {
	if t := g.t[li]; t != nil || g.ctxs == nil {
		return t
	}
	ctx := c.backend.NewContextSize(1).Layer(li)
	g.ctxs[li] = ctx
	g.t[li] = ctx.Zeros(ml.DTypeF32, 1, g.rows, kvHeads)
	return g.t[li]
}

// done is the last batch known to have run on the device.
func (c *Cache) done() uint64 {
	if !c.opts.Pipelined {
		return c.batches
	}
	return c.synced
}

// retire frees the spills no fresh position refers to once their last
// batch has run.
func (c *Cache) retire() {
	c.spills = slices.DeleteFunc(c.spills, func(g *normSeg) bool {
		if g.used == 0 && g.last <= c.done() {
			g.close()
			return true
		}
		return false
	})
}

// placed records that a batch (with outputs or not) was placed, and what
// the runner has waited for: pipelined, the runner read the outputs of the
// batch before the last one if it had any.
func (c *Cache) placed(outputs bool) {
	c.prevOut, c.lastOut = c.lastOut, outputs
}

// noteSynced updates synced before a batch is placed.
func (c *Cache) noteSynced() {
	if c.opts.Pipelined && c.prevOut && c.batches >= 1 {
		c.synced = max(c.synced, c.batches-1)
	}
}

// report gives the observer the norms of the readable fresh positions of
// seqs (nil: every sequence) and forgets them as fresh; all reads every
// fresh position (the caller knows every batch has been computed and its
// outputs read).
func (c *Cache) report(all bool, seqs ...int) error {
	obs := c.observer()
	if c.lay == nil {
		return nil
	}
	defer c.retire()
	if seqs == nil {
		for seq := range c.lay.seqs {
			seqs = append(seqs, seq)
		}
		slices.Sort(seqs)
	}
	var todo []int
	var newest uint64
	for _, seq := range seqs {
		s := c.lay.seqs[seq]
		if s == nil || len(s.fresh) == 0 {
			continue
		}
		if obs == nil || s.unmanaged {
			s.dropFresh(0)
			continue
		}
		todo = append(todo, seq)
		newest = max(newest, s.fresh[len(s.fresh)-1].batch)
	}
	if len(todo) == 0 {
		return nil
	}
	if newest > c.synced && (all || !c.opts.Pipelined || !c.lastOut) {
		c.sync()
	}
	count := map[int]int{}
	todo = slices.DeleteFunc(todo, func(seq int) bool {
		s := c.lay.seqs[seq]
		n, _ := slices.BinarySearchFunc(s.fresh, c.synced+1, func(f freshNorm, b uint64) int {
			if f.batch < b {
				return -1
			}
			return 1
		})
		if c.opts.Pipelined && !all {
			// Not the sequence's newest batch (see the top of this file).
			m, _ := slices.BinarySearchFunc(s.fresh, s.newestBatch, func(f freshNorm, b uint64) int {
				if f.batch < b {
					return -1
				}
				return 1
			})
			n = min(n, m)
		}
		count[seq] = n
		return n == 0
	})
	h := c.opts.KVHeads
	for li := range c.opts.Layers {
		data := map[*normSeg][]float32{}
		missing := false
		for _, seq := range todo {
			for _, f := range c.lay.seqs[seq].fresh[:count[seq]] {
				if _, ok := data[f.seg]; ok {
					continue
				}
				nt := f.seg.t[li]
				if nt == nil {
					missing = true
					break
				}
				data[f.seg] = c.fetch(nt)
			}
		}
		if missing {
			continue
		}
		for _, seq := range todo {
			s := c.lay.seqs[seq]
			f := s.fresh[:count[seq]]
			norms := make([]float32, len(f)*h)
			positions := make([]int32, len(f))
			ids := make([]hooks.SeqID, len(f))
			for j, e := range f {
				buf := data[e.seg]
				for head := range h {
					norms[j*h+head] = buf[head*e.seg.rows+int(e.row)]
				}
				positions[j], ids[j] = e.pos, hooks.SeqID(seq)
			}
			if err := obs.ObserveKeys(&hooks.KeyBatch{Layer: li, Seqs: ids, Positions: positions, Norms: norms}); err != nil {
				if err := c.fail(fmt.Errorf("ollama: report key norms of seq %d, layer %d: %w", seq, li, err)); err != nil {
					return err
				}
			}
		}
	}
	for _, seq := range todo {
		c.lay.seqs[seq].forgetFresh(count[seq])
	}
	return nil
}

// sync waits for the graphs already submitted to the backend: computing on
// the backend orders after them, and reading the result waits for it.
// Pipelined, it is called only when the last batch placed has no outputs
// (its computing a graph would overwrite them otherwise).
func (c *Cache) sync() {
	if c.awaitDevice != nil {
		c.awaitDevice()
	}
	c.synced = c.batches
	if c.ring == nil {
		return
	}
	for li := range c.opts.Layers {
		nt := c.ring.t[li]
		if nt == nil {
			continue
		}
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
	if err := c.runPending(); err != nil {
		return err
	}
	return c.prefillReady(nil)
}
