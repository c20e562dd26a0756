//go:build cgo && linux

package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/llama2c"
	"github.com/kvnorm/kvnorm/synth"
)

// The memory a user of kvnorm's Ollama gets, through bin/ollama serve: a
// smaller KV allocation at the same num_ctx, prompts of num_ctx tokens and
// answers past the cache served by eviction, answers independent of what the
// server served before.

// forkSetup returns the repository root, bin/ollama and the stories260K
// GGUF, or skips.
func forkSetup(t testing.TB) (bin, stories string) {
	t.Helper()
	root, err := findRepo()
	require.NoError(t, err)
	models := filepath.Join(root, "..", "shared", "models")
	if _, err := os.Stat(filepath.Join(models, "stories260K.bin")); err != nil {
		t.Skipf("stories260K not found in %s", models)
	}
	bin = ollamaBinary(t, root)
	stories = filepath.Join(t.TempDir(), "stories260K.gguf")
	require.NoError(t, llama2c.ConvertFile(filepath.Join(models, "stories260K.bin"), filepath.Join(models, "tok512.bin"), stories, "f32"))
	return bin, stories
}

// generateFull runs a raw, non-streamed generation and returns the final
// response (text in Response, counts and durations).
func (s *server) generateFull(t *testing.T, model, prompt string, options map[string]any) (api.GenerateResponse, error) {
	t.Helper()
	return s.generateWithin(t, 10*time.Minute, model, prompt, options)
}

// generateWithin is generateFull with its time limit.
func (s *server) generateWithin(t *testing.T, limit time.Duration, model, prompt string, options map[string]any) (api.GenerateResponse, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	stream := false
	var last api.GenerateResponse
	var text strings.Builder
	// The server's client times out after 2 minutes; an answer past the
	// cache on a loaded 2-core machine may take longer.
	client := api.NewClient(s.base, &http.Client{})
	err := client.Generate(ctx, &api.GenerateRequest{Model: model, Prompt: prompt, Raw: true, Stream: &stream, Options: options},
		func(r api.GenerateResponse) error {
			text.WriteString(r.Response)
			last = r
			return nil
		})
	last.Response = text.String()
	return last, err
}

var kvLine = regexp.MustCompile(`msg="kv cache" device=CPU size="([0-9.]+) (B|KiB|MiB|GiB)"`)

// kvCacheBytes parses the runner's last "kv cache" memory line.
func kvCacheBytes(t *testing.T, log string) float64 {
	t.Helper()
	m := kvLine.FindAllStringSubmatch(log, -1)
	require.NotEmpty(t, m, "no kv cache line in the log")
	last := m[len(m)-1]
	v, err := strconv.ParseFloat(last[1], 64)
	require.NoError(t, err)
	unit := map[string]float64{"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[last[2]]
	return v * unit
}

// runningSize is /api/ps's size of the only loaded model.
func (s *server) runningSize(t *testing.T) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ps, err := s.client.ListRunning(ctx)
	require.NoError(t, err)
	require.Len(t, ps.Models, 1)
	return ps.Models[0].Size
}

// mini1B has the Llama-3.2-1B layout where the KV cache is concerned (16
// layers, KV heads of 64 dims; one KV head instead of 8, which changes no
// ratio) in a model of a few MB: at num_ctx 8192 and num_batch 512 its KV
// sizes by policy are the 1B's, divided by 8.
var mini1B = synth.Shape{Name: "mini-1b", Arch: "llama", Layers: 16, Heads: 2, KVHeads: 1, HeadDim: 64, Embd: 128, FFN: 128,
	Vocab: 512, Ctx: 8192, RopeBase: 500000}

