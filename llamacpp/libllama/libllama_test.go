//go:build linux && amd64

package libllama_test

import (
	"bytes"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/ebitengine/purego"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llama2c"
	"github.com/kvnorm/kvnorm/llamacpp/libllama"
	"github.com/kvnorm/kvnorm/llamacpp/statemode"
)

// crossTolF16 is the bound cmd/kvnorm's cross-runtime test holds logits to
// after the same f16 eviction (rounding of f16 keys and values, flash
// attention accumulating in a different order; here also a libllama built
// with other optimisation flags than the linked copy).
const crossTolF16 = 5e-2

const story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " +
	"One day, she saw a big, red ball in the sky. It was the sun! She thought it was so pretty."

var (
	convOnce sync.Once
	convPath string
	convErr  error
)

// storiesGGUF converts stories260K to an f16 GGUF once (skipping without
// ../shared/models).
func storiesGGUF(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(repoRoot(t), "..", "shared", "models")
	if _, err := os.Stat(filepath.Join(dir, "stories260K.bin")); err != nil {
		t.Skip("../shared/models/stories260K.bin not found beside the repository")
	}
	convOnce.Do(func() {
		d, err := os.MkdirTemp("", "kvnorm-libllama-test")
		if err != nil {
			convErr = err
			return
		}
		convPath = filepath.Join(d, "stories260K-f16.gguf")
		convErr = llama2c.ConvertFile(filepath.Join(dir, "stories260K.bin"), filepath.Join(dir, "tok512.bin"), convPath, "f16")
	})
	require.NoError(t, convErr)
	return convPath
}

