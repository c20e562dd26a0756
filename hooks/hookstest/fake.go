// Package hookstest provides fake runtimes that implement the hooks contract
// without cgo or a model, for tests of the compressor and of code built on it.
//
// A fake cache holds, per sequence and per (layer, KV head), the set of
// positions it stores, and refuses to grow past its capacity, so a test can
// check both what a plan evicted and that the cache never overflowed.
package hookstest

import (
	"fmt"
	"slices"
	"sync"

	"github.com/kvnorm/kvnorm/hooks"
)

// Cache is the state shared by both fakes.
type Cache struct {
	mu    sync.Mutex
	shape hooks.CacheShape
	seqs  map[hooks.SeqID][][]hooks.Pos // [layer*KVHeads+head] ascending positions
	// Calls counts the plans applied.
	Calls int
}

func newCache(shape hooks.CacheShape) Cache {
	return Cache{shape: shape, seqs: map[hooks.SeqID][][]hooks.Pos{}}
}

// CacheShape implements hooks.Runtime.
func (c *Cache) CacheShape() hooks.CacheShape { return c.shape }

// Append stores positions of seq in every layer and head, as a forward pass
// of a batch would. It fails when a lane would exceed the capacity.
func (c *Cache) Append(seq hooks.SeqID, positions ...hooks.Pos) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	lanes := c.seqs[seq]
	if lanes == nil {
		lanes = make([][]hooks.Pos, c.shape.Layers*c.shape.KVHeads)
		c.seqs[seq] = lanes
	}
	for i := range lanes {
		if c.shape.Capacity > 0 && len(lanes[i])+len(positions) > c.shape.Capacity {
			return fmt.Errorf("hookstest: seq %d: %d cells + %d incoming exceed capacity %d", seq, len(lanes[i]), len(positions), c.shape.Capacity)
		}
	}
	for i := range lanes {
		lanes[i] = append(lanes[i], positions...)
		slices.Sort(lanes[i])
	}
	return nil
}

// Clear removes every cell of seq.
func (c *Cache) Clear(seq hooks.SeqID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.seqs, seq)
}

// Free is the number of free cells of seq's fullest lane.
func (c *Cache) Free(seq hooks.SeqID) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	used := 0
	for _, l := range c.seqs[seq] {
		used = max(used, len(l))
	}
	return c.shape.Capacity - used
}

// Lane returns a copy of the positions stored in (layer, head) of seq.
func (c *Cache) Lane(seq hooks.SeqID, layer, head int) []hooks.Pos {
	c.mu.Lock()
	defer c.mu.Unlock()
	lanes := c.seqs[seq]
	if lanes == nil {
		return nil
	}
	return slices.Clone(lanes[layer*c.shape.KVHeads+head])
}

// Entries counts the (layer, head, position) entries stored for seq.
func (c *Cache) Entries(seq hooks.SeqID) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, l := range c.seqs[seq] {
		n += len(l)
	}
	return n
}

func (c *Cache) lanes(seq hooks.SeqID) ([][]hooks.Pos, error) {
	lanes := c.seqs[seq]
	if lanes == nil {
		return nil, fmt.Errorf("%w: seq %d", hooks.ErrUnknownSequence, seq)
	}
	return lanes, nil
}

// Shared is a fake cache whose cells are shared by all heads and layers, like
// llama.cpp's: it implements hooks.PositionEvictor only.
type Shared struct{ Cache }

// NewShared returns an empty shared-cell fake cache.
func NewShared(shape hooks.CacheShape) *Shared { return &Shared{newCache(shape)} }

// EvictPositions implements hooks.PositionEvictor. Like llama.cpp it refuses
// to evict the last position of the sequence.
func (s *Shared) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	lanes, err := s.lanes(seq)
	if err != nil {
		return err
	}
	last := lanes[0][len(lanes[0])-1]
	for _, p := range positions {
		if p == last {
			return fmt.Errorf("hookstest: seq %d: evicting the last position %d", seq, p)
		}
		if _, ok := slices.BinarySearch(lanes[0], p); !ok {
			return fmt.Errorf("hookstest: seq %d: position %d is not live", seq, p)
		}
	}
	for i := range lanes {
		lanes[i] = slices.DeleteFunc(lanes[i], func(p hooks.Pos) bool {
			_, found := slices.BinarySearch(positions, p)
			return found
		})
	}
	s.Calls++
	return nil
}

// PerHead is a fake cache that keeps a separate set of positions per layer
// and KV head, like kvnorm's Ollama cache: it implements hooks.HeadCompactor.
type PerHead struct{ Cache }

// NewPerHead returns an empty per-head fake cache.
func NewPerHead(shape hooks.CacheShape) *PerHead { return &PerHead{newCache(shape)} }

// CompactHeads implements hooks.HeadCompactor: every listed position must be
// live in its lane and every head of a layer must keep the same count.
func (p *PerHead) CompactHeads(plan *hooks.HeadPlan) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	lanes, err := p.lanes(plan.Seq)
	if err != nil {
		return err
	}
	if len(plan.Layers) != p.shape.Layers {
		return fmt.Errorf("hookstest: plan has %d layers, cache %d", len(plan.Layers), p.shape.Layers)
	}
	for l, heads := range plan.Layers {
		if heads == nil {
			continue
		}
		if len(heads) != p.shape.KVHeads {
			return fmt.Errorf("hookstest: layer %d: plan has %d heads, cache %d", l, len(heads), p.shape.KVHeads)
		}
		for h, keep := range heads {
			if len(keep) != len(heads[0]) {
				return fmt.Errorf("hookstest: layer %d: head %d keeps %d, head 0 keeps %d", l, h, len(keep), len(heads[0]))
			}
			for _, q := range keep {
				if _, ok := slices.BinarySearch(lanes[l*p.shape.KVHeads+h], q); !ok {
					return fmt.Errorf("hookstest: layer %d head %d: position %d is not live", l, h, q)
				}
			}
		}
	}
	for l, heads := range plan.Layers {
		for h, keep := range heads {
			lanes[l*p.shape.KVHeads+h] = slices.Clone(keep)
		}
	}
	p.Calls++
	return nil
}