// The runner's "kv cache" line and /api/ps see the smaller allocation.
//
//   - The tiny synthetic llama (4 layers, 2 KV heads of 16 dims) at num_ctx
//     4096 and num_batch 512: layers 0-1 whole and 2-3 at 2048+512 cells,
//     the keys and values take 13312/16384 = 0.8125 of the full size, plus
//     the norm ring of every layer (512 rows of 4 bytes per KV head: 16 KiB,
//     0.008 of the 2 MiB; the runner prints sizes to 0.1 MiB, hence the
//     tolerance of 0.025).
//   - mini1B, the 1B's layout, at num_ctx 8192 and num_batch 512: keep 0.5
//     with layers 0-1 whole must take at most 0.62 of the full size (issue
//     10's target): the keys and values take (2×8192 + 14×4608)/(16×8192)
//     = 0.617, the norm ring 0.001 (per-cell norms took 0.010 more: 0.627).
func TestForkAllocation(t *testing.T) {
	bin, _ := forkSetup(t)
	dir := t.TempDir()
	tiny, mini := filepath.Join(dir, "tiny.gguf"), filepath.Join(dir, "mini1b.gguf")
	require.NoError(t, synth.Write(tiny, synth.Shapes["tiny"], gguf.F16, 1))
	require.NoError(t, synth.Write(mini, mini1B, gguf.F16, 1))
	store := t.TempDir()
	type row struct {
		name  string
		env   []string
		ratio float64 // K+V cells over the full size
	}
	models := []struct {
		name, path string
		numCtx     int
		offBytes   float64 // K and V of every cell, f16
		ringBytes  float64 // the norm rings of every layer
		max        float64 // the bound keep=0.5 must meet (0: none)
		tol        float64 // the log line's rounding (0.05 MiB) over offBytes
		rows       []row
	}{
		{"tiny", tiny, 4096, 4 * 4096 * 2 * 2 * 16 * 2, 4 * 512 * 2 * 4, 0, 0.025, []row{
			{"off", nil, 1},
			{"keep=1", []string{"OLLAMA_KV_NORM_KEEP=1"}, 1},
			{"keep=0.5", []string{"OLLAMA_KV_NORM_KEEP=0.5"}, (2*4096 + 2*2560) / 16384.0},
			{"keep=0.25", []string{"OLLAMA_KV_NORM_KEEP=0.25"}, (2*4096 + 2*1536) / 16384.0},
			{"keep=0.5/skip=none", []string{"OLLAMA_KV_NORM_KEEP=0.5", "OLLAMA_KV_NORM_SKIP_LAYERS=none"}, 2560 / 4096.0},
		}},
		{"mini1b", mini, 8192, 16 * 8192 * 2 * 64 * 2, 16 * 512 * 4, 0.62, 0.0016, []row{
			{"off", nil, 1},
			{"keep=0.5", []string{"OLLAMA_KV_NORM_KEEP=0.5"}, (2*8192 + 14*4608) / (16 * 8192.0)},
		}},
	}
	for _, m := range models {
		opts := map[string]any{"num_ctx": m.numCtx, "num_batch": 512, "temperature": 0, "num_thread": 1, "num_predict": 4}
		var off float64
		var offPS int64
		for i, tt := range m.rows {
			t.Run(m.name+"/"+tt.name, func(t *testing.T) {
				s := startServer(t, bin, store, tt.env...)
				if i == 0 {
					s.createModel(t, m.name, m.path)
				}
				_, err := s.generateFull(t, m.name, "hello world", opts)
				require.NoError(t, err)
				kv := kvCacheBytes(t, s.log.String())
				ps := s.runningSize(t)
				if tt.env == nil {
					off, offPS = kv, ps
					assert.InDelta(t, m.offBytes, kv, m.tol*m.offBytes, "kv cache")
					t.Logf("%s off: kv cache %.0f bytes, /api/ps %d", m.name, kv, ps)
					return
				}
				require.NotZero(t, off)
				want := tt.ratio + m.ringBytes/m.offBytes
				t.Logf("%s %s: kv cache %.0f bytes (%.4f of off; expected %.4f), /api/ps %d (%.3f of off)", m.name, tt.name, kv, kv/off, want, ps, float64(ps)/float64(offPS))
				assert.InDelta(t, want, kv/off, m.tol)
				if tt.ratio < 1 {
					assert.Less(t, ps, offPS, "/api/ps sees the smaller cache")
				}
				if m.max > 0 {
					assert.LessOrEqual(t, kv/off, m.max, "issue 10's target")
				}
			})
		}
	}
}

