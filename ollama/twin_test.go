//go:build cgo

package ollama

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/conformance"
)

// greedy decodes n tokens of seq 0 after the prompt's last logits and
// returns every step's logits.
func greedy(t *testing.T, e *Engine, last []float32, n int) [][]float32 {
	t.Helper()
	var out [][]float32
	for range n {
		rows, err := e.Decode(0, []int32{conformance.Argmax(last)})
		require.NoError(t, err)
		last = rows[0]
		out = append(out, last)
	}
	return out
}

// A twin shares the model's weights but not its cache: a compressed engine
// and its uncompressed twin, decoding in turns, each give the logits of an
// engine of its own, bit for bit, and either can be closed first.
func TestTwinSharesWeightsNotCache(t *testing.T) {
	ids := func(e *Engine) []int32 {
		ids, err := e.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		return ids
	}
	// References: one engine each, compressed and not.
	ref := openEngine(t, Config{Context: 128})
	p := ids(ref)
	rows, err := ref.Prefill(0, p, false)
	require.NoError(t, err)
	plain := greedy(t, ref, rows[0], 6)
	ref2 := openEngine(t, Config{Context: 128})
	attach(t, ref2, perHead(0.5))
	rows, err = ref2.Prefill(0, p, false)
	require.NoError(t, err)
	compressed := greedy(t, ref2, rows[0], 6)
	require.NotEqual(t, plain, compressed, "the fixture must tell the two caches apart")

	e := openEngine(t, Config{Context: 128})
	tw, err := e.Twin()
	require.NoError(t, err)
	assert.Equal(t, e.Info(), tw.Info())
	assert.Equal(t, e.CacheShape(), tw.CacheShape())
	assert.Same(t, e.Session().Model(), tw.Session().Model(), "one model, loaded once")
	attach(t, e, perHead(0.5))

	er, err := e.Prefill(0, p, false)
	require.NoError(t, err)
	tr, err := tw.Prefill(0, p, false)
	require.NoError(t, err)
	el, tl := er[0], tr[0]
	for i := range 6 {
		got, err := tw.Decode(0, []int32{conformance.Argmax(tl)})
		require.NoError(t, err)
		tl = got[0]
		assert.Equal(t, plain[i], tl, "twin, step %d", i)
		got, err = e.Decode(0, []int32{conformance.Argmax(el)})
		require.NoError(t, err)
		el = got[0]
		assert.Equal(t, compressed[i], el, "compressed engine, step %d", i)
	}
	n, _, _ := tw.Live(0)
	assert.Equal(t, len(p)+6, n, "the twin compressed nothing")
	_, entries, _ := e.Live(0)
	assert.Less(t, entries, int64(5*4*(len(p)+6)), "the engine did")

	// Closing the first engine leaves the twin's model loaded.
	require.NoError(t, e.Close())
	got, err := tw.Decode(0, []int32{conformance.Argmax(tl)})
	require.NoError(t, err)
	assert.Len(t, got[0], tw.Info().Vocab)
	_, err = e.Twin()
	assert.ErrorContains(t, err, "closed")
	require.NoError(t, tw.Close())
	require.NoError(t, tw.Close(), "closing twice is safe")
	_, err = tw.Decode(0, []int32{1})
	assert.ErrorContains(t, err, "closed")
}

func TestTwinOfUpstreamSession(t *testing.T) {
	s, err := Open(storiesGGUF(t), Config{Upstream: true})
	require.NoError(t, err)
	defer s.Close()
	_, err = s.Twin()
	assert.ErrorContains(t, err, "Upstream")
}