// promptTokens tokenizes the story with the library's tokenizer and repeats
// it to n tokens.
func promptTokens(t *testing.T, lib string, ctx uintptr, a *app, n int) []int32 {
	t.Helper()
	h, err := purego.Dlopen(lib, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	require.NoError(t, err)
	var tokenize func(vocab uintptr, text string, textLen int32, toks *int32, max int32, addSpecial, parseSpecial bool) int32
	purego.RegisterLibFunc(&tokenize, h, "llama_tokenize")
	buf := make([]int32, 512)
	k := tokenize(a.modelGetVocab(a.getModel(ctx)), story, int32(len(story)), &buf[0], int32(len(buf)), true, false)
	require.Greater(t, k, int32(2), "llama_tokenize")
	toks, body := buf[:k:k], buf[1:k]
	for len(toks) < n {
		toks = append(toks, body...)
	}
	return toks[:n]
}

type reference struct {
	Before, After int
	Kept          []int32
	Logits        []float32
}

// linkedReference runs the same steps through kvnorm/llamacpp (provider a)
// in another process: llamacpp/internal/stateref.
func linkedReference(t *testing.T, model string, toks []int32, next int32, keep float64, nCtx, nBatch int) reference {
	t.Helper()
	s := make([]string, len(toks))
	for i, v := range toks {
		s[i] = strconv.Itoa(int(v))
	}
	cmd := exec.Command("go", "run", "./llamacpp/internal/stateref", "-model", model, "-tokens", strings.Join(s, ","),
		"-next", strconv.Itoa(int(next)), "-keep", strconv.FormatFloat(keep, 'g', -1, 64),
		"-nctx", strconv.Itoa(nCtx), "-nbatch", strconv.Itoa(nBatch))
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1") // this test may run without cgo; stateref needs it
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	require.NoError(t, cmd.Run(), "go run ./llamacpp/internal/stateref: %s", errb.String())
	var r reference
	require.NoError(t, json.Unmarshal(out.Bytes(), &r), out.String())
	return r
}

func keepPolicy(keep float64) adapter.Policy {
	p := adapter.DefaultPolicy()
	p.Keep = keep
	return p
}

// TestCompressMatchesLinked: the app decodes a prompt with its libllama,
// kvnorm compresses through that library (provider b); the positions kept
// and the next token's logits match kvnorm's linked llama.cpp (provider a)
// doing the same.
func TestCompressMatchesLinked(t *testing.T) {
	lib := libPath(t)
	model := storiesGGUF(t)
	const nCtx, nBatch, n, keep = 256, 64, 150, 0.5
	a := loadApp(t, lib)
	ctx := a.newContext(t, model, nCtx, nBatch)
	toks := promptTokens(t, lib, ctx, a, n)
	a.decodeTokens(t, ctx, toks, nBatch)

	l, err := libllama.Open(lib)
	require.NoError(t, err)
	defer l.Close()
	st, err := l.Compress(ctx, 0, keepPolicy(keep))
	require.NoError(t, err)
	state, err := l.ReadState(ctx, 0)
	require.NoError(t, err)
	var kept []int32
	for _, p := range state.Positions() {
		kept = append(kept, int32(p))
	}
	next := toks[1]
	logits := a.decodeTokens(t, ctx, []int32{next}, nBatch)

	ref := linkedReference(t, model, toks, next, keep, nCtx, nBatch)
	assert.Equal(t, n, st.PositionsBefore)
	assert.Equal(t, ref.Before, st.PositionsBefore)
	assert.Equal(t, ref.After, st.PositionsAfter)
	assert.Equal(t, ref.Kept, kept, "positions kept: libllama vs linked")
	require.Len(t, logits, len(ref.Logits))
	worst := 0.0
	for i := range logits {
		worst = max(worst, math.Abs(float64(logits[i]-ref.Logits[i])))
	}
	t.Logf("kept %d of %d positions; max |Δ logit| libllama vs linked: %.3g (tolerance %g)", st.PositionsAfter, st.PositionsBefore, worst, crossTolF16)
	assert.LessOrEqual(t, worst, crossTolF16)
}

// TestRefusals: what provider b refuses with a real library, each with an
// error naming it.
func TestRefusals(t *testing.T) {
	lib := libPath(t)

	_, err := libllama.Open(filepath.Join(t.TempDir(), "libmissing.so"))
	assert.ErrorIs(t, err, libllama.ErrOpen)

	// A library that is not llama.cpp: the first missing function is named.
	_, err = libllama.Open("libc.so.6")
	require.ErrorIs(t, err, statemode.ErrMissingFunc)
	assert.Contains(t, err.Error(), "llama_state_seq_get_size")

	model := storiesGGUF(t)
	a := loadApp(t, lib)
	ctx := a.newContext(t, model, 128, 32)
	l, err := libllama.Open(lib)
	require.NoError(t, err)

	_, err = l.Compress(0, 0, keepPolicy(0.5))
	assert.ErrorIs(t, err, statemode.ErrBadInput, "nil context")
	_, err = l.Compress(ctx, -1, keepPolicy(0.5))
	assert.ErrorIs(t, err, statemode.ErrBadInput, "negative sequence")
	_, err = l.Compress(ctx, 0, keepPolicy(0.5))
	assert.ErrorIs(t, err, hooks.ErrUnknownSequence, "empty sequence")

	// A plan made before the app decoded more is not applied: the sequence
	// no longer ends where its state said.
	toks := promptTokens(t, lib, ctx, a, 40)
	a.decodeTokens(t, ctx, toks, 32)
	comp, err := l.NewCompressor(ctx, 0, keepPolicy(0.5))
	require.NoError(t, err)
	a.decodeTokens(t, ctx, toks[1:2], 32)
	_, err = comp.Compress(0, -1)
	require.ErrorIs(t, err, statemode.ErrState)
	assert.Contains(t, err.Error(), "now ends at position 40")
	assert.Equal(t, int32(40), a.memorySeqPosMax(a.getMemory(ctx), 0), "nothing evicted")

	require.NoError(t, l.Close())
	require.NoError(t, l.Close(), "Close twice")
	_, err = l.Compress(ctx, 0, keepPolicy(0.5))
	assert.ErrorIs(t, err, libllama.ErrOpen, "closed library")
}
