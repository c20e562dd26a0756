//go:build cgo

package ollama

import (
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/hooks"
)

// EngineMaxContext caps the context OpenEngine chooses from the model's
// trained context when Config.Context is 0 (a 128K-token model would
// otherwise allocate its whole cache).
const EngineMaxContext = 4096

// Engine drives a Session of Ollama's Go engine through hooks.Engine, the
// interface of the conformance suite, the demo and the cross-runtime tests.
// Its cache reports key norms to the observer set with SetObserver (normally
// an adapter.Compressor built on the Engine): the norms of every batch are
// read back before Prefill or Decode returns, Prefill ends with PrefillDone,
// and a batch that would not fit calls CachePressure first. Plans come back
// through CompactHeads (per head) or EvictPositions (per token, applied as
// the same keep set in every head).
//
// An Engine is not safe for concurrent use: the observer calls back into it
// from within Prefill and Decode.
type Engine struct {
	s    *Session
	c    *Cache
	obs  hooks.Observer
	info hooks.EngineInfo
	// rec and attn record attention (record.go) while attn is set.
	rec  *recorder
	attn func(*Attention) error
}

var (
	_ hooks.Engine          = (*Engine)(nil)
	_ hooks.HeadCompactor   = (*Engine)(nil)
	_ hooks.PositionEvictor = (*Engine)(nil)
)

// OpenEngine loads a GGUF model into Ollama's Go engine with kvnorm's cache,
// without a policy of its own (cfg.Policy must be nil: compression comes
// from the observer). Config.Context 0 means the model's trained context,
// at most EngineMaxContext; the other fields default as for Open (f16
// cache, flash attention as set, one thread, batches of 512).
func OpenEngine(path string, cfg Config) (*Engine, error) {
	if cfg.Policy != nil || cfg.Upstream {
		return nil, errors.New("ollama: OpenEngine: compression comes from the observer (SetObserver): leave Config.Policy nil and Upstream off")
	}
	if cfg.Context == 0 {
		cfg.Context = min(trainedContext(path), EngineMaxContext)
	}
	cfg.Observe, cfg.Pipelined = true, false
	s, err := Open(path, cfg)
	if err != nil {
		return nil, err
	}
	e := &Engine{s: s, c: s.cache}
	e.info = hooks.EngineInfo{Runtime: "ollama", Model: path, Arch: s.Architecture(), Vocab: s.VocabSize(),
		Context: s.capacity, FlashAttn: cfg.FlashAttention}
	if err := e.c.CacheShape().Validate(); err != nil {
		s.Close()
		return nil, err
	}
	return e, nil
}

// Twin opens a second engine on e's loaded model (Session.Twin): the weights
// are shared, not loaded again; the twin has a cache of its own, as large and
// of the same type as e's, and no observer. An engine and its twins are used
// from one goroutine at a time, as one engine is; the model is freed when the
// last of them is closed. The paired decode of `kvnorm bench e2e` compares a
// compressed engine with its uncompressed twin, so that the two differ only
// in their caches.
func (e *Engine) Twin() (*Engine, error) {
	s, err := e.s.Twin()
	if err != nil {
		return nil, err
	}
	return &Engine{s: s, c: s.cache, info: e.info}, nil
}

// trainedContext reads <arch>.context_length from the GGUF file (512 when
// it cannot).
func trainedContext(path string) int {
	const fallback = 512
	f, err := gguf.Open(path)
	if err != nil {
		return fallback
	}
	defer f.Close()
	arch, err := gguf.Get[string](f, "general.architecture")
	if err != nil {
		return fallback
	}
	v, ok := f.Value(arch + ".context_length")
	if !ok {
		return fallback
	}
	var n int64
	switch x := v.(type) {
	case uint32:
		n = int64(x)
	case uint64:
		n = int64(min(x, math.MaxInt32))
	case int32:
		n = int64(x)
	case int64:
		n = x
	default:
		return fallback
	}
	if n <= 0 {
		return fallback
	}
	return int(n)
}

// Session returns the engine's session (for inspection; the engine expects
// to be its only user).
func (e *Engine) Session() *Session { return e.s }

// Cache returns the engine's cache.
func (e *Engine) Cache() *Cache { return e.c }

// SetModelName sets the model name Info reports (default: the path).
func (e *Engine) SetModelName(name string) { e.info.Model = name }

// Info describes the engine (hooks.Engine).
func (e *Engine) Info() hooks.EngineInfo { return e.info }

// CacheShape describes the cache (hooks.Runtime).
func (e *Engine) CacheShape() hooks.CacheShape { return e.c.CacheShape() }

// Tokenize encodes text as llama.cpp does (see Session.Tokenize).
func (e *Engine) Tokenize(text string, addBOS bool) ([]int32, error) {
	return e.s.Tokenize(text, addBOS)
}

// Detokenize decodes ids.
func (e *Engine) Detokenize(tokens []int32) (string, error) { return e.s.Detokenize(tokens) }

// SetObserver attaches o to the cache (nil detaches).
func (e *Engine) SetObserver(o hooks.Observer) {
	e.obs = o
	e.c.SetObserver(o)
}

// Prefill decodes the prompt into seq after its highest position, in chunks
// when it is longer than the cache (compressed under pressure by the
// observer), then reports PrefillDone.
func (e *Engine) Prefill(seq hooks.SeqID, tokens []int32, all bool) ([][]float32, error) {
	if len(tokens) == 0 {
		return nil, fmt.Errorf("ollama: prefill of seq %d: empty prompt", seq)
	}
	rows, err := e.run(seq, tokens, all, true)
	if err != nil {
		return nil, err
	}
	if e.obs != nil {
		if _, err := e.obs.PrefillDone(seq); err != nil {
			return nil, fmt.Errorf("ollama: prefill done (seq %d): %w", seq, err)
		}
	}
	return rows, nil
}

