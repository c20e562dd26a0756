package ollama

import (
	"fmt"
	"slices"

	"github.com/ollama/ollama/ml"
)

// Device work decided between batches.
//
// The runner calls Remove (a context shift) and CopyPrefix between forward
// passes, outside any graph. In its pipelined loop the batch placed last may
// then have computed with its outputs (the logits it samples from) still in
// the scheduler's buffers, unread: Ollama's runner reads them after
// releasing the scheduler, while it already builds the next batch. A graph
// the cache computed then, on the same scheduler, would reuse those buffers
// and overwrite them, and the runner would sample from garbage. (The soak
// found it: answers running past the cache, whose shifts computed at once,
// differed between fresh servers, and a short answer beside one read "$100"
// where a fresh server said "want".)
//
// So the bookkeeping changes at once and the device work waits in
// Cache.pending, to run first in the graph of the next batch: it orders
// after every batch placed before (a backend runs graphs in order), before
// anything of the new batch reads the cells, and computes nothing of its
// own. Outside the runner's loop (not pipelined: Session, Engine) a shift's
// work runs at once; copies wait for the next batch or Flush in every mode.

// deviceOp is device work on the cells of one slab.
type deviceOp struct {
	slab int // the slab it writes
	// build adds the work to ctx and reports whether it added anything.
	build func(ctx ml.Context) (bool, error)
}

// queue adds op to the pending work, and runs the pending work at once when
// now is set and the runner is not pipelining (nothing of a batch can be
// waiting to be read).
func (c *Cache) queue(op deviceOp, now bool) error {
	c.pending = append(c.pending, op)
	if now && (!c.opts.Pipelined || c.flushing) {
		return c.runPending()
	}
	return nil
}

// dropPending forgets the pending work on a slab whose sequence is gone.
func (c *Cache) dropPending(slab int) {
	c.pending = slices.DeleteFunc(c.pending, func(op deviceOp) bool { return op.slab == slab })
}

// runPending adds the pending work to the graph being built, or computes it
// at once outside a forward pass.
func (c *Cache) runPending() error {
	if len(c.pending) == 0 {
		return nil
	}
	ops := c.pending
	c.pending = nil
	ctx, done := c.opContext()
	defer done()
	work := false
	var err error
	for _, op := range ops {
		added, e := op.build(ctx)
		work = work || added
		if e != nil && err == nil {
			err = c.fail(fmt.Errorf("ollama: cache operation on slot %d: %w", op.slab, e))
		}
	}
	if work && ctx != c.graph {
		ctx.Compute()
	}
	return err
}
