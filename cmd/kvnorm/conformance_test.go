package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// storiesPaths returns stories260K and its tokenizer from ../shared/models
// beside the repository root (two levels above this package), or skips.
func storiesPaths(t *testing.T) (model, tok string) {
	t.Helper()
	models := filepath.Join("..", "..", "..", "shared", "models")
	model, tok = filepath.Join(models, "stories260K.bin"), filepath.Join(models, "tok512.bin")
	for _, p := range []string{model, tok} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("stories260K not available: %v", err)
		}
	}
	return model, tok
}

// TestConformanceBadFlags: every bad size, list or tolerance flag is an
// error naming it, before any runtime opens.
func TestConformanceBadFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--samples", "-1"}, "--samples -1"},
		{[]string{"--prefill", "-3"}, "--prefill -3"},
		{[]string{"--lengths", "200,x"}, `--lengths "x"`},
		{[]string{"--depths", "0.5,1.5"}, `--depths "1.5"`},
		{[]string{"--sinks", "0,4"}, "take one value unless --recommend"},
		{[]string{"--window", "-2"}, `--window "-2"`},
		{[]string{"--skip-layers", "0,1;x"}, "--skip-layers"},
		{[]string{"--recommend", "--target-ctx", "-5"}, "--target-ctx -5"},
		{[]string{"--bootstrap", "-1"}, "bootstrap=-1"},
		{[]string{"--samples", "2", "--prefill", "600"}, "must fit the context 512"},
	}
	model, tok := storiesPaths(t)
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			args := append([]string{"conformance", "--model", model, "--tokenizer", tok, "--runtime", "reference", "--tasks", "lm",
				"--out", t.TempDir()}, c.args...)
			code, out, errs := cli(t, args...)
			assert.NotEqual(t, 0, code)
			assert.Contains(t, errs+out, c.want)
		})
	}
}

// TestConformanceRecommendReference: --recommend on the reference runtime
// with tiny sizes prints the Ollama lines, the Go literal and the memory,
// or says why nothing qualifies; a loose tolerance admits keep 0.5, an
// impossible one admits nothing.
func TestConformanceRecommendReference(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the reference forward pass")
	}
	model, tok := storiesPaths(t)
	base := []string{"conformance", "--model", model, "--tokenizer", tok, "--runtime", "reference", "--recommend",
		"--tasks", "lm", "--samples", "2", "--prefill", "64", "--score", "16", "--keep", "1,0.5", "--granularity", "per-head",
		"--chunked=false", "--bootstrap", "200", "--target-ctx", "2048"}
	code, out, errs := cli(t, append(base, "--out", t.TempDir(), "--max-ppl-increase", "1000%")...)
	require.Equal(t, 0, code, errs)
	for _, want := range []string{"policy: knorm keep=0.5 per-head", "export OLLAMA_KV_NORM_KEEP=0.5", "export OLLAMA_KV_NORM_SKIP_LAYERS=0,1",
		"adapter.Policy{Method: adapter.KNorm, Keep: 0.5, Granularity: hooks.PerHead, SkipLayers: []int{0, 1}}", "KV memory of one sequence at 2048 tokens"} {
		assert.Contains(t, out, want)
	}
	code, out, errs = cli(t, append(base, "--out", t.TempDir(), "--max-ppl-increase", "-50%")...)
	assert.Equal(t, 1, code)
	assert.Contains(t, out, "no recommendation")
	assert.Contains(t, errs, "no runtime has a compressed policy within the tolerances")
}
