//go:build cgo

package llamacpp_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp"
)

// A twin is a second context on the engine's model: decoding in turns with
// it, each gives the logits an engine of its own gives, and the model stays
// open until the last of them is closed.
func TestEngineTwin(t *testing.T) {
	opts := llamacpp.ContextOptions{NCtx: 128, Threads: 1}
	steps := func(e *llamacpp.Engine, prompt []int32) (out [][]float32) {
		rows, err := e.Prefill(0, prompt, false)
		require.NoError(t, err)
		last := rows[0]
		for range 5 {
			rows, err := e.Decode(0, []int32{conformance.Argmax(last)})
			require.NoError(t, err)
			last = rows[0]
			out = append(out, last)
		}
		return out
	}
	ref, err := llamacpp.NewEngine(openStories(t, "f32"), opts)
	require.NoError(t, err)
	defer ref.Close()
	prompt, err := ref.Tokenize("Once upon a time, there was a little girl named Lily.", true)
	require.NoError(t, err)
	want := steps(ref, prompt)

	m := openStories(t, "f32")
	e, err := llamacpp.NewEngine(m, opts)
	require.NoError(t, err)
	tw, err := e.Twin()
	require.NoError(t, err)
	assert.Same(t, e.Model(), tw.Model())
	assert.NotSame(t, e.Context(), tw.Context())
	assert.Equal(t, e.CacheShape(), tw.CacheShape())

	// In turns: prefill e, prefill the twin, then one token each.
	rows, err := e.Prefill(0, prompt, false)
	require.NoError(t, err)
	trows, err := tw.Prefill(0, prompt, false)
	require.NoError(t, err)
	el, tl := rows[0], trows[0]
	for i := range 5 {
		r, err := e.Decode(0, []int32{conformance.Argmax(el)})
		require.NoError(t, err)
		el = r[0]
		r, err = tw.Decode(0, []int32{conformance.Argmax(tl)})
		require.NoError(t, err)
		tl = r[0]
		assert.Equal(t, want[i], el, "engine, step %d", i)
		assert.Equal(t, want[i], tl, "twin, step %d", i)
	}
	require.NoError(t, tw.RemoveSequence(0))
	n, _, _ := e.Live(hooks.SeqID(0))
	assert.Equal(t, len(prompt)+5, n, "the twin's sequences are its own")

	require.NoError(t, e.Close())
	require.NoError(t, e.Close(), "closing twice is safe")
	_, err = e.Twin()
	assert.ErrorIs(t, err, llamacpp.ErrClosed)
	_, err = tw.Prefill(0, prompt[:3], false)
	require.NoError(t, err, "the model outlives the first engine while its twin is open")
	require.NoError(t, tw.Close())
	_, err = m.Tokenize("x", true)
	assert.ErrorIs(t, err, llamacpp.ErrClosed, "the last engine closed the model")
}
