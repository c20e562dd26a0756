//go:build cgo

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/conformance/refengine"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp"
)

// llamacppModels returns stories260K.bin and tok512.bin from ../shared/models
// beside the repository root (the directory of go.mod), or skips.
func llamacppModels(t *testing.T) (ckpt, tok string) {
	t.Helper()
	dir, err := os.Getwd()
	require.NoError(t, err)
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Skip("go.mod not found above the test directory")
		}
		dir = parent
	}
	models := filepath.Join(dir, "..", "shared", "models")
	ckpt = filepath.Join(models, "stories260K.bin")
	if _, err := os.Stat(ckpt); err != nil {
		t.Skipf("%s not found: skipping the llama.cpp CLI tests that need a model", ckpt)
	}
	return ckpt, filepath.Join(models, "tok512.bin")
}

// storyPrompt writes a story of about n tokens of stories260K into dir.
func storyPrompt(t *testing.T, dir string, sentences int) string {
	t.Helper()
	base := []string{
		"Once upon a time, there was a little girl named Lily.",
		"She loved to play outside in the park with her friends.",
		"One day, she saw a big red ball under a tree.",
		"She ran to the ball and picked it up.",
		"A little dog came and wanted to play too.",
		"Lily threw the ball and the dog ran after it.",
		"They played all day until the sun went down.",
		"Then Lily went home and told her mom about the dog.",
	}
	var b strings.Builder
	for i := range sentences {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(base[i%len(base)])
	}
	p := filepath.Join(dir, "story.txt")
	require.NoError(t, os.WriteFile(p, []byte(b.String()), 0o644))
	return p
}

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, log bytes.Buffer
	code = run(args, &out, &log)
	return code, out.String(), log.String()
}

func TestGenerateLlamacppJSON(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	prompt := storyPrompt(t, t.TempDir(), 17) // about 300 tokens
	code, out, log := runCLI(t, "generate", "--runtime", "llamacpp", "--model", ckpt, "--tokenizer", tok,
		"--prompt-file", prompt, "--keep", "0.5", "--n", "32", "--json")
	require.Equal(t, 0, code, log)
	assert.Contains(t, log, "converting it as a llama2.c checkpoint")

	var raw map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &raw))
	for _, k := range []string{"runtime", "policy", "keep", "prompt_tokens", "kv_cells_before", "kv_cells_after",
		"generated_tokens", "text", "prefill_ms", "compress_ms", "decode_tokens_per_s"} {
		assert.Contains(t, raw, k)
	}
	var res generateResult
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.Equal(t, "llamacpp", res.Runtime)
	assert.Equal(t, ckpt, res.Model)
	assert.True(t, strings.HasPrefix(res.Policy, "knorm keep=0.5"), res.Policy)
	assert.Equal(t, "per-token", res.Granularity)
	assert.Equal(t, 0.5, res.Keep)
	assert.InDelta(t, 300, res.PromptTokens, 40)
	assert.Equal(t, res.PromptTokens, res.KVCellsBefore)
	assert.Equal(t, int(math.Ceil(float64(res.PromptTokens)/2)), res.KVCellsAfter)
	assert.Equal(t, res.KVBytesBefore*int64(res.KVCellsAfter), res.KVBytesAfter*int64(res.KVCellsBefore))
	assert.Equal(t, 1, res.Compressions)
	assert.Equal(t, 32, res.GeneratedTokens)
	assert.NotEmpty(t, strings.TrimSpace(res.Text))
	assert.Greater(t, res.PrefillMs, 0.0)
	assert.Greater(t, res.CompressMs, 0.0)
	assert.Greater(t, res.DecodeTokensPerS, 0.0)
}

