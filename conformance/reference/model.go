// Package reference is an independent, plain-Go forward pass of the llama
// architecture with a KV cache whose eviction semantics match those of the
// runtimes kvnorm drives. It is the oracle of the conformance suite: slow,
// simple and exact enough (float32 weights, float64 accumulation) to tell
// whether a runtime computes the same logits and the same keys, and whether
// its cache evicts the same entries.
//
// Data flow: a [Model] is loaded from a GGUF file ([LoadGGUF], [FromGGUF];
// F32, F16, BF16, Q8_0 and Q4_0 weights are dequantised to float32) or
// built from a llama2.c checkpoint ([FromCheckpoint]). [Model.NewSession]
// starts a sequence; [Session.Decode] runs tokens at given positions,
// appending one (position, key, value) entry per token to every (layer, KV
// head) list and returning the logits of every token. The eviction methods
// remove entries per (layer, head) or per position; [Session.Keys] exposes
// the live post-RoPE keys, whose L2 norms kvnorm ranks.
//
// The forward pass: RMSNorm with the file's epsilon, grouped-query attention
// (query head h reads KV head h / (heads / kv_heads)), RoPE in ggml's normal
// mode (pairs (x[2i], x[2i+1]) rotated by pos * base^(-2i/rope_dims)), a
// SiLU-gated FFN, a final RMSNorm and the classifier (output.weight, or the
// token embedding when it is absent).
package reference

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/llama2c"
)

// Errors wrapped by this package.
var (
	// ErrModel marks a model file this package cannot run: another
	// architecture, missing or misshapen tensors, unsupported options.
	ErrModel = errors.New("reference: unsupported or inconsistent model")
	// ErrInput marks invalid arguments to a Session.
	ErrInput = errors.New("reference: invalid input")
)

// Config is the shape and numerics of a model.
type Config struct {
	Layers    int // transformer blocks
	Heads     int // query heads
	KVHeads   int // key/value heads
	HeadDim   int // width of one head
	Dim       int // embedding width, Heads * HeadDim
	HiddenDim int // FFN width
	Vocab     int
	Ctx       int // trained context length (not enforced)
	// RopeDims is the number of leading dimensions of each head RoPE
	// rotates (llama.rope.dimension_count, normally HeadDim).
	RopeDims int
	// RopeBase is the RoPE frequency base theta (llama.rope.freq_base).
	RopeBase float32
	// Eps is the RMSNorm epsilon.
	Eps float32
	// TiedClassifier is true when the classifier is the token embedding.
	TiedClassifier bool
}

type layer struct {
	attnNorm, wq, wk, wv, wo, ffnNorm, w1, w2, w3 []float32
}

// Model holds float32 weights. It is read-only and safe for concurrent use
// by many sessions.
type Model struct {
	cfg      Config
	embd     []float32 // [Vocab][Dim]
	layers   []layer
	outNorm  []float32 // [Dim]
	output   []float32 // [Vocab][Dim]
	kvPerQ   int       // Heads / KVHeads
	invFreqs []float64 // RoPE inverse frequencies, RopeDims/2 of them
}

// Config returns the model's configuration.
func (m *Model) Config() Config { return m.cfg }

func (c Config) validate() error {
	switch {
	case c.Layers <= 0, c.Heads <= 0, c.KVHeads <= 0, c.HeadDim <= 0, c.HiddenDim <= 0, c.Vocab <= 0:
		return fmt.Errorf("%w: non-positive size in %+v", ErrModel, c)
	case c.Heads%c.KVHeads != 0:
		return fmt.Errorf("%w: kv heads %d do not divide heads %d", ErrModel, c.KVHeads, c.Heads)
	case c.Dim != c.Heads*c.HeadDim:
		return fmt.Errorf("%w: dim %d != heads %d * head dim %d", ErrModel, c.Dim, c.Heads, c.HeadDim)
	case c.RopeDims < 0 || c.RopeDims > c.HeadDim || c.RopeDims%2 != 0:
		return fmt.Errorf("%w: rope dims %d (head dim %d)", ErrModel, c.RopeDims, c.HeadDim)
	case !(c.RopeBase > 0) || !(c.Eps >= 0):
		return fmt.Errorf("%w: rope base %v, eps %v", ErrModel, c.RopeBase, c.Eps)
	}
	return nil
}

