//go:build cgo

package main

import (
	"encoding/json"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A prompt longer than --ctx completes on both runtimes without --batch: it
// is fed in chunks chosen from the cache (a quarter of it), each after a
// compression under pressure. Before, Ollama failed with "could not find a kv
// cache slot: seq 0 needs 301 cells, 128 of 128 are free" and llama.cpp with
// "batch of 512 tokens does not fit in a context of 256 cells".
func TestGenerateLongPromptBothRuntimes(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	prompt := storyPrompt(t, t.TempDir(), 17) // about 300 tokens
	for _, tc := range []struct {
		runtime, granularity string
		cells, chunk         int // cells per sequence at --ctx 128, and the chunk chosen from them
	}{
		{"ollama", "per-head", 128, 32},
		{"ollama", "per-token", 128, 32},
		{"llamacpp", "per-token", 256, 64}, // llama.cpp pads to 256 cells
	} {
		t.Run(tc.runtime+"/"+tc.granularity, func(t *testing.T) {
			code, out, log := runCLI(t, "generate", "--runtime", tc.runtime, "--model", ckpt, "--tokenizer", tok,
				"--prompt-file", prompt, "--ctx", "128", "--keep", "0.5", "--granularity", tc.granularity, "--n", "16", "--json")
			require.Equal(t, 0, code, log)
			assert.Contains(t, log, fmt.Sprintf("cells per sequence, prefill chunks of %d", tc.chunk))
			var res generateResult
			require.NoError(t, json.Unmarshal([]byte(out), &res))
			assert.Equal(t, tc.runtime, res.Runtime)
			assert.Equal(t, tc.granularity, res.Granularity)
			assert.InDelta(t, 300, res.PromptTokens, 40)
			assert.Greater(t, res.PromptTokens, tc.cells, "the prompt is longer than the cache")
			assert.LessOrEqual(t, res.KVCellsBefore, tc.cells)
			assert.Greater(t, res.KVCellsBefore, 0)
			assert.LessOrEqual(t, res.KVCellsAfter, res.KVCellsBefore)
			assert.Greater(t, res.Compressions, 1, "compressions under pressure are counted")
			assert.Equal(t, 16, res.GeneratedTokens)
			assert.NotEmpty(t, res.Text)
		})
	}
}

// What cannot work is refused before anything runs, with the flag named, the
// same way on both runtimes.
func TestGenerateRefusesWhatCannotWork(t *testing.T) {
	ckpt, tok := llamacppModels(t)
	long := storyPrompt(t, t.TempDir(), 17)
	for _, rt := range []string{"ollama", "llamacpp"} {
		cells := map[string]string{"ollama": "--ctx 128 gives 128 cells per sequence;", "llamacpp": "--ctx 128 gives 256 cells per sequence (llama.cpp pads to a multiple of 256);"}[rt]
		for _, tc := range []struct {
			name string
			args []string
			want string
		}{
			{"explicit batch larger than the cache", []string{"--prompt", "hi", "--ctx", "128", "--batch", "512"},
				"--batch 512 does not fit in the cache: " + cells + " give --batch <="},
			{"explicit batch leaving no room under pressure", []string{"--prompt-file", long, "--ctx", "256", "--batch", "256", "--keep", "0.5"},
				"--batch 256 cannot be fed into a full cache"},
			{"long prompt uncompressed", []string{"--prompt-file", long, "--ctx", "128"}, "raise --ctx, or compress"},
			{"every layer skipped", []string{"--prompt", "hi", "--keep", "0.5", "--skip-layers", "0,1,2,3,4"},
				"--skip-layers does not fit this model (5 layers"},
			{"skip layers the model lacks", []string{"--prompt", "hi", "--keep", "0.5", "--skip-layers", "0,1,12"},
				"--skip-layers does not fit this model (5 layers"},
			{"budget covers the context", []string{"--prompt", "hi", "--budget", "4096", "--ctx", "512"},
				"--budget does not fit this model"},
			{"sinks and window cover the context", []string{"--prompt", "hi", "--keep", "0.5", "--sinks", "300", "--window", "300", "--ctx", "512"},
				"--sinks/--window does not fit this model"},
			{"sinks near MaxInt", []string{"--prompt", "hi", "--keep", "0.5", "--sinks", "9223372036854775806"},
				"sinks=9223372036854775806 exceeds 2147483647"},
		} {
			t.Run(rt+"/"+tc.name, func(t *testing.T) {
				args := append([]string{"generate", "--runtime", rt, "--model", ckpt, "--tokenizer", tok, "--n", "4"}, tc.args...)
				code, _, log := runCLI(t, args...)
				assert.Equal(t, 1, code, log)
				assert.Contains(t, log, tc.want)
			})
		}
		// Granularity in any case, as --policy.
		t.Run(rt+"/granularity case", func(t *testing.T) {
			code, _, log := runCLI(t, "generate", "--runtime", rt, "--model", ckpt, "--tokenizer", tok, "--n", "4",
				"--prompt", "hi", "--keep", "0.5", "--granularity", "PER-TOKEN", "--policy", "KNorm")
			assert.Equal(t, 0, code, log)
		})
	}
}