func TestGenerateLlamacppOptions(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	dir := t.TempDir()
	prompt := storyPrompt(t, dir, 8)

	// keep 1: no compressor at all.
	code, out, log := runCLI(t, "generate", "--runtime", "llamacpp", "--model", ckpt, "--tokenizer", tok,
		"--prompt-file", prompt, "--n", "8", "--json", "--flash-attn", "off")
	require.Equal(t, 0, code, log)
	var res generateResult
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.Equal(t, "none", res.Policy)
	assert.Equal(t, res.KVCellsBefore, res.KVCellsAfter)
	assert.Equal(t, 0, res.Compressions)

	// A GGUF model, a budget, sampling, text output.
	gguf := filepath.Join(dir, "s.gguf")
	code, _, log = runCLI(t, "convert", "llama2c", ckpt, "--tokenizer", tok, "-o", gguf, "--type", "f16")
	require.Equal(t, 0, code, log)
	code, out, log = runCLI(t, "generate", "--runtime", "llamacpp", "--model", gguf, "--prompt-file", prompt,
		"--budget", "20", "--policy", "streaming", "--temp", "0.8", "--seed", "3", "--n", "8")
	require.Equal(t, 0, code, log)
	assert.NotContains(t, log, "converting")
	assert.Contains(t, out, "KV cells")
	assert.Contains(t, out, "-> 20 ")

	// A prompt of 3 × the context, fed in chunks.
	long := storyPrompt(t, t.TempDir(), 70)
	code, out, log = runCLI(t, "generate", "--runtime", "llamacpp", "--model", gguf, "--prompt-file", long,
		"--ctx", "256", "--batch", "64", "--keep", "0.25", "--n", "8", "--json")
	require.Equal(t, 0, code, log)
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.Greater(t, res.PromptTokens, 3*256)
	assert.LessOrEqual(t, res.KVCellsBefore, 256)
	assert.Greater(t, res.Compressions, 1)
	assert.Equal(t, 8, res.GeneratedTokens)
}

func TestGenerateLlamacppErrors(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	dir := t.TempDir()
	notModel := filepath.Join(dir, "junk.bin")
	require.NoError(t, os.WriteFile(notModel, []byte("not a model, not a checkpoint"), 0o644))
	src, err := os.ReadFile(ckpt)
	require.NoError(t, err)
	trunc := filepath.Join(dir, "trunc.bin")
	require.NoError(t, os.WriteFile(trunc, src[:len(src)/3], 0o644))
	long := storyPrompt(t, dir, 40)
	base := []string{"generate", "--runtime", "llamacpp", "--tokenizer", tok}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"missing model", []string{"--model", filepath.Join(dir, "nope.gguf"), "--prompt", "hi"}, "no such file"},
		{"not GGUF, no tokenizer", []string{"--model", notModel, "--tokenizer", "", "--prompt", "hi"}, "needs --tokenizer"},
		{"not a checkpoint", []string{"--model", notModel, "--prompt", "hi"}, "llama2.c checkpoint"},
		{"truncated checkpoint", []string{"--model", trunc, "--prompt", "hi"}, "llama2.c checkpoint"},
		{"keep out of range", []string{"--model", ckpt, "--prompt", "hi", "--keep", "1.5"}, "keep=1.5"},
		{"empty prompt", []string{"--model", ckpt, "--prompt", "   "}, "prompt is empty"},
		{"chunk larger than the context", []string{"--model", ckpt, "--prompt", "hi", "--ctx", "256", "--batch", "512"}, "does not fit"},
		{"q8_0 on a head dim of 8", []string{"--model", ckpt, "--prompt", "hi", "--cache-type", "q8_0"}, "multiple of 32"},
		{"per-head on llama.cpp", []string{"--model", ckpt, "--prompt", "hi", "--keep", "0.5", "--granularity", "per-head"}, "per-token"},
		{"prompt too long uncompressed", []string{"--model", ckpt, "--prompt-file", long, "--ctx", "256", "--batch", "64"}, "raise --ctx"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, log := runCLI(t, append(cloneArgs(base), tc.args...)...)
			assert.Equal(t, 1, code)
			assert.Contains(t, log, tc.want)
		})
	}
}

func cloneArgs(s []string) []string { return append([]string(nil), s...) }

func TestConvertLlama2c(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	dir := t.TempDir()
	for _, typ := range []string{"f32", "f16"} {
		out := filepath.Join(dir, typ+".gguf")
		// Flags after the positional checkpoint.
		code, stdout, log := runCLI(t, "convert", "llama2c", ckpt, "--tokenizer", tok, "-o", out, "--type", typ)
		require.Equal(t, 0, code, log)
		assert.Contains(t, stdout, "wrote "+out)
		m, err := llamacpp.Open(out)
		require.NoError(t, err)
		c, err := m.NewContext(llamacpp.ContextOptions{NCtx: 256, Threads: 1})
		require.NoError(t, err)
		g, err := c.Generate(context.Background(), 0, []llamacpp.Token{m.Info().BOS}, llamacpp.GenerateOptions{MaxTokens: 40})
		require.NoError(t, err)
		assert.True(t, strings.HasPrefix(strings.TrimSpace(g.Text),
			"Once upon a time, there was a little girl named Lily. She loved to play outside in the park."), g.Text)
		require.NoError(t, m.Close())
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"convert"}, "usage"},
		{[]string{"convert", "pytorch", ckpt}, "unknown format"},
		{[]string{"convert", "llama2c", ckpt, "-o", filepath.Join(dir, "x.gguf")}, "--tokenizer is required"},
		{[]string{"convert", "llama2c", ckpt, "--tokenizer", tok}, "-o OUT.gguf is required"},
		{[]string{"convert", "llama2c", "--tokenizer", tok, "-o", filepath.Join(dir, "x.gguf")}, "want one CHECKPOINT"},
		{[]string{"convert", "llama2c", ckpt, "--tokenizer", tok, "-o", filepath.Join(dir, "x.gguf"), "--type", "q8_0"}, "want f32 or f16"},
		{[]string{"convert", "llama2c", filepath.Join(dir, "none.bin"), "--tokenizer", tok, "-o", filepath.Join(dir, "x.gguf")}, "no such file"},
	} {
		code, _, log := runCLI(t, tc.args...)
		assert.NotEqual(t, 0, code, tc.args)
		assert.Contains(t, log, tc.want, tc.args)
	}
	_, err := os.Stat(filepath.Join(dir, "x.gguf"))
	assert.True(t, os.IsNotExist(err), "no partial output left behind")
}

