//go:build cgo

package kvnormhook

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/ollama/ollama/fs/ggml"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/llama2c"
)

// storiesGGUF converts ../shared/models/stories260K.bin (beside the
// repository root) to a GGUF file of architecture llama.
func storiesGGUF(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	require.NoError(t, err)
	for ; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		require.NotEqual(t, dir, filepath.Dir(dir), "no go.mod above the test")
	}
	models := filepath.Join(dir, "..", "shared", "models")
	if _, err := os.Stat(filepath.Join(models, "stories260K.bin")); err != nil {
		t.Skip("stories260K not found: expected ../shared/models/stories260K.bin next to the repository root")
	}
	out := filepath.Join(t.TempDir(), "stories260K.gguf")
	require.NoError(t, llama2c.ConvertFile(filepath.Join(models, "stories260K.bin"), filepath.Join(models, "tok512.bin"), out, "f32"))
	return out
}

// Ollama v0.24.0 sends llama models to its llama.cpp runner (tok nil);
// with compression on, CheckServer gives them the Go engine's text processor.
func TestCheckServerRoutesLlama(t *testing.T) {
	path := storiesGGUF(t)
	r, err := os.Open(path)
	require.NoError(t, err)
	f, err := ggml.Decode(r, -1)
	r.Close()
	require.NoError(t, err)
	for _, name := range []string{EnvKeep, EnvBudget, EnvSkipLayers, EnvSinks, EnvWindow, EnvGranularity} {
		t.Setenv(name, "")
	}
	var log bytes.Buffer
	prev := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&log, nil)))
	t.Cleanup(func() { slog.SetDefault(prev) })

	tok, err := CheckServer(nil, path, f, 0, 512)
	require.NoError(t, err)
	assert.Nil(t, tok, "compression off: Ollama's choice stands")
	assert.Empty(t, log.String())

	t.Setenv(EnvKeep, "0.5")
	tok, err = CheckServer(nil, path, f, 0, 512)
	require.NoError(t, err)
	require.NotNil(t, tok, "compression on: the Go engine")
	ids, err := tok.Encode("Once upon a time", true)
	require.NoError(t, err)
	assert.NotEmpty(t, ids)
	assert.Contains(t, log.String(), `msg="kvnorm: KV cache compression on: the model runs on Ollama's Go engine (routed by kvnorm; OLLAMA_NEW_ENGINE=1 is not needed)" arch=llama`)

	log.Reset()
	tok, err = CheckServer(nil, path, f, 1, 512)
	require.NoError(t, err)
	assert.Nil(t, tok, "a split vision model stays on llama.cpp")
	assert.Contains(t, log.String(), "its vision projector is a separate file")

	log.Reset()
	t.Setenv(EnvSkipLayers, "0,1,2,3,4")
	tok, err = CheckServer(nil, path, f, 0, 512)
	require.NoError(t, err)
	assert.Nil(t, tok, "every one of the 5 layers skipped: compression off, not routed")
	assert.Contains(t, log.String(), "skips every one of the model's 5 layers")

	log.Reset()
	t.Setenv(EnvSkipLayers, "")
	t.Setenv(EnvBudget, "4096")
	_, err = CheckServer(nil, path, f, 0, 100000)
	require.NoError(t, err)
	assert.Contains(t, log.String(), "budget=4096 >= the context of 512 cells", "num_ctx capped at the trained context (512)")

	t.Setenv(EnvKeep, "half")
	_, err = CheckServer(nil, path, f, 0, 512)
	assert.ErrorContains(t, err, `OLLAMA_KV_NORM_KEEP="half"`)
}
