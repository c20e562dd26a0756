package llamacpp

import (
	"errors"
	"fmt"

	"github.com/kvnorm/kvnorm/hooks"
)

// Engine drives one Context of its own Model through hooks.Engine, the
// interface the conformance suite, the demo and the benchmarks use. It also
// implements hooks.PositionEvictor (through its Context), so a compressor or
// a fixed plan can be applied to it.
type Engine struct {
	m *Model
	c *Context
	o ContextOptions // as given to NewEngine (Twin opens its context with them)
	// users counts the open engines on m (the first and its twins); m is
	// closed with the last of them.
	users  *int
	closed bool
}

var (
	_ hooks.Engine          = (*Engine)(nil)
	_ hooks.PositionEvictor = (*Engine)(nil)
)

// OpenEngine loads the GGUF model at path and creates one context on it.
func OpenEngine(path string, o ContextOptions) (*Engine, error) {
	m, err := Open(path)
	if err != nil {
		return nil, err
	}
	return NewEngine(m, o)
}

// NewEngine creates one context on m; the engine owns m from then on and
// closes it with itself (also when NewEngine fails).
func NewEngine(m *Model, o ContextOptions) (*Engine, error) {
	c, err := m.NewContext(o)
	if err != nil {
		m.Close()
		return nil, err
	}
	return &Engine{m: m, c: c, o: o, users: new(1)}, nil
}

// Twin creates a second engine on e's model: a context of its own with e's
// options (its own cache and sequences, no observer), the weights not loaded
// again. An engine and its twins are used from one goroutine at a time, as
// one engine is; the model is closed with the last of them.
func (e *Engine) Twin() (*Engine, error) {
	if e.closed {
		return nil, fmt.Errorf("%w: twin of a closed engine", ErrClosed)
	}
	c, err := e.m.NewContext(e.o)
	if err != nil {
		return nil, err
	}
	*e.users++
	return &Engine{m: e.m, c: c, o: e.o, users: e.users}, nil
}

// Model and Context give access to the full llamacpp API.
func (e *Engine) Model() *Model { return e.m }

// Context is the engine's context.
func (e *Engine) Context() *Context { return e.c }

// Info describes the engine.
func (e *Engine) Info() hooks.EngineInfo {
	in := e.m.Info()
	return hooks.EngineInfo{
		Runtime: "llamacpp", Model: in.Path, Arch: in.Arch, Vocab: in.Vocab,
		Context: e.c.Capacity(), FlashAttn: e.c.FlashAttn() != FlashAttnOff,
	}
}

func (e *Engine) CacheShape() hooks.CacheShape { return e.c.CacheShape() }

func (e *Engine) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error {
	return e.c.EvictPositions(seq, positions)
}

// ReportDeferredKeys, SeqEpoch and EvictPositionsInEpoch pass a compressor
// built on the engine through to its context (hooks.DeferredKeys,
// hooks.SequenceEpochs).
func (e *Engine) ReportDeferredKeys(seq hooks.SeqID, obs hooks.Observer) error {
	return e.c.ReportDeferredKeys(seq, obs)
}

func (e *Engine) SeqEpoch(seq hooks.SeqID) uint64 { return e.c.SeqEpoch(seq) }

func (e *Engine) EvictPositionsInEpoch(seq hooks.SeqID, epoch uint64, positions []hooks.Pos) error {
	return e.c.EvictPositionsInEpoch(seq, epoch, positions)
}

func (e *Engine) Tokenize(text string, addBOS bool) ([]int32, error) {
	return e.m.Tokenize(text, addBOS)
}

func (e *Engine) Detokenize(tokens []int32) (string, error) { return e.m.Detokenize(tokens) }

func (e *Engine) SetObserver(o hooks.Observer) { e.c.SetObserver(o) }

// RecordAttention passes f the attention of every layer of every batch the
// engine decodes from now on (nil stops); see Context.RecordAttention. The
// engine's context must have flash attention off, else the error wraps
// ErrNoAttention. (conformance.AttentionRecorder is implemented on top of it
// in cmd/kvnorm, so that this package does not import the suite.)
func (e *Engine) RecordAttention(f func(*Attention) error) error { return e.c.RecordAttention(f) }

// Prefill decodes the prompt (in chunks, compressing under pressure), then
// reports PrefillDone to the observer.
func (e *Engine) Prefill(seq hooks.SeqID, tokens []int32, all bool) ([][]float32, error) {
	outs := []int{len(tokens) - 1}
	if all {
		outs = allIndices(len(tokens))
	}
	logits, err := e.c.DecodeOutputs(seq, tokens, outs)
	if err != nil {
		return nil, err
	}
	if _, err := e.c.PrefillDone(seq); err != nil {
		return nil, err
	}
	return logits, nil
}

// Decode appends tokens to seq and returns the logits of each.
func (e *Engine) Decode(seq hooks.SeqID, tokens []int32) ([][]float32, error) {
	return e.c.DecodeOutputs(seq, tokens, allIndices(len(tokens)))
}

// Live counts the cells of seq; every cell holds all layers and KV heads.
func (e *Engine) Live(seq hooks.SeqID) (int, int64, error) {
	if seq < 0 || int(seq) >= e.c.Seqs() {
		return 0, 0, fmt.Errorf("%w: sequence %d outside the context's %d sequences", ErrBadInput, seq, e.c.Seqs())
	}
	n := e.c.Cells(seq)
	sh := e.c.CacheShape()
	return n, int64(n) * int64(sh.Layers) * int64(sh.KVHeads), nil
}

func (e *Engine) RemoveSequence(seq hooks.SeqID) error { return e.c.Clear(seq) }

// Close frees the context, and the model unless a twin still uses it; it is
// safe to call twice.
func (e *Engine) Close() error {
	if e.closed {
		return nil
	}
	e.closed = true
	err := e.c.Close()
	if *e.users--; *e.users == 0 {
		err = errors.Join(err, e.m.Close())
	}
	return err
}

func allIndices(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}
