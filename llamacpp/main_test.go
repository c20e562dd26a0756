//go:build cgo

package llamacpp_test

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/llama2c"
	"github.com/kvnorm/kvnorm/llamacpp"
)

// modelsDir finds ../shared/models beside the repository root (the directory
// of go.mod), or "" when it is absent.
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
	tmpDir   string
	convOnce = map[string]*sync.Once{"f32": {}, "f16": {}}
	convErr  = map[string]error{}
	convPath = map[string]string{}
	convMu   sync.Mutex
)

func TestMain(m *testing.M) {
	var err error
	tmpDir, err = os.MkdirTemp("", "kvnorm-llamacpp-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(tmpDir)
	os.Exit(code)
}

// storiesGGUF converts stories260K to GGUF once per tensor type and returns
// its path; the test is skipped when ../shared/models is absent.
func storiesGGUF(t testing.TB, typ string) string {
	t.Helper()
	dir := modelsDir()
	if dir == "" {
		t.Skip("../shared/models/stories260K.bin not found beside the repository: skipping the llama.cpp tests that need a model")
	}
	convMu.Lock()
	once := convOnce[typ]
	convMu.Unlock()
	once.Do(func() {
		p := filepath.Join(tmpDir, "stories260K-"+typ+".gguf")
		err := llama2c.ConvertFile(filepath.Join(dir, "stories260K.bin"), filepath.Join(dir, "tok512.bin"), p, typ)
		convMu.Lock()
		convErr[typ], convPath[typ] = err, p
		convMu.Unlock()
	})
	convMu.Lock()
	defer convMu.Unlock()
	require.NoError(t, convErr[typ], "convert stories260K to %s GGUF", typ)
	return convPath[typ]
}

// openStories opens the converted model, closed at the end of the test.
func openStories(t testing.TB, typ string) *llamacpp.Model {
	t.Helper()
	m, err := llamacpp.Open(storiesGGUF(t, typ))
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

// newCtx creates a context with one thread (the tiny model thrashes on two).
func newCtx(t testing.TB, m *llamacpp.Model, o llamacpp.ContextOptions) *llamacpp.Context {
	t.Helper()
	if o.Threads == 0 {
		o.Threads = 1
	}
	c, err := m.NewContext(o)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

var (
	wideOnce sync.Once
	widePath string
	wideErr  error
)

// wideGGUF is a synthetic model (seeded random weights, the stories260K
// tokenizer) with a head dim of 32, the smallest a q8_0 or q4_0 cache takes.
// Its text is noise; it is for cache types, not for quality.
func wideGGUF(t testing.TB) string {
	t.Helper()
	dir := modelsDir()
	if dir == "" {
		t.Skip("../shared/models/tok512.bin not found beside the repository: skipping the llama.cpp tests that need a model")
	}
	wideOnce.Do(func() {
		cfg := llama2c.Config{Dim: 128, HiddenDim: 256, NLayers: 3, NHeads: 4, NKVHeads: 2, VocabSize: 512, SeqLen: 512, SharedClassifier: true}
		ck, err := llama2c.NewCheckpoint(cfg)
		if err != nil {
			wideErr = err
			return
		}
		rng := rand.New(rand.NewPCG(1, 2))
		fill := func(w []float32, scale float32) {
			for i := range w {
				w[i] = float32(rng.NormFloat64()) * scale
			}
		}
		ones := func(w []float32) {
			for i := range w {
				w[i] = 1
			}
		}
		fill(ck.TokenEmbedding, 0.5)
		ones(ck.FinalNorm)
		for i := range ck.Layers {
			L := &ck.Layers[i]
			ones(L.AttnNorm)
			ones(L.FFNNorm)
			for _, w := range [][]float32{L.WQ, L.WK, L.WV, L.WO, L.W1, L.W3} {
				fill(w, 0.09)
			}
			fill(L.W2, 0.06)
		}
		tok, err := llama2c.ReadTokenizer(filepath.Join(dir, "tok512.bin"), cfg.VocabSize)
		if err != nil {
			wideErr = err
			return
		}
		w, err := llama2c.ToGGUF(ck, tok, gguf.F32)
		if err != nil {
			wideErr = err
			return
		}
		widePath = filepath.Join(tmpDir, "wide-hd32.gguf")
		wideErr = w.WriteFile(widePath)
	})
	require.NoError(t, wideErr, "build the synthetic head-dim-32 model")
	return widePath
}
