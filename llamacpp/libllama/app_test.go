//go:build linux && amd64

package libllama_test

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"unsafe"

	"github.com/ebitengine/purego"
	"github.com/stretchr/testify/require"
)

// The test acts as an app that drives a libllama it loaded at run time, as
// yzma does: every llama.cpp call below goes through purego, and this test
// binary links no llama.cpp of its own. The structs mirror llama.h of the
// pinned llama.cpp (Ollama v0.24.0); kvnorm/llamacpp's kvn_llama.h checks
// the same layouts against llama.h at build time.

type modelParams struct {
	devices, bufOverrides        uintptr
	nGPULayers, splitMode        int32
	mainGPU                      int32
	tensorSplit                  uintptr
	progress, progressData       uintptr
	kvOverrides                  uintptr
	vocabOnly, useMmap, useMlock bool
	checkTensors, extraBufts     bool
	noHost, noAlloc              bool
}

type contextParams struct {
	nCtx, nBatch, nUbatch, nSeqMax        uint32
	nThreads, nThreadsBatch               int32
	ropeScaling, pooling, attention       int32
	flashAttn                             int32
	ropeFreqBase, ropeFreqScale           float32
	yarnExt, yarnAttn, yarnFast, yarnSlow float32
	yarnOrigCtx                           uint32
	defragThold                           float32
	cbEval, cbEvalData                    uintptr
	typeK, typeV                          int32
	abort, abortData                      uintptr
	embeddings, offloadKQV, noPerf        bool
	opOffload, swaFull, kvUnified         bool
}

type batch struct {
	nTokens                  int32
	token, embd, pos, nSeqID uintptr
	seqID, logits            uintptr
}

// app holds the llama.cpp functions the app calls.
type app struct {
	backendInit          func()
	modelDefaultParams   func() modelParams
	contextDefaultParams func() contextParams
	modelLoad            func(path string, p modelParams) uintptr
	modelFree            func(m uintptr)
	initFromModel        func(m uintptr, p contextParams) uintptr
	free                 func(ctx uintptr)
	batchGetOne          func(tokens *int32, n int32) batch
	decode               func(ctx uintptr, b batch) int32
	logitsIth            func(ctx uintptr, i int32) *float32
	getModel             func(ctx uintptr) uintptr
	modelGetVocab        func(m uintptr) uintptr
	vocabNTokens         func(v uintptr) int32
	memorySeqPosMax      func(mem uintptr, seq int32) int32
	getMemory            func(ctx uintptr) uintptr
}

func loadApp(t *testing.T, lib string) *app {
	t.Helper()
	h, err := purego.Dlopen(lib, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	require.NoError(t, err, "dlopen %s", lib)
	a := &app{}
	for name, fn := range map[string]any{
		"llama_backend_init":           &a.backendInit,
		"llama_model_default_params":   &a.modelDefaultParams,
		"llama_context_default_params": &a.contextDefaultParams,
		"llama_model_load_from_file":   &a.modelLoad,
		"llama_model_free":             &a.modelFree,
		"llama_init_from_model":        &a.initFromModel,
		"llama_free":                   &a.free,
		"llama_batch_get_one":          &a.batchGetOne,
		"llama_decode":                 &a.decode,
		"llama_get_logits_ith":         &a.logitsIth,
		"llama_get_model":              &a.getModel,
		"llama_model_get_vocab":        &a.modelGetVocab,
		"llama_vocab_n_tokens":         &a.vocabNTokens,
		"llama_memory_seq_pos_max":     &a.memorySeqPosMax,
		"llama_get_memory":             &a.getMemory,
	} {
		sym, err := purego.Dlsym(h, name)
		require.NoError(t, err, name)
		purego.RegisterFunc(fn, sym)
	}
	a.backendInit()
	return a
}

// appContext is the app's model and context (n_ctx cells, one sequence,
// batches of nBatch, f16 cache, flash attention on, one thread: what
// kvnorm/llamacpp's Context sets for the same options).
func (a *app) newContext(t *testing.T, model string, nCtx, nBatch int) (ctx uintptr) {
	t.Helper()
	mp := a.modelDefaultParams()
	mp.nGPULayers = 0
	m := a.modelLoad(model, mp)
	require.NotZero(t, m, "llama_model_load_from_file %s", model)
	t.Cleanup(func() { a.modelFree(m) })
	cp := a.contextDefaultParams()
	cp.nCtx, cp.nBatch, cp.nUbatch, cp.nSeqMax = uint32(nCtx), uint32(nBatch), uint32(nBatch), 1
	cp.nThreads, cp.nThreadsBatch = 1, 1
	cp.kvUnified = false
	cp.typeK, cp.typeV = 1, 1 // GGML_TYPE_F16
	cp.flashAttn = 1          // LLAMA_FLASH_ATTN_TYPE_ENABLED
	ctx = a.initFromModel(m, cp)
	require.NotZero(t, ctx, "llama_init_from_model")
	t.Cleanup(func() { a.free(ctx) })
	return ctx
}

// decode feeds tokens to sequence 0 in batches of nBatch and returns the
// logits of the last one.
func (a *app) decodeTokens(t *testing.T, ctx uintptr, toks []int32, nBatch int) []float32 {
	t.Helper()
	for i := 0; i < len(toks); i += nBatch {
		chunk := toks[i:min(i+nBatch, len(toks))]
		rc := a.decode(ctx, a.batchGetOne(&chunk[0], int32(len(chunk))))
		runtime.KeepAlive(chunk)
		require.Zero(t, rc, "llama_decode of tokens [%d,%d)", i, i+len(chunk))
	}
	n := a.vocabNTokens(a.modelGetVocab(a.getModel(ctx)))
	p := a.logitsIth(ctx, -1)
	require.NotNil(t, p, "llama_get_logits_ith")
	return append([]float32(nil), unsafe.Slice(p, n)...)
}

// repoRoot is the directory of go.mod above the test's directory.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	require.NoError(t, err)
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

// libPath is the libllama.so the tests load: $KVNORM_LIBLLAMA, or the one
// `make libllama` builds under build/libllama/lib. Without it the tests skip,
// unless KVNORM_REQUIRE_LIBLLAMA=1 (make test sets it) makes that a failure.
func libPath(t *testing.T) string {
	t.Helper()
	p := os.Getenv("KVNORM_LIBLLAMA")
	if p == "" {
		p = filepath.Join(repoRoot(t), "build", "libllama", "lib", "libllama.so")
	}
	if _, err := os.Stat(p); err != nil {
		msg := fmt.Sprintf("%s not found (run `make libllama`): %v", p, err)
		if os.Getenv("KVNORM_REQUIRE_LIBLLAMA") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return p
}