func (m *Model) init() error {
	if err := m.cfg.validate(); err != nil {
		return err
	}
	m.kvPerQ = m.cfg.Heads / m.cfg.KVHeads
	m.invFreqs = make([]float64, m.cfg.RopeDims/2)
	for i := range m.invFreqs {
		m.invFreqs[i] = math.Pow(float64(m.cfg.RopeBase), -float64(2*i)/float64(m.cfg.RopeDims))
	}
	return nil
}

// FromCheckpoint builds a model from a llama2.c checkpoint, sharing its
// weight slices (do not modify them). It uses llama2.c's numerics: RMSNorm
// epsilon 1e-5 and RoPE base 10000 over the whole head, the same float32
// values ToGGUF writes, so the result matches the converted GGUF F32 model
// bit for bit.
func FromCheckpoint(ck *llama2c.Checkpoint) (*Model, error) {
	c := ck.Config
	if err := c.Validate(); err != nil {
		return nil, err
	}
	m := &Model{
		cfg: Config{
			Layers: c.NLayers, Heads: c.NHeads, KVHeads: c.NKVHeads, HeadDim: c.HeadSize(), Dim: c.Dim,
			HiddenDim: c.HiddenDim, Vocab: c.VocabSize, Ctx: c.SeqLen, RopeDims: c.HeadSize(),
			RopeBase: llama2c.RopeFreqBase, Eps: llama2c.RMSNormEps, TiedClassifier: c.SharedClassifier,
		},
		embd: ck.TokenEmbedding, outNorm: ck.FinalNorm, output: ck.Classifier,
	}
	for _, l := range ck.Layers {
		m.layers = append(m.layers, layer{l.AttnNorm, l.WQ, l.WK, l.WV, l.WO, l.FFNNorm, l.W1, l.W2, l.W3})
	}
	if len(m.layers) != c.NLayers {
		return nil, fmt.Errorf("%w: checkpoint has %d layers, config %d", ErrModel, len(m.layers), c.NLayers)
	}
	if err := m.checkShapes(); err != nil {
		return nil, err
	}
	return m, m.init()
}

func (m *Model) checkShapes() error {
	c := m.cfg
	kv := c.KVHeads * c.HeadDim
	check := func(name string, v []float32, n int) error {
		if len(v) != n {
			return fmt.Errorf("%w: %s has %d values, want %d", ErrModel, name, len(v), n)
		}
		return nil
	}
	errs := []error{check("token embedding", m.embd, c.Vocab*c.Dim), check("output norm", m.outNorm, c.Dim),
		check("classifier", m.output, c.Vocab*c.Dim)}
	for i, l := range m.layers {
		p := fmt.Sprintf("layer %d ", i)
		errs = append(errs, check(p+"attn norm", l.attnNorm, c.Dim), check(p+"wq", l.wq, c.Dim*c.Dim),
			check(p+"wk", l.wk, kv*c.Dim), check(p+"wv", l.wv, kv*c.Dim), check(p+"wo", l.wo, c.Dim*c.Dim),
			check(p+"ffn norm", l.ffnNorm, c.Dim), check(p+"w1", l.w1, c.HiddenDim*c.Dim),
			check(p+"w2", l.w2, c.Dim*c.HiddenDim), check(p+"w3", l.w3, c.HiddenDim*c.Dim))
	}
	return errors.Join(errs...)
}