// TestConformanceEngineLlamacpp: the engine the conformance suite opens.
func TestConformanceEngineLlamacpp(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	var log bytes.Buffer
	e, err := engines["llamacpp"](conformance.EngineOptions{Model: ckpt, Tokenizer: tok, Threads: 1, Log: &log})
	require.NoError(t, err)
	_, ok := e.(hooks.PositionEvictor)
	require.True(t, ok, "plans apply through PositionEvictor")
	info := e.Info()
	assert.Equal(t, "llamacpp", info.Runtime)
	assert.Equal(t, "llama", info.Arch)
	assert.Equal(t, 512, info.Vocab)
	assert.Equal(t, 512, info.Context, "the model's trained context")
	toks, err := e.Tokenize("Once upon a time, there was a little girl named Lily.", true)
	require.NoError(t, err)
	comp, err := adapter.New(e, adapter.DefaultPolicy())
	require.NoError(t, err)
	e.SetObserver(comp)
	rows, err := e.Prefill(0, toks, true)
	require.NoError(t, err)
	require.Len(t, rows, len(toks))
	n, entries, err := e.Live(0)
	require.NoError(t, err)
	assert.Equal(t, (len(toks)+1)/2, n)
	assert.Equal(t, int64(n*5*4), entries)
	more, err := e.Decode(0, []int32{401, 396})
	require.NoError(t, err)
	assert.Len(t, more, 2)
	require.NoError(t, e.RemoveSequence(0))
	n, _, err = e.Live(0)
	require.NoError(t, err)
	assert.Equal(t, 0, n)
	require.NoError(t, e.Close())
	assert.Contains(t, log.String(), "converting")
}

// attnRows collects attention as (layer, head, query position) -> weight by
// key position, from either runtime.
type attnRows map[[3]int]map[hooks.Pos]float32

func (r attnRows) add(b *conformance.AttentionBatch) {
	group := b.Heads / b.KVHeads
	for h := range b.Heads {
		for q, qp := range b.Queries {
			row := map[hooks.Pos]float32{}
			for c, p := range b.Cells[h/group] {
				if w := b.Weight(h, q, c); p >= 0 {
					row[p] = w
				} else if w != 0 {
					row[-1-hooks.Pos(c)] = w // weight on an empty cell: never equal to the reference
				}
			}
			r[[3]int{b.Layer, h, int(qp)}] = row
		}
	}
}

// keysFirst is an observer that records which keys were reported, for the
// recorder to check that a batch's keys come before its attention.
type keysFirst struct {
	seen map[[2]int]bool // layer, position
}

func (o *keysFirst) ObserveKeys(b *hooks.KeyBatch) error {
	for _, p := range b.Positions {
		o.seen[[2]int{b.Layer, int(p)}] = true
	}
	return nil
}
func (o *keysFirst) PrefillDone(seq hooks.SeqID) (hooks.Stats, error) { return hooks.Stats{}, nil }
func (o *keysFirst) CachePressure(hooks.SeqID, int, int) (hooks.Stats, error) {
	return hooks.Stats{}, errors.New("no room")
}
func (o *keysFirst) Forget(hooks.SeqID, hooks.Pos, hooks.Pos) {}

