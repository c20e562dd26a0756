package ollama

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/synth"
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

func TestLocalModels(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("OLLAMA_MODELS", filepath.Join(dir, "none"))
	ms, err := LocalModels()
	require.NoError(t, err, "a missing store is an empty list")
	assert.Empty(t, ms)

	t.Setenv("OLLAMA_MODELS", dir)
	blobs := filepath.Join(dir, "blobs")
	require.NoError(t, os.MkdirAll(blobs, 0o755))
	digest := func(c string) string { return strings.Repeat(c, 64) }
	llama, qwen := synth.Shapes["tiny"], synth.Shapes["tiny"]
	qwen.Arch, qwen.Layers = "qwen3", 2 // smaller than the llama
	require.NoError(t, synth.Write(filepath.Join(blobs, "sha256-"+digest("a")), llama, gguf.F16, 1))
	require.NoError(t, synth.Write(filepath.Join(blobs, "sha256-"+digest("b")), qwen, gguf.F16, 1))
	require.NoError(t, os.WriteFile(filepath.Join(blobs, "sha256-"+digest("c")), []byte("GGUF"), 0o644))
	manifest := func(rel, hex string) {
		p := filepath.Join(dir, "manifests", rel)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(`{"layers":[{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:`+hex+`"}]}`), 0o644))
	}
	manifest("registry.ollama.ai/library/tiny/1b", digest("a"))
	manifest("registry.ollama.ai/me/small/latest", digest("b"))
	manifest("hf.co/someone/junk/q4", digest("c"))
	manifest("registry.ollama.ai/library/gone/latest", digest("d")) // no blob: left out
	manifest("registry.ollama.ai/library/bad", digest("a"))         // not host/ns/model/tag: left out

	ms, err = LocalModels()
	require.NoError(t, err)
	require.Len(t, ms, 3)
	assert.Equal(t, LocalModel{Name: "hf.co/someone/junk:q4", Path: filepath.Join(blobs, "sha256-"+digest("c")), Size: 4}, ms[0])
	assert.Equal(t, "me/small:latest", ms[1].Name)
	assert.Equal(t, "qwen3", ms[1].Arch)
	assert.True(t, ms[1].Supported)
	assert.Equal(t, "tiny:1b", ms[2].Name)
	assert.Equal(t, "llama", ms[2].Arch)
	assert.True(t, ms[2].Supported)
	assert.Less(t, ms[1].Size, ms[2].Size)
	p, err := ResolveModel(ms[2].Name)
	require.NoError(t, err)
	assert.Equal(t, ms[2].Path, p, "a listed name resolves to its blob")
}