// LoadGGUF loads a llama-architecture GGUF model; see [FromGGUF].
func LoadGGUF(path string) (*Model, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m, err := FromGGUF(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// FromGGUF builds a model from a GGUF file with general.architecture
// "llama". It reads llama.block_count, embedding_length,
// feed_forward_length, attention.head_count, attention.head_count_kv
// (default: head_count), attention.layer_norm_rms_epsilon (required),
// rope.freq_base (default 10000, as llama.cpp), rope.dimension_count
// (default: the head size) and context_length, and rejects RoPE scaling and
// a key or value length other than the head size. Tensors must have the
// shapes llama.cpp expects; output.weight is optional (tied classifier).
func FromGGUF(f *gguf.File) (*Model, error) {
	arch, err := f.String("general.architecture")
	if err != nil {
		return nil, err
	}
	if arch != "llama" {
		return nil, fmt.Errorf("%w: architecture %q, want \"llama\"", ErrModel, arch)
	}
	geti := func(key string, def int64) (int, error) {
		if !f.Has(key) && def >= 0 {
			return int(def), nil
		}
		v, err := f.Int(key)
		if err != nil {
			return 0, err
		}
		if v < 0 || v > 1<<31 {
			return 0, fmt.Errorf("%w: %s = %d", ErrModel, key, v)
		}
		return int(v), nil
	}
	var c Config
	for _, p := range []struct {
		key string
		dst *int
		def int64
	}{
		{"llama.block_count", &c.Layers, -1},
		{"llama.embedding_length", &c.Dim, -1},
		{"llama.feed_forward_length", &c.HiddenDim, -1},
		{"llama.attention.head_count", &c.Heads, -1},
		{"llama.context_length", &c.Ctx, 0},
	} {
		if *p.dst, err = geti(p.key, p.def); err != nil {
			return nil, err
		}
	}
	if c.Heads <= 0 || c.Dim%c.Heads != 0 {
		return nil, fmt.Errorf("%w: head count %d does not divide embedding length %d", ErrModel, c.Heads, c.Dim)
	}
	c.HeadDim = c.Dim / c.Heads
	if c.KVHeads, err = geti("llama.attention.head_count_kv", int64(c.Heads)); err != nil {
		return nil, err
	}
	if c.RopeDims, err = geti("llama.rope.dimension_count", int64(c.HeadDim)); err != nil {
		return nil, err
	}
	for _, key := range []string{"llama.attention.key_length", "llama.attention.value_length"} {
		if n, err := geti(key, int64(c.HeadDim)); err != nil {
			return nil, err
		} else if n != c.HeadDim {
			return nil, fmt.Errorf("%w: %s %d differs from the head size %d", ErrModel, key, n, c.HeadDim)
		}
	}
	eps, err := f.Float("llama.attention.layer_norm_rms_epsilon")
	if err != nil {
		return nil, err
	}
	c.Eps = float32(eps)
	c.RopeBase = 10000
	if f.Has("llama.rope.freq_base") {
		b, err := f.Float("llama.rope.freq_base")
		if err != nil {
			return nil, err
		}
		c.RopeBase = float32(b)
	}
	if s, err := f.String("llama.rope.scaling.type"); err == nil && s != "none" {
		return nil, fmt.Errorf("%w: RoPE scaling %q", ErrModel, s)
	}
	if f.Has("llama.expert_count") {
		return nil, fmt.Errorf("%w: mixture of experts", ErrModel)
	}

	embdInfo, ok := f.Tensor("token_embd.weight")
	if !ok {
		return nil, fmt.Errorf("%w: no tensor token_embd.weight", ErrModel)
	}
	if len(embdInfo.Dims) != 2 {
		return nil, fmt.Errorf("%w: token_embd.weight dims %v", ErrModel, embdInfo.Dims)
	}
	c.Vocab = int(embdInfo.Dims[1])

	load := func(name string, dims ...int) ([]float32, error) {
		t, ok := f.Tensor(name)
		if !ok {
			return nil, fmt.Errorf("%w: no tensor %s", ErrModel, name)
		}
		want := make([]uint64, len(dims))
		for i, d := range dims {
			want[i] = uint64(d)
		}
		if fmt.Sprint(t.Dims) != fmt.Sprint(want) {
			return nil, fmt.Errorf("%w: tensor %s has dims %v, want %v", ErrModel, name, t.Dims, want)
		}
		return f.F32(name)
	}
	m := &Model{cfg: c}
	if err := c.validate(); err != nil {
		return nil, err
	}
	d, h, kv := c.Dim, c.HiddenDim, c.KVHeads*c.HeadDim
	if m.embd, err = load("token_embd.weight", d, c.Vocab); err != nil {
		return nil, err
	}
	if m.outNorm, err = load("output_norm.weight", d); err != nil {
		return nil, err
	}
	if _, ok := f.Tensor("output.weight"); ok {
		if m.output, err = load("output.weight", d, c.Vocab); err != nil {
			return nil, err
		}
	} else {
		m.output, m.cfg.TiedClassifier = m.embd, true
	}
	m.layers = make([]layer, c.Layers)
	for i := range m.layers {
		l := &m.layers[i]
		p := fmt.Sprintf("blk.%d.", i)
		for _, t := range []struct {
			dst  *[]float32
			name string
			dims []int
		}{
			{&l.attnNorm, "attn_norm", []int{d}},
			{&l.wq, "attn_q", []int{d, d}},
			{&l.wk, "attn_k", []int{d, kv}},
			{&l.wv, "attn_v", []int{d, kv}},
			{&l.wo, "attn_output", []int{d, d}},
			{&l.ffnNorm, "ffn_norm", []int{d}},
			{&l.w1, "ffn_gate", []int{d, h}},
			{&l.w2, "ffn_down", []int{h, d}},
			{&l.w3, "ffn_up", []int{d, h}},
		} {
			if *t.dst, err = load(p+t.name+".weight", t.dims...); err != nil {
				return nil, err
			}
		}
	}
	return m, m.init()
}

// matmul computes out[t][o] = sum_i w[o][i] * x[t][i] for every token t,
// with w row-major [rows][cols], accumulating in float64. Large products
// are split over goroutines by rows.
func matmul(out [][]float32, w []float32, x [][]float32, rows, cols int) {
	work := func(lo, hi int) {
		for o := lo; o < hi; o++ {
			row := w[o*cols : (o+1)*cols]
			for t, xt := range x {
				out[t][o] = float32(dot(row, xt))
			}
		}
	}
	workers := runtime.GOMAXPROCS(0)
	if workers == 1 || rows*cols*len(x) < 1<<18 {
		work(0, rows)
		return
	}
	var wg sync.WaitGroup
	chunk := (rows + workers - 1) / workers
	for lo := 0; lo < rows; lo += chunk {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			work(lo, hi)
		}(lo, min(lo+chunk, rows))
	}
	wg.Wait()
}

func dot(a, b []float32) float64 {
	b = b[:len(a)]
	var s0, s1 float64
	i := 0
	for ; i+1 < len(a); i += 2 {
		s0 += float64(a[i]) * float64(b[i])
		s1 += float64(a[i+1]) * float64(b[i+1])
	}
	if i < len(a) {
		s0 += float64(a[i]) * float64(b[i])
	}
	return s0 + s1
}

// rmsNorm writes w * x / sqrt(mean(x^2) + eps) to out.
func rmsNorm(out, x, w []float32, eps float32) {
	var ss float64
	for _, v := range x {
		ss += float64(v) * float64(v)
	}
	scale := 1 / math.Sqrt(ss/float64(len(x))+float64(eps))
	for i, v := range x {
		out[i] = float32(float64(w[i]) * (float64(v) * scale))
	}
}

// rope rotates the pairs (v[2i], v[2i+1]) of one head, for 2i < RopeDims,
// by pos * invFreqs[i].
func (m *Model) rope(v []float32, pos int32) {
	for i, f := range m.invFreqs {
		sin, cos := math.Sincos(float64(pos) * f)
		a, b := float64(v[2*i]), float64(v[2*i+1])
		v[2*i] = float32(a*cos - b*sin)
		v[2*i+1] = float32(a*sin + b*cos)
	}
}

func silu(x float64) float64 { return x / (1 + math.Exp(-x)) }
