package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/llamacpp"
	"github.com/kvnorm/kvnorm/synth"
)

// cli runs the command in-process and returns its exit code and output.
func cli(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, log bytes.Buffer
	code = run(args, &out, &log)
	return code, out.String(), log.String()
}

func TestVersionAndUsage(t *testing.T) {
	code, out, _ := cli(t, "version")
	assert.Equal(t, 0, code)
	assert.Contains(t, out, "kvnorm ")
	code, _, errs := cli(t, "frobnicate")
	assert.Equal(t, 2, code)
	assert.Contains(t, errs, `unknown command "frobnicate"`)
	code, _, errs = cli(t)
	assert.Equal(t, 2, code)
	assert.Contains(t, errs, "demo")
	code, _, errs = cli(t, "version", "extra")
	assert.Equal(t, 1, code)
	assert.Contains(t, errs, "unexpected argument(s): extra")
}

func TestBenchKernelsQuick(t *testing.T) {
	code, out, errs := cli(t, "bench", "kernels", "--quick", "--json")
	require.Equal(t, 0, code, errs)
	var res struct {
		Impl    string `json:"active_impl"`
		Kernels []struct {
			DType    string  `json:"dtype"`
			Dim      int     `json:"dim"`
			Impl     string  `json:"impl"`
			GBps     float64 `json:"gbps"`
			ReadGBps float64 `json:"read_gbps"`
			Ratio    float64 `json:"ratio"`
		} `json:"kernels"`
		Select []struct {
			N            int     `json:"n"`
			ScoresPerSec float64 `json:"scores_per_s"`
		} `json:"select"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.NotEmpty(t, res.Impl)
	dtypes := map[string]bool{}
	for _, k := range res.Kernels {
		dtypes[k.DType] = true
		assert.Positive(t, k.GBps)
		assert.Positive(t, k.ReadGBps)
		assert.InDelta(t, k.GBps/k.ReadGBps, k.Ratio, 1e-9)
	}
	assert.Equal(t, map[string]bool{"f32": true, "f16": true, "bf16": true, "q8_0": true}, dtypes)
	require.Len(t, res.Select, 2)
	assert.Positive(t, res.Select[1].ScoresPerSec)

	code, _, errs = cli(t, "bench", "nothing")
	assert.Equal(t, 1, code)
	assert.Contains(t, errs, `bench "nothing"`)
	code, _, errs = cli(t, "bench", "kernels", "--dims", "64,x")
	assert.Equal(t, 1, code)
	assert.Contains(t, errs, `"x" is not a positive integer`)
}

func TestSynthCommand(t *testing.T) {
	out := filepath.Join(t.TempDir(), "tiny.gguf")
	code, stdout, errs := cli(t, "synth", "--shape", "tiny", "--type", "q8_0", "-o", out)
	require.Equal(t, 0, code, errs)
	assert.Contains(t, errs, "RANDOM WEIGHTS")
	assert.Contains(t, stdout, "wrote")
	f, err := gguf.Open(out)
	require.NoError(t, err)
	f.Close()
	code, _, errs = cli(t, "synth", "--shape", "gpt5", "-o", out)
	assert.Equal(t, 1, code)
	assert.Contains(t, errs, `--shape "gpt5"`)
	code, _, errs = cli(t, "synth", "--shape", "custom", "--layers", "2", "--heads", "3", "--kv-heads", "2", "--head-dim", "8", "--embd", "24", "--ffn", "32", "-o", out)
	assert.Equal(t, 1, code)
	assert.Contains(t, errs, "heads=3 is not a multiple of kv heads=2")
	// A custom shape takes --rope-base (and its default) into the file.
	for _, tc := range []struct {
		args []string
		want float32
	}{{nil, 10000}, {[]string{"--rope-base", "500000"}, 500000}} {
		args := append([]string{"synth", "--shape", "custom", "--layers", "2", "--heads", "4", "--kv-heads", "2",
			"--head-dim", "8", "--embd", "32", "--ffn", "32", "--vocab", "512", "-o", out}, tc.args...)
		code, _, errs = cli(t, args...)
		require.Equal(t, 0, code, errs)
		f, err := gguf.Open(out)
		require.NoError(t, err)
		v, ok := f.Value("llama.rope.freq_base")
		f.Close()
		require.True(t, ok)
		assert.Equal(t, tc.want, v, "rope base of %v", tc.args)
	}
	code, _, errs = cli(t, "synth", "--shape", "tiny")
	assert.Equal(t, 1, code)
	assert.Contains(t, errs, "-o OUT.gguf is required")
}

func TestDemo(t *testing.T) {
	// An empty Ollama store, so that the no-argument demo does not pick a
	// model of the machine's own store.
	t.Setenv("OLLAMA_MODELS", t.TempDir())
	t.Setenv("HOME", t.TempDir())
	// On a synthetic model given with --model: works anywhere.
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, synth.Write(path, synth.Shapes["tiny"], gguf.F16, 1))
	// The pure-Go reference runtime: works without cgo.
	code, out, errs := cli(t, "demo", "--runtime", "reference", "--model", path, "--n", "8")
	require.Equal(t, 0, code, errs)
	assert.Contains(t, out, "runtime: reference")
	m, err := llamacpp.Open(path)
	if errors.Is(err, llamacpp.ErrNoCgo) {
		t.Skip("the llama.cpp runtime is not built in (cgo off)")
	}
	require.NoError(t, err)
	require.NoError(t, m.Close())
	code, out, errs = cli(t, "demo", "--model", path, "--n", "8")
	require.Equal(t, 0, code, errs)
	assert.Contains(t, out, "given with --model")
	assert.Contains(t, out, "KV cells after prefill")
	assert.Contains(t, out, "continuation, compressed:")

	// With no arguments from this checkout: ../shared/models.
	if sharedModels() == "" {
		t.Skip("../shared/models is absent: the no-argument demo falls back to a synthetic model")
	}
	if _, err := os.Stat(filepath.Join(sharedModels(), "stories260K.bin")); err != nil {
		t.Skip(err)
	}
	code, out, errs = cli(t, "demo", "--n", "16")
	require.Equal(t, 0, code, errs)
	assert.Contains(t, out, "stories260K")
	assert.Regexp(t, `KV cells after prefill\s+(\d+)\s+(\d+)`, out)
}
