package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llama2c"
	"github.com/kvnorm/kvnorm/llamacpp"
)

func init() {
	generators["llamacpp"] = generateLlamacpp
	engines["llamacpp"] = openLlamacppEngine
}

// llamacppEngine is a llamacpp.Engine for the conformance suite: it records
// attention as a conformance.AttentionRecorder (llamacpp does not import the
// suite: its own llamacpp.Attention is translated here) and removes its
// temporary GGUF file (a converted llama2.c checkpoint) when closed.
type llamacppEngine struct {
	*llamacpp.Engine
	cleanup func()
}

var _ conformance.AttentionRecorder = (*llamacppEngine)(nil)

var _ conformance.Twinner = (*llamacppEngine)(nil)

// Twin opens a second context on e's model (llamacpp.Engine.Twin).
func (e *llamacppEngine) Twin() (hooks.Engine, error) {
	t, err := e.Engine.Twin()
	if err != nil {
		return nil, err
	}
	return &llamacppEngine{Engine: t, cleanup: func() {}}, nil
}

func (e *llamacppEngine) Close() error {
	err := e.Engine.Close()
	e.cleanup()
	return err
}

// RecordAttention implements conformance.AttentionRecorder on
// llamacpp.Engine.RecordAttention (kq_soft_max, flash attention off). A
// llama.cpp cell holds all KV heads, so every KV head gets the same cell list.
func (e *llamacppEngine) RecordAttention(f func(*conformance.AttentionBatch) error) error {
	if f == nil {
		return e.Engine.RecordAttention(nil)
	}
	return noAttention(e.Engine.RecordAttention(func(a *llamacpp.Attention) error {
		cells := make([][]hooks.Pos, a.KVHeads)
		for g := range cells {
			cells[g] = a.Cells
		}
		return f(&conformance.AttentionBatch{Layer: a.Layer, Seq: a.Seq, Queries: a.Queries,
			Heads: a.Heads, KVHeads: a.KVHeads, Cells: cells, Weights: a.Weights})
	}))
}

// Prefill and Decode report a batch whose attention cannot be recorded as
// conformance.ErrNoAttention (the task then reports n/a).
func (e *llamacppEngine) Prefill(seq hooks.SeqID, tokens []int32, all bool) ([][]float32, error) {
	out, err := e.Engine.Prefill(seq, tokens, all)
	return out, noAttention(err)
}

func (e *llamacppEngine) Decode(seq hooks.SeqID, tokens []int32) ([][]float32, error) {
	out, err := e.Engine.Decode(seq, tokens)
	return out, noAttention(err)
}

// noAttention adds conformance.ErrNoAttention to an error wrapping
// llamacpp.ErrNoAttention.
func noAttention(err error) error {
	if errors.Is(err, llamacpp.ErrNoAttention) && !errors.Is(err, conformance.ErrNoAttention) {
		return fmt.Errorf("%w: %w", conformance.ErrNoAttention, err)
	}
	return err
}

// tinyEmbd is the model width below which the conformance engine runs on
// one thread unless told otherwise (about 50M parameters).
const tinyEmbd = 768

// openLlamacppEngine opens the llama.cpp runtime for the conformance suite:
// one sequence of o.Context cells (the model's trained context when 0) in
// chunks of a quarter of the cache, flash attention on, or off when the
// suite records attention (o.Attention: llama.cpp computes the
// probabilities, kq_soft_max, only without it); o.Threads threads, or one for
// a tiny model when 0.
func openLlamacppEngine(o conformance.EngineOptions) (hooks.Engine, error) {
	logw := o.Log
	if logw == nil {
		logw = io.Discard
	}
	path, cleanup, err := ggufModel(o.Model, o.Tokenizer, logw)
	if err != nil {
		return nil, err
	}
	m, err := llamacpp.Open(path)
	if err != nil {
		cleanup()
		return nil, err
	}
	n := o.Context
	if n <= 0 {
		n = m.Info().TrainCtx
	}
	// Chunks of a quarter of the cache leave room to compress between them
	// when a prompt outgrows the cache.
	batch := max(1, min(512, n/4))
	co := llamacpp.ContextOptions{NCtx: n, NBatch: batch, Threads: o.Threads}
	if co.Threads <= 0 && m.Info().Embd < tinyEmbd {
		// ggml's threads spin at a barrier after every op: on a tiny model
		// an op takes microseconds, and with fewer free cores than threads
		// each barrier waits for a scheduler slice. stories260K sampled
		// text at 100-400 ms/token on 2 threads of a shared 2-core machine,
		// ~1 ms on one.
		co.Threads = 1
		fmt.Fprintf(logw, "llamacpp: 1 thread for a model of width %d (< %d; --threads overrides)\n", m.Info().Embd, tinyEmbd)
	}
	if o.Attention {
		co.FlashAttn = llamacpp.FlashAttnOff
		fmt.Fprintf(logw, "llamacpp: flash attention off to record attention (kq_soft_max)\n")
	}
	e, err := llamacpp.NewEngine(m, co)
	if err != nil {
		cleanup()
		return nil, err
	}
	return &llamacppEngine{Engine: e, cleanup: cleanup}, nil
}

