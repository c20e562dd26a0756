//go:build cgo

package ollama

import (
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/nn"
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/models/llama"

	"github.com/kvnorm/kvnorm/hooks"
)

// Recording attention (Engine.RecordAttention).
//
// Ollama v0.24.0 computes attention inside the model's forward pass:
// nn.Attention receives the roped query, the cache only keys, values and the
// mask, and with flash attention the probabilities never exist as a tensor.
// Without patching Ollama, the recorder reconstructs them from what it can
// reach through exported fields:
//
//   - the query: each layer's attn_q weight (llama.SelfAttention.Query, an
//     *nn.Linear) is replaced, while recording, by queryTap, which embeds the
//     real weight and overrides Mulmat. nn.Linear.Forward calls
//     Weight.Mulmat(ctx, hidden), so the tap sees the product; it adds the
//     bias (if the layer has one), reshapes it to [headDim, heads, tokens]
//     and applies the model's own rotary embedding (the model's Shift, the
//     function the cache re-ropes keys with, which for llama is the very
//     function its forward pass ropes queries with, with the layer's rope
//     factors), then copies the result into a tensor of its own, outside
//     the graph's allocator, where it survives the pass. The tap is only the
//     receiver of Mulmat: nothing in llama's forward pass passes the weight
//     as an argument to a ggml op (which type-asserts *ggml.Tensor).
//   - the keys: the cache's own tensors, cast to f32 in a small graph after
//     the pass, over the cells the sequence holds in each layer.
//   - the mask: the cache's layout (a cell is visible to a query when its
//     mask position is at most the query's position, as maskFor builds it).
//
// The host then computes softmax(q·k/√headDim) per query head over the
// visible cells of KV head h/(heads/kvHeads), in float64. Architectures
// other than llama (whose queries take other paths: q-norms, fused QKV,
// other scales) are refused with ErrNoAttention.

// queryTap is a layer's attn_q weight that also keeps the roped queries of
// every forward pass.
type queryTap struct {
	ml.Tensor // the real weight: every other method is its own
	rec       *recorder
	layer     int
}

// Mulmat is the real weight's product; the tap adds the roped queries'
// copy to the graph.
func (w *queryTap) Mulmat(ctx ml.Context, t ml.Tensor) ml.Tensor {
	out := w.Tensor.Mulmat(ctx, t)
	w.rec.tap(ctx, w.layer, out)
	return out
}

// recorder holds the taps of one model and the queries of the last pass.
type recorder struct {
	c              *Cache
	heads, headDim int
	scale          float64
	linears        []*nn.Linear
	orig           []ml.Tensor // the weights the taps replaced
	bufs           ml.Context
	q              []ml.Tensor // per layer: [headDim·heads·maxBatch] f32

	// The pass the taps belong to.
	batch     uint64 // Cache.batches when it was placed
	pos       ml.Tensor
	seqs      []int
	positions []int32 // as the cache numbers them
	tapped    []bool
	err       error
}

// startRecorder puts query taps on the layers of m, a model whose cache is
// c; stop removes them.
func startRecorder(m model.Model, c *Cache) (*recorder, error) {
	cfg := m.Backend().Config()
	arch := cfg.Architecture()
	lm, ok := m.(*llama.Model)
	if !ok {
		return nil, fmt.Errorf("%w: architecture %q: kvnorm reconstructs the attention of llama models only", ErrNoAttention, arch)
	}
	if c.opts.Shift == nil {
		return nil, fmt.Errorf("%w: architecture %q has no rotary embedding function (Shift)", ErrNoAttention, arch)
	}
	heads := int(cfg.Uint("attention.head_count"))
	r := &recorder{c: c, heads: heads, headDim: c.opts.HeadDim, scale: 1 / math.Sqrt(float64(c.opts.HeadDim)),
		tapped: make([]bool, c.opts.Layers)}
	if heads <= 0 || heads%c.opts.KVHeads != 0 {
		return nil, fmt.Errorf("%w: architecture %q: %d query heads for %d KV heads", ErrNoAttention, arch, heads, c.opts.KVHeads)
	}
	if len(lm.Layers) != c.opts.Layers {
		return nil, fmt.Errorf("%w: architecture %q: %d layers, the cache has %d", ErrNoAttention, arch, len(lm.Layers), c.opts.Layers)
	}
	for i := range lm.Layers {
		sa := lm.Layers[i].SelfAttention
		if sa == nil || sa.Query == nil || sa.Query.Weight == nil {
			return nil, fmt.Errorf("%w: architecture %q: layer %d has no attn_q weight", ErrNoAttention, arch, i)
		}
		if _, ok := sa.Query.Weight.(*queryTap); ok {
			return nil, fmt.Errorf("ollama: layer %d already records attention", i)
		}
		if d := sa.Query.Weight.Dim(1); d != heads*r.headDim {
			return nil, fmt.Errorf("%w: architecture %q: layer %d: attn_q gives %d values per token, want %d heads × %d",
				ErrNoAttention, arch, i, d, heads, r.headDim)
		}
		r.linears = append(r.linears, sa.Query)
	}
	r.bufs = c.backend.NewContextSize(len(r.linears))
	for i, lin := range r.linears {
		r.q = append(r.q, r.bufs.Input().Empty(ml.DTypeF32, r.headDim*heads*c.maxBatch))
		r.orig = append(r.orig, lin.Weight)
		lin.Weight = &queryTap{Tensor: lin.Weight, rec: r, layer: i}
	}
	return r, nil
}

