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

// attnAccumulator sums, per (layer, KV head), the attention each key
// receives from a range of queries and the share of each query's attention
// (among the keys counted) on the lowest-norm half of those keys.
//
// Queries at positions in [qFrom, qTo) count; keys count when their position
// is below keyEnd and not after the query. The prompt-internal measure is
// qFrom 0, qTo = keyEnd = P (every prompt query to the earlier prompt keys);
// the decoding-phase measure, the paper's, is qFrom = keyEnd = P, qTo
// unbounded (the queries after the prompt to the prompt's keys).
type attnAccumulator struct {
	obs        *normObserver
	qFrom, qTo hooks.Pos
	keyEnd     hooks.Pos
	kvHeads    int
	recv       [][]float64 // [layer*KVHeads+head][position]
	cnt        [][]float64
	share      []float64 // [layer*KVHeads+head]
	uniform    []float64
	queries    []float64
}

func newAttnAccumulator(obs *normObserver, qFrom, qTo, keyEnd hooks.Pos) *attnAccumulator {
	n := obs.shape.Layers * obs.shape.KVHeads
	return &attnAccumulator{obs: obs, qFrom: qFrom, qTo: qTo, keyEnd: keyEnd, kvHeads: obs.shape.KVHeads, recv: make([][]float64, n), cnt: make([][]float64, n),
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
			if qp < a.qFrom || qp >= a.qTo {
				continue
			}
			vis = vis[:0]
			for c, p := range cells {
				if p >= 0 && p <= qp && p < a.keyEnd {
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
				var s, tot float64
				for _, v := range vis {
					w := float64(b.Weight(h, q, v.c))
					tot += w
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
				if tot <= 0 {
					continue
				}
				a.share[lane] += s / tot
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

// attnSample is what one sample measured: per lane, ρ, the low-half share
// and the uniform share, for the decoding phase and the prompt.
type attnSample struct {
	rho, share, uni [2][]float64 // [0] decoding, [1] prompt
}

// runAttention measures, on the uncompressed model, how key norms relate to
// the attention keys receive (Devoto et al.'s central analysis): the
// decoding-phase measure the paper states, and the prompt-internal one.
func (r *runner) runAttention() TaskResult {
	tr := TaskResult{Task: TaskAttention, Status: StatusOK}
	s := r.sizes
	cost := float64(s.AttentionLength + s.AttentionScore)
	rec, ok := r.eng.(AttentionRecorder)
	if !ok {
		tr.Status, tr.Note = StatusNA, fmt.Sprintf("runtime %s does not implement conformance.AttentionRecorder", r.name)
		r.prog.advance(float64(s.AttentionSamples)*cost, "")
		return tr
	}
	shape := r.eng.CacheShape()
	var samples []attnSample
	for i := range s.AttentionSamples {
		smp, err := r.corp.sample(i)
		if err == nil && len(smp) < s.AttentionLength+s.AttentionScore {
			err = fmt.Errorf("text sample %d has %d tokens, attention needs %d", i, len(smp), s.AttentionLength+s.AttentionScore)
		}
		if err != nil {
			tr.Status, tr.Note = StatusError, err.Error()
			return tr
		}
		tr.Inputs = append(tr.Inputs, Input{ID: fmt.Sprintf("sample=%d", i), Tokens: s.AttentionLength, Sample: i,
			Extra: Metrics{"decoded": Num(s.AttentionScore)}})
		as, err := r.attentionSample(rec, shape, smp[:s.AttentionLength], smp[s.AttentionLength:s.AttentionLength+s.AttentionScore])
		r.prog.advance(cost, fmt.Sprintf("attention sample=%d", i))
		if err != nil {
			tr.Status, tr.Note = StatusError, err.Error()
			if errors.Is(err, ErrNoAttention) {
				tr.Status = StatusNA
			}
			return tr
		}
		samples = append(samples, as)
	}
	res := &AttentionResult{Samples: s.AttentionSamples, Length: s.AttentionLength, Decode: s.AttentionScore}
	res.Layers = summariseAttention(samples, 0, shape, r.cfg.Bootstrap, mix(r.cfg.Seed, strHash(TaskAttention), 0))
	res.Prompt = summariseAttention(samples, 1, shape, r.cfg.Bootstrap, mix(r.cfg.Seed, strHash(TaskAttention), 1))
	tr.Attention = res
	return tr
}

// summariseAttention averages measure m of every sample per layer (over KV
// heads, then samples) with bootstrap intervals over samples, and per head.
func summariseAttention(samples []attnSample, m int, shape hooks.CacheShape, b int, seed uint64) []LayerAttention {
	var out []LayerAttention
	for l := range shape.Layers {
		la := LayerAttention{Layer: l}
		// Per sample: the mean over the layer's heads.
		var sr, ss, su []float64
		hr, hs := make([][]float64, shape.KVHeads), make([][]float64, shape.KVHeads)
		for _, smp := range samples {
			lo, hi := l*shape.KVHeads, (l+1)*shape.KVHeads
			sr = append(sr, meanFinite(smp.rho[m][lo:hi]))
			ss = append(ss, meanFinite(smp.share[m][lo:hi]))
			su = append(su, meanFinite(smp.uni[m][lo:hi]))
			for g := range shape.KVHeads {
				hr[g] = append(hr[g], smp.rho[m][lo+g])
				hs[g] = append(hs[g], smp.share[m][lo+g])
			}
		}
		for g := range shape.KVHeads {
			la.HeadSpearman = append(la.HeadSpearman, Num(meanFinite(hr[g])))
			la.HeadShareLowHalf = append(la.HeadShareLowHalf, Num(meanFinite(hs[g])))
		}
		la.Spearman, la.ShareLowHalf, la.ShareUniform = Num(meanFinite(sr)), Num(meanFinite(ss)), Num(meanFinite(su))
		la.SpearmanCI = sampleCI(sr, b, mix(seed, uint64(l), 0x5))
		la.ShareLowHalfCI = sampleCI(ss, b, mix(seed, uint64(l), 0x6))
		out = append(out, la)
	}
	return out
}

// attentionSample prefills prompt, then decodes cont teacher-forced, with
// attention recorded: the prefill feeds the prompt-internal measure, the
// continuation the decoding-phase one.
func (r *runner) attentionSample(rec AttentionRecorder, shape hooks.CacheShape, prompt, cont []int32) (attnSample, error) {
	e := r.eng
	e.SetObserver(nil)
	if err := e.RemoveSequence(runSeq); err != nil {
		return attnSample{}, err
	}
	P := hooks.Pos(len(prompt))
	obs := newNormObserver(shape)
	dec := newAttnAccumulator(obs, P, math.MaxInt32, P)
	prm := newAttnAccumulator(obs, 0, P, P)
	e.SetObserver(obs)
	if err := rec.RecordAttention(func(b *AttentionBatch) error {
		if b.Seq != runSeq {
			return nil
		}
		if err := prm.add(b); err != nil {
			return err
		}
		return dec.add(b)
	}); err != nil {
		return attnSample{}, err
	}
	defer func() {
		_ = rec.RecordAttention(nil)
		e.SetObserver(nil)
		_ = e.RemoveSequence(runSeq)
	}()
	if _, err := e.Prefill(runSeq, prompt, false); err != nil {
		return attnSample{}, err
	}
	if _, err := e.Decode(runSeq, cont); err != nil {
		return attnSample{}, err
	}
	var as attnSample
	as.rho[0], as.share[0], as.uni[0] = dec.result()
	as.rho[1], as.share[1], as.uni[1] = prm.result()
	return as, nil
}
