//go:build cgo

package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
	"github.com/kvnorm/kvnorm/synth"
)

// storiesFiles returns stories260K.bin and tok512.bin from ../shared/models
// next to the repository root, or skips.
func storiesFiles(t *testing.T) (string, string) {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", "..", "..", "shared", "models"))
	require.NoError(t, err)
	ckpt := filepath.Join(dir, "stories260K.bin")
	if _, err := os.Stat(ckpt); err != nil {
		t.Skipf("stories260K not found at %s", ckpt)
	}
	return ckpt, filepath.Join(dir, "tok512.bin")
}

func TestGenerateOllama(t *testing.T) {
	ckpt, tok := storiesFiles(t)
	prompt := "Once upon a time there was a little girl named Lily. She loved to play with her toys."
	for _, gran := range []string{"per-head", "per-token"} {
		t.Run(gran, func(t *testing.T) {
			var out, log bytes.Buffer
			code := run([]string{"generate", "--runtime", "ollama", "--granularity", gran, "--keep", "0.5", "--json",
				"--model", ckpt, "--tokenizer", tok, "--prompt", prompt, "--n", "24"}, &out, &log)
			require.Equal(t, 0, code, log.String())
			var res generateResult
			require.NoError(t, json.Unmarshal(out.Bytes(), &res))
			assert.Equal(t, "ollama", res.Runtime)
			assert.Equal(t, gran, res.Granularity)
			assert.Equal(t, 24, res.GeneratedTokens)
			assert.Equal(t, res.PromptTokens, res.KVCellsBefore)
			assert.Less(t, res.KVCellsAfter, res.KVCellsBefore)
			assert.Less(t, res.KVBytesAfter, res.KVBytesBefore)
			assert.Equal(t, 1, res.Compressions)
			assert.NotEmpty(t, res.Text)
			assert.Contains(t, log.String(), "kvnorm: compressed")
		})
	}

	var out, log bytes.Buffer
	code := run([]string{"generate", "--runtime", "ollama", "--model", "no-such-model:7b", "--prompt", "hi"}, &out, &log)
	assert.NotEqual(t, 0, code)
	assert.True(t, strings.Contains(log.String(), "no such file") && strings.Contains(log.String(), "ollama pull"), log.String())
	code = run([]string{"generate", "--runtime", "ollama", "--model", ckpt, "--prompt", "hi"}, &out, &log)
	assert.NotEqual(t, 0, code)
	assert.Contains(t, log.String(), "needs --tokenizer")
}

// TestConformanceEngineOllama: the engine the conformance suite opens.
func TestConformanceEngineOllama(t *testing.T) {
	ckpt, tok := storiesFiles(t)
	var log bytes.Buffer
	e, err := engines["ollama"](conformance.EngineOptions{Model: ckpt, Tokenizer: tok, Threads: 1, Log: &log})
	require.NoError(t, err)
	defer e.Close()
	_, ok := e.(hooks.HeadCompactor)
	require.True(t, ok, "per-head plans apply through HeadCompactor")
	_, ok = e.(hooks.PositionEvictor)
	require.True(t, ok, "per-token plans apply through PositionEvictor")
	info := e.Info()
	assert.Equal(t, hooks.EngineInfo{Runtime: "ollama", Model: ckpt, Arch: "llama", Vocab: 512, Context: 512, FlashAttn: true}, info)
	assert.Equal(t, kernels.F16, e.CacheShape().KType, "Ollama's default cache type, as llama.cpp's")
	toks, err := e.Tokenize("Once upon a time, there was a little girl named Lily.", true)
	require.NoError(t, err)
	pol := adapter.DefaultPolicy()
	pol.Granularity = hooks.PerHead
	comp, err := adapter.New(e, pol)
	require.NoError(t, err)
	var stats []hooks.Stats
	comp.OnStats(func(s hooks.Stats) { stats = append(stats, s) })
	e.SetObserver(comp)
	rows, err := e.Prefill(0, toks, true)
	require.NoError(t, err)
	require.Len(t, rows, len(toks))
	require.Len(t, stats, 1, "Prefill reports PrefillDone")
	assert.Equal(t, "prefill", stats[0].Trigger)
	n, entries, err := e.Live(0)
	require.NoError(t, err)
	assert.Equal(t, stats[0].PositionsAfter, n)
	assert.Equal(t, stats[0].EntriesAfter, entries)
	half := int64((len(toks) + 1) / 2)
	assert.Equal(t, int64(len(toks))*2*4+half*3*4, entries, "layers 0 and 1 whole, every head of 2-4 keeps half")
	more, err := e.Decode(0, []int32{401, 396})
	require.NoError(t, err)
	assert.Len(t, more, 2)
	require.NoError(t, e.RemoveSequence(0))
	n, _, err = e.Live(0)
	require.NoError(t, err)
	assert.Equal(t, 0, n)
	require.NoError(t, e.Close())

	_, err = engines["ollama"](conformance.EngineOptions{Model: "no-such-model:1b", Log: &log})
	assert.ErrorContains(t, err, "ollama pull")
}