// stop puts the real weights back and frees the query buffers.
func (r *recorder) stop() {
	for i, lin := range r.linears {
		lin.Weight = r.orig[i]
	}
	r.bufs.Close()
}

// tap adds the roped queries of layer's product out ([heads·headDim,
// tokens]) to the graph of the pass being built.
func (r *recorder) tap(ctx ml.Context, layer int, out ml.Tensor) {
	c := r.c
	if c.cur.reserve || c.lay == nil {
		return
	}
	n := c.cur.n
	if r.pos == nil || r.batch != c.batches {
		// The first layer of a new pass: the model ropes with the
		// runner's positions (the cache's minus the sequence's offset).
		r.batch, r.err = c.batches, nil
		r.seqs, r.positions = slices.Clone(c.cur.seqs), slices.Clone(c.cur.positions)
		runner := make([]int32, n)
		for j, seq := range r.seqs {
			runner[j] = r.positions[j]
			if s := c.lay.seqs[seq]; s != nil {
				runner[j] -= s.offset
			}
		}
		r.pos = ctx.Input().FromInts(runner, n)
		clear(r.tapped)
	}
	if out.Dim(0) != r.heads*r.headDim || out.Dim(1) != n || n > c.maxBatch {
		r.err = fmt.Errorf("ollama: layer %d: attn_q product is %v for a pass of %d tokens (want [%d, %d], at most %d tokens)",
			layer, out.Shape(), n, r.heads*r.headDim, n, c.maxBatch)
		return
	}
	q := out
	if b := r.linears[layer].Bias; b != nil {
		q = q.Add(ctx, b)
	}
	roped, err := c.opts.Shift(ctx, layer, q.Reshape(ctx, r.headDim, r.heads, n), r.pos)
	if err != nil {
		r.err = fmt.Errorf("ollama: layer %d: rope the queries: %w", layer, err)
		return
	}
	ctx.Forward(roped.Copy(ctx, r.q[layer].View(ctx, 0, r.headDim*r.heads*n)))
	r.tapped[layer] = true
}

// collect returns the attention of every sequence of the last pass, layer
// by layer, sequences in order of appearance within a layer.
func (r *recorder) collect() ([]*Attention, error) {
	if r.err != nil {
		return nil, r.err
	}
	c := r.c
	if r.pos == nil || r.batch != c.batches {
		return nil, errors.New("ollama: the last forward pass went through no query tap")
	}
	for l, ok := range r.tapped {
		if !ok {
			return nil, fmt.Errorf("ollama: the last forward pass did not compute layer %d's queries through attn_q", l)
		}
	}
	var order []int
	for _, seq := range r.seqs {
		if !slices.Contains(order, seq) {
			order = append(order, seq)
		}
	}
	keys, err := r.keys(order)
	if err != nil {
		return nil, err
	}
	// The queries (the key graphs above ran after the pass: reading their
	// outputs waited for it).
	ctx := c.backend.NewContext()
	defer ctx.Close()
	n := len(r.seqs)
	queries := make([][]float32, len(r.q))
	for l, qt := range r.q {
		queries[l] = qt.View(ctx, 0, r.headDim*r.heads*n).BackendGet()
	}
	var out []*Attention
	for l := range c.opts.Layers {
		for _, seq := range order {
			out = append(out, r.attention(seq, l, queries[l], keys[[2]int{seq, l}]))
		}
	}
	return out, nil
}

