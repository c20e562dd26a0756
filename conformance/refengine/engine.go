// Package refengine runs the pure-Go reference forward pass
// (conformance/reference) behind hooks.Engine, so the conformance suite can
// drive it exactly as it drives llama.cpp or Ollama.
//
// Data flow: Prefill and Decode cut the tokens into batches; before a batch
// that would not fit in the context the engine calls the observer's
// CachePressure; each batch runs through reference.Session.Decode, then the
// engine reports the batch's post-RoPE keys of every layer to the observer
// (as f32 keys, or as norms with Options.Norms) and, when attention is
// recorded, the attention probabilities of every layer; Prefill ends with
// PrefillDone. The observer (an adapter.Compressor) applies its plans back
// through EvictPositions (per-token plans) or CompactHeads (per-head plans),
// which remove entries from the reference cache with the runtimes' semantics:
// kept entries keep their positions, the next token goes after the highest.
//
// An Engine is not safe for concurrent use: the observer calls back into it
// (EvictPositions, CompactHeads) from within Prefill and Decode.
package refengine

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/conformance/reference"
	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
	"github.com/kvnorm/kvnorm/llama2c"
)

// ErrContextFull is returned when a batch does not fit in a sequence's
// context and no observer freed room for it.
var ErrContextFull = errors.New("refengine: context full")

// Options configure an Engine.
type Options struct {
	// Context is the number of cells per (layer, KV head) lane of a
	// sequence; 0 uses the model's trained context.
	Context int
	// Batch is the largest number of tokens decoded in one forward batch;
	// 0 means 512.
	Batch int
	// Norms makes the engine report per-head key norms instead of f32 keys
	// (both paths of the hooks contract are then exercised).
	Norms bool
}

// Engine is the reference forward pass as a hooks.Engine. It implements
// hooks.PositionEvictor, hooks.HeadCompactor and
// conformance.AttentionRecorder.
type Engine struct {
	m     *reference.Model
	tok   *llama2c.Tokenizer
	opts  Options
	info  hooks.EngineInfo
	shape hooks.CacheShape
	obs   hooks.Observer
	attn  func(*conformance.AttentionBatch) error
	seqs  map[hooks.SeqID]*reference.Session

	keyBuf  []float32
	normBuf []float32
	closed  bool
}

var (
	_ hooks.Engine                  = (*Engine)(nil)
	_ hooks.PositionEvictor         = (*Engine)(nil)
	_ hooks.HeadCompactor           = (*Engine)(nil)
	_ conformance.AttentionRecorder = (*Engine)(nil)
)

// Factory opens the reference runtime for the conformance suite: it is the
// conformance.EngineFactory registered as "reference".
func Factory(o conformance.EngineOptions) (hooks.Engine, error) {
	return Open(o.Model, o.Tokenizer, Options{Context: o.Context})
}

// Open loads a model for the reference forward pass: a GGUF file (its
// tokenizer comes from the file unless tokenizer names a llama2.c tokenizer)
// or a llama2.c checkpoint with its llama2.c tokenizer.
func Open(model, tokenizer string, o Options) (*Engine, error) {
	head := make([]byte, 4)
	f, err := os.Open(model)
	if err != nil {
		return nil, fmt.Errorf("refengine: %w", err)
	}
	_, err = io.ReadFull(f, head)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("refengine: %s: %w", model, err)
	}
	var (
		m   *reference.Model
		tok *llama2c.Tokenizer
	)
	if bytes.Equal(head, []byte("GGUF")) {
		gf, err := gguf.Open(model)
		if err != nil {
			return nil, err
		}
		defer gf.Close()
		if m, err = reference.FromGGUF(gf); err != nil {
			return nil, fmt.Errorf("%s: %w", model, err)
		}
		if tokenizer == "" {
			if tok, err = llama2c.TokenizerFromGGUF(gf); err != nil {
				return nil, fmt.Errorf("%s: tokenizer: %w", model, err)
			}
		}
	} else {
		if tokenizer == "" {
			return nil, fmt.Errorf("refengine: %s is not a GGUF file; a llama2.c checkpoint needs --tokenizer", model)
		}
		ck, err := llama2c.ReadCheckpoint(model)
		if err != nil {
			return nil, err
		}
		if m, err = reference.FromCheckpoint(ck); err != nil {
			return nil, err
		}
	}
	if tok == nil {
		if tok, err = llama2c.ReadTokenizer(tokenizer, m.Config().Vocab); err != nil {
			return nil, err
		}
	}
	return New(m, tok, model, o)
}