// A prompt of num_ctx tokens is served untruncated (prompt_eval_count equal
// to upstream's, no truncation) by the compressed layers' smaller cache, and
// an answer of twice num_ctx is served by eviction with the runner's shifts
// accepted: no re-decode.
func TestForkLongPromptAndAnswer(t *testing.T) {
	bin, stories := forkSetup(t)
	store := t.TempDir()
	const sentence = "Once upon a time there was a little girl named Lily. She loved to play with her toys and her friends. "
	opts := map[string]any{"num_ctx": 512, "num_batch": 64, "temperature": 0, "num_thread": 1, "num_predict": 2, "num_keep": 4}

	off := startServer(t, bin, store, "OLLAMA_DEBUG=1")
	off.createModel(t, "stories", stories)
	// About 490 tokens as upstream counts them (its prompt_eval_count of
	// a prompt longer than num_ctx is the truncated one).
	r, err := off.generateFull(t, "stories", strings.Repeat(sentence, 10), opts)
	require.NoError(t, err)
	prompt := strings.Repeat(sentence, 490*10/r.PromptEvalCount)
	up, err := off.generateFull(t, "stories", prompt, opts)
	require.NoError(t, err)
	require.LessOrEqual(t, up.PromptEvalCount, 512)
	require.Greater(t, up.PromptEvalCount, 400)
	require.NotContains(t, off.log.String(), "truncating input prompt")

	on := startServer(t, bin, store, "OLLAMA_DEBUG=1", "OLLAMA_KV_NORM_KEEP=0.5")
	got, err := on.generateFull(t, "stories", prompt, opts)
	require.NoError(t, err)
	assert.Equal(t, up.PromptEvalCount, got.PromptEvalCount, "prompt_eval_count equals the prompt's tokens")
	log := on.log.String()
	assert.NotContains(t, log, "truncating input prompt")
	assert.Contains(t, log, "trigger=pressure", "chunks made room by evicting")
	t.Logf("prompt of %d tokens at num_ctx 512: served", got.PromptEvalCount)

	// An answer of twice num_ctx.
	ans := map[string]any{"num_ctx": 128, "num_batch": 16, "temperature": 0, "num_thread": 1, "num_predict": 256, "num_keep": 4}
	g, err := on.generateFull(t, "stories", sentence, ans)
	require.NoError(t, err)
	assert.Equal(t, 256, g.EvalCount, "the answer runs to num_predict")
	log = on.log.String()
	assert.Contains(t, log, "context limit hit - shifting")
	assert.NotContains(t, log, "kv cache removal unsupported", "no shift refused")
	assert.NotContains(t, log, "inputs need reprocessing")
	assert.NotContains(t, log, "panic")
	t.Logf("answer of %d tokens at num_ctx 128: %d shifts, %d compressions under pressure; ends %q", g.EvalCount,
		strings.Count(log, "context limit hit - shifting"), strings.Count(log, "trigger=pressure"), tail(g.Response, 120))
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}

// A request's answer does not depend on the server's history nor on what is
// batched beside it: 8 requests sharing a prefix give the same
// temperature-0 answers sent one after another on a warm server with
// OLLAMA_NUM_PARALLEL=4 (twice, so the second round could reuse slots),
// sent all at once (twice: the runner interleaves them differently each
// time) and each on a fresh runner.
func TestForkHistoryIndependent(t *testing.T) {
	bin, stories := forkSetup(t)
	store := t.TempDir()
	opts := map[string]any{"num_ctx": 256, "num_batch": 32, "temperature": 0, "num_thread": 1, "num_predict": 24}
	env := []string{"OLLAMA_KV_NORM_KEEP=0.5", "OLLAMA_NUM_PARALLEL=4", "OLLAMA_DEBUG=1"}

	warm := startServer(t, bin, store, env...)
	warm.createModel(t, "stories", stories)
	seq := make([]string, len(burstEndings))
	for round := range 2 {
		for i, e := range burstEndings {
			r, err := warm.generateFull(t, "stories", burstPrefix+e, opts)
			require.NoError(t, err)
			if round == 0 {
				seq[i] = r.Response
			} else {
				assert.Equal(t, seq[i], r.Response, "request %d, second round", i)
			}
		}
	}
	for round := range 2 {
		burst, err := warm.burst(t, "stories", opts)
		require.NoError(t, err)
		for i := range burstEndings {
			assert.Equal(t, seq[i], burst[i].Response, "request %d, burst %d", i, round)
		}
		// The runner decoded them together (4 slots).
		assert.GreaterOrEqual(t, maxOverlap(burst), 2, "burst %d: requests decoded at once", round)
	}
	log := warm.log.String()

	// Fresh: every request on a runner started for it (keep_alive 0
	// unloads the runner after each answer).
	fresh := startServer(t, bin, store, env...)
	for i, e := range burstEndings {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		stream := false
		var text strings.Builder
		err := fresh.client.Generate(ctx, &api.GenerateRequest{Model: "stories", Prompt: burstPrefix + e, Raw: true, Stream: &stream,
			Options: opts, KeepAlive: &api.Duration{Duration: 0}}, func(r api.GenerateResponse) error {
			text.WriteString(r.Response)
			return nil
		})
		cancel()
		require.NoError(t, err)
		assert.Equal(t, seq[i], text.String(), "request %d, fresh runner", i)
		waitUnloaded(t, fresh)
	}
	assert.Contains(t, log, "loading cache slot")
	t.Logf("warm server: %d slot loads, %d with a reused prefix", strings.Count(log, "loading cache slot"), countReused(log))
}