// TestLlamacppAttentionMatchesReference: llama.cpp's kq_soft_max (flash
// attention off, f32 cache), mapped to positions through its cells, equals
// the reference forward pass's attention, also after evictions leave holes
// that later tokens fill.
func TestLlamacppAttentionMatchesReference(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	const tol = 2e-5 // f32 weights and cache on both sides
	ref, err := refengine.Open(ckpt, tok, refengine.Options{Context: 512, Batch: 48})
	require.NoError(t, err)
	defer ref.Close()
	path, cleanup, err := ggufModel(ckpt, tok, io.Discard)
	require.NoError(t, err)
	m, err := llamacpp.Open(path)
	require.NoError(t, err)
	le, err := llamacpp.NewEngine(m, llamacpp.ContextOptions{NCtx: 512, NBatch: 48, Threads: 1,
		FlashAttn: llamacpp.FlashAttnOff, KType: llamacpp.CacheF32, VType: llamacpp.CacheF32})
	require.NoError(t, err)
	lc := &llamacppEngine{Engine: le, cleanup: cleanup}
	defer lc.Close()

	text, err := os.ReadFile(storyPrompt(t, t.TempDir(), 12))
	require.NoError(t, err)
	toks, err := ref.Tokenize(string(text), true)
	require.NoError(t, err)
	require.Greater(t, len(toks), 200)
	prompt, more := toks[:150], toks[150:200]

	engs := []hooks.Engine{ref, lc}
	rows := []attnRows{{}, {}}
	for i, e := range engs {
		recordAttention(t, e, &rows[i])
		_, err := e.Prefill(0, prompt, false)
		require.NoError(t, err)
		// Holes: every third position of 10..120; the next chunk fills them.
		var evict []hooks.Pos
		for p := hooks.Pos(10); p < 120; p += 3 {
			evict = append(evict, p)
		}
		require.NoError(t, e.(hooks.PositionEvictor).EvictPositions(0, evict))
		_, err = e.Decode(0, more)
		require.NoError(t, err)
	}
	require.Len(t, rows[1], len(rows[0]))
	var worst float64
	for k, want := range rows[0] {
		got, ok := rows[1][k]
		require.True(t, ok, "llama.cpp has no attention for layer %d head %d query %d", k[0], k[1], k[2])
		for p, w := range got {
			_, ok := want[p]
			require.True(t, ok || w == 0, "layer %d head %d query %d: weight %g on position %d the reference does not hold", k[0], k[1], k[2], w, p)
		}
		for p, w := range want {
			d := math.Abs(float64(w) - float64(got[p]))
			worst = max(worst, d)
			require.LessOrEqual(t, d, tol, "layer %d head %d query %d key %d: reference %g, llama.cpp %g", k[0], k[1], k[2], p, w, got[p])
		}
	}
	t.Logf("%d attention rows (5 layers × 8 heads × 200 queries), largest difference %.2g (tolerance %g)", len(rows[0]), worst, tol)
}

// TestConformanceAttentionLlamacpp: the suite's attention task reports
// numbers for llama.cpp, and they agree with the reference on the same text.
func TestConformanceAttentionLlamacpp(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	r := attentionAgreesWithReference(t, "llamacpp", "llama.cpp", ckpt, tok)
	assert.False(t, r.Info.FlashAttn, "attention needs flash attention off")
}

// TestLlamacppNoAttention: with flash attention on the engine says so as
// conformance.ErrNoAttention (the task reports n/a). Also: a tiny model gets
// one thread when the suite asks for the default.
func TestLlamacppNoAttention(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	var log bytes.Buffer
	e, err := engines["llamacpp"](conformance.EngineOptions{Model: ckpt, Tokenizer: tok, Log: &log})
	require.NoError(t, err)
	defer e.Close()
	assert.True(t, e.Info().FlashAttn)
	assert.Contains(t, log.String(), "1 thread for a model of width 64", "a tiny model runs on one thread by default")
	rec, ok := e.(conformance.AttentionRecorder)
	require.True(t, ok)
	err = rec.RecordAttention(func(*conformance.AttentionBatch) error { return nil })
	assert.ErrorIs(t, err, conformance.ErrNoAttention)
	assert.ErrorIs(t, err, llamacpp.ErrNoAttention)
	require.NoError(t, rec.RecordAttention(nil))
}

// recordAttention makes e record its attention into rows, checking that no
// attention reaches a position whose key the observer has not been given.
func recordAttention(t *testing.T, e hooks.Engine, rows *attnRows) {
	t.Helper()
	obs := &keysFirst{seen: map[[2]int]bool{}}
	e.SetObserver(obs)
	require.NoError(t, e.(conformance.AttentionRecorder).RecordAttention(func(b *conformance.AttentionBatch) error {
		for g := range b.KVHeads {
			for _, p := range b.Cells[g] {
				if p >= 0 && !obs.seen[[2]int{b.Layer, int(p)}] {
					return fmt.Errorf("layer %d: attention to position %d before its key", b.Layer, p)
				}
			}
		}
		rows.add(b)
		return nil
	}))
}
