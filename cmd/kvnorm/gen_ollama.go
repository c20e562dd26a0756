package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llama2c"
	"github.com/kvnorm/kvnorm/ollama"
)

func init() {
	generators["ollama"] = generateOllama
	engines["ollama"] = openOllamaEngine
	localOllamaModel = smallestOllamaModel
}

// smallestOllamaModel returns the smallest model of the local Ollama store
// whose architecture kvnorm's Ollama cache supports (and llama.cpp runs), or
// "" when there is none.
func smallestOllamaModel() (name, path string) {
	ms, err := ollama.LocalModels()
	if err != nil {
		return "", ""
	}
	for _, m := range ms {
		if m.Supported {
			return m.Name, m.Path
		}
	}
	return "", ""
}

// ollamaEngine is an ollama.Engine for the conformance suite: it records
// attention as a conformance.AttentionRecorder (ollama does not import the
// suite: its own ollama.Attention is translated here) and removes its
// temporary GGUF file (a converted llama2.c checkpoint) when closed.
type ollamaEngine struct {
	*ollama.Engine
	cleanup func()
}

var _ conformance.AttentionRecorder = (*ollamaEngine)(nil)

// RecordAttention implements conformance.AttentionRecorder on
// ollama.Engine.RecordAttention (probabilities reconstructed from the
// pass's queries and the cache's keys; llama models only).
func (e *ollamaEngine) RecordAttention(f func(*conformance.AttentionBatch) error) error {
	if f == nil {
		return e.Engine.RecordAttention(nil)
	}
	err := e.Engine.RecordAttention(func(a *ollama.Attention) error {
		return f(&conformance.AttentionBatch{Layer: a.Layer, Seq: a.Seq, Queries: a.Queries,
			Heads: a.Heads, KVHeads: a.KVHeads, Cells: a.Cells, Weights: a.Weights})
	})
	if errors.Is(err, ollama.ErrNoAttention) {
		return fmt.Errorf("%w: %w", conformance.ErrNoAttention, err)
	}
	return err
}

var _ conformance.Twinner = (*ollamaEngine)(nil)

// Twin opens a second engine on e's model (ollama.Engine.Twin): the weights
// are not loaded again.
func (e *ollamaEngine) Twin() (hooks.Engine, error) {
	t, err := e.Engine.Twin()
	if err != nil {
		return nil, err
	}
	return &ollamaEngine{Engine: t, cleanup: func() {}}, nil
}

func (e *ollamaEngine) Close() error {
	err := e.Engine.Close()
	e.cleanup()
	return err
}

