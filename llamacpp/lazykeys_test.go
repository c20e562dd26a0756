//go:build cgo

package llamacpp_test

import (
	"context"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp"
)

// countingObserver passes everything to a compressor and counts the key
// batches the context streams to it.
type countingObserver struct {
	*adapter.Compressor
	mu      sync.Mutex
	batches int
	tokens  int
}

func (o *countingObserver) ObserveKeys(b *hooks.KeyBatch) error {
	o.mu.Lock()
	o.batches++
	o.tokens += b.Len()
	o.mu.Unlock()
	return o.Compressor.ObserveKeys(b)
}

func (o *countingObserver) count() (int, int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.batches, o.tokens
}

// chat plays two turns on seq 0: a prompt, generated tokens, a second prompt
// (each prompt compressed after prefill), then one more token under cache
// pressure. It returns the positions kept after each step and the last
// logits.
func chat(t *testing.T, m *llamacpp.Model, eager bool) (kept [][]hooks.Pos, logits []float32, obs *countingObserver) {
	t.Helper()
	defer llamacpp.SetEagerKeys(eager)()
	// An f32 cache holds the keys exactly as cb_eval sees them, so norms
	// read back from the state equal the streamed ones and the plans match.
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, KType: llamacpp.CacheF32, VType: llamacpp.CacheF32})
	comp, err := adapter.New(c, policy(0.5))
	require.NoError(t, err)
	obs = &countingObserver{Compressor: comp}
	c.SetObserver(obs)

	prompt := storyTokens(t, m, 100)
	g, err := c.Generate(context.Background(), 0, prompt, llamacpp.GenerateOptions{MaxTokens: 30, IgnoreEOG: true})
	require.NoError(t, err)
	require.Equal(t, 50, g.CellsAfter)
	kept = append(kept, c.Positions(0))
	_, _, err = c.Prompt(0, storyTokens(t, m, 60)[1:])
	require.NoError(t, err)
	kept = append(kept, c.Positions(0))
	// Fill the cache with short decodes until it must compress under pressure.
	tok := llamacpp.Token(m.Info().BOS + 10)
	for c.Cells(0) < c.Capacity() {
		logits, err = c.Decode(0, []llamacpp.Token{tok})
		require.NoError(t, err)
	}
	logits, err = c.Decode(0, []llamacpp.Token{tok})
	require.NoError(t, err)
	kept = append(kept, c.Positions(0))
	return kept, logits, obs
}

// TestHeldBackKeysGiveTheSamePlans: a context that holds back the keys of its
// short decodes and reads them from the state when a compression is due
// keeps exactly the positions that streaming every decode's keys keeps, and
// its logits are bit-identical; it streams no keys while generating.
func TestHeldBackKeysGiveTheSamePlans(t *testing.T) {
	m := openStories(t, "f32")
	keptEager, logitsEager, eagerObs := chat(t, m, true)
	keptLazy, logitsLazy, lazyObs := chat(t, m, false)
	for i := range keptEager {
		assert.Equal(t, keptEager[i], keptLazy[i], "step %d", i)
	}
	assert.Equal(t, logitsEager, logitsLazy)

	layers := m.Info().Layers
	eb, et := eagerObs.count()
	lb, lt := lazyObs.count()
	// The lazy context hands over keys in one batch per layer for each of
	// the two prompts and for each of the three compressions (the held-back
	// keys, read from the state), never one per decoded token.
	assert.LessOrEqual(t, lb, 5*layers)
	assert.Greater(t, eb, 10*layers)
	assert.LessOrEqual(t, lt, et, "no key is handed over twice")
	t.Logf("key batches streamed: eager %d (%d token-layers), held back %d (%d)", eb, et, lb, lt)
}

