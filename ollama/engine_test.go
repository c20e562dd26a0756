//go:build cgo

package ollama

import (
	"strings"
	"testing"

	"github.com/ollama/ollama/kvcache"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// countingObserver counts the events an engine reports.
type countingObserver struct {
	hooks.Observer
	prefill, pressure, batches int
}

func (o *countingObserver) ObserveKeys(b *hooks.KeyBatch) error {
	o.batches++
	return o.Observer.ObserveKeys(b)
}

func (o *countingObserver) PrefillDone(seq hooks.SeqID) (hooks.Stats, error) {
	o.prefill++
	return o.Observer.PrefillDone(seq)
}

func (o *countingObserver) CachePressure(seq hooks.SeqID, free, incoming int) (hooks.Stats, error) {
	o.pressure++
	return o.Observer.CachePressure(seq, free, incoming)
}

func openEngine(t *testing.T, cfg Config) *Engine {
	t.Helper()
	e, err := OpenEngine(storiesGGUF(t), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { e.Close() })
	return e
}

func attach(t *testing.T, e *Engine, p *adapter.Policy) (*adapter.Compressor, *countingObserver) {
	t.Helper()
	comp, err := adapter.New(e, *p)
	require.NoError(t, err)
	obs := &countingObserver{Observer: comp}
	e.SetObserver(obs)
	return comp, obs
}

func TestEngineInfo(t *testing.T) {
	e := openEngine(t, Config{})
	in := e.Info()
	assert.Equal(t, "ollama", in.Runtime)
	assert.Equal(t, "llama", in.Arch)
	assert.Equal(t, 512, in.Vocab)
	assert.Equal(t, 512, in.Context, "stories260K's trained context")
	sh := e.CacheShape()
	assert.Equal(t, hooks.CacheShape{Layers: 5, KVHeads: 4, HeadDim: 8, KType: sh.KType, VType: sh.VType, Capacity: 512}, sh)
	assert.Equal(t, "f16", sh.KType.String())
	assert.Equal(t, "f32", openEngine(t, Config{CacheType: "f32", Context: 64}).CacheShape().KType.String())

	_, err := OpenEngine(storiesGGUF(t), Config{Policy: perHead(0.5)})
	assert.ErrorContains(t, err, "observer")
}

// Prefill reports PrefillDone once and returns the asked rows; Live counts
// distinct positions and entries; RemoveSequence forgets.
func TestEnginePrefillAndLive(t *testing.T) {
	e := openEngine(t, Config{Context: 128})
	ids, err := e.Tokenize(storyPrompt, true)
	require.NoError(t, err)
	n := len(ids)

	rows, err := e.Prefill(0, ids, true)
	require.NoError(t, err)
	assert.Len(t, rows, n)
	p, entries, err := e.Live(0)
	require.NoError(t, err)
	assert.Equal(t, n, p)
	assert.Equal(t, int64(5*4*n), entries)
	require.NoError(t, e.RemoveSequence(0))
	p, entries, _ = e.Live(0)
	assert.Zero(t, p)
	assert.Zero(t, entries)

	// The same prefill asking for the last row only (asking for every row
	// runs the output matmul with another kernel: the rows differ by ~4e-6).
	base, err := e.Prefill(0, ids, false)
	require.NoError(t, err)
	require.NoError(t, e.RemoveSequence(0))
	assert.InDelta(t, 0, maxDiff(rows[n-1], base[0]), 1e-4)

	comp, obs := attach(t, e, perHead(0.5))
	last, err := e.Prefill(0, ids, false)
	require.NoError(t, err)
	require.Len(t, last, 1)
	assert.InDelta(t, 0, maxDiff(base[0], last[0]), 0, "the last prompt token's logits come before compression")
	assert.Equal(t, 1, obs.prefill)
	assert.Equal(t, 0, obs.pressure)
	assert.Equal(t, 5, obs.batches, "one batch per layer")
	kept := len(e.Cache().HeadPositions(0, 2, 0))
	assert.InDelta(t, float64(n)/2, kept, 0.5, "keep 0.5 of %d positions", n)
	p, entries, err = e.Live(0)
	require.NoError(t, err)
	assert.Equal(t, int64(2*4*n+3*4*kept), entries, "layers 0 and 1 keep everything, the others half")
	assert.Equal(t, n, p, "layers 0 and 1 still hold every position")
	cp, ce := comp.Live(0)
	assert.Equal(t, len(cp), p)
	assert.Equal(t, ce, entries)
	for l := 2; l < 5; l++ {
		for h := range 4 {
			assert.Len(t, e.Cache().HeadPositions(0, l, h), kept)
		}
	}
	out, err := e.Decode(0, ids[1:4])
	require.NoError(t, err)
	assert.Len(t, out, 3)
	assert.Equal(t, 1, obs.prefill, "Decode does not report PrefillDone")
	_, ce = comp.Live(0)
	assert.Equal(t, int64(2*4*n+3*4*kept), ce, "the decoded keys stay in the cache until a plan needs them")
	_, err = comp.PlanFor(0, -1)
	require.NoError(t, err)
	_, ce = comp.Live(0)
	assert.Equal(t, int64(2*4*n+3*4*kept+5*4*3), ce, "the decoded keys are reported before a plan")

	require.NoError(t, e.RemoveSequence(0))
	cp, _ = comp.Live(0)
	assert.Empty(t, cp, "the observer forgets a removed sequence")
	_, err = e.Decode(0, []int32{512})
	assert.ErrorContains(t, err, "outside the vocabulary")
	_, err = e.Prefill(0, nil, false)
	assert.Error(t, err)
}

// A prompt longer than the cache is fed in chunks, compressed under pressure;
// without an observer it does not fit.
func TestEngineChunkedPrompt(t *testing.T) {
	e := openEngine(t, Config{Context: 48})
	ids, err := e.Tokenize(strings.Repeat(storyPrompt+". ", 4), true)
	require.NoError(t, err)
	require.Greater(t, len(ids), 120)

	_, err = e.Prefill(0, ids, false)
	assert.ErrorIs(t, err, kvcache.ErrKvCacheFull)
	require.NoError(t, e.RemoveSequence(0))

	for _, p := range []*adapter.Policy{perToken(0.5), perHead(0.5)} {
		t.Run(p.Granularity.String(), func(t *testing.T) {
			_, obs := attach(t, e, p)
			defer func() { e.SetObserver(nil); require.NoError(t, e.RemoveSequence(0)) }()
			rows, err := e.Prefill(0, ids, false)
			require.NoError(t, err)
			assert.Len(t, rows, 1)
			assert.Positive(t, obs.pressure)
			assert.Equal(t, 1, obs.prefill)
			u := e.Cache().Usage(0)
			for l, c := range u.Cells {
				assert.LessOrEqual(t, c, 48, "layer %d", l)
			}
			assert.Equal(t, ids[len(ids)-1], ids[len(ids)-1])
			held := e.Cache().HeadPositions(0, 4, 0)
			assert.Equal(t, int32(len(ids)-1), held[len(held)-1], "the last prompt position is kept")
			_, err = e.Decode(0, ids[1:9])
			require.NoError(t, err, "generation continues under pressure")
		})
	}
}

// EvictPositions removes positions from every head, keeps them in order and
// refuses the last position and uneven per-head layers.
func TestEngineEvictPositions(t *testing.T) {
	e := openEngine(t, Config{Context: 128})
	ids, err := e.Tokenize(storyPrompt, true)
	require.NoError(t, err)
	n := int32(len(ids))
	_, err = e.Prefill(0, ids, false)
	require.NoError(t, err)
	assert.ErrorContains(t, e.EvictPositions(0, []hooks.Pos{n - 1}), "last position")
	assert.ErrorIs(t, e.EvictPositions(3, []hooks.Pos{1}), hooks.ErrUnknownSequence)

	require.NoError(t, e.EvictPositions(0, []hooks.Pos{1, 5, 6}))
	p, entries, _ := e.Live(0)
	assert.Equal(t, int(n)-3, p)
	assert.Equal(t, int64(5*4*(int(n)-3)), entries)
	for l := range 5 {
		for h := range 4 {
			got := e.Cache().HeadPositions(0, l, h)
			assert.NotContains(t, got, int32(5))
			assert.Len(t, got, int(n)-3)
		}
	}

	// Heads of layer 2 keep different positions: evicting a position only
	// some of them hold would make the layer uneven.
	plan := &hooks.HeadPlan{Seq: 0, Layers: make([][][]hooks.Pos, 5)}
	plan.Layers[2] = make([][]hooks.Pos, 4)
	for h := range 4 {
		keep := []hooks.Pos{0, 7 + int32(h), n - 1}
		plan.Layers[2][h] = keep
	}
	require.NoError(t, e.CompactHeads(plan))
	assert.ErrorIs(t, e.EvictPositions(0, []hooks.Pos{7}), ErrPlan)
	require.NoError(t, e.EvictPositions(0, []hooks.Pos{0}), "a position every head holds")
	assert.Equal(t, []int32{8, n - 1}, e.Cache().HeadPositions(0, 2, 1))
}

// TestEngineDecodeReadsNothingBack: with a compressor attached, a decoded
// token's norms stay in the cache (no sync, no read-back per step) until a
// compression needs them; then the compressor sees every decoded position.
func TestEngineDecodeReadsNothingBack(t *testing.T) {
	for _, p := range []*adapter.Policy{perToken(0.5), perHead(0.5)} {
		t.Run(p.Granularity.String(), func(t *testing.T) {
			e := openEngine(t, Config{Context: 64})
			comp, obs := attach(t, e, p)
			ids, err := e.Tokenize(storyPrompt, true)
			require.NoError(t, err)
			_, err = e.Prefill(0, ids, false)
			require.NoError(t, err)
			c := e.Cache()
			syncs, fetches, batches := c.syncs, c.fetches, obs.batches
			for i := range 10 {
				_, err := e.Decode(0, []int32{int32(300 + i)})
				require.NoError(t, err)
			}
			assert.Equal(t, syncs, c.syncs, "no sync per decoded token")
			assert.Equal(t, fetches, c.fetches, "no read-back per decoded token")
			assert.Equal(t, batches, obs.batches)

			// An explicit compression first reads the held norms back.
			_, err = comp.PlanFor(0, -1)
			require.NoError(t, err)
			pos, _ := comp.Live(0)
			assert.Contains(t, pos, int32(len(ids)+9), "the last decoded position is known to the compressor")

			// Decoding past the cache compresses under pressure and goes on.
			for i := range 80 {
				_, err := e.Decode(0, []int32{int32(300 + i%100)})
				require.NoError(t, err, "step %d", i)
			}
			assert.Positive(t, obs.pressure)
		})
	}
}
