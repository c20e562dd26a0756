// Package testmodel finds the real test model, stories260K, for the tests of
// the conformance packages: ../shared/models beside the repository root (the
// directory holding go.mod).
package testmodel

import (
	"os"
	"path/filepath"
	"testing"
)

// Paths returns the stories260K llama2.c checkpoint and its tokenizer, or
// skips the test with a message when they are absent.
func Paths(t testing.TB) (model, tokenizer string) {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Skip("go.mod not found above the package directory: cannot locate ../shared/models")
		}
		dir = parent
	}
	models := filepath.Join(dir, "..", "shared", "models")
	model, tokenizer = filepath.Join(models, "stories260K.bin"), filepath.Join(models, "tok512.bin")
	for _, p := range []string{model, tokenizer} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("stories260K not available (want ../shared/models beside the repository root): %v", err)
		}
	}
	return model, tokenizer
}
