//go:build cgo

package kvnormhook

import (
	"fmt"
	"log/slog"

	"github.com/ollama/ollama/fs/ggml"
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/tokenizer"

	"github.com/kvnorm/kvnorm/ollama"
)

// CheckServer is called by the server's NewLlamaServer once Ollama has made
// its own choice of runner: tok is the Go engine's text processor when Ollama
// chose the Go engine, nil when it chose the llama.cpp runner. It refuses
// invalid OLLAMA_KV_NORM_* values, logs one line per setting this model
// cannot use, and returns the text processor to run with: with compression
// on, a model bound for llama.cpp whose architecture the Go engine runs and
// whose cache kvnorm replaces gets the Go engine's text processor, so that it
// runs on the Go engine (see decideServer). numCtx is the request's num_ctx,
// capped here, as Ollama caps it, at the model's trained context.
func CheckServer(tok tokenizer.Tokenizer, modelPath string, f *ggml.GGML, projectors, numCtx int) (tokenizer.Tokenizer, error) {
	p, err := PolicyFromEnv(nil)
	if err != nil || p == nil {
		return tok, err
	}
	m := serverModel{Context: numCtx, Projectors: projectors, GoEngine: tok != nil}
	if f != nil {
		kv := f.KV()
		m.Arch, m.Layers = kv.Architecture(), int(kv.BlockCount())
		if train := int(kv.ContextLength()); train > 0 && m.Context > train {
			m.Context = train
		}
	}
	var routed tokenizer.Tokenizer
	d := decideServer(p, m, func() error {
		t, err := goEngineTextProcessor(modelPath, m.Arch)
		routed = t
		return err
	})
	d.log(slog.Default())
	if d.route {
		return routed, nil
	}
	return tok, nil
}

// goEngineTextProcessor builds the Go engine's text processor for the model
// (Ollama's model.NewTextProcessor, which reads the GGUF metadata and builds
// the model without weights) and checks that kvnorm can replace the cache
// the model is built with. The error says why the model cannot run
// compressed on the Go engine.
func goEngineTextProcessor(modelPath, arch string) (tokenizer.Tokenizer, error) {
	t, err := model.NewTextProcessor(modelPath)
	if err != nil {
		return nil, fmt.Errorf("Ollama's Go engine does not run architecture %q: %w", arch, err)
	}
	m, ok := t.(model.Model)
	if !ok {
		return nil, fmt.Errorf("Ollama's Go engine built a %T for architecture %q, not a model", t, arch)
	}
	if err := ollama.CheckCache(arch, m.Config().Cache); err != nil {
		return nil, err
	}
	return t, nil
}
