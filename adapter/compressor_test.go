package adapter_test

import (
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/hooks/hookstest"
	"github.com/kvnorm/kvnorm/kernels"
)

var shape = hooks.CacheShape{Layers: 4, KVHeads: 2, HeadDim: 16, KType: kernels.F16, VType: kernels.F16, Capacity: 256}

// fakeRuntime is what both fakes offer: the contract plus cell bookkeeping.
type fakeRuntime interface {
	hooks.Runtime
	Append(seq hooks.SeqID, positions ...hooks.Pos) error
	Free(seq hooks.SeqID) int
	Lane(seq hooks.SeqID, layer, head int) []hooks.Pos
	Entries(seq hooks.SeqID) int
}

// decode plays a runtime decoding a batch of one sequence: store the cells,
// then report every layer's keys (f16, [n][kvHeads][headDim]) to the observer.
func decode(t *testing.T, rt fakeRuntime, obs hooks.Observer, rng *rand.Rand, seq hooks.SeqID, from, n int) {
	t.Helper()
	pos := make([]hooks.Pos, n)
	seqs := make([]hooks.SeqID, n)
	for i := range pos {
		pos[i], seqs[i] = hooks.Pos(from+i), seq
	}
	require.NoError(t, rt.Append(seq, pos...))
	for l := range shape.Layers {
		keys := make([]byte, 0, n*shape.KVHeads*shape.HeadDim*2)
		for range n * shape.KVHeads * shape.HeadDim {
			h := kernels.F32ToF16(float32(rng.NormFloat64()) * (0.5 + rng.Float32()))
			keys = append(keys, byte(h), byte(h>>8))
		}
		require.NoError(t, obs.ObserveKeys(&hooks.KeyBatch{Layer: l, Seqs: seqs, Positions: pos, DType: kernels.F16, Keys: keys}))
	}
}

func TestCompressorTwoSequencesPerToken(t *testing.T) {
	rt := hookstest.NewShared(shape)
	p := adapter.DefaultPolicy()
	c, err := adapter.New(rt, p)
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(1, 2))
	decode(t, rt, c, rng, 0, 0, 100)
	decode(t, rt, c, rng, 1, 0, 60)
	otherBefore := rt.Lane(1, 3, 1)

	plan, err := c.PlanFor(0, -1)
	require.NoError(t, err)
	st, err := c.PrefillDone(0)
	require.NoError(t, err)
	assert.Equal(t, "prefill", st.Trigger)
	assert.Equal(t, 100, st.PositionsBefore)
	assert.Equal(t, 50, st.PositionsAfter)
	assert.Equal(t, int64(100*8), st.EntriesBefore)
	assert.Equal(t, int64(50*8), st.EntriesAfter)
	assert.Equal(t, int64(50*8*(2*16*2)), st.BytesFreed, "50 positions × 8 lanes × K+V f16 rows")
	for l := range shape.Layers {
		for h := range shape.KVHeads {
			assert.Equal(t, plan.Token.Keep, rt.Lane(0, l, h), "exactly the planned cells remain")
		}
	}
	assert.Contains(t, rt.Lane(0, 0, 0), hooks.Pos(99), "the last position is kept")
	assert.Equal(t, otherBefore, rt.Lane(1, 3, 1), "the other sequence is untouched")
	live, entries := c.Live(0)
	assert.Equal(t, plan.Token.Keep, live, "the compressor forgot what was evicted")
	assert.Equal(t, int64(400), entries)
	live1, _ := c.Live(1)
	assert.Len(t, live1, 60)

	// Decoding continues after the highest position and is recorded.
	decode(t, rt, c, rng, 0, 100, 1)
	live, _ = c.Live(0)
	assert.Equal(t, hooks.Pos(100), live[len(live)-1])
	assert.Equal(t, 1, c.Totals().Compressions)
}

func TestCompressorPerHeadCompacts(t *testing.T) {
	rt := hookstest.NewPerHead(shape)
	p := adapter.DefaultPolicy()
	p.Granularity = hooks.PerHead
	p.Keep = 0.25
	c, err := adapter.New(rt, p)
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(3, 4))
	decode(t, rt, c, rng, 5, 0, 64)
	st, err := c.PrefillDone(5)
	require.NoError(t, err)
	assert.Equal(t, int64(2*2*64+2*2*16), st.EntriesAfter, "two skipped layers keep 64, two others 16 per head")
	for h := range shape.KVHeads {
		assert.Len(t, rt.Lane(5, 0, h), 64)
		assert.Len(t, rt.Lane(5, 2, h), 16)
		_, norms, err := c.Norms(5, 2, h)
		require.NoError(t, err)
		assert.Len(t, norms, 16)
	}
	assert.NotEqual(t, rt.Lane(5, 2, 0), rt.Lane(5, 2, 1), "heads keep their own positions")
}

