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
