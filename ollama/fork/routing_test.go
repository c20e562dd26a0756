//go:build cgo && linux

package main

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// TestRouting runs kvnorm's Ollama build without OLLAMA_NEW_ENGINE: Ollama
// v0.24.0 sends a llama-architecture model to its llama.cpp runner, which
// kvnorm does not hook. With compression on, kvnorm sends it to the Go engine
// instead and says so; with compression off, or a setting that leaves nothing
// to compress on this model, the model goes where Ollama sends it.
func TestRouting(t *testing.T) {
	bin, gguf := forkSetup(t)
	store := t.TempDir()
	const prompt = "Once upon a time there was a little girl named Lily. She loved to play with her toys and her friends. One day she went to the park"
	opts := map[string]any{"num_ctx": 256, "temperature": 0, "num_predict": 16, "seed": 1}
	const routed = "kvnorm: KV cache compression on: the model runs on Ollama's Go engine (routed by kvnorm; OLLAMA_NEW_ENGINE=1 is not needed)"
	const goEngine = "starting ollama engine" // the Go-engine runner's first line
	noNewEngine := "OLLAMA_NEW_ENGINE="       // overrides startServer's OLLAMA_NEW_ENGINE=1 (the last value wins)

	t.Run("on: routed to the Go engine", func(t *testing.T) {
		s := startServer(t, bin, store, noNewEngine, "OLLAMA_KV_NORM_KEEP=0.5", "OLLAMA_KV_NORM_GRANULARITY=per-head")
		s.createModel(t, "stories", gguf)
		text, err := s.generate(t, "stories", prompt, opts)
		require.NoError(t, err)
		pol := adapter.DefaultPolicy()
		pol.Granularity = hooks.PerHead
		assert.Equal(t, strings.TrimSpace(expected(t, gguf, prompt, &pol, 16)), strings.TrimSpace(text))
		log := s.log.String()
		assert.Contains(t, log, `msg="`+routed+`" arch=llama`)
		assert.Contains(t, log, goEngine)
		assert.Contains(t, log, "kvnorm: cache installed")
		assert.Contains(t, log, `msg="kvnorm: compressed" arch=llama`)
		assert.NotContains(t, log, "kvnorm does not hook")
	})

	t.Run("off: Ollama's choice, the llama.cpp runner", func(t *testing.T) {
		s := startServer(t, bin, store, noNewEngine)
		_, err := s.generate(t, "stories", prompt, opts)
		require.NoError(t, err)
		log := s.log.String()
		assert.Empty(t, hookLines(log))
		assert.NotContains(t, log, goEngine)
		assert.Contains(t, log, "starting go runner", "the llama.cpp runner")
	})

	t.Run("nothing to compress on this model: stays, with one line", func(t *testing.T) {
		s := startServer(t, bin, store, noNewEngine, "OLLAMA_KV_NORM_KEEP=0.5", "OLLAMA_KV_NORM_SKIP_LAYERS=0,1,2,3,4")
		_, err := s.generate(t, "stories", prompt, opts)
		require.NoError(t, err)
		log := s.log.String()
		assert.Contains(t, log, `msg="kvnorm: OLLAMA_KV_NORM_SKIP_LAYERS does not fit this model" arch=llama layers=5 num_ctx=256`)
		assert.Contains(t, log, "skips every one of the model's 5 layers")
		assert.NotContains(t, log, routed)
		assert.NotContains(t, log, goEngine)
		assert.NotContains(t, log, "kvnorm: compressed")
	})

	t.Run("budget >= num_ctx: warned, still compresses under the Go engine", func(t *testing.T) {
		s := startServer(t, bin, store, noNewEngine, "OLLAMA_KV_NORM_BUDGET=256")
		_, err := s.generate(t, "stories", prompt, opts)
		require.NoError(t, err)
		log := s.log.String()
		assert.Contains(t, log, `msg="kvnorm: OLLAMA_KV_NORM_BUDGET does not fit this model"`)
		assert.Contains(t, log, "budget=256 >= the context of 256 cells")
		assert.Contains(t, log, routed)
	})
	t.Run("sinks+window cover num_ctx on the Go engine Ollama chose: Ollama's cache stays", func(t *testing.T) {
		// OLLAMA_NEW_ENGINE=1 (startServer's default): the model reaches the
		// Go-engine runner without kvnorm routing it, and the runner knows
		// num_ctx only from its load request.
		s := startServer(t, bin, store, "OLLAMA_KV_NORM_KEEP=0.5", "OLLAMA_KV_NORM_WINDOW=300")
		_, err := s.generate(t, "stories", prompt, opts)
		require.NoError(t, err)
		log := s.log.String()
		assert.Contains(t, log, `msg="kvnorm: OLLAMA_KV_NORM_SINKS+OLLAMA_KV_NORM_WINDOW does not fit this model"`)
		assert.Contains(t, log, goEngine)
		assert.Contains(t, log, `msg="kvnorm: cache not installed: compression would be off" num_ctx=256`)
		assert.NotContains(t, log, "kvnorm: cache installed")
		assert.NotContains(t, log, "kvnorm: compressed")
	})
}
