package ollama

import (
	"errors"
	"fmt"
	"math"
	"slices"
)

// errUneven reports a removal that would leave the heads of a layer holding
// different numbers of cells, which a rectangular attention tensor cannot
// express.
var errUneven = errors.New("heads of a layer would hold different numbers of cells")

// visiblePos is the mask position of a compacted cell: after per-head
// compaction a cell holds a different position in every head, but all of
// them lie before any later query, so the cell is visible to every query of
// its sequence.
const visiblePos int32 = -1

// layerCells is what one sequence holds in one layer: its first n cells, in
// every KV head. Each head's positions are ascending along the cells.
type layerCells struct {
	// shared holds the positions of every head while the heads agree (the
	// layer was never compacted per head); heads is nil then.
	shared []int32
	// heads holds the positions of each head once they differ.
	heads [][]int32
	// mask holds, per cell, the position the attention mask compares with a
	// query's position (visiblePos for cells compacted per head).
	mask []int32
}

func (lc *layerCells) n() int { return len(lc.mask) }

// perHead reports whether the heads hold different positions.
func (lc *layerCells) perHead() bool { return lc.heads != nil }

// head returns the positions head h holds; do not modify them.
func (lc *layerCells) head(h int) []int32 {
	if lc.heads != nil {
		return lc.heads[h]
	}
	return lc.shared
}

func (lc *layerCells) appendPos(p int32) {
	if lc.heads != nil {
		for h := range lc.heads {
			lc.heads[h] = append(lc.heads[h], p)
		}
	} else {
		lc.shared = append(lc.shared, p)
	}
	lc.mask = append(lc.mask, p)
}

// truncate keeps the first n cells.
func (lc *layerCells) truncate(n int) {
	if n == 0 {
		*lc = layerCells{}
		return
	}
	if lc.heads != nil {
		for h := range lc.heads {
			lc.heads[h] = lc.heads[h][:n]
		}
	} else {
		lc.shared = lc.shared[:n]
	}
	lc.mask = lc.mask[:n]
}

func (lc *layerCells) clone() layerCells {
	out := layerCells{shared: slices.Clone(lc.shared), mask: slices.Clone(lc.mask)}
	if lc.heads != nil {
		out.heads = make([][]int32, len(lc.heads))
		for h := range lc.heads {
			out.heads[h] = slices.Clone(lc.heads[h])
		}
	}
	return out
}

// seqCells is one sequence's slab of cells, across layers.
type seqCells struct {
	slab   int
	layers []layerCells
	// fresh lists the positions whose key norms the observer has not been
	// given yet, ascending, and where their norms are (norms.go): they are
	// the last len(fresh) cells of every layer (a compaction keeps them, at
	// the end).
	fresh []freshNorm
	// newestBatch is the sequence's newest batch: in pipelined mode the
	// norms it placed are not read before the sequence's next batch,
	// whatever was placed in between (norms.go, report).
	newestBatch uint64
	// prefillBatch is the batch that ended the prompt (prefillDue).
	prefillBatch uint64
	// prefillDue is set when a batch with an output for the sequence was
	// placed while its prompt was not compressed yet (prefilled unset).
	prefillDue, prefilled bool
	// lossy is set once the sequence lost a position it was fed (an
	// eviction, a shift of a compressed sequence, a copy of a lossy
	// prefix): its cells are no longer what a fresh decode of its inputs
	// holds, so its prefix is never reused (CanResume).
	lossy bool
	// offset maps the runner's positions to the cache's: after the runner
	// shifted a compressed sequence by d positions, its later tokens come
	// numbered d lower, and the cache stores them at position + offset so
	// that positions stay unique and ascending (keys are re-roped instead).
	offset int32
	// shifted is set by a context shift: the cells are no longer what a
	// fresh decode of the runner's inputs holds either.
	shifted bool
	// unmanaged sequences hold cells the compressor has no record of (a
	// prefix copied from a sequence compacted per head): they are never
	// compressed.
	unmanaged bool
}

// exact reports whether the sequence holds every position it was fed,
// unshifted, as a fresh decode of its inputs would.
func (s *seqCells) exact() bool { return !s.lossy && !s.shifted }

// used is the largest number of cells any layer of the sequence holds.
func (s *seqCells) used() int {
	m := 0
	for i := range s.layers {
		m = max(m, s.layers[i].n())
	}
	return m
}

// last is the highest position the sequence holds, or -1.
func (s *seqCells) last() int32 {
	last := int32(-1)
	for i := range s.layers {
		lc := &s.layers[i]
		for h := range lc.headCount() {
			if p := lc.head(h); len(p) > 0 {
				last = max(last, p[len(p)-1])
			}
		}
	}
	return last
}

func (lc *layerCells) headCount() int {
	if lc.heads != nil {
		return len(lc.heads)
	}
	return 1
}