// The requests of TestForkHistoryIndependent and BenchmarkForkBurst: a
// shared prefix of 35 tokens and 8 endings.
const burstPrefix = "Once upon a time there was a little girl named Lily. She loved to play with her toys and her friends. One day she went to the park with her mom and"

var burstEndings = []string{" saw a dog", " found a ball", " met a boy", " ate an apple", " saw a bird", " lost her hat", " climbed a tree", " played in the sand"}

// burst sends the burstEndings requests at once and returns their final
// responses, in order.
func (s *server) burst(t *testing.T, model string, options map[string]any) ([]api.GenerateResponse, error) {
	t.Helper()
	out := make([]api.GenerateResponse, len(burstEndings))
	errs := make([]error, len(burstEndings))
	var wg sync.WaitGroup
	for i, e := range burstEndings {
		wg.Go(func() { out[i], errs[i] = s.generateFull(t, model, burstPrefix+e, options) })
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

// maxOverlap is the largest number of responses the runner was working on
// at once: each from its end (CreatedAt) back over its prompt and eval
// durations.
func maxOverlap(rs []api.GenerateResponse) int {
	most := 0
	for _, a := range rs {
		n := 0
		for _, b := range rs {
			start := b.CreatedAt.Add(-b.PromptEvalDuration - b.EvalDuration)
			if !start.After(a.CreatedAt) && !b.CreatedAt.Before(a.CreatedAt) {
				n++
			}
		}
		most = max(most, n)
	}
	return most
}

var usedRe = regexp.MustCompile(`msg="loading cache slot".* used=([0-9]+)`)

// countReused counts the slot loads that reused a prefix (used > 0).
func countReused(log string) int {
	n := 0
	for _, m := range usedRe.FindAllStringSubmatch(log, -1) {
		if m[1] != "0" {
			n++
		}
	}
	return n
}

// waitUnloaded waits until the server has no model loaded.
func waitUnloaded(t *testing.T, s *server) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		ps, err := s.client.ListRunning(ctx)
		cancel()
		if err == nil && len(ps.Models) == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("the model is still loaded after keep_alive 0")
}

// The cost of never reusing a compressed prefix, in a two-turn chat:
// prompt_eval_count is the whole conversation either way (Ollama counts the
// prompt, reused or not); the runner's "loading cache slot" line says how
// many tokens it reused.
func TestForkChatSecondTurn(t *testing.T) {
	bin, stories := forkSetup(t)
	store := t.TempDir()
	opts := map[string]any{"num_ctx": 256, "num_batch": 32, "temperature": 0, "num_thread": 1, "num_predict": 16}
	turn1 := "Once upon a time there was a little girl named Lily. She loved to play with her toys and her friends."
	for i, env := range [][]string{{"OLLAMA_DEBUG=1"}, {"OLLAMA_DEBUG=1", "OLLAMA_KV_NORM_KEEP=0.5"}} {
		s := startServer(t, bin, store, env...)
		if i == 0 {
			s.createModel(t, "stories", stories)
		}
		r1, err := s.generateFull(t, "stories", turn1, opts)
		require.NoError(t, err)
		turn2 := turn1 + r1.Response + " Then her mom said"
		r2, err := s.generateFull(t, "stories", turn2, opts)
		require.NoError(t, err)
		m := usedRe.FindAllStringSubmatch(s.log.String(), -1)
		require.Len(t, m, 2)
		used, _ := strconv.Atoi(m[1][1])
		name := map[int]string{0: "off", 1: "keep=0.5"}[i]
		t.Logf("%s: turn 2 prompt_eval_count %d, reused %d tokens, prompt_eval_duration %v", name, r2.PromptEvalCount, used, r2.PromptEvalDuration)
		if i == 0 {
			assert.Positive(t, used, "upstream reuses the first turn")
		} else {
			assert.Zero(t, used, "a compressed slot is not reused")
		}
	}
	_ = fmt.Sprint
}

// runnerPeakRSS returns the largest VmHWM (kB) of the server's runners.
func (s *server) runnerPeakRSS(t *testing.T) int64 {
	t.Helper()
	var peak int64
	for _, m := range groupMembers(s.pgid) {
		pid, cmd, _ := strings.Cut(m, " ")
		if !strings.Contains(cmd, " runner ") {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", pid, "status"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				peak = max(peak, kb)
			}
		}
	}
	return peak
}