// keys returns the keys of the cells each of seqs holds in every layer l,
// as f32 [headDim, cells, kvHeads], by (seq, l). Each is cast in a graph of
// its own: with several outputs in one graph, the scheduler's allocator
// reused the memory of some outputs for others (measured: half the heads of
// an f16 cast came back wrong).
func (r *recorder) keys(seqs []int) (map[[2]int][]float32, error) {
	c := r.c
	out := map[[2]int][]float32{}
	for _, seq := range seqs {
		s := c.lay.seqs[seq]
		if s == nil {
			return nil, fmt.Errorf("ollama: seq %d holds no cells after its forward pass", seq)
		}
		for l := range c.opts.Layers {
			key, n := c.keys[l], s.layers[l].n()
			if key == nil || n == 0 {
				return nil, fmt.Errorf("ollama: seq %d holds no keys in layer %d after its forward pass", seq, l)
			}
			ctx := c.backend.NewContext()
			v := key.View(ctx, c.lay.slabStart(s.slab, l)*key.Stride(1),
				key.Dim(0), key.Stride(1),
				n, key.Stride(2),
				key.Dim(2))
			var t ml.Tensor
			if key.DType() == ml.DTypeF32 {
				t = v.Contiguous(ctx)
			} else {
				t = v.Cast(ctx, ml.DTypeF32)
			}
			ctx.Forward(t).Compute(t)
			out[[2]int{seq, l}] = t.Floats()
			ctx.Close()
		}
	}
	return out, nil
}

// attention computes softmax(q·k·scale) of seq's queries in layer l over
// the cells it holds, from the pass's roped queries q ([headDim, heads,
// tokens]) and the cells' keys k ([headDim, cells, kvHeads]).
func (r *recorder) attention(seq, l int, q, k []float32) *Attention {
	lc := &r.c.lay.seqs[seq].layers[l]
	kvHeads, d := r.c.opts.KVHeads, r.headDim
	nc := lc.n()
	a := &Attention{Layer: l, Seq: hooks.SeqID(seq), Heads: r.heads, KVHeads: kvHeads, Cells: make([][]hooks.Pos, kvHeads)}
	for g := range kvHeads {
		a.Cells[g] = slices.Clone(lc.head(g))
	}
	var tokens []int
	for j, s := range r.seqs {
		if s == seq {
			tokens = append(tokens, j)
			a.Queries = append(a.Queries, r.positions[j])
		}
	}
	nq := len(tokens)
	a.Weights = make([]float32, r.heads*nq*nc)
	group := r.heads / kvHeads
	logits := make([]float64, nc)
	for h := range r.heads {
		kh := k[(h/group)*nc*d : (h/group+1)*nc*d]
		for qi, j := range tokens {
			qv := q[(j*r.heads+h)*d : (j*r.heads+h+1)*d]
			qp := r.positions[j]
			best := math.Inf(-1)
			for c := range nc {
				logits[c] = math.Inf(-1)
				if lc.mask[c] > qp {
					continue
				}
				kv := kh[c*d : (c+1)*d]
				var dot float64
				for i, x := range qv {
					dot += float64(x) * float64(kv[i])
				}
				logits[c] = dot * r.scale
				best = max(best, logits[c])
			}
			var sum float64
			for c := range nc {
				if !math.IsInf(logits[c], -1) {
					logits[c] = math.Exp(logits[c] - best)
					sum += logits[c]
				} else {
					logits[c] = 0
				}
			}
			row := a.Weights[(h*nq+qi)*nc : (h*nq+qi+1)*nc]
			for c := range nc {
				row[c] = float32(logits[c] / sum)
			}
		}
	}
	return a
}

// RecordAttention makes the engine pass f the attention of every layer of
// every forward pass it decodes from now on (nil stops), after the pass's
// key norms were reported to the observer; Prefill or Decode stops and
// returns f's error when it fails. The probabilities are reconstructed
// from the pass's queries and the cache's keys (record.go), with flash
// attention on or off. It returns an error wrapping ErrNoAttention for an
// architecture other than llama.
func (e *Engine) RecordAttention(f func(*Attention) error) error {
	if f == nil {
		e.attn = nil
		if e.rec != nil {
			e.rec.stop()
			e.rec = nil
		}
		return nil
	}
	if e.s.closed {
		return errors.New("ollama: engine is closed")
	}
	if e.rec == nil {
		r, err := startRecorder(e.s.m, e.c)
		if err != nil {
			return err
		}
		e.rec = r
	}
	e.attn = f
	return nil
}

// reportAttention reports the keys of the last pass, then passes its
// attention to the recorder's callback.
func (e *Engine) reportAttention() error {
	if err := e.c.report(true); err != nil {
		return err
	}
	batches, err := e.rec.collect()
	if err != nil {
		return err
	}
	for _, b := range batches {
		if err := e.attn(b); err != nil {
			return err
		}
	}
	return nil
}