func TestCompressorPerHeadNeedsCompactor(t *testing.T) {
	p := adapter.DefaultPolicy()
	p.Granularity = hooks.PerHead
	_, err := adapter.New(hookstest.NewShared(shape), p)
	require.ErrorIs(t, err, hooks.ErrUnsupported)
	assert.ErrorContains(t, err, "per-token")
}

func TestCompressorPerTokenOnCompactor(t *testing.T) {
	rt := hookstest.NewPerHead(shape)
	c, err := adapter.New(rt, adapter.DefaultPolicy())
	require.NoError(t, err)
	decode(t, rt, c, rand.New(rand.NewPCG(5, 6)), 0, 0, 30)
	_, err = c.PrefillDone(0)
	require.NoError(t, err)
	for l := range shape.Layers {
		assert.Equal(t, rt.Lane(0, 0, 0), rt.Lane(0, l, 1), "one keep set for all heads")
	}
	assert.Len(t, rt.Lane(0, 0, 0), 15)
}

// A prompt four times the cache, fed in chunks with pressure compression in
// between, never overflows the cache.
func TestCompressorChunkedPrefillUnderPressure(t *testing.T) {
	for _, g := range []hooks.Granularity{hooks.PerToken, hooks.PerHead} {
		t.Run(g.String(), func(t *testing.T) {
			small := shape
			small.Capacity = 64
			var rt fakeRuntime
			if g == hooks.PerHead {
				rt = hookstest.NewPerHead(small)
			} else {
				rt = hookstest.NewShared(small)
			}
			p := adapter.DefaultPolicy()
			p.Granularity, p.Keep, p.Sinks, p.Window = g, 0.25, 2, 4
			c, err := adapter.New(rt, p)
			require.NoError(t, err)
			rng := rand.New(rand.NewPCG(7, 8))
			const chunk = 16
			for from := 0; from < 4*small.Capacity; from += chunk {
				if free := rt.Free(0); free < chunk {
					st, err := c.CachePressure(0, free, chunk)
					require.NoError(t, err)
					assert.Equal(t, "pressure", st.Trigger)
					require.GreaterOrEqual(t, rt.Free(0), chunk)
				}
				decode(t, rt, c, rng, 0, from, chunk) // fails if the cache overflows
			}
			st, err := c.PrefillDone(0)
			require.NoError(t, err)
			assert.LessOrEqual(t, st.EntriesAfter, int64(small.Capacity*small.Layers*small.KVHeads))
			lane := rt.Lane(0, 3, 0)
			assert.LessOrEqual(t, len(lane), small.Capacity)
			assert.Equal(t, []hooks.Pos{0, 1}, lane[:2], "sinks survive every compression")
			assert.Equal(t, hooks.Pos(4*small.Capacity-1), lane[len(lane)-1])
			assert.Greater(t, c.Totals().Compressions, 4)
		})
	}
}

func TestCompressorPressureErrors(t *testing.T) {
	small := shape
	small.Capacity = 16
	rt := hookstest.NewShared(small)
	p := adapter.DefaultPolicy()
	p.Sinks, p.Window = 4, 8
	c, err := adapter.New(rt, p)
	require.NoError(t, err)
	_, err = c.CachePressure(0, 0, 4)
	assert.ErrorIs(t, err, hooks.ErrUnknownSequence)
	decode(t, rt, c, rand.New(rand.NewPCG(9, 9)), 0, 0, 16)
	_, err = c.CachePressure(0, 0, 8)
	assert.ErrorContains(t, err, "protected")
	assert.Len(t, rt.Lane(0, 0, 0), 16, "a failed compression evicts nothing")
	_, err = c.CachePressure(0, -1, 8)
	assert.ErrorContains(t, err, "free=-1")
	st, err := c.CachePressure(0, 4, 4)
	require.NoError(t, err)
	assert.True(t, st.Skipped)
}

