package ollama

import (
	"fmt"
	"slices"
	"time"

	"github.com/kvnorm/kvnorm/hooks"
)

func (c *Cache) recordStats(st hooks.Stats) {
	if c.why != "" {
		st.Trigger = c.why
	}
	c.statsMu.Lock()
	c.history = append(c.history, st)
	if len(c.history) > 256 {
		c.history = slices.Delete(c.history, 0, len(c.history)-256)
	}
	c.statsMu.Unlock()
	c.log.Info("kvnorm: compressed", "arch", c.opts.Arch, "seq", st.Seq, "trigger", st.Trigger,
		"policy", st.Policy, "positions", fmt.Sprintf("%d->%d", st.PositionsBefore, st.PositionsAfter),
		"entries", fmt.Sprintf("%d->%d", st.EntriesBefore, st.EntriesAfter), "freed_bytes", st.BytesFreed,
		"plan", st.PlanTime.Round(time.Microsecond), "apply", st.ApplyTime.Round(time.Microsecond))
}

// Stats returns the stats of the latest compressions (at most 256), oldest
// first.
func (c *Cache) Stats() []hooks.Stats {
	c.statsMu.Lock()
	defer c.statsMu.Unlock()
	return slices.Clone(c.history)
}

// Usage is what one sequence holds.
type Usage struct {
	// Cells is the number of cells each layer holds (per head: every head
	// of a layer holds the same count).
	Cells []int `json:"cells"`
	// Positions is the number of distinct positions held by any head.
	Positions int `json:"positions"`
	// Entries is the number of (layer, head, cell) entries; Bytes their K+V
	// size for the cache's type.
	Entries int64 `json:"entries"`
	Bytes   int64 `json:"bytes"`
}

// Usage reports what seq holds.
func (c *Cache) Usage(seq int) Usage {
	var u Usage
	if c.lay == nil {
		return u
	}
	s := c.lay.seqs[seq]
	if s == nil {
		return u
	}
	seen := map[int32]bool{}
	u.Cells = make([]int, len(s.layers))
	for li := range s.layers {
		lc := &s.layers[li]
		u.Cells[li] = lc.n()
		u.Entries += int64(lc.n() * c.opts.KVHeads)
		for h := range lc.headCount() {
			for _, p := range lc.head(h) {
				seen[p] = true
			}
		}
	}
	u.Positions = len(seen)
	if eb, err := c.shape.EntryBytes(); err == nil {
		u.Bytes = u.Entries * eb
	}
	return u
}

// HeadPositions returns the positions head h of layer li of seq holds, in
// cell order.
func (c *Cache) HeadPositions(seq, li, h int) []int32 {
	if c.lay == nil || c.lay.seqs[seq] == nil || li < 0 || li >= c.opts.Layers || h < 0 || h >= c.opts.KVHeads {
		return nil
	}
	return slices.Clone(c.lay.seqs[seq].layers[li].head(h))
}

// LayerCells returns the cells each layer's tensors hold per sequence slot
// (before padding): the context for layers kept whole, the policy's budget
// plus one batch for compressed layers.
func (c *Cache) LayerCells() []int {
	if c.lay == nil {
		return nil
	}
	return slices.Clone(c.lay.capacity)
}
