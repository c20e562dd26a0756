//go:build cgo

package llamacpp_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp"
)

// keyLog is an observer that remembers which (layer, position) keys it got.
type keyLog struct{ seen map[[2]int]bool }

func (o *keyLog) ObserveKeys(b *hooks.KeyBatch) error {
	for _, p := range b.Positions {
		o.seen[[2]int{b.Layer, int(p)}] = true
	}
	return nil
}
func (o *keyLog) PrefillDone(hooks.SeqID) (hooks.Stats, error) { return hooks.Stats{}, nil }
func (o *keyLog) CachePressure(hooks.SeqID, int, int) (hooks.Stats, error) {
	return hooks.Stats{}, errors.New("no room")
}
func (o *keyLog) Forget(hooks.SeqID, hooks.Pos, hooks.Pos) {}

// TestRecordAttention checks what kq_soft_max gives, mapped to positions, on
// the second sequence of a context (its own stream), after evictions whose
// holes the next batch fills: every query's row sums to 1 over the live
// positions it may see and is 0 elsewhere (masked, later or empty cells), the cells hold exactly the live
// positions, and a batch's keys reach the observer first.
func TestRecordAttention(t *testing.T) {
	m := openStories(t, "f32")
	// KeepHoles: the evicted cells stay where they were, so that the next
	// batch refills them out of position order (TestEvictionCompacts checks
	// the map after the default compaction).
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 32, Seqs: 2, FlashAttn: llamacpp.FlashAttnOff,
		KType: llamacpp.CacheF32, VType: llamacpp.CacheF32, KeepHoles: true})
	const seq = 1
	in := m.Info()
	obs := &keyLog{seen: map[[2]int]bool{}}
	c.SetObserver(obs)
	var batches []*llamacpp.Attention
	require.NoError(t, c.RecordAttention(func(a *llamacpp.Attention) error {
		for _, p := range a.Cells {
			if p >= 0 && !obs.seen[[2]int{a.Layer, int(p)}] {
				t.Errorf("layer %d: attention to position %d before its key", a.Layer, p)
			}
		}
		batches = append(batches, a)
		return nil
	}))
	toks := storyTokens(t, m, 130)
	_, err := c.Decode(seq, toks[:100]) // chunks of 32, 32, 32, 4
	require.NoError(t, err)
	var evict []hooks.Pos
	for p := hooks.Pos(10); p < 60; p += 2 {
		evict = append(evict, p)
	}
	require.NoError(t, c.EvictPositions(seq, evict))
	_, err = c.Decode(seq, toks[100:])
	require.NoError(t, err)
	require.Len(t, batches, 5*in.Layers)

	for i, a := range batches {
		assert.Equal(t, i%in.Layers, a.Layer)
		assert.Equal(t, hooks.SeqID(seq), a.Seq)
		assert.Equal(t, in.Heads, a.Heads)
		assert.Equal(t, in.KVHeads, a.KVHeads)
		assert.Equal(t, 256, len(a.Cells), "n_kv: the used cells padded to 256")
		require.Len(t, a.Weights, a.Heads*len(a.Queries)*len(a.Cells))
		live := map[hooks.Pos]bool{}
		for _, p := range a.Cells {
			if p >= 0 {
				assert.False(t, live[p], "position %d in two cells", p)
				live[p] = true
			}
		}
		for h := range a.Heads {
			for q, qp := range a.Queries {
				var sum float64
				for cell, p := range a.Cells {
					w := a.Weight(h, q, cell)
					if p < 0 || p > qp {
						require.Zero(t, w, "batch %d head %d query %d: cell %d holds %d", i, h, q, cell, p)
						continue
					}
					require.GreaterOrEqual(t, w, float32(0)) // sharp heads underflow to 0
					sum += float64(w)
				}
				require.InDelta(t, 1, sum, 1e-5)
			}
		}
	}
	// The last batch: positions 100..129 after 25 evictions fill the holes.
	last := batches[len(batches)-1]
	assert.Equal(t, hooks.Pos(100), last.Queries[0])
	var held []hooks.Pos
	for _, p := range last.Cells {
		if p >= 0 {
			held = append(held, p)
		}
	}
	assert.False(t, slices.IsSorted(held), "llama.cpp reuses the holes: cells are not in position order")
	slices.Sort(held)
	assert.Equal(t, c.Positions(seq), held)
	assert.Equal(t, hooks.Pos(100), last.Cells[10], "the first hole takes the first new token")
	assert.Equal(t, hooks.Pos(11), last.Cells[11], "untouched cells keep their positions")

	// The first sequence is empty and never recorded.
	assert.Equal(t, 0, c.Cells(0))
	require.NoError(t, c.RecordAttention(nil))
	n := len(batches)
	_, err = c.Decode(seq, toks[:1])
	require.NoError(t, err)
	assert.Len(t, batches, n, "nil stops recording")
}

func TestRecordAttentionErrors(t *testing.T) {
	m := openStories(t, "f32")
	toks := storyTokens(t, m, 40)
	ok := func(*llamacpp.Attention) error { return nil }

	for _, fa := range []llamacpp.FlashAttn{llamacpp.FlashAttnOn, llamacpp.FlashAttnAuto} {
		c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, FlashAttn: fa})
		assert.ErrorIs(t, c.RecordAttention(ok), llamacpp.ErrNoAttention, "flash attention %s", fa)
		require.NoError(t, c.RecordAttention(nil))
	}

	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, FlashAttn: llamacpp.FlashAttnOff})
	// Tokens decoded with nothing attached: their cells are unknown.
	_, err := c.Decode(0, toks[:10])
	require.NoError(t, err)
	require.NoError(t, c.RecordAttention(ok))
	_, err = c.Decode(0, toks[10:20])
	assert.ErrorIs(t, err, llamacpp.ErrNoAttention)
	require.NoError(t, c.Clear(0))
	_, err = c.Decode(0, toks[:20])
	require.NoError(t, err)

	// An error from the recorder stops the decode.
	stop := errors.New("stop")
	calls := 0
	require.NoError(t, c.RecordAttention(func(*llamacpp.Attention) error { calls++; return stop }))
	_, err = c.Decode(0, toks[20:30])
	assert.ErrorIs(t, err, stop)
	assert.Equal(t, 1, calls)

	// Closed.
	require.NoError(t, c.Close())
	assert.ErrorIs(t, c.RecordAttention(ok), llamacpp.ErrClosed)
	assert.NoError(t, c.RecordAttention(nil))
}