// New wraps a loaded model and its tokenizer; name is reported as the model.
func New(m *reference.Model, tok *llama2c.Tokenizer, name string, o Options) (*Engine, error) {
	c := m.Config()
	if tok.VocabSize() != c.Vocab {
		return nil, fmt.Errorf("refengine: tokenizer has %d pieces, model vocab is %d", tok.VocabSize(), c.Vocab)
	}
	if o.Context < 0 || o.Batch < 0 {
		return nil, fmt.Errorf("refengine: context=%d, batch=%d must be >= 0", o.Context, o.Batch)
	}
	if o.Context == 0 {
		o.Context = c.Ctx
	}
	if o.Context <= 0 {
		return nil, fmt.Errorf("refengine: the model states no context length: set Options.Context")
	}
	if o.Batch == 0 {
		o.Batch = 512
	}
	e := &Engine{
		m: m, tok: tok, opts: o, seqs: map[hooks.SeqID]*reference.Session{},
		info: hooks.EngineInfo{Runtime: "reference", Model: name, Arch: "llama", Vocab: c.Vocab, Context: o.Context},
		shape: hooks.CacheShape{Layers: c.Layers, KVHeads: c.KVHeads, HeadDim: c.HeadDim,
			KType: kernels.F32, VType: kernels.F32, Capacity: o.Context},
	}
	return e, e.shape.Validate()
}

// CacheShape implements hooks.Runtime.
func (e *Engine) CacheShape() hooks.CacheShape { return e.shape }

// Info implements hooks.Engine.
func (e *Engine) Info() hooks.EngineInfo { return e.info }

// Model returns the reference model.
func (e *Engine) Model() *reference.Model { return e.m }

// Session returns the reference session holding seq's cache (nil when seq
// has none), for tests that inspect what was evicted.
func (e *Engine) Session(seq hooks.SeqID) *reference.Session { return e.seqs[seq] }

// Tokenize implements hooks.Engine.
func (e *Engine) Tokenize(text string, addBOS bool) ([]int32, error) {
	return e.tok.Encode(text, addBOS), nil
}

// Detokenize implements hooks.Engine.
func (e *Engine) Detokenize(tokens []int32) (string, error) { return e.tok.Decode(tokens), nil }

// SetObserver implements hooks.Engine.
func (e *Engine) SetObserver(o hooks.Observer) { e.obs = o }

// RecordAttention implements conformance.AttentionRecorder.
func (e *Engine) RecordAttention(f func(*conformance.AttentionBatch) error) error {
	e.attn = f
	for _, s := range e.seqs {
		s.RecordAttention = f != nil
	}
	return nil
}

// Prefill implements hooks.Engine.
func (e *Engine) Prefill(seq hooks.SeqID, tokens []int32, all bool) ([][]float32, error) {
	if len(tokens) == 0 {
		return nil, fmt.Errorf("refengine: prefill of seq %d: empty prompt", seq)
	}
	logits, err := e.run(seq, tokens, all)
	if err != nil {
		return nil, err
	}
	if e.obs != nil {
		if _, err := e.obs.PrefillDone(seq); err != nil {
			return nil, fmt.Errorf("refengine: prefill done (seq %d): %w", seq, err)
		}
	}
	return logits, nil
}

// Decode implements hooks.Engine.
func (e *Engine) Decode(seq hooks.SeqID, tokens []int32) ([][]float32, error) {
	return e.run(seq, tokens, true)
}