// layout tracks which cells of the cache hold which positions. Each layer
// has one slab of slabCells[layer] cells per sequence slot (layers kept whole
// get the whole context, compressed layers what the policy keeps plus
// headroom); in every layer, a sequence's cells are packed at the front of
// its slab. It is plain bookkeeping, with no tensors, so that it can be
// tested without a backend.
type layout struct {
	layers, kvHeads int
	slabCells       []int // per layer
	capacity        []int // per layer: cells a sequence may use (<= slabCells)
	owner           []int // slab -> sequence, -1 when free
	seqs            map[int]*seqCells
}

// newLayout returns the bookkeeping of slabs sequence slots whose layer l
// holds capacity[l] cells, padded to slabCells[l].
func newLayout(layers, kvHeads, slabs int, slabCells, capacity []int) *layout {
	l := &layout{layers: layers, kvHeads: kvHeads, slabCells: slabCells, capacity: capacity,
		owner: make([]int, slabs), seqs: map[int]*seqCells{}}
	for i := range l.owner {
		l.owner[i] = -1
	}
	return l
}

// uniform returns per-layer sizes all equal to n.
func uniform(layers, n int) []int {
	out := make([]int, layers)
	for i := range out {
		out[i] = n
	}
	return out
}

// seq returns the cells of seq, assigning a free slab when create is set.
func (l *layout) seq(seq int, create bool) (*seqCells, error) {
	if s := l.seqs[seq]; s != nil || !create {
		return s, nil
	}
	slab := slices.Index(l.owner, -1)
	if slab < 0 {
		return nil, fmt.Errorf("no free sequence slot for seq %d: all %d slots are in use", seq, len(l.owner))
	}
	l.owner[slab] = seq
	s := &seqCells{slab: slab, layers: make([]layerCells, l.layers)}
	l.seqs[seq] = s
	return s, nil
}

// free releases the slab of seq.
func (l *layout) free(seq int) {
	if s := l.seqs[seq]; s != nil {
		l.owner[s.slab] = -1
		delete(l.seqs, seq)
	}
}

// slabStart is the first cell of a slab in layer li.
func (l *layout) slabStart(slab, li int) int { return slab * l.slabCells[li] }

// total is the number of cells of layer li's tensors: every slot's slab.
func (l *layout) total(li int) int { return len(l.owner) * l.slabCells[li] }

// room returns, per layer, how many more cells s may use.
func (l *layout) room(s *seqCells) []int {
	out := make([]int, l.layers)
	for i := range out {
		out[i] = l.capacity[i] - s.layers[i].n()
	}
	return out
}

// appendTokens records positions at the end of every layer of seq. Positions
// must ascend and follow every position the sequence holds.
func (l *layout) appendTokens(s *seqCells, positions []int32) error {
	last := s.last()
	for _, p := range positions {
		if p <= last {
			return fmt.Errorf("position %d does not follow the last cached position %d", p, last)
		}
		last = p
	}
	for i := range s.layers {
		if n := s.layers[i].n(); n+len(positions) > l.capacity[i] {
			return fmt.Errorf("layer %d: %d new cells on top of %d used exceed its capacity of %d cells", i, len(positions), n, l.capacity[i])
		}
	}
	for i := range s.layers {
		for _, p := range positions {
			s.layers[i].appendPos(p)
		}
	}
	return nil
}

// removeTail drops positions >= begin from every layer of s. Each head keeps
// its positions ascending, so the dropped positions are a suffix of every
// head; the heads of a layer must drop the same count.
func (l *layout) removeTail(s *seqCells, begin int32) error {
	cut := make([]int, len(s.layers))
	for i := range s.layers {
		lc := &s.layers[i]
		cut[i] = -1
		for h := range lc.headCount() {
			p := lc.head(h)
			k, _ := slices.BinarySearch(p, begin)
			if cut[i] >= 0 && k != cut[i] {
				return fmt.Errorf("remove positions >= %d: layer %d: %w", begin, i, errUneven)
			}
			cut[i] = k
		}
	}
	for i := range s.layers {
		if cut[i] >= 0 {
			s.layers[i].truncate(cut[i])
		}
	}
	return nil
}

// removeMiddle drops positions [begin, end) from every layer of s and
// renumbers later positions by begin-end. It needs every layer's heads to
// agree. It returns, per layer, the cells to keep (in order; they move to the
// front) and the index of the first kept cell whose position was renumbered.
func (l *layout) removeMiddle(s *seqCells, begin, end int32) (keep [][]int32, shifted []int, err error) {
	for i := range s.layers {
		if s.layers[i].perHead() {
			return nil, nil, fmt.Errorf("remove positions [%d,%d): layer %d holds different positions per head", begin, end, i)
		}
	}
	offset := begin - end
	keep = make([][]int32, len(s.layers))
	shifted = make([]int, len(s.layers))
	for i := range s.layers {
		lc := &s.layers[i]
		var cells []int32
		var pos []int32
		shifted[i] = -1
		for c, p := range lc.shared {
			switch {
			case p >= begin && p < end:
				continue
			case p >= end:
				if shifted[i] < 0 {
					shifted[i] = len(cells)
				}
				p += offset
			}
			cells = append(cells, int32(c))
			pos = append(pos, p)
		}
		if shifted[i] < 0 {
			shifted[i] = len(cells)
		}
		keep[i] = cells
		lc.shared = pos
		lc.mask = slices.Clone(pos)
	}
	return keep, shifted, nil
}