// createModelFile creates model name from a GGUF file too large to read
// into memory at once.
func (s *server) createModelFile(t *testing.T, name, path string) {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	h := sha256.New()
	_, err = io.Copy(h, f)
	require.NoError(t, err)
	digest := "sha256:" + hex.EncodeToString(h.Sum(nil))
	_, err = f.Seek(0, io.SeekStart)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	require.NoError(t, s.client.CreateBlob(ctx, digest, f))
	stream := false
	require.NoError(t, s.client.Create(ctx, &api.CreateRequest{Model: name, Files: map[string]string{filepath.Base(path): digest}, Stream: &stream},
		func(api.ProgressResponse) error { return nil }))
}

// The figures of docs/results.md, "Ollama: KV memory by policy", on the
// Llama-3.2-1B shape: set KVNORM_FORK_1B to its GGUF (`kvnorm synth --shape
// llama-3.2-1b --type f16 --out FILE`), about 2.5 GB. One server per row,
// num_ctx 8192, num_batch 512, a 4-token raw prompt, 4 tokens generated, 2
// threads; it prints the table and checks issue 10's target (keep 0.5 with
// layers 0-1 whole at most 0.62 of off, f16).
//
//	KVNORM_FORK_1B=/path/llama-1b-f16.gguf go test -count=1 -v -run TestFork1BMemory -timeout 60m ./ollama/fork/
func TestFork1BMemory(t *testing.T) {
	path := os.Getenv("KVNORM_FORK_1B")
	if path == "" {
		t.Skip("KVNORM_FORK_1B (a GGUF of the Llama-3.2-1B shape) not set")
	}
	root, err := findRepo()
	require.NoError(t, err)
	bin := ollamaBinary(t, root)
	store := t.TempDir()
	opts := map[string]any{"num_ctx": 8192, "num_batch": 512, "temperature": 0, "num_thread": 2, "num_predict": 4}
	q8 := []string{"OLLAMA_KV_CACHE_TYPE=q8_0", "OLLAMA_FLASH_ATTENTION=1"}
	rows := []struct {
		cache, policy string
		env           []string
	}{
		{"f16", "off", nil},
		{"f16", "keep=1", []string{"OLLAMA_KV_NORM_KEEP=1"}},
		{"f16", "keep=0.5", []string{"OLLAMA_KV_NORM_KEEP=0.5"}},
		{"f16", "keep=0.25", []string{"OLLAMA_KV_NORM_KEEP=0.25"}},
		{"q8_0, flash attention", "off", q8},
		{"q8_0, flash attention", "keep=0.5", append([]string{"OLLAMA_KV_NORM_KEEP=0.5"}, q8...)},
	}
	table := []string{"| cache | policy | kv cache | × off | ps bytes | peak RSS kB |", "| --- | --- | ---: | ---: | ---: | ---: |"}
	offKV := map[string]float64{}
	for i, r := range rows {
		s := startServer(t, bin, store, append([]string{"OLLAMA_DEBUG=1"}, r.env...)...)
		if i == 0 {
			s.createModelFile(t, "llama1b", path)
		}
		_, err := s.generateFull(t, "llama1b", "Once upon a time", opts)
		require.NoError(t, err, "%s %s", r.cache, r.policy)
		kv := kvCacheBytes(t, s.log.String())
		ps := s.runningSize(t)
		rss := s.runnerPeakRSS(t)
		if r.policy == "off" {
			offKV[r.cache] = kv
		}
		ratio := kv / offKV[r.cache]
		table = append(table, fmt.Sprintf("| %s | %s | %.1f MiB | %.3f | %d | %d |", r.cache, r.policy, kv/(1<<20), ratio, ps, rss))
		if r.cache == "f16" && r.policy == "keep=0.5" {
			assert.LessOrEqual(t, ratio, 0.62, "issue 10's target")
		}
		// Free the memory before the next server.
		require.NoError(t, syscall.Kill(-s.pgid, syscall.SIGKILL))
		waitGroupGone(s.pgid, 30*time.Second)
	}
	t.Log("\n" + strings.Join(table, "\n"))
}