func TestCompressorBadInput(t *testing.T) {
	rt := hookstest.NewShared(shape)
	c, err := adapter.New(rt, adapter.DefaultPolicy())
	require.NoError(t, err)
	cases := []struct {
		name string
		b    *hooks.KeyBatch
		msg  string
	}{
		{"nil", nil, "nil batch"},
		{"layer out of range", &hooks.KeyBatch{Layer: 9, Seqs: []hooks.SeqID{0}, Positions: []hooks.Pos{0}, Norms: []float32{1, 2}}, "layer=9"},
		{"seqs mismatch", &hooks.KeyBatch{Layer: 0, Seqs: []hooks.SeqID{0, 0}, Positions: []hooks.Pos{0}, Norms: []float32{1, 2}}, "2 seqs for 1 positions"},
		{"short keys", &hooks.KeyBatch{Layer: 0, Seqs: []hooks.SeqID{0}, Positions: []hooks.Pos{0}, DType: kernels.F16, Keys: make([]byte, 10)}, "10 key bytes"},
		{"norm count", &hooks.KeyBatch{Layer: 0, Seqs: []hooks.SeqID{0}, Positions: []hooks.Pos{0}, Norms: []float32{1}}, "1 norms"},
		{"negative position", &hooks.KeyBatch{Layer: 0, Seqs: []hooks.SeqID{0}, Positions: []hooks.Pos{-4}, Norms: []float32{1, 1}}, "negative position -4"},
		{"both", &hooks.KeyBatch{Layer: 0, Seqs: []hooks.SeqID{0}, Positions: []hooks.Pos{0}, Norms: []float32{1, 1}, Keys: []byte{1}}, "both keys and norms"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := c.ObserveKeys(tc.b)
			require.ErrorIs(t, err, hooks.ErrBadBatch)
			assert.ErrorContains(t, err, tc.msg)
		})
	}
	_, err = c.PrefillDone(42)
	assert.ErrorIs(t, err, hooks.ErrUnknownSequence)
	_, err = adapter.New(nil, adapter.DefaultPolicy())
	assert.Error(t, err)
	bad := adapter.DefaultPolicy()
	bad.Keep = 2
	_, err = adapter.New(rt, bad)
	assert.ErrorContains(t, err, "keep=2")
	_, err = adapter.New(hookstest.NewShared(hooks.CacheShape{Layers: 1, KVHeads: 1, HeadDim: 30, KType: kernels.Q8_0, VType: kernels.F16}), adapter.DefaultPolicy())
	assert.ErrorContains(t, err, "key type")
}

func TestCompressorMinPromptAndForget(t *testing.T) {
	rt := hookstest.NewShared(shape)
	p := adapter.DefaultPolicy()
	p.MinPrompt = 50
	c, err := adapter.New(rt, p)
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(10, 11))
	decode(t, rt, c, rng, 0, 0, 40)
	st, err := c.PrefillDone(0)
	require.NoError(t, err)
	assert.True(t, st.Skipped)
	assert.Equal(t, 40, rt.Entries(0)/8)
	c.Forget(0, 30, -1)
	live, _ := c.Live(0)
	assert.Len(t, live, 30)
	c.DropSequence(0)
	live, _ = c.Live(0)
	assert.Empty(t, live)
}

func TestCompressorConcurrentSequences(t *testing.T) {
	rt := hookstest.NewShared(shape)
	c, err := adapter.New(rt, adapter.DefaultPolicy())
	require.NoError(t, err)
	var wg sync.WaitGroup
	for s := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(s), 1))
			for from := 0; from < 64; from += 8 {
				decode(t, rt, c, rng, hooks.SeqID(s), from, 8)
			}
			_, err := c.PrefillDone(hooks.SeqID(s))
			assert.NoError(t, err)
		}()
	}
	wg.Wait()
	for s := range 4 {
		assert.Len(t, rt.Lane(hooks.SeqID(s), 2, 1), 32)
	}
}

// lockedRuntime holds its own lock while it decodes (and reports keys) and
// while it evicts, as llama.cpp's Context does.
type lockedRuntime struct {
	mu sync.Mutex
	*hookstest.Shared
}

func (l *lockedRuntime) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.Shared.EvictPositions(seq, positions)
}

// A compression applied while another sequence decodes must not deadlock:
// the compressor must not hold its lock while the runtime evicts.
func TestCompressorNoLockOrderInversion(t *testing.T) {
	rt := &lockedRuntime{Shared: hookstest.NewShared(shape)}
	c, err := adapter.New(rt, adapter.DefaultPolicy())
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(12, 13))
	decode(t, rt, c, rng, 0, 0, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		r2 := rand.New(rand.NewPCG(14, 15))
		for from := 0; from < 128; from += 4 {
			rt.mu.Lock()
			time.Sleep(200 * time.Microsecond) // a forward pass in progress
			decode(t, rt, c, r2, 1, from, 4)
			rt.mu.Unlock()
		}
	}()
	for i := range 30 {
		decode(t, rt, c, rng, 0, 64+4*i, 4)
		st, err := c.Compress(0, -1)
		require.NoError(t, err)
		require.False(t, st.Skipped)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("deadlock: decoding seq 1 and compressing seq 0 wait on each other")
	}
	live, _ := c.Live(1)
	assert.Len(t, live, 128, "seq 1's records are intact")
}