func (e *Engine) run(seq hooks.SeqID, tokens []int32, all bool) ([][]float32, error) {
	if e.closed {
		return nil, errors.New("refengine: engine closed")
	}
	s := e.seqs[seq]
	if s == nil {
		s = e.m.NewSession()
		s.RecordAttention = e.attn != nil
		e.seqs[seq] = s
	}
	var out [][]float32
	for off := 0; off < len(tokens); {
		n := min(e.opts.Batch, len(tokens)-off, e.opts.Context)
		used := e.maxLane(s)
		if used+n > e.opts.Context {
			// Feed a long prompt in chunks small enough for compression
			// under pressure to make room for them.
			n = min(n, max(1, e.opts.Context/2))
		}
		if used+n > e.opts.Context {
			if e.obs == nil {
				return nil, fmt.Errorf("%w: seq %d holds %d of %d cells, %d incoming (no observer to compress)", ErrContextFull, seq, used, e.opts.Context, n)
			}
			if _, err := e.obs.CachePressure(seq, e.opts.Context-used, n); err != nil {
				return nil, fmt.Errorf("refengine: cache pressure (seq %d): %w", seq, err)
			}
			if used = e.maxLane(s); used+n > e.opts.Context {
				return nil, fmt.Errorf("%w: seq %d still holds %d of %d cells after compression, %d incoming", ErrContextFull, seq, used, e.opts.Context, n)
			}
		}
		batch := tokens[off : off+n]
		logits, err := s.Decode(batch, nil)
		if err != nil {
			return nil, err
		}
		if err := e.report(seq, s, n); err != nil {
			return nil, err
		}
		if all {
			out = append(out, logits...)
		} else if off+n == len(tokens) {
			out = append(out, logits[n-1])
		}
		off += n
	}
	return out, nil
}

func (e *Engine) maxLane(s *reference.Session) int {
	used := 0
	for l := range e.shape.Layers {
		for h := range e.shape.KVHeads {
			used = max(used, s.LaneLen(l, h))
		}
	}
	return used
}

// report sends the keys (or norms) of the last n decoded tokens of every
// layer to the observer, then the attention of every layer to the recorder.
func (e *Engine) report(seq hooks.SeqID, s *reference.Session, n int) error {
	sh := e.shape
	if e.obs != nil {
		seqs := make([]hooks.SeqID, n)
		for i := range seqs {
			seqs[i] = seq
		}
		e.keyBuf = slices.Grow(e.keyBuf[:0], n*sh.KVHeads*sh.HeadDim)[:n*sh.KVHeads*sh.HeadDim]
		for l := range sh.Layers {
			var positions []hooks.Pos
			for h := range sh.KVHeads {
				pos, keys, err := s.TailKeys(l, h, n)
				if err != nil {
					return err
				}
				positions = pos
				// ggml layout: token-major, then head, then the key.
				for t := range n {
					copy(e.keyBuf[(t*sh.KVHeads+h)*sh.HeadDim:], keys[t*sh.HeadDim:(t+1)*sh.HeadDim])
				}
			}
			b := &hooks.KeyBatch{Layer: l, Seqs: seqs, Positions: positions, DType: kernels.F32}
			if e.opts.Norms {
				e.normBuf = slices.Grow(e.normBuf[:0], n*sh.KVHeads)[:n*sh.KVHeads]
				if err := kernels.NormsF32(e.normBuf, e.keyBuf, sh.HeadDim); err != nil {
					return err
				}
				b.Norms = e.normBuf
			} else {
				b.Keys = hooks.F32Bytes(e.keyBuf)
			}
			if err := e.obs.ObserveKeys(b); err != nil {
				return fmt.Errorf("refengine: observe keys of layer %d: %w", l, err)
			}
		}
	}
	if e.attn != nil {
		for l := range sh.Layers {
			if err := e.attn(e.attention(seq, s, l, n)); err != nil {
				return err
			}
		}
	}
	return nil
}

