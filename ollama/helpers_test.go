//go:build cgo

package ollama

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/llama2c"
)

// modelsDir is ../shared/models relative to the repository root (the
// directory holding go.mod), or "" when absent.
func modelsDir() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			m := filepath.Join(dir, "..", "shared", "models")
			if _, err := os.Stat(filepath.Join(m, "stories260K.bin")); err == nil {
				return m
			}
			return ""
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

var (
	ggufOnce sync.Once
	ggufPath string
	ggufErr  error
	ggufDir  string
)

// storiesGGUF converts stories260K to an F32 GGUF once per test binary, or
// skips the test when the model is absent.
func storiesGGUF(t testing.TB) string {
	t.Helper()
	m := modelsDir()
	if m == "" {
		t.Skip("stories260K not found: expected ../shared/models/stories260K.bin next to the repository root")
	}
	ggufOnce.Do(func() {
		ggufDir, ggufErr = os.MkdirTemp("", "kvnorm-ollama-test-")
		if ggufErr != nil {
			return
		}
		ggufPath = filepath.Join(ggufDir, "stories260K.gguf")
		ggufErr = llama2c.ConvertFile(filepath.Join(m, "stories260K.bin"), filepath.Join(m, "tok512.bin"), ggufPath, "f32")
	})
	require.NoError(t, ggufErr)
	return ggufPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	for _, e := range benchEngines {
		e.Close()
	}
	if ggufDir != "" {
		os.RemoveAll(ggufDir)
	}
	os.Exit(code)
}

// pressureCompressions counts the compressions s's cache made under
// pressure (a batch that did not fit).
func pressureCompressions(s *Session) int {
	n := 0
	for _, st := range s.Cache().Stats() {
		if st.Trigger == "pressure" {
			n++
		}
	}
	return n
}