// Decode appends tokens to seq and returns the logits of each.
func (e *Engine) Decode(seq hooks.SeqID, tokens []int32) ([][]float32, error) {
	if len(tokens) == 0 {
		return nil, fmt.Errorf("ollama: decode of seq %d: no tokens", seq)
	}
	// The norms of decoded tokens stay in the cache until a compression
	// needs them (ReportDeferredKeys, or the cache's pressure path):
	// reading them back at every step cost 7% of decode throughput.
	return e.run(seq, tokens, true, false)
}

// ReportDeferredKeys reads back every norm the cache has not reported yet,
// so that the observer has seen every key before it plans; the compressor
// calls it before every plan (hooks.DeferredKeys).
func (e *Engine) ReportDeferredKeys(hooks.SeqID, hooks.Observer) error {
	if e.s.closed {
		return errors.New("ollama: engine is closed")
	}
	if e.c.inPressure {
		return nil // the cache reported what is computed before asking
	}
	return e.c.Flush()
}

var _ hooks.DeferredKeys = (*Engine)(nil)

func (e *Engine) run(seq hooks.SeqID, tokens []int32, all, flush bool) ([][]float32, error) {
	if e.s.closed {
		return nil, errors.New("ollama: engine is closed")
	}
	if seq < 0 {
		return nil, fmt.Errorf("ollama: negative sequence %d", seq)
	}
	vocab := int32(e.s.VocabSize())
	for i, t := range tokens {
		if t < 0 || t >= vocab {
			return nil, fmt.Errorf("ollama: token %d (index %d) outside the vocabulary of %d", t, i, vocab)
		}
	}
	capacity := e.s.capacity
	var out [][]float32
	for off := 0; off < len(tokens); {
		// Chunks small enough for compression under pressure to make room
		// for them (the observer's policy is not known here: it keeps at
		// least the last position).
		n := chunkSize(min(e.s.batch, len(tokens)-off), len(tokens)-off, capacity, e.s.used(int(seq)), 1, false)
		var outs []int32
		switch {
		case all:
			outs = make([]int32, n)
			for i := range outs {
				outs[i] = int32(i)
			}
		case off+n == len(tokens):
			outs = []int32{int32(n - 1)}
		}
		rows, err := e.s.forwardRows(int(seq), tokens[off:off+n], outs)
		if err != nil {
			return nil, err
		}
		if e.attn != nil {
			if err := e.reportAttention(); err != nil {
				return nil, err
			}
		}
		out = append(out, rows...)
		off += n
	}
	// A prompt's norms are read back now, so the observer has seen every key
	// when Prefill reports PrefillDone.
	if flush {
		if err := e.c.Flush(); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// CompactHeads keeps the plan's positions in each planned layer and head
// (hooks.HeadCompactor).
func (e *Engine) CompactHeads(plan *hooks.HeadPlan) error { return e.c.CompactHeads(plan) }

// EvictPositions frees the positions from every layer and KV head of seq
// (hooks.PositionEvictor): each head keeps what it holds minus positions.
// A layer compacted per head whose heads hold different numbers of the
// positions cannot stay rectangular: that is an error.
func (e *Engine) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error {
	if e.c.lay == nil || e.c.lay.seqs[int(seq)] == nil {
		return fmt.Errorf("%w: seq %d holds no cells", hooks.ErrUnknownSequence, seq)
	}
	s := e.c.lay.seqs[int(seq)]
	if last := s.last(); slices.Contains(positions, last) {
		return fmt.Errorf("ollama: evict seq %d: the plan lists the last position %d", seq, last)
	}
	evict := make(map[hooks.Pos]bool, len(positions))
	for _, p := range positions {
		evict[p] = true
	}
	sh := e.c.CacheShape()
	plan := &hooks.HeadPlan{Seq: seq, Layers: make([][][]hooks.Pos, sh.Layers)}
	for l := range sh.Layers {
		heads := make([][]hooks.Pos, sh.KVHeads)
		changed := false
		for h := range heads {
			held := e.c.HeadPositions(int(seq), l, h)
			keep := make([]hooks.Pos, 0, len(held))
			for _, p := range held {
				if !evict[p] {
					keep = append(keep, p)
				}
			}
			slices.Sort(keep)
			changed = changed || len(keep) != len(held)
			if h > 0 && len(keep) != len(heads[0]) {
				return fmt.Errorf("%w: evict seq %d: layer %d, compacted per head, would keep %d positions in head 0 and %d in head %d",
					ErrPlan, seq, l, len(heads[0]), len(keep), h)
			}
			heads[h] = keep
		}
		if changed {
			plan.Layers[l] = heads
		}
	}
	return e.c.CompactHeads(plan)
}

// Live returns the distinct positions of seq held by any head and its
// (layer, head, position) entries.
func (e *Engine) Live(seq hooks.SeqID) (int, int64, error) {
	u := e.c.Usage(int(seq))
	return u.Positions, u.Entries, nil
}

// RemoveSequence frees every cell of seq; the observer forgets it.
func (e *Engine) RemoveSequence(seq hooks.SeqID) error {
	if err := e.c.Remove(int(seq), 0, math.MaxInt32); err != nil {
		return err
	}
	delete(e.s.next, int(seq))
	return nil
}

// Close frees the model and its cache; it is safe to call twice.
func (e *Engine) Close() error {
	_ = e.RecordAttention(nil)
	return e.s.Close()
}