// openOllamaEngine opens Ollama's Go engine with kvnorm's cache for the
// conformance suite and the demo: one sequence of o.Context cells (the
// model's trained context, at most ollama.EngineMaxContext, when 0), an f16
// cache and flash attention on, as the llama.cpp engine. It applies per-head
// and per-token plans (hooks.HeadCompactor, hooks.PositionEvictor) and
// records attention (llama models) with flash attention on: the
// probabilities are computed from the queries and the cached keys, not read
// from Ollama's attention kernel, so o.Attention changes nothing.
func openOllamaEngine(o conformance.EngineOptions) (hooks.Engine, error) {
	logw := o.Log
	if logw == nil {
		logw = io.Discard
	}
	path, cleanup, err := ollamaModelPath(o.Model, o.Tokenizer, logw)
	if err != nil {
		return nil, err
	}
	// Ollama's engine logs through slog's default logger (model loading):
	// keep only its warnings, on the log writer. The engine is used from one
	// goroutine at a time, so the default logger is not restored.
	slog.SetDefault(slog.New(slog.NewTextHandler(logw, &slog.HandlerOptions{Level: slog.LevelWarn})))
	e, err := ollama.OpenEngine(path, ollama.Config{Context: o.Context, Threads: o.Threads, FlashAttention: true,
		Logger: slog.New(slog.NewTextHandler(logw, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		cleanup()
		return nil, err
	}
	e.SetModelName(o.Model)
	return &ollamaEngine{Engine: e, cleanup: cleanup}, nil
}

// generateOllama runs `kvnorm generate --runtime ollama`: Ollama's Go engine
// with kvnorm's cache, per-head (the paper) or per-token.
func generateOllama(ctx context.Context, o generateOptions) (*generateResult, error) {
	path, cleanup, err := ollamaModelPath(o.Model, o.Tokenizer, o.Log)
	if err != nil {
		return nil, err
	}
	defer cleanup()

	// Ollama's engine logs through slog's default logger: keep its notes
	// on the log writer, warnings only.
	prev := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(o.Log, &slog.HandlerOptions{Level: slog.LevelWarn})))
	defer slog.SetDefault(prev)

	// Settings the model cannot use are refused before it loads (its
	// layers come from the GGUF header); the prefill chunk depends on the
	// prompt's length, known once its tokenizer is loaded: the session opens
	// with the batch of a prompt that fits and lowers it for a longer one.
	layers, err := ggufLayers(path)
	if err != nil {
		return nil, err
	}
	lim := cacheLimits{Layers: layers, Capacity: o.Ctx}
	if err := checkPolicy(o, lim); err != nil {
		return nil, err
	}
	openBatch, err := prefillBatch(o, 0, lim)
	if err != nil {
		return nil, err
	}
	cfg := ollama.Config{Context: o.Ctx, Batch: openBatch, Threads: o.Threads, FlashAttention: o.FlashAttn,
		CacheType: o.CacheType, Logger: slog.New(slog.NewTextHandler(o.Log, nil))}
	if o.Compress {
		p := o.Policy
		cfg.Policy = &p
	}
	s, err := ollama.Open(path, cfg)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	prompt, err := s.Tokenize(o.Prompt, true)
	if err != nil {
		return nil, fmt.Errorf("tokenize the prompt: %w", err)
	}
	batch, err := prefillBatch(o, len(prompt), lim)
	if err != nil {
		return nil, err
	}
	if err := s.SetBatch(batch); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "ollama: %d prompt tokens, %d cells per sequence, prefill chunks of %d\n", len(prompt), o.Ctx, batch)
	g, err := s.Generate(ctx, 0, prompt, o.N, ollama.GenerateOptions{Temperature: o.Temp, Seed: o.Seed})
	if err != nil {
		return nil, err
	}

	res := &generateResult{
		Runtime: "ollama", Model: o.Model, Policy: "none", Granularity: o.Policy.Granularity.String(),
		Keep: 1, PromptTokens: len(prompt), GeneratedTokens: len(g.Tokens), Text: g.Text,
		PrefillMs: g.Prefill.Seconds() * 1000,
	}
	if o.Compress {
		res.Policy, res.Keep, res.Budget = o.Policy.String(), o.Policy.Keep, o.Policy.Budget
	}
	// Cells are reported per head: (layer, head, cell) entries over
	// layers × KV heads, which for per-token plans is the positions kept.
	shape := s.Cache().CacheShape()
	perHead := int64(shape.Layers * shape.KVHeads)
	res.KVCellsBefore = int((g.Before.Entries + perHead - 1) / perHead)
	res.KVCellsAfter = int((g.After.Entries + perHead - 1) / perHead)
	res.KVBytesBefore, res.KVBytesAfter = g.Before.Bytes, g.After.Bytes
	if comp := s.Cache().Compressor(); comp != nil {
		t := comp.Totals()
		res.Compressions = t.Compressions
		res.CompressMs = (t.PlanTime + t.ApplyTime).Seconds() * 1000
	}
	if d := g.Decode.Seconds(); d > 0 && len(g.Tokens) > 1 {
		// The first token comes from the prompt's logits.
		res.DecodeTokensPerS = float64(len(g.Tokens)-1) / d
	}
	return res, nil
}

// ggufLayers reads <arch>.block_count from a GGUF file's header.
func ggufLayers(path string) (int, error) {
	f, err := gguf.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	arch, err := f.String("general.architecture")
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	n, err := f.Int(arch + ".block_count")
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return int(n), nil
}

// ollamaModelPath returns the GGUF file to load for --model: a GGUF file, a
// llama2.c checkpoint converted to a temporary GGUF (with --tokenizer), or an
// Ollama model name resolved in the local store.
func ollamaModelPath(modelArg, tokenizer string, logw io.Writer) (path string, cleanup func(), err error) {
	cleanup = func() {}
	f, err := os.Open(modelArg)
	if errors.Is(err, fs.ErrNotExist) {
		p, rerr := ollama.ResolveModel(modelArg)
		if rerr != nil {
			return "", cleanup, fmt.Errorf("--model %q: no such file, and %w", modelArg, rerr)
		}
		fmt.Fprintf(logw, "model %s: %s\n", modelArg, p)
		return p, cleanup, nil
	}
	if err != nil {
		return "", cleanup, fmt.Errorf("--model: %w", err)
	}
	magic := make([]byte, 4)
	_, err = io.ReadFull(f, magic)
	f.Close()
	if err == nil && string(magic) == "GGUF" {
		return modelArg, cleanup, nil
	}
	if tokenizer == "" {
		return "", cleanup, fmt.Errorf("--model %q is not a GGUF file; a llama2.c checkpoint needs --tokenizer", modelArg)
	}
	dir, err := os.MkdirTemp("", "kvnorm-ollama-")
	if err != nil {
		return "", cleanup, err
	}
	cleanup = func() { os.RemoveAll(dir) }
	out := filepath.Join(dir, filepath.Base(modelArg)+".gguf")
	if err := llama2c.ConvertFile(modelArg, tokenizer, out, "f32"); err != nil {
		cleanup()
		return "", func() {}, fmt.Errorf("convert llama2.c checkpoint %s: %w", modelArg, err)
	}
	return out, cleanup, nil
}
