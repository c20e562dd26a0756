package ollama

import (
	"errors"
	"fmt"
	"slices"

	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"

	"github.com/kvnorm/kvnorm/hooks"
)

// Compression: when it runs, to what target, and how a plan moves cells.
//
// A sequence's context length L is the number of positions it was fed
// (its highest position + 1, as the cache numbers them). Every compression
// keeps Target(L) positions per head (ceil(keep × L), or BUDGET; at least the
// sinks, the window and the last position) of the layers the policy
// compresses, and never more than fit:
//
//   - after a prompt (the first batch with an output of a sequence not
//     compressed yet), unless L < MIN_PROMPT;
//   - under pressure, before a batch that would not fit a compressed layer:
//     to min(Target(L), cells - batch). A prompt longer than the smaller
//     cache is fed this way, chunk after chunk, and so is an answer that
//     fills it;
//   - a layer kept whole that is full (a context longer than num_ctx: a
//     Session fed past its context, or a runner shift) evicts by norm too,
//     the adapter's pressure rule (what is missing plus live/16).
//
// The target depends on L, not on what is live, so repeated compressions do
// not compound (a context of L positions keeps Target(L) whatever happened
// before).

// prefillReady compresses the sequences whose prompt has been decoded;
// placing lists the sequences of the batch being placed (nil inside Flush).
//
// In pipelined mode a sequence is compressed when its own second batch after
// the prompt is placed (in the runner: the graph of its second generated
// token), whatever other sequences were placed in between: the runner may
// leave a sequence out of a full batch, and the moment of its compression,
// the positions it plans over and its target must depend only on the
// sequence's own batches, not on what was batched beside it (issue 10).
// The prompt's norms are read then; the first generated token, placed by
// the sequence's newest batch, is never read (norms.go) and is kept.
func (c *Cache) prefillReady(placing []int) error {
	var due []int
	for seq, s := range c.lay.seqs {
		if s.prefillDue {
			due = append(due, seq)
		}
	}
	slices.Sort(due)
	for _, seq := range due {
		s := c.lay.seqs[seq]
		if c.comp == nil || c.ext != nil || s.unmanaged {
			s.prefillDue, s.prefilled = false, true
			continue
		}
		if c.opts.Pipelined && !c.flushing && (!slices.Contains(placing, seq) || s.newestBatch == s.prefillBatch) {
			// Not the sequence's own batch, or the prompt's last batch is
			// the sequence's newest: its norms are not read yet.
			continue
		}
		s.prefillDue, s.prefilled = false, true
		p := c.comp.Policy()
		live := int(s.last() + 1)
		if live < p.MinPrompt {
			continue
		}
		if err := c.report(c.flushing, seq); err != nil {
			return err
		}
		if err := c.compressTo(seq, p.Target(live), "prefill"); err != nil {
			return c.fail(fmt.Errorf("ollama: compress seq %d after its prompt: %w", seq, err))
		}
	}
	return nil
}

// compressTo compresses seq to target positions per head in the layers the
// policy compresses, logging the compression under trigger why.
func (c *Cache) compressTo(seq, target int, why string) error {
	c.why = why
	defer func() { c.why = "" }()
	_, err := c.comp.Compress(hooks.SeqID(seq), target)
	if errors.Is(err, hooks.ErrUnknownSequence) {
		return nil
	}
	return err
}

// makeRoom compresses seq so that k more tokens fit in every layer.
func (c *Cache) makeRoom(seq int, s *seqCells, k int) error {
	full := func() (layer int, ok bool) {
		for li := range s.layers {
			if s.layers[li].n()+k > c.lay.capacity[li] {
				return li, true
			}
		}
		return 0, false
	}
	if _, ok := full(); !ok {
		return nil
	}
	obs := c.observer()
	if obs != nil && !s.unmanaged {
		if err := c.report(false, seq); err != nil {
			return err
		}
		if err := c.pressure(seq, s, k); err != nil {
			return err
		}
	}
	if li, ok := full(); ok {
		return fmt.Errorf("%w: seq %d needs %d cells, %d of %d are free in layer %d", kvcache.ErrKvCacheFull,
			seq, k, c.lay.capacity[li]-s.layers[li].n(), c.lay.capacity[li], li)
	}
	return nil
}

// pressure compresses the layers of seq that k more tokens would overflow.
func (c *Cache) pressure(seq int, s *seqCells, k int) error {
	wrap := func(err error) error {
		if err == nil || errors.Is(err, hooks.ErrUnknownSequence) {
			return nil
		}
		return c.fail(fmt.Errorf("ollama: compress seq %d under cache pressure: %w", seq, err))
	}
	if c.ext != nil {
		free := c.lay.capacity[0]
		for li := range s.layers {
			free = min(free, c.lay.capacity[li]-s.layers[li].n())
		}
		// The observer plans on every key it has seen: give it the norms
		// of the batches already computed (decoded tokens are not read back
		// as they are decoded).
		if err := c.report(false, seq); err != nil {
			return c.fail(fmt.Errorf("ollama: compress seq %d under cache pressure: %w", seq, err))
		}
		c.inPressure = true
		_, err := c.ext.CachePressure(hooks.SeqID(seq), max(free, 0), k)
		c.inPressure = false
		return wrap(err)
	}
	// Layers sized for the budget: down to the budget of the context.
	if c.squeezed > 0 {
		over := false
		for li := range s.layers {
			if c.lay.capacity[li] == c.squeezed && s.layers[li].n()+k > c.squeezed {
				over = true
			}
		}
		if over {
			// Unread positions (the last batch, pipelined) stay.
			p := c.comp.Policy()
			target := min(p.Target(int(s.last()+1)), p.Target(c.shape.Capacity), c.squeezed-k-len(s.fresh))
			if err := wrap(c.compressTo(seq, max(target, 0), "pressure")); err != nil {
				return err
			}
		}
	}
	// Layers kept whole that are full: the adapter's pressure rule.
	free, over := 0, false
	for li := range s.layers {
		if c.lay.capacity[li] != c.squeezed || c.squeezed == 0 {
			if room := c.lay.capacity[li] - s.layers[li].n(); room < k {
				free, over = max(room, 0), true
			}
		}
	}
	if over {
		_, err := c.comp.CachePressure(hooks.SeqID(seq), free, k)
		return wrap(err)
	}
	return nil
}

