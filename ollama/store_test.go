package ollama

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestResolveModel(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("OLLAMA_MODELS", dir)
	hex := strings.Repeat("ab", 32)
	write := func(rel, body string) {
		p := filepath.Join(dir, rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
	}
	write("blobs/sha256-"+hex, "GGUF")
	write("manifests/registry.ollama.ai/library/tiny/1b", `{"layers":[{"mediaType":"application/vnd.ollama.image.template","digest":"sha256:`+strings.Repeat("cd", 32)+`"},{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:`+hex+`"}]}`)
	write("manifests/registry.ollama.ai/me/tiny/latest", `{"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:`+hex+`"}]}`)
	write("manifests/registry.ollama.ai/library/broken/latest", `{"layers":[`)
	write("manifests/registry.ollama.ai/library/noweights/latest", `{"layers":[]}`)
	write("manifests/registry.ollama.ai/library/baddigest/latest", `{"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"md5:x"}]}`)

	for _, name := range []string{"tiny:1b", "me/tiny", "registry.ollama.ai/me/tiny:latest"} {
		p, err := ResolveModel(name)
		require.NoError(t, err, name)
		assert.Equal(t, filepath.Join(dir, "blobs", "sha256-"+hex), p)
	}
	_, err := ResolveModel("tiny")
	assert.ErrorIs(t, err, ErrModelNotFound, "the default tag is latest")
	assert.ErrorContains(t, err, "ollama pull tiny")
	for name, want := range map[string]string{
		"broken": "manifest", "noweights": "has no", "baddigest": "bad digest", "::": "not a valid",
	} {
		_, err := ResolveModel(name)
		assert.ErrorContains(t, err, want, name)
	}
}
