//go:build cgo && linux

package main

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestForkLongPrompt measures what a user of kvnorm's Ollama build gets for
// a prompt that fills num_ctx on a real-sized model, one row per policy,
// each on a fresh server: the runner's "kv cache" line, /api/ps, the
// runner's RSS after the answer and its peak, prompt_eval_count against the
// prompt's tokens, the prompt's evaluation time (time to first token) and
// decode tokens/s. It runs only when KVNORM_FORK_MODEL names a GGUF (for
// example `kvnorm synth --shape llama-3.2-1b --type f16`); an 8000-token
// prompt of that shape takes minutes per row on 2 cores.
//
//	KVNORM_FORK_MODEL=M.gguf [KVNORM_FORK_TOKENS=8000] [KVNORM_FORK_CTX=8192]
//	[KVNORM_FORK_POLICIES="off keep=0.5"] [KVNORM_FORK_CACHE=f16|q8_0]
//	[KVNORM_FORK_THREADS=2] go test -run TestForkLongPrompt -v -timeout 2h ./ollama/fork/
func TestForkLongPrompt(t *testing.T) {
	model := os.Getenv("KVNORM_FORK_MODEL")
	if model == "" {
		t.Skip("KVNORM_FORK_MODEL not set (a GGUF to measure)")
	}
	bin, _ := forkSetup(t)
	envInt := func(name string, def int) int {
		v, err := strconv.Atoi(cmpOr(os.Getenv(name), strconv.Itoa(def)))
		require.NoError(t, err, name)
		return v
	}
	tokens, numCtx, threads := envInt("KVNORM_FORK_TOKENS", 8000), envInt("KVNORM_FORK_CTX", 8192), envInt("KVNORM_FORK_THREADS", 2)
	policies := strings.Fields(cmpOr(os.Getenv("KVNORM_FORK_POLICIES"), "off keep=0.5"))
	cache := cmpOr(os.Getenv("KVNORM_FORK_CACHE"), "f16")
	store := t.TempDir()
	// Flash attention on (Ollama quantizes the cache only with it, and a
	// long prompt's attention is cheaper with it on the CPU).
	base := []string{"OLLAMA_KV_CACHE_TYPE=" + cache, "OLLAMA_FLASH_ATTENTION=1"}
	opts := map[string]any{"num_ctx": numCtx, "num_batch": 512, "temperature": 0, "num_thread": threads, "num_predict": 32}

	// The prompt: a sentence repeated to the wanted token count, measured
	// with a first request (prompt_eval_count of a known number of copies).
	const sentence = "Once upon a time there was a little girl named Lily. She loved to play with her toys and her friends. "
	var prompt string
	var promptTokens int
	fmt.Printf("| cache | policy | kv cache MiB | × off | /api/ps bytes | RSS after MiB | peak RSS MiB | prompt tokens | prompt_eval_count | prompt s | decode tok/s | × off |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	var offKV, offDecode float64
	for i, pol := range policies {
		env := append([]string(nil), base...)
		if pol != "off" {
			for _, kv := range strings.Split(pol, ",") {
				k, v, ok := strings.Cut(kv, "=")
				require.True(t, ok, "policy %q: want name=value[,name=value]", pol)
				env = append(env, "OLLAMA_KV_NORM_"+strings.ToUpper(strings.ReplaceAll(k, "-", "_"))+"="+v)
			}
		}
		s := startServer(t, bin, store, env...)
		if i == 0 {
			s.createModel(t, "m", model)
			count := func(copies int) int {
				r, err := s.generateFull(t, "m", strings.Repeat(sentence, copies), map[string]any{"num_ctx": numCtx, "num_predict": 1, "num_thread": threads})
				require.NoError(t, err)
				return r.PromptEvalCount
			}
			one, four := count(1), count(4)
			per := (four - one) / 3
			require.Positive(t, per)
			copies := (tokens - (one - per)) / per
			prompt, promptTokens = strings.Repeat(sentence, copies), one-per+copies*per
		}
		start := time.Now()
		// No 10-minute limit: a prompt of num_ctx tokens on a real-sized
		// model may take longer on 2 cores.
		r, err := s.generateWithin(t, 90*time.Minute, "m", prompt, opts)
		require.NoError(t, err, pol)
		wall := time.Since(start)
		log := s.log.String()
		kv := kvCacheBytes(t, log)
		ps := s.runningSize(t)
		rss, hwm := runnerMemory(t, log)
		decode := float64(r.EvalCount) / r.EvalDuration.Seconds()
		if pol == "off" {
			offKV, offDecode = kv, decode
		}
		ratio := func(v, off float64) string {
			if off == 0 {
				return "–"
			}
			return fmt.Sprintf("%.3f", v/off)
		}
		fmt.Printf("| %s | %s | %.1f | %s | %d | %.1f | %.1f | %d | %d | %.1f | %.2f | %s |\n", cache, pol, kv/(1<<20), ratio(kv, offKV), ps,
			float64(rss)/1024, float64(hwm)/1024, promptTokens, r.PromptEvalCount, r.PromptEvalDuration.Seconds(), decode, ratio(decode, offDecode))
		t.Logf("%s: %s wall, load %s", pol, wall.Round(time.Second), loadAvg())
		assert.NotContains(t, log, "kv cache removal unsupported", "no shift refused")
		assert.NotContains(t, log, "truncating input prompt", "the prompt is served whole")
		assert.Equal(t, promptTokens, r.PromptEvalCount, "prompt_eval_count is the prompt's tokens")
	}
}

func cmpOr(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

var runnerPort = regexp.MustCompile(`starting runner.*--port (\d+)`)

// runnerMemory returns the Go-engine runner's VmRSS and VmHWM in kB: the
// process whose command line has the port of the last "starting runner"
// line of the server's log.
func runnerMemory(t *testing.T, log string) (rss, hwm int64) {
	t.Helper()
	m := runnerPort.FindAllStringSubmatch(log, -1)
	require.NotEmpty(t, m, "no starting runner line")
	port := m[len(m)-1][1]
	for _, p := range liveProcesses() {
		f := strings.Fields(p.cmdline)
		if len(f) < 2 || f[1] != "runner" || !strings.Contains(p.cmdline, "--port "+port) {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid))
		require.NoError(t, err)
		for _, l := range strings.Split(string(st), "\n") {
			k, v, _ := strings.Cut(l, ":")
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			switch k {
			case "VmRSS":
				rss = n
			case "VmHWM":
				hwm = n
			}
		}
		return rss, hwm
	}
	t.Fatalf("no runner process with --port %s", port)
	return 0, 0
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.Join(strings.Fields(string(b))[:3], " ")
}