// attention lays the recorded attention of the last n tokens in layer l out
// as an AttentionBatch.
func (e *Engine) attention(seq hooks.SeqID, s *reference.Session, l, n int) *conformance.AttentionBatch {
	c := e.m.Config()
	b := &conformance.AttentionBatch{Layer: l, Seq: seq, Heads: c.Heads, KVHeads: c.KVHeads, Cells: make([][]hooks.Pos, c.KVHeads)}
	for g := range b.Cells {
		b.Cells[g] = s.LivePositions(l, g)
	}
	cells := len(b.Cells[0])
	b.Queries, _, _ = s.TailKeys(l, 0, n)
	b.Weights = make([]float32, c.Heads*n*cells)
	group := c.Heads / c.KVHeads
	for h := range c.Heads {
		lane := b.Cells[h/group]
		for q := range n {
			a, _ := s.LastAttention(q, l, h)
			row := b.Weights[(h*n+q)*cells : (h*n+q+1)*cells]
			// a lists a subsequence of the lane, in cache order.
			k := 0
			for i, p := range a.Positions {
				for k < len(lane) && lane[k] != p {
					k++
				}
				if k < len(lane) {
					row[k] = a.Weights[i]
				}
			}
		}
	}
	return b
}

// EvictPositions implements hooks.PositionEvictor: it removes the positions
// from every layer and KV head of seq.
func (e *Engine) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error {
	s := e.seqs[seq]
	if s == nil {
		return fmt.Errorf("%w: seq %d", hooks.ErrUnknownSequence, seq)
	}
	if last := s.NextPos() - 1; slices.Contains(positions, last) {
		return fmt.Errorf("refengine: evict seq %d: the plan lists the last position %d", seq, last)
	}
	s.EvictPositions(positions)
	return nil
}

// CompactHeads implements hooks.HeadCompactor: each planned (layer, KV head)
// keeps exactly the plan's positions, which must all be live there.
func (e *Engine) CompactHeads(plan *hooks.HeadPlan) error {
	if plan == nil {
		return errors.New("refengine: nil head plan")
	}
	s := e.seqs[plan.Seq]
	if s == nil {
		return fmt.Errorf("%w: seq %d", hooks.ErrUnknownSequence, plan.Seq)
	}
	if len(plan.Layers) > e.shape.Layers {
		return fmt.Errorf("refengine: head plan of seq %d has %d layers, the model %d", plan.Seq, len(plan.Layers), e.shape.Layers)
	}
	masks := make([][][]bool, len(plan.Layers))
	for l, heads := range plan.Layers {
		if heads == nil {
			continue
		}
		if len(heads) != e.shape.KVHeads {
			return fmt.Errorf("refengine: head plan of seq %d, layer %d: %d heads, want %d", plan.Seq, l, len(heads), e.shape.KVHeads)
		}
		masks[l] = make([][]bool, len(heads))
		for h, keep := range heads {
			if len(keep) != len(heads[0]) {
				return fmt.Errorf("refengine: head plan of seq %d, layer %d: head %d keeps %d, head 0 keeps %d", plan.Seq, l, h, len(keep), len(heads[0]))
			}
			lane := s.LivePositions(l, h)
			mask := make([]bool, len(lane))
			for _, p := range keep {
				i, ok := slices.BinarySearch(lane, p) // lanes stay ascending
				if !ok {
					return fmt.Errorf("refengine: head plan of seq %d keeps position %d, not live in layer %d head %d", plan.Seq, p, l, h)
				}
				mask[i] = true
			}
			masks[l][h] = mask
		}
	}
	// Validated: apply.
	for l, heads := range masks {
		for h, mask := range heads {
			if _, err := s.KeepHead(l, h, mask); err != nil {
				return err
			}
		}
	}
	return nil
}

// Live implements hooks.Engine.
func (e *Engine) Live(seq hooks.SeqID) (int, int64, error) {
	s := e.seqs[seq]
	if s == nil {
		return 0, 0, nil
	}
	p, n := s.LiveCount()
	return p, n, nil
}

// RemoveSequence implements hooks.Engine; the observer forgets seq too.
func (e *Engine) RemoveSequence(seq hooks.SeqID) error {
	delete(e.seqs, seq)
	if e.obs != nil {
		e.obs.Forget(seq, 0, -1)
	}
	return nil
}

// Close implements hooks.Engine; it is safe to call twice.
func (e *Engine) Close() error {
	e.closed = true
	e.seqs = nil
	return nil
}
