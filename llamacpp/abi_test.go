package llamacpp

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestDeclarationsMatchLlamaH compiles kvn_llama.h against the llama.h,
// ggml.h and ggml-backend.h of the Ollama module this package links (from
// the Go module cache) with KVN_ABI_CHECK: a prototype that disagrees with
// llama.cpp's, a struct field at another offset or an enum value that moved
// fails the compile, and so this test.
func TestDeclarationsMatchLlamaH(t *testing.T) {
	cc := os.Getenv("CC")
	if cc == "" {
		cc = "cc"
	}
	if _, err := exec.LookPath(cc); err != nil {
		t.Skipf("no C compiler (%s): %v", cc, err)
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/ollama/ollama").Output()
	require.NoError(t, err, "go list -m github.com/ollama/ollama")
	mod := strings.TrimSpace(string(out))
	require.NotEmpty(t, mod, "the Ollama module is not in the module cache: run go mod download")
	src := filepath.Join(t.TempDir(), "check.c")
	require.NoError(t, os.WriteFile(src, []byte("#include \"llama.h\"\n#include \"ggml.h\"\n#include \"ggml-backend.h\"\n#define KVN_ABI_CHECK\n#include \"kvn_llama.h\"\n"), 0o644))
	wd, err := os.Getwd()
	require.NoError(t, err)
	cmd := exec.Command(cc, "-std=c11", "-Wall", "-Werror", "-fsyntax-only",
		"-I", wd,
		"-I", filepath.Join(mod, "llama", "llama.cpp", "include"),
		"-I", filepath.Join(mod, "ml", "backend", "ggml", "ggml", "include"),
		src)
	msg, err := cmd.CombinedOutput()
	require.NoError(t, err, "kvn_llama.h disagrees with llama.cpp's headers:\n%s", msg)
}
