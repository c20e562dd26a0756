package conformance

import (
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// normObserver records the key norm of every (layer, KV head, position) a
// runtime reports, and never compresses: the attention task measures the
// uncompressed model.
type normObserver struct {
	shape hooks.CacheShape
	norms [][]float32 // [layer*KVHeads+head][position], NaN when unseen
	buf   []float32
}

var _ hooks.Observer = (*normObserver)(nil)

func newNormObserver(shape hooks.CacheShape) *normObserver {
	return &normObserver{shape: shape, norms: make([][]float32, shape.Layers*shape.KVHeads)}
}

func (o *normObserver) ObserveKeys(b *hooks.KeyBatch) error {
	if err := b.Validate(o.shape); err != nil {
		return err
	}
	h := o.shape.KVHeads
	norms := b.Norms
	if norms == nil {
		o.buf = slices.Grow(o.buf[:0], b.Len()*h)[:b.Len()*h]
		if err := kernels.Norms(o.buf, b.Keys, b.DType, o.shape.HeadDim); err != nil {
			return err
		}
		norms = o.buf
	}
	for i, p := range b.Positions {
		for g := range h {
			lane := &o.norms[b.Layer*h+g]
			for int(p) >= len(*lane) {
				*lane = append(*lane, float32(math.NaN()))
			}
			(*lane)[p] = norms[i*h+g]
		}
	}
	return nil
}

// norm returns the recorded norm of (layer, head, pos), NaN when unseen.
func (o *normObserver) norm(layer, head int, pos hooks.Pos) float32 {
	lane := o.norms[layer*o.shape.KVHeads+head]
	if pos < 0 || int(pos) >= len(lane) {
		return float32(math.NaN())
	}
	return lane[pos]
}

func (o *normObserver) PrefillDone(seq hooks.SeqID) (hooks.Stats, error) {
	return hooks.Stats{Seq: seq, Trigger: hooks.TriggerPrefill.String(), Skipped: true}, nil
}

func (o *normObserver) CachePressure(seq hooks.SeqID, free, incoming int) (hooks.Stats, error) {
	return hooks.Stats{}, fmt.Errorf("conformance: the attention task does not compress, yet seq %d ran out of cells (%d free, %d incoming)", seq, free, incoming)
}

func (o *normObserver) Forget(hooks.SeqID, hooks.Pos, hooks.Pos) {}

// attnAccumulator sums, per (layer, KV head), the attention each position
// receives from later queries and the share of each query's attention on the
// lowest-norm half of the keys it sees.
type attnAccumulator struct {
	obs     *normObserver
	kvHeads int
	recv    [][]float64 // [layer*KVHeads+head][position]
	cnt     [][]float64
	share   []float64 // [layer*KVHeads+head]
	uniform []float64
	queries []float64
}

func newAttnAccumulator(obs *normObserver) *attnAccumulator {
	n := obs.shape.Layers * obs.shape.KVHeads
	return &attnAccumulator{obs: obs, kvHeads: obs.shape.KVHeads, recv: make([][]float64, n), cnt: make([][]float64, n),
		share: make([]float64, n), uniform: make([]float64, n), queries: make([]float64, n)}
}

func (a *attnAccumulator) add(b *AttentionBatch) error {
	if b.KVHeads != a.kvHeads || len(b.Cells) != b.KVHeads || b.Heads%b.KVHeads != 0 {
		return fmt.Errorf("conformance: attention batch of layer %d: %d heads, %d KV heads, %d cell lists (cache has %d KV heads)", b.Layer, b.Heads, b.KVHeads, len(b.Cells), a.kvHeads)
	}
	if b.Layer < 0 || b.Layer >= a.obs.shape.Layers {
		return fmt.Errorf("conformance: attention batch of layer %d out of range", b.Layer)
	}
	nc := b.NumCells()
	if len(b.Weights) != b.Heads*len(b.Queries)*nc {
		return fmt.Errorf("conformance: attention batch of layer %d: %d weights, want %d heads × %d queries × %d cells", b.Layer, len(b.Weights), b.Heads, len(b.Queries), nc)
	}
	group := b.Heads / b.KVHeads
	type cell struct {
		c    int
		pos  hooks.Pos
		norm float32
	}
	var vis []cell
	low := make([]bool, nc)
	for g := range b.KVHeads {
		lane := b.Layer*a.kvHeads + g
		cells := b.Cells[g]
		if len(cells) != nc {
			return fmt.Errorf("conformance: attention batch of layer %d: KV head %d has %d cells, head 0 %d", b.Layer, g, len(cells), nc)
		}
		for q, qp := range b.Queries {
			vis = vis[:0]
			for c, p := range cells {
				if p >= 0 && p <= qp {
					n := a.obs.norm(b.Layer, g, p)
					if math.IsNaN(float64(n)) {
						return fmt.Errorf("conformance: layer %d KV head %d: attention to position %d whose key was never reported (report keys before attention)", b.Layer, g, p)
					}
					vis = append(vis, cell{c, p, n})
				}
			}
			if len(vis) < 2 {
				continue
			}
			// The lowest-norm half of the keys this query sees (ties: lower
			// position first, as plans break them).
			slices.SortFunc(vis, func(x, y cell) int {
				if x.norm != y.norm {
					if x.norm < y.norm {
						return -1
					}
					return 1
				}
				return int(x.pos - y.pos)
			})
			clear(low)
			half := len(vis) / 2
			for _, v := range vis[:half] {
				low[v.c] = true
			}
			for h := g * group; h < (g+1)*group; h++ {
				var s float64
				for _, v := range vis {
					w := float64(b.Weight(h, q, v.c))
					if low[v.c] {
						s += w
					}
					if v.pos < qp {
						for int(v.pos) >= len(a.recv[lane]) {
							a.recv[lane] = append(a.recv[lane], 0)
							a.cnt[lane] = append(a.cnt[lane], 0)
						}
						a.recv[lane][v.pos] += w
						a.cnt[lane][v.pos]++
					}
				}
				a.share[lane] += s
				a.uniform[lane] += float64(half) / float64(len(vis))
				a.queries[lane]++
			}
		}
	}
	return nil
}

// result returns, per lane, the Spearman correlation between key norm and
// mean attention received from later queries, the share on the low half and
// the uniform share.
func (a *attnAccumulator) result() (rho, share, uniform []float64) {
	n := len(a.recv)
	rho, share, uniform = make([]float64, n), make([]float64, n), make([]float64, n)
	for lane := range n {
		l, g := lane/a.kvHeads, lane%a.kvHeads
		var x, y []float64
		for p, c := range a.cnt[lane] {
			if c > 0 {
				x = append(x, float64(a.obs.norm(l, g, hooks.Pos(p))))
				y = append(y, a.recv[lane][p]/c)
			}
		}
		rho[lane] = Spearman(x, y)
		share[lane], uniform[lane] = math.NaN(), math.NaN()
		if a.queries[lane] > 0 {
			share[lane] = a.share[lane] / a.queries[lane]
			uniform[lane] = a.uniform[lane] / a.queries[lane]
		}
	}
	return rho, share, uniform
}

// runAttention measures, on the uncompressed model, how key norms relate to
// the attention keys receive (Devoto et al.'s central analysis).
func (r *runner) runAttention() TaskResult {
	tr := TaskResult{Task: TaskAttention, Status: StatusOK}
	s := r.sizes
	rec, ok := r.eng.(AttentionRecorder)
	if !ok {
		tr.Status, tr.Note = StatusNA, fmt.Sprintf("runtime %s does not implement conformance.AttentionRecorder", r.name)
		r.prog.advance(float64(s.AttentionSamples*s.AttentionLength), "")
		return tr
	}
	shape := r.eng.CacheShape()
	lanes := shape.Layers * shape.KVHeads
	rhos, shares, unis := make([][]float64, lanes), make([][]float64, lanes), make([][]float64, lanes)
	for i := range s.AttentionSamples {
		smp, err := r.corp.sample(i)
		if err == nil && len(smp) < s.AttentionLength {
			err = fmt.Errorf("text sample %d has %d tokens, attention needs %d", i, len(smp), s.AttentionLength)
		}
		if err != nil {
			tr.Status, tr.Note = StatusError, err.Error()
			return tr
		}
		tr.Inputs = append(tr.Inputs, Input{ID: fmt.Sprintf("sample=%d", i), Tokens: s.AttentionLength, Sample: i})
		rho, share, uni, err := r.attentionSample(rec, shape, smp[:s.AttentionLength])
		r.prog.advance(float64(s.AttentionLength), fmt.Sprintf("attention sample=%d", i))
		if err != nil {
			tr.Status, tr.Note = StatusError, err.Error()
			if errors.Is(err, ErrNoAttention) {
				tr.Status = StatusNA
			}
			return tr
		}
		for lane := range lanes {
			rhos[lane] = append(rhos[lane], rho[lane])
			shares[lane] = append(shares[lane], share[lane])
			unis[lane] = append(unis[lane], uni[lane])
		}
	}
	res := &AttentionResult{Samples: s.AttentionSamples, Length: s.AttentionLength}
	for l := range shape.Layers {
		la := LayerAttention{Layer: l}
		var hr, hs, hu []float64
		for g := range shape.KVHeads {
			lane := l*shape.KVHeads + g
			hr = append(hr, meanFinite(rhos[lane]))
			hs = append(hs, meanFinite(shares[lane]))
			hu = append(hu, meanFinite(unis[lane]))
		}
		la.HeadSpearman, la.HeadShareLowHalf = nums(hr), nums(hs)
		la.Spearman, la.ShareLowHalf, la.ShareUniform = Num(meanFinite(hr)), Num(meanFinite(hs)), Num(meanFinite(hu))
		res.Layers = append(res.Layers, la)
	}
	tr.Attention = res
	return tr
}

func (r *runner) attentionSample(rec AttentionRecorder, shape hooks.CacheShape, tokens []int32) (rho, share, uni []float64, err error) {
	e := r.eng
	e.SetObserver(nil)
	if err := e.RemoveSequence(runSeq); err != nil {
		return nil, nil, nil, err
	}
	obs := newNormObserver(shape)
	acc := newAttnAccumulator(obs)
	e.SetObserver(obs)
	if err := rec.RecordAttention(func(b *AttentionBatch) error {
		if b.Seq != runSeq {
			return nil
		}
		return acc.add(b)
	}); err != nil {
		return nil, nil, nil, err
	}
	defer func() {
		_ = rec.RecordAttention(nil)
		e.SetObserver(nil)
		_ = e.RemoveSequence(runSeq)
	}()
	if _, err := e.Prefill(runSeq, tokens, false); err != nil {
		return nil, nil, nil, err
	}
	rho, share, uni = acc.result()
	return rho, share, uni, nil
}
