package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Every anchor occurs once in the pinned Ollama source, and patching is
// deterministic.
func TestPatchesApplyToPinnedOllama(t *testing.T) {
	root, err := findRepo()
	require.NoError(t, err)
	modDir, version, err := moduleDir(root)
	if err != nil {
		t.Skipf("Ollama module unavailable: %v", err)
	}
	assert.Equal(t, "v0.24.0", version)
	for _, p := range patches {
		b, err := os.ReadFile(filepath.Join(modDir, p.file))
		require.NoError(t, err)
		got, err := insert(string(b), p)
		require.NoError(t, err, p.file)
		assert.Equal(t, 1, strings.Count(got, "kvnormhook."), p.file)
		assert.Contains(t, got, "import (\n\t"+hookImport+"\n")
		again, err := insert(string(b), p)
		require.NoError(t, err)
		assert.Equal(t, got, again)
	}
}

func TestInsertRefusesChangedSource(t *testing.T) {
	p := patches[0]
	_, err := insert("package x\nimport (\n)\n", p)
	assert.ErrorContains(t, err, "occurs 0 times")
	_, err = insert(p.anchor+p.anchor, p)
	assert.ErrorContains(t, err, "occurs 2 times")
	_, err = insert(p.anchor, p)
	assert.ErrorContains(t, err, "no import block")
}

func TestGoLine(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module x\n\ngo 1.26.0\n"), 0o644))
	v, err := goLine(filepath.Join(dir, "go.mod"))
	require.NoError(t, err)
	assert.Equal(t, "1.26.0", v)
}