// generateLlamacpp runs `kvnorm generate --runtime llamacpp`: the prompt is
// decoded into a llama.cpp context (in chunks when it exceeds --ctx, sized by
// prefillBatch, each after a compression under pressure has made room), the
// cache is compressed after prefill with the policy (keys streamed through
// cb_eval), then --n tokens are generated, compressing again under pressure.
func generateLlamacpp(ctx context.Context, o generateOptions) (*generateResult, error) {
	logw := o.Log
	if logw == nil {
		logw = io.Discard
	}
	path, cleanup, err := ggufModel(o.Model, o.Tokenizer, logw)
	if err != nil {
		return nil, err
	}
	defer cleanup()

	m, err := llamacpp.Open(path)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	ct, err := llamacpp.ParseCacheType(o.CacheType)
	if err != nil {
		return nil, fmt.Errorf("--cache-type: %w", err)
	}
	fa := llamacpp.FlashAttnOff
	if o.FlashAttn {
		fa = llamacpp.FlashAttnOn
	}
	prompt, err := m.Tokenize(o.Prompt, true)
	if err != nil {
		return nil, err
	}
	if len(prompt) == 0 {
		return nil, errors.New("the prompt has no tokens")
	}
	// llama.cpp pads a sequence's cells to a multiple of 256 (NewContext
	// reports the result as Capacity).
	lim := cacheLimits{Layers: m.Info().Layers, Capacity: (o.Ctx + 255) / 256 * 256}
	if lim.Capacity != o.Ctx {
		lim.Padding = "llama.cpp pads to a multiple of 256"
	}
	if err := checkPolicy(o, lim); err != nil {
		return nil, err
	}
	batch, err := prefillBatch(o, len(prompt), lim)
	if err != nil {
		return nil, err
	}
	lc, err := m.NewContext(llamacpp.ContextOptions{
		NCtx: o.Ctx, NBatch: batch, Threads: o.Threads, FlashAttn: fa, KType: ct, VType: ct,
	})
	if err != nil {
		return nil, err
	}
	defer lc.Close()
	if lc.Capacity() != lim.Capacity {
		return nil, fmt.Errorf("llamacpp: --ctx %d gave %d cells per sequence, expected %d", o.Ctx, lc.Capacity(), lim.Capacity)
	}
	var comp *adapter.Compressor
	if o.Compress {
		if comp, err = lc.EnableCompression(o.Policy); err != nil {
			return nil, err
		}
	}
	fmt.Fprintf(logw, "llamacpp: %s, %d prompt tokens, %d cells per sequence, prefill chunks of %d, cache %s, flash attention %v\n",
		m.Info().Desc, len(prompt), lc.Capacity(), batch, ct, fa)

	var sampler *llamacpp.Sampler
	if o.Temp > 0 {
		sampler = llamacpp.NewSampler(o.Temp, 0, 0, o.Seed)
	}
	g, err := lc.Generate(ctx, 0, prompt, llamacpp.GenerateOptions{MaxTokens: o.N, Sampler: sampler})
	if err != nil {
		return nil, err
	}
	res := &generateResult{
		Runtime:          "llamacpp",
		Model:            o.Model,
		Policy:           "none",
		Granularity:      o.Policy.Granularity.String(),
		Keep:             1,
		PromptTokens:     g.PromptTokens,
		KVCellsBefore:    g.CellsBefore,
		KVCellsAfter:     g.CellsAfter,
		KVBytesBefore:    int64(g.CellsBefore) * lc.CellBytes(),
		KVBytesAfter:     int64(g.CellsAfter) * lc.CellBytes(),
		GeneratedTokens:  len(g.Tokens),
		Text:             g.Text,
		PrefillMs:        ms(g.PrefillTime.Seconds()),
		DecodeTokensPerS: g.DecodeTokensPerSecond(),
	}
	if comp != nil {
		tot := comp.Totals()
		res.Policy = o.Policy.String()
		res.Keep = o.Policy.Keep
		res.Budget = o.Policy.Budget
		res.Compressions = tot.Compressions
		res.CompressMs = ms((tot.PlanTime + tot.ApplyTime).Seconds())
		fmt.Fprintf(logw, "llamacpp: policy %s: %d compressions, %d KV cells after prefill, %d at the end\n",
			o.Policy, tot.Compressions, g.CellsAfter, g.CellsEnd)
	}
	return res, nil
}

func ms(s float64) float64 { return s * 1000 }

// ggufModel returns a GGUF path for --model: the file itself when it is a
// GGUF file, else a llama2.c checkpoint converted (with --tokenizer) to a
// temporary GGUF file, removed by cleanup.
func ggufModel(model, tokenizer string, logw io.Writer) (path string, cleanup func(), err error) {
	f, err := os.Open(model)
	if err != nil {
		return "", nil, fmt.Errorf("--model: %w", err)
	}
	magic := make([]byte, 4)
	_, rerr := io.ReadFull(f, magic)
	f.Close()
	if rerr == nil && bytes.Equal(magic, []byte("GGUF")) {
		return model, func() {}, nil
	}
	if tokenizer == "" {
		return "", nil, fmt.Errorf("--model %s is not a GGUF file; a llama2.c checkpoint needs --tokenizer", model)
	}
	dir, err := os.MkdirTemp("", "kvnorm-gguf")
	if err != nil {
		return "", nil, err
	}
	out := filepath.Join(dir, filepath.Base(model)+".gguf")
	fmt.Fprintf(logw, "llamacpp: %s is not GGUF: converting it as a llama2.c checkpoint (tokenizer %s) to %s (f32)\n", model, tokenizer, out)
	if err := llama2c.ConvertFile(model, tokenizer, out, "f32"); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("--model %s: not GGUF, and as a llama2.c checkpoint: %w", model, err)
	}
	return out, func() { os.RemoveAll(dir) }, nil
}
