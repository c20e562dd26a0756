package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// pinnedOllama returns the directory and version of the Ollama module
// kvnorm's go.mod pins, skipping the test when the module cache lacks it.
func pinnedOllama(t *testing.T) (dir, version string) {
	t.Helper()
	root, err := findRepo()
	require.NoError(t, err)
	dir, version, err = moduleDir(root)
	if err != nil {
		t.Skipf("Ollama module unavailable: %v", err)
	}
	return dir, version
}

// Every anchor occurs once in the pinned Ollama source, and patching is
// deterministic.
func TestPatchesApplyToPinnedOllama(t *testing.T) {
	modDir, version := pinnedOllama(t)
	assert.Equal(t, "v0.24.0", version)
	for _, p := range patches {
		b, err := os.ReadFile(filepath.Join(modDir, p.file))
		require.NoError(t, err)
		got, err := insert(string(b), p)
		require.NoError(t, err, p.file)
		assert.Equal(t, 1, strings.Count(p.insert, "// kvnorm: "), "every insertion says it is kvnorm's: %s", p.insert)
		calls := strings.Count(p.insert, "kvnormhook.")
		assert.Equal(t, calls, strings.Count(got, "kvnormhook."), p.file)
		if calls > 0 {
			assert.Contains(t, got, "import (\n\t"+hookImport+"\n")
		} else {
			assert.NotContains(t, got, hookImport, "an insertion that calls no kvnorm code imports nothing")
		}
		again, err := insert(string(b), p)
		require.NoError(t, err)
		assert.Equal(t, got, again)
	}
}

// A file with several patches gets every call and one import.
func TestApplyPatchesOneFile(t *testing.T) {
	modDir, _ := pinnedOllama(t)
	src := t.TempDir()
	calls := 0
	for _, file := range patchedFiles() {
		require.NoError(t, os.MkdirAll(filepath.Join(src, filepath.Dir(file)), 0o755))
		require.NoError(t, apply(modDir, src, file))
		b, err := os.ReadFile(filepath.Join(src, file))
		require.NoError(t, err)
		want, marks := 0, 0
		for _, p := range patches {
			if p.file == file {
				want += strings.Count(p.insert, "kvnormhook.")
				marks++
				assert.Contains(t, string(b), p.anchor+p.insert)
			}
		}
		assert.Equal(t, want, strings.Count(string(b), "kvnormhook."), file)
		assert.Equal(t, marks, strings.Count(string(b), "// kvnorm: "), file)
		assert.Equal(t, 1, strings.Count(string(b), hookImport), file)
		calls += marks
	}
	assert.Equal(t, len(patches), calls)
	assert.Equal(t, []string{"runner/ollamarunner/runner.go", "llm/server.go", "server/routes.go"}, patchedFiles())
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

// TestOptFlags: outside make the tool builds with the Makefile's flags on an
// AVX2 host, and never overrides flags the caller set.
func TestOptFlags(t *testing.T) {
	t.Setenv("CGO_CFLAGS", "")
	t.Setenv("CGO_CXXFLAGS", "")
	if hostHasAVX2() {
		require.Equal(t, []string{"CGO_CFLAGS=-O3 -march=x86-64-v3", "CGO_CXXFLAGS=-O3 -march=x86-64-v3"}, optFlags())
	} else {
		require.Nil(t, optFlags())
	}
	t.Setenv("CGO_CFLAGS", "-O2")
	require.Nil(t, optFlags(), "a caller's CGO_CFLAGS wins")
	t.Setenv("CGO_CFLAGS", "")
	t.Setenv("CGO_CXXFLAGS", "-O2")
	require.Nil(t, optFlags(), "a caller's CGO_CXXFLAGS wins")
}

// TestOptFlagsMatchMakefile: the tool's flags are the Makefile's, so a
// bin/ollama built by the fork's tests is the one `make ollama` builds.
func TestOptFlagsMatchMakefile(t *testing.T) {
	repo, err := findRepo()
	require.NoError(t, err)
	mk, err := os.ReadFile(filepath.Join(repo, "Makefile"))
	require.NoError(t, err)
	found := map[string]string{}
	for _, line := range strings.Split(string(mk), "\n") {
		for _, v := range []string{"CGO_CFLAGS", "CGO_CXXFLAGS"} {
			if rest, ok := strings.CutPrefix(line, v); ok {
				if val, ok := strings.CutPrefix(strings.TrimSpace(rest), "?="); ok {
					found[v] = strings.TrimSpace(val)
				}
			}
		}
	}
	require.Len(t, found, 2, "the Makefile sets CGO_CFLAGS and CGO_CXXFLAGS with ?=")
	assert.Equal(t, makeFlags, found["CGO_CFLAGS"], "Makefile CGO_CFLAGS")
	assert.Equal(t, makeFlags, found["CGO_CXXFLAGS"], "Makefile CGO_CXXFLAGS")
}