// compactPlan maps a per-head keep list of layer li of s to source cells:
// src[h][j] is the cell that holds keep[h][j]. Every head keeps the same
// count and every kept position must be held by its head.
func (l *layout) compactPlan(s *seqCells, li int, keep [][]int32) ([][]int32, error) {
	if len(keep) != l.kvHeads {
		return nil, fmt.Errorf("layer %d: plan has %d heads, the cache %d", li, len(keep), l.kvHeads)
	}
	lc := &s.layers[li]
	src := make([][]int32, l.kvHeads)
	for h, k := range keep {
		if len(k) != len(keep[0]) {
			return nil, fmt.Errorf("layer %d: head %d keeps %d positions, head 0 keeps %d", li, h, len(k), len(keep[0]))
		}
		have := lc.head(h)
		cells := make([]int32, len(k))
		prev := int32(math.MinInt32)
		for j, p := range k {
			if p <= prev {
				return nil, fmt.Errorf("layer %d head %d: kept positions are not ascending at %d", li, h, p)
			}
			prev = p
			c, ok := slices.BinarySearch(have, p)
			if !ok {
				return nil, fmt.Errorf("layer %d head %d: kept position %d is not in the cache", li, h, p)
			}
			cells[j] = int32(c)
		}
		src[h] = cells
	}
	return src, nil
}

// applyCompact records that layer li of s now holds keep[h] in head h, at
// the front of its slab.
func (l *layout) applyCompact(s *seqCells, li int, keep [][]int32) {
	lc := &s.layers[li]
	same := true
	for h := 1; h < len(keep); h++ {
		if !slices.Equal(keep[h], keep[0]) {
			same = false
			break
		}
	}
	n := len(keep[0])
	if same {
		// Every head agrees (a per-token plan): the positions stay exact.
		*lc = layerCells{shared: slices.Clone(keep[0]), mask: slices.Clone(keep[0])}
		return
	}
	heads := make([][]int32, len(keep))
	for h := range keep {
		heads[h] = slices.Clone(keep[h])
	}
	mask := make([]int32, n)
	for i := range mask {
		mask[i] = visiblePos
	}
	*lc = layerCells{heads: heads, mask: mask}
}

// identity reports whether src moves no cell (src[h][j] == j for all h, j).
func identity(src [][]int32) bool {
	for _, cells := range src {
		for j, c := range cells {
			if int(c) != j {
				return false
			}
		}
	}
	return true
}

// prefixOf returns what layer cells of src hold below position end, cut to
// the count every head can provide, so that a copy stays rectangular. exact
// is false when some head lost positions below end to the cut.
func prefixOf(lc *layerCells, end int32) (out layerCells, exact bool) {
	m := math.MaxInt
	counts := make([]int, lc.headCount())
	for h := range counts {
		counts[h], _ = slices.BinarySearch(lc.head(h), end)
		m = min(m, counts[h])
	}
	exact = true
	for _, c := range counts {
		if c != m {
			exact = false
		}
	}
	out = lc.clone()
	out.truncate(m)
	return out, exact
}

// rangeFor returns the cells [lo, lo+length) that a batch touching the given
// sequences attends over in layer li: from the first slab's start, padded to
// a multiple of pad (cells beyond a sequence's own are masked). Slabs are
// multiples of pad too, so every sequence's cells start at the same
// alignment in the attention row whatever its slot and whatever shares the
// batch: ggml's sums over a row then see the same values in the same lanes,
// plus masked zeros, and a sequence's results do not depend on its slot or
// on the other sequences of the batch.
func (l *layout) rangeFor(seqs []*seqCells, li, pad int) (lo, length int) {
	total := l.total(li)
	lo, hi := math.MaxInt, 0
	for _, s := range seqs {
		start := l.slabStart(s.slab, li)
		lo = min(lo, start)
		hi = max(hi, start+s.layers[li].n())
	}
	if lo == math.MaxInt {
		return 0, 0
	}
	length = max(hi-lo, 1)
	length = min(roundUp(length, pad), total-lo)
	return lo, length
}

// maskFor fills mask ([batch][length], row-major by query) for layer li: a
// query sees a cell of its own sequence whose mask position does not exceed
// its own position (positions as the cache numbers them).
func (l *layout) maskFor(mask []float32, lo, length, li int, seqs []int, positions []int32) {
	inf := float32(math.Inf(-1))
	for i := range mask {
		mask[i] = inf
	}
	for i, seq := range seqs {
		s := l.seqs[seq]
		if s == nil {
			continue
		}
		row := mask[i*length : (i+1)*length]
		start := l.slabStart(s.slab, li) - lo
		for c, p := range s.layers[li].mask {
			if p <= positions[i] {
				row[start+c] = 0
			}
		}
	}
}

func roundUp(n, pad int) int {
	if pad <= 1 {
		return n
	}
	return (n + pad - 1) / pad * pad
}
