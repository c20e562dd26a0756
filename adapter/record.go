package adapter

import (
	"fmt"
	"slices"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// lane holds the live positions of one (layer, KV head) of one sequence and
// the L2 norms of their keys, ascending by position.
type lane struct {
	pos  []hooks.Pos
	norm []float32
}

// put records the norm of pos, keeping the lane sorted; a position seen again
// (a runtime that re-decodes it) takes the new norm.
func (l *lane) put(pos hooks.Pos, norm float32) {
	n := len(l.pos)
	if n == 0 || pos > l.pos[n-1] {
		l.pos = append(l.pos, pos)
		l.norm = append(l.norm, norm)
		return
	}
	i, found := slices.BinarySearch(l.pos, pos)
	if found {
		l.norm[i] = norm
		return
	}
	l.pos = slices.Insert(l.pos, i, pos)
	l.norm = slices.Insert(l.norm, i, norm)
}

// keepOnly retains the ascending positions in keep.
func (l *lane) keepOnly(keep []hooks.Pos) {
	w, k := 0, 0
	for i, p := range l.pos {
		for k < len(keep) && keep[k] < p {
			k++
		}
		if k < len(keep) && keep[k] == p {
			l.pos[w], l.norm[w] = p, l.norm[i]
			w++
		}
	}
	l.pos, l.norm = l.pos[:w], l.norm[:w]
}

// forget drops positions in [from, to).
func (l *lane) forget(from, to hooks.Pos) {
	w := 0
	for i, p := range l.pos {
		if p < from || p >= to {
			l.pos[w], l.norm[w] = p, l.norm[i]
			w++
		}
	}
	l.pos, l.norm = l.pos[:w], l.norm[:w]
}

// Record holds the key norms of one sequence: for every layer and KV head,
// its live positions and the L2 norm of each one's key. It never holds keys.
// Memory is 8 bytes per live (layer, head, position) entry.
//
// A Record is not safe for concurrent use; Compressor serialises access.
type Record struct {
	shape hooks.CacheShape
	lanes []lane // layer-major: lanes[layer*KVHeads+head]
}

// NewRecord returns an empty record for a cache of the given shape.
func NewRecord(shape hooks.CacheShape) (*Record, error) {
	if err := shape.Validate(); err != nil {
		return nil, err
	}
	return &Record{shape: shape, lanes: make([]lane, shape.Layers*shape.KVHeads)}, nil
}

// Shape returns the cache shape the record was made for.
func (r *Record) Shape() hooks.CacheShape { return r.shape }

func (r *Record) lane(layer, head int) *lane { return &r.lanes[layer*r.shape.KVHeads+head] }

// Put records the key norm of one (layer, head, position).
func (r *Record) Put(layer, head int, pos hooks.Pos, norm float32) error {
	if layer < 0 || layer >= r.shape.Layers || head < 0 || head >= r.shape.KVHeads {
		return fmt.Errorf("%w: (layer %d, head %d) outside %d layers × %d kv heads", hooks.ErrBadBatch, layer, head, r.shape.Layers, r.shape.KVHeads)
	}
	if pos < 0 {
		return fmt.Errorf("%w: negative position %d", hooks.ErrBadBatch, pos)
	}
	r.lane(layer, head).put(pos, norm)
	return nil
}

// PutNorms records norms laid out [len(positions)][KVHeads] for one layer.
func (r *Record) PutNorms(layer int, positions []hooks.Pos, norms []float32) error {
	h := r.shape.KVHeads
	if len(norms) != len(positions)*h {
		return fmt.Errorf("%w: layer %d: %d norms for %d positions × %d kv heads", hooks.ErrBadBatch, layer, len(norms), len(positions), h)
	}
	if layer < 0 || layer >= r.shape.Layers {
		return fmt.Errorf("%w: layer=%d out of range [0,%d)", hooks.ErrBadBatch, layer, r.shape.Layers)
	}
	for i, p := range positions {
		if p < 0 {
			return fmt.Errorf("%w: layer %d: negative position %d", hooks.ErrBadBatch, layer, p)
		}
		for j := range h {
			r.lane(layer, j).put(p, norms[i*h+j])
		}
	}
	return nil
}

// PutKeys computes the L2 norms of keys laid out [len(positions)][KVHeads][HeadDim]
// in dtype dt and records them for one layer.
func (r *Record) PutKeys(layer int, positions []hooks.Pos, keys []byte, dt kernels.DType) error {
	norms := make([]float32, len(positions)*r.shape.KVHeads)
	if err := kernels.Norms(norms, keys, dt, r.shape.HeadDim); err != nil {
		return fmt.Errorf("layer %d: %w", layer, err)
	}
	return r.PutNorms(layer, positions, norms)
}

// Lane returns the live positions of (layer, head), ascending, and their key
// norms. The slices alias the record: do not modify them.
func (r *Record) Lane(layer, head int) ([]hooks.Pos, []float32) {
	l := r.lane(layer, head)
	return l.pos, l.norm
}

// Positions returns the distinct live positions over all lanes, ascending.
func (r *Record) Positions() []hooks.Pos {
	var out []hooks.Pos
	same := true
	first := r.lanes[0].pos
	for i := range r.lanes {
		if !slices.Equal(r.lanes[i].pos, first) {
			same = false
			break
		}
	}
	if same {
		return slices.Clone(first)
	}
	for i := range r.lanes {
		out = append(out, r.lanes[i].pos...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Entries is the number of live (layer, head, position) entries.
func (r *Record) Entries() int64 {
	var n int64
	for i := range r.lanes {
		n += int64(len(r.lanes[i].pos))
	}
	return n
}

// MaxLaneLen is the largest number of live positions in any lane.
func (r *Record) MaxLaneLen() int {
	m := 0
	for i := range r.lanes {
		m = max(m, len(r.lanes[i].pos))
	}
	return m
}

// Forget drops positions [from, to) from every lane; to < 0 means to the end.
func (r *Record) Forget(from, to hooks.Pos) {
	if to < 0 {
		to = 1<<31 - 1
	}
	for i := range r.lanes {
		r.lanes[i].forget(from, to)
	}
}

// evicted returns, for every lane a plan changes, the positions it evicts
// (lane index -> ascending positions), computed against the record as it is.
func (r *Record) evicted(p *Plan) map[int][]hooks.Pos {
	out := map[int][]hooks.Pos{}
	if p.Token != nil {
		for i := range r.lanes {
			if len(p.Token.Evict) > 0 {
				out[i] = p.Token.Evict
			}
		}
		return out
	}
	for l, heads := range p.Head.Layers {
		for h, keep := range heads {
			i := l*r.shape.KVHeads + h
			var ev []hooks.Pos
			k := 0
			for _, q := range r.lanes[i].pos {
				for k < len(keep) && keep[k] < q {
					k++
				}
				if k == len(keep) || keep[k] != q {
					ev = append(ev, q)
				}
			}
			if len(ev) > 0 {
				out[i] = ev
			}
		}
	}
	return out
}

// drop forgets the given positions of each lane (lane index -> ascending
// positions). Positions recorded after the plan was made are untouched.
func (r *Record) drop(evicted map[int][]hooks.Pos) {
	for i, ev := range evicted {
		l := &r.lanes[i]
		w, k := 0, 0
		for j, q := range l.pos {
			for k < len(ev) && ev[k] < q {
				k++
			}
			if k < len(ev) && ev[k] == q {
				continue
			}
			l.pos[w], l.norm[w] = q, l.norm[j]
			w++
		}
		l.pos, l.norm = l.pos[:w], l.norm[:w]
	}
}