// Compress compresses seq to target positions per head (target < 0: the
// policy's budget) on the application's request.
func (c *Cache) Compress(seq, target int) (hooks.Stats, error) {
	if c.comp == nil {
		return hooks.Stats{}, c.compressionOff()
	}
	if err := c.report(true, seq); err != nil {
		return hooks.Stats{}, err
	}
	return c.comp.Compress(hooks.SeqID(seq), target)
}

func (c *Cache) compressionOff() error {
	if c.noComp != nil {
		return fmt.Errorf("ollama: compression is off: %w", c.noComp)
	}
	return errors.New("ollama: the cache was built without a policy")
}

// CompactHeads keeps, in every planned layer and head of plan.Seq, only the
// plan's positions, gathered into the first cells of the sequence's slab
// (hooks.HeadCompactor). The compressor calls it; applications call
// Compress or Flush.
func (c *Cache) CompactHeads(plan *hooks.HeadPlan) error {
	if plan == nil {
		return fmt.Errorf("%w: nil plan", ErrPlan)
	}
	if c.lay == nil {
		return fmt.Errorf("%w: the cache is not initialised", ErrPlan)
	}
	s := c.lay.seqs[int(plan.Seq)]
	if s == nil {
		return fmt.Errorf("%w: seq %d holds no cells", hooks.ErrUnknownSequence, plan.Seq)
	}
	if len(plan.Layers) != c.opts.Layers {
		return fmt.Errorf("%w: plan has %d layers, the cache %d", ErrPlan, len(plan.Layers), c.opts.Layers)
	}
	// Positions whose norms the planner has not seen are newer than every
	// planned one and held by every head: they stay.
	tail := s.freshPositions()
	keeps := make([][][]int32, len(plan.Layers))
	srcs := make([][][]int32, len(plan.Layers))
	for li, keep := range plan.Layers {
		if keep == nil {
			continue
		}
		if len(tail) > 0 {
			withTail := make([][]int32, len(keep))
			for h := range keep {
				withTail[h] = mergeSorted(keep[h], tail)
			}
			keep = withTail
		}
		keeps[li] = keep
		src, err := c.lay.compactPlan(s, li, keep)
		if err != nil {
			return fmt.Errorf("%w: seq %d: %w", ErrPlan, plan.Seq, err)
		}
		srcs[li] = src
	}
	ctx, done := c.opContext()
	defer done()
	moved := false
	for li, src := range srcs {
		if src == nil {
			continue
		}
		if len(src[0]) < s.layers[li].n() {
			s.lossy = true
		}
		if len(src[0]) > 0 && !identity(src) && c.keys[li] != nil {
			c.gather(ctx, li, s.slab, src)
			moved = true
		}
	}
	if moved && ctx != c.graph {
		ctx.Compute()
	}
	for li, keep := range keeps {
		if keep != nil {
			c.lay.applyCompact(s, li, keep)
		}
	}
	return nil
}

// mergeSorted returns the union of two ascending lists, ascending.
func mergeSorted(a, b []int32) []int32 {
	out := make([]int32, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || (i < len(a) && a[i] < b[j]):
			out = append(out, a[i])
			i++
		case i == len(a) || b[j] < a[i]:
			out = append(out, b[j])
			j++
		default:
			out = append(out, a[i])
			i, j = i+1, j+1
		}
	}
	return out
}

// gather moves, in layer li of a slab, cell src[h][j] of head h to cell j,
// keys and values alike (norms are kept by batch, not by cell: norms.go).
func (c *Cache) gather(ctx ml.Context, li, slab int, src [][]int32) {
	heads, k := len(src), len(src[0])
	flat := make([]int32, 0, heads*k)
	for _, cells := range src {
		flat = append(flat, cells...)
	}
	dsts := make([]int32, k)
	for j := range dsts {
		dsts[j] = int32(j)
	}
	idx := ctx.Input().FromInts(flat, k, heads)
	dst := ctx.Input().FromInts(dsts, k)
	start := c.lay.slabStart(slab, li)
	cells := c.lay.slabCells[li]

	rows := func(t ml.Tensor) {
		v := t.View(ctx, start*t.Stride(1), t.Dim(0), t.Stride(1), cells, t.Stride(2), heads)
		ctx.Forward(v.SetRows(ctx, v.Rows(ctx, idx), dst))
	}
	rows(c.keys[li])
	value := c.values[li]
	if !c.config.PermutedV {
		rows(value)
		return
	}
	// V is [cells, headDim, kvHeads]: gather on a transposed copy and write
	// the rows back transposed.
	vs := value.View(ctx, start*value.Stride(0), cells, value.Stride(1), value.Dim(1), value.Stride(2), heads)
	got := vs.Permute(ctx, 1, 0, 2, 3).Contiguous(ctx).Rows(ctx, idx)
	out := value.View(ctx, start*value.Stride(0), k, value.Stride(1), value.Dim(1), value.Stride(2), heads).Permute(ctx, 1, 0, 2, 3)
	ctx.Forward(got.Copy(ctx, out))
}