// TestConformanceOllamaQuick runs `kvnorm conformance --runtime ollama
// --quick` (every task; two policies and keeps to stay short).
func TestConformanceOllamaQuick(t *testing.T) {
	ckpt, tok := storiesFiles(t)
	out := t.TempDir()
	code, _, errs := runCLI(t, "conformance", "--runtime", "ollama", "--quick", "--model", ckpt, "--tokenizer", tok,
		"--policies", "knorm,random", "--keep", "1,0.5", "--out", out)
	require.Equal(t, 0, code, errs)
	b, err := os.ReadFile(filepath.Join(out, "results.json"))
	require.NoError(t, err)
	var res conformance.Results
	require.NoError(t, json.Unmarshal(b, &res))
	require.Len(t, res.Runtimes, 1)
	rr := res.Runtimes[0]
	assert.Equal(t, "ollama", rr.Runtime)
	require.Empty(t, rr.Error)
	var tasks []string
	for _, tr := range rr.Tasks {
		tasks = append(tasks, tr.Task)
		if tr.Task == conformance.TaskAttention {
			require.Equal(t, conformance.StatusOK, tr.Status, tr.Note)
			require.NotNil(t, tr.Attention)
			assert.Len(t, tr.Attention.Layers, 5)
			continue
		}
		require.Equal(t, conformance.StatusOK, tr.Status, "%s: %s", tr.Task, tr.Note)
		require.Len(t, tr.Rows, 1+2*2*2, tr.Task)
		for _, row := range tr.Rows {
			assert.Equal(t, conformance.StatusOK, row.Status, "%s %s %s %g: %s", tr.Task, row.Policy, row.Granularity, row.Keep, row.Note)
			if row.Keep == 1 && tr.Task == conformance.TaskLM {
				assert.Equal(t, conformance.Num(0), row.Metrics["max_abs_logit_diff"], "keep 1 is the baseline exactly (%s %s)", row.Policy, row.Granularity)
			}
			if row.Keep == 0.5 && !row.Baseline {
				assert.Less(t, float64(row.Metrics["kept_entries"]), 1.0, "%s %s %s keeps fewer entries", tr.Task, row.Policy, row.Granularity)
			}
		}
	}
	assert.Equal(t, conformance.AllTasks, tasks)
	for _, f := range []string{"report.md", "ollama-lm.png", "ollama-greedy.png"} {
		st, err := os.Stat(filepath.Join(out, f))
		require.NoError(t, err, f)
		assert.Positive(t, st.Size(), f)
	}
}

// The demo's default model is the smallest supported model of the local
// Ollama store.
func TestLocalOllamaModel(t *testing.T) {
	store := t.TempDir()
	t.Setenv("OLLAMA_MODELS", store)
	name, path := localOllamaModel()
	assert.Empty(t, name+path, "an empty store has no model")

	small, big := synth.Shapes["tiny"], synth.Shapes["tiny"]
	small.Layers = 3
	blob := func(c string) string { return filepath.Join(store, "blobs", "sha256-"+strings.Repeat(c, 64)) }
	require.NoError(t, os.MkdirAll(filepath.Join(store, "blobs"), 0o755))
	require.NoError(t, synth.Write(blob("a"), big, gguf.F16, 1))
	require.NoError(t, synth.Write(blob("b"), small, gguf.F16, 1))
	require.NoError(t, os.WriteFile(blob("c"), []byte("GGUF"), 0o644)) // smallest, unreadable
	for rel, c := range map[string]string{"library/big/1b": "a", "library/small/1b": "b", "library/junk/latest": "c"} {
		p := filepath.Join(store, "manifests", "registry.ollama.ai", rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(`{"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:`+strings.Repeat(c, 64)+`"}]}`), 0o644))
	}
	name, path = localOllamaModel()
	assert.Equal(t, "small:1b", name)
	assert.Equal(t, blob("b"), path)

	for _, rt := range []string{"llamacpp", "ollama"} {
		code, out, errs := runCLI(t, "demo", "--runtime", rt, "--n", "4")
		require.Equal(t, 0, code, errs)
		assert.Contains(t, out, "the model small:1b from the local Ollama store", rt)
		assert.Contains(t, out, "runtime: "+rt, rt)
	}
}