// TestHeldBackKeysAfterClearAndEvict: held-back keys of a cleared sequence
// are not reported, and another sequence's held-back keys are untouched.
func TestHeldBackKeysAfterClearAndEvict(t *testing.T) {
	m := openStories(t, "f32")
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, Seqs: 2, KType: llamacpp.CacheF32, VType: llamacpp.CacheF32})
	comp, err := c.EnableCompression(policy(0.5))
	require.NoError(t, err)
	for seq := range hooks.SeqID(2) {
		_, _, err := c.Prompt(seq, storyTokens(t, m, 64))
		require.NoError(t, err)
		for range 10 {
			_, err := c.Decode(seq, []llamacpp.Token{m.Info().BOS + 5})
			require.NoError(t, err)
		}
	}
	other := c.Positions(1)
	require.NoError(t, c.Clear(0))
	_, err = comp.Compress(0, -1)
	require.ErrorIs(t, err, hooks.ErrUnknownSequence, "a cleared sequence has nothing to compress")
	pos, _ := comp.Live(1)
	assert.Len(t, pos, 32, "seq 1's held-back keys are not read until it compresses")
	st, err := comp.Compress(1, 16)
	require.NoError(t, err)
	assert.Equal(t, 42, st.PositionsBefore, "32 kept after prefill + 10 held back")
	assert.Equal(t, 16, st.PositionsAfter)
	assert.Len(t, c.Positions(1), 16)
	assert.Subset(t, other, c.Positions(1))
}

// TestStalePlanAfterClear: a plan made before Clear and applied after a new
// prompt was decoded into the sequence is refused and evicts nothing (issue
// 13 item 3: before epochs it passed the position checks and evicted the new
// prompt's cells).
func TestStalePlanAfterClear(t *testing.T) {
	m := openStories(t, "f32")
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256})
	comp, err := c.EnableCompression(policy(0.5))
	require.NoError(t, err)
	_, err = c.Decode(0, storyTokens(t, m, 100))
	require.NoError(t, err)
	ep := c.SeqEpoch(0)
	plan, err := comp.PlanFor(0, -1)
	require.NoError(t, err)
	require.NotEmpty(t, plan.Token.Evict)

	require.NoError(t, c.Clear(0))
	_, err = c.Decode(0, storyTokens(t, m, 90))
	require.NoError(t, err)
	before := c.Positions(0)
	err = c.EvictPositionsInEpoch(0, ep, plan.Token.Evict)
	require.ErrorIs(t, err, hooks.ErrStalePlan)
	assert.Equal(t, before, c.Positions(0), "the new prompt's cells are untouched")
	assert.Len(t, before, 90)

	// A plan of the current epoch applies.
	require.NoError(t, c.EvictPositionsInEpoch(0, c.SeqEpoch(0), []hooks.Pos{3, 4}))
	assert.Len(t, c.Positions(0), 88)
}

// evictorOnly is a runtime wrapper that passes on nothing but eviction: a
// compressor built on it is never asked for held-back keys.
type evictorOnly struct{ c *llamacpp.Context }

func (w evictorOnly) CacheShape() hooks.CacheShape { return w.c.CacheShape() }
func (w evictorOnly) EvictPositions(seq hooks.SeqID, p []hooks.Pos) error {
	return w.c.EvictPositions(seq, p)
}

// TestHeldBackKeysReachAnyObserver: keys held back (a prompt shorter than the
// streaming threshold, generated tokens) reach an observer whose compressor
// plans for another runtime value before the context's own triggers
// (prefill done, cache pressure) call it.
func TestHeldBackKeysReachAnyObserver(t *testing.T) {
	m := openStories(t, "f32")
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 32})
	comp, err := adapter.New(evictorOnly{c}, policy(0.5))
	require.NoError(t, err)
	c.SetObserver(comp)
	_, st, err := c.Prompt(0, storyTokens(t, m, 20))
	require.NoError(t, err)
	assert.Equal(t, 20, st.PositionsBefore)
	assert.Equal(t, 10, st.PositionsAfter)
	for c.Cells(0) < c.Capacity() {
		_, err := c.Decode(0, []llamacpp.Token{m.Info().BOS + 7})
		require.NoError(t, err)
	}
	_, err = c.Decode(0, []llamacpp.Token{m.Info().BOS + 7})
	require.NoError(t, err, "cache pressure compresses with the held-back keys")
	pos, _ := comp.Live(0)
	assert.Equal(t, c.Positions(0)[:len(pos)], pos)
}
