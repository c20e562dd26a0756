//go:build cgo

package ollama

import (
	"context"
	"fmt"
	"math"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance/reference"
	"github.com/kvnorm/kvnorm/hooks"
)

const storyPrompt = "Once upon a time there was a little girl named Lily. She loved to play with her toys and her friends. One day she went to the park with her mom"

func perHead(keep float64) *adapter.Policy {
	p := adapter.DefaultPolicy()
	p.Granularity = hooks.PerHead
	p.Keep = keep
	return &p
}

func perToken(keep float64) *adapter.Policy {
	p := adapter.DefaultPolicy()
	p.Keep = keep
	return &p
}

func open(t *testing.T, cfg Config) *Session {
	t.Helper()
	if cfg.Context == 0 {
		cfg.Context = 256
	}
	s, err := Open(storiesGGUF(t), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// run decodes the prompt, flushes (compressing with a policy) and generates
// n greedy tokens, returning the logits before each generated token.
func run(t *testing.T, s *Session, seq int, prompt []int32, n int) ([]int32, [][]float32) {
	t.Helper()
	var all [][]float32
	g, err := s.Generate(context.Background(), seq, prompt, n, GenerateOptions{IgnoreEOS: true,
		Logits: func(_ int, l []float32) { all = append(all, slices.Clone(l)) }})
	require.NoError(t, err)
	return g.Tokens, all
}

func maxDiff(a, b []float32) float64 {
	d := 0.0
	for i := range a {
		d = max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

func both(t *testing.T, f func(t *testing.T, fa bool)) {
	for _, fa := range []bool{false, true} {
		t.Run(fmt.Sprintf("flash=%v", fa), func(t *testing.T) { f(t, fa) })
	}
}

// Without compression, kvnorm's cache computes exactly what Ollama's own
// causal cache computes.
func TestMatchesOllamaCache(t *testing.T) {
	both(t, func(t *testing.T, fa bool) {
		up := open(t, Config{Upstream: true, FlashAttention: fa, Batch: 16})
		kv := open(t, Config{FlashAttention: fa, Batch: 16})
		ids, err := kv.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		upTok, upLogits := run(t, up, 0, ids, 24)
		kvTok, kvLogits := run(t, kv, 0, ids, 24)
		assert.Equal(t, upTok, kvTok)
		for i := range upLogits {
			assert.LessOrEqual(t, maxDiff(upLogits[i], kvLogits[i]), 1e-5, "step %d", i)
		}
	})
}

// The logits and the key norms match the plain-Go reference model.
func TestMatchesReference(t *testing.T) {
	ref, err := reference.LoadGGUF(storiesGGUF(t))
	require.NoError(t, err)
	both(t, func(t *testing.T, fa bool) {
		s := open(t, Config{Policy: perHead(1), FlashAttention: fa, CacheType: "f32"})
		ids, err := s.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		rs := ref.NewSession()
		rl, err := rs.Decode(ids, nil)
		require.NoError(t, err)
		logits, err := s.Decode(0, ids)
		require.NoError(t, err)
		require.NoError(t, s.Flush())
		assert.LessOrEqual(t, maxDiff(rl[len(rl)-1], logits), 1e-3)

		comp := s.Cache().Compressor()
		for l := range 5 {
			keys := rs.Keys(l)
			for h := range keys {
				pos, norms, err := comp.Norms(0, l, h)
				require.NoError(t, err)
				require.Len(t, pos, len(ids))
				for i, e := range keys[h] {
					var sum float64
					for _, v := range e.Key {
						sum += float64(v) * float64(v)
					}
					assert.InDelta(t, math.Sqrt(sum), norms[i], 1e-4, "layer %d head %d pos %d", l, h, pos[i])
				}
			}
		}
	})
}

// Per-head compression at keep 0.5 keeps each head's own lowest-norm half,
// physically: attention runs over half the cells of every compressed layer,
// and the logits match the reference model with the same entries evicted.
func TestPerHeadHalvesCells(t *testing.T) {
	ref, err := reference.LoadGGUF(storiesGGUF(t))
	require.NoError(t, err)
	both(t, func(t *testing.T, fa bool) {
		s := open(t, Config{Policy: perHead(0.5), FlashAttention: fa, CacheType: "f32", Batch: 16})
		ids, err := s.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		n := len(ids)
		_, err = s.Decode(0, ids)
		require.NoError(t, err)
		require.NoError(t, s.Flush())

		u := s.Cache().Usage(0)
		half := (n + 1) / 2
		assert.Equal(t, []int{n, n, half, half, half}, u.Cells)
		assert.Equal(t, int64((2*n+3*half)*4), u.Entries)
		st := s.Cache().Stats()
		require.Len(t, st, 1)
		assert.Equal(t, "prefill", st[0].Trigger)
		assert.Equal(t, u.Entries, st[0].EntriesAfter)

		// Each head kept its own lowest norms, and the heads differ.
		comp := s.Cache().Compressor()
		differ := false
		rs := ref.NewSession()
		_, err = rs.Decode(ids, nil)
		require.NoError(t, err)
		for l := 2; l < 5; l++ {
			for h := range 4 {
				kept := s.Cache().HeadPositions(0, l, h)
				require.Len(t, kept, half)
				assert.Contains(t, kept, int32(n-1), "the last position is kept")
				if !slices.Equal(kept, s.Cache().HeadPositions(0, l, 0)) {
					differ = true
				}
				pos, norms, err := comp.Norms(0, l, h)
				require.NoError(t, err)
				assert.Equal(t, kept, pos)
				// Every evicted position had a norm at least as high as
				// every kept one (but the protected last position).
				keptMax := float32(0)
				for i, p := range pos {
					if p != int32(n-1) {
						keptMax = max(keptMax, norms[i])
					}
				}
				var evict []int32
				for _, e := range rs.Entries(l, h) {
					if !slices.Contains(kept, e.Pos) {
						evict = append(evict, e.Pos)
						var sum float64
						for _, v := range e.Key {
							sum += float64(v) * float64(v)
						}
						assert.GreaterOrEqual(t, math.Sqrt(sum)+1e-5, float64(keptMax))
					}
				}
				_, err = rs.EvictHead(l, h, evict)
				require.NoError(t, err)
			}
		}
		assert.True(t, differ, "per-head plans should differ between heads")

		// Decoding continues after the kept cells, in step with the
		// reference.
		for step := range 12 {
			next := int32(400 + step) // any tokens: compare logits
			rl, err := rs.Decode([]int32{next}, nil)
			require.NoError(t, err)
			l, err := s.Decode(0, []int32{next})
			require.NoError(t, err)
			assert.LessOrEqual(t, maxDiff(rl[0], l), 1e-3, "step %d", step)
		}
		u = s.Cache().Usage(0)
		assert.Equal(t, []int{n + 12, n + 12, half + 12, half + 12, half + 12}, u.Cells)
	})
}

// After a per-head compression, decoding attends over the cells each layer
// holds (padded to the backend's cache padding), not over the layer's whole
// allocation: what Get hands attention for a compressed layer is about half
// of what a layer kept whole gets. (Issue 14: the attention saved is the only
// decode gain; a Get that returned the allocation would lose it silently.)
func TestDecodeAttendsLiveCellsOnly(t *testing.T) {
	both(t, func(t *testing.T, fa bool) {
		s := open(t, Config{Policy: perHead(0.5), FlashAttention: fa, CacheType: "f32", Context: 1024})
		story, err := s.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		var ids []int32
		for len(ids) < 700 {
			ids = append(ids, story...)
		}
		ids = ids[:700]
		_, err = s.Decode(0, ids)
		require.NoError(t, err)
		require.NoError(t, s.Flush())
		_, err = s.Decode(0, []int32{ids[1]})
		require.NoError(t, err)

		c := s.Cache()
		pad := c.config.CachePadding
		require.Greater(t, pad, 1)
		ctx := s.Model().Backend().NewContext()
		defer ctx.Close()
		want := []int{701, 701, 351, 351, 351} // cells held: layers 0-1 whole, then half of 701 and the new token
		for li, n := range want {
			require.Equal(t, n, c.lay.seqs[0].layers[li].n(), "layer %d holds", li)
			c.SetLayer(li)
			// The mask belonged to the batch's context, closed since: its
			// width is the group's length.
			k, v, _ := c.Get(ctx)
			cells := roundUp(n, pad)
			assert.Equal(t, cells, k.Dim(2), "layer %d: keys attended", li)
			assert.Equal(t, cells, c.cur.groups[c.cur.layerGroup[li]].length, "layer %d: mask width", li)
			if c.config.PermutedV {
				assert.Equal(t, cells, v.Dim(0), "layer %d: values attended", li)
			} else {
				assert.Equal(t, cells, v.Dim(2), "layer %d: values attended", li)
			}
			assert.Less(t, k.Dim(2), c.keys[li].Dim(1), "layer %d: attention runs over less than the allocation", li)
		}
	})
}

// Per-head keep 1.0 is identical to no compression, bit for bit.
func TestPerHeadKeepOneIsIdentity(t *testing.T) {
	both(t, func(t *testing.T, fa bool) {
		plain := open(t, Config{FlashAttention: fa})
		keep1 := open(t, Config{Policy: perHead(1), FlashAttention: fa})
		ids, err := plain.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		pt, pl := run(t, plain, 0, ids, 32)
		kt, kl := run(t, keep1, 0, ids, 32)
		assert.Equal(t, pt, kt)
		for i := range pl {
			require.True(t, slices.Equal(pl[i], kl[i]), "step %d differs", i)
		}
		st := keep1.Cache().Stats()
		assert.Empty(t, st, "keep 1 evicts nothing")
		assert.Equal(t, plain.Cache().Usage(0), keep1.Cache().Usage(0))
	})
}

// Generation continues after compression, and a second sequence in the same
// cache stays bit-identical to a run without compression.
func TestSecondSequenceUntouched(t *testing.T) {
	both(t, func(t *testing.T, fa bool) {
		plain := open(t, Config{FlashAttention: fa, Sequences: 2})
		comp := open(t, Config{Policy: perHead(0.5), FlashAttention: fa, Sequences: 2})
		ids, err := plain.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		other, err := plain.Tokenize("The cat sat on the mat and looked at the big red ball", true)
		require.NoError(t, err)

		// seq 1 is fed one token per batch, so it never counts as a prompt
		// and is never compressed; seq 0 is compressed in between.
		step := func(i int) {
			lp, err := plain.Decode(1, other[i:i+1])
			require.NoError(t, err)
			lc, err := comp.Decode(1, other[i:i+1])
			require.NoError(t, err)
			require.True(t, slices.Equal(lp, lc), "seq 1 token %d: logits differ", i)
		}
		step(0)
		step(1)
		run(t, plain, 0, ids, 0)
		gen, _ := run(t, comp, 0, ids, 0)
		assert.Empty(t, gen)
		require.NotEmpty(t, comp.Cache().Stats(), "seq 0 is compressed")
		for i := 2; i < len(other); i++ {
			step(i)
			if i%3 == 0 {
				_, err := comp.Decode(0, []int32{int32(300 + i)})
				require.NoError(t, err, "seq 0 decodes on after compression")
			}
		}
		assert.Equal(t, len(other), comp.Cache().Usage(1).Cells[4], "seq 1 keeps every cell")
		assert.Less(t, comp.Cache().Usage(0).Cells[4], len(ids), "seq 0 is compressed")
	})
}

// Per-token mode evicts the same positions in every layer and head, as the
// reference model's EvictPositions does.
func TestPerToken(t *testing.T) {
	ref, err := reference.LoadGGUF(storiesGGUF(t))
	require.NoError(t, err)
	s := open(t, Config{Policy: perToken(0.5), CacheType: "f32"})
	ids, err := s.Tokenize(storyPrompt, true)
	require.NoError(t, err)
	n := len(ids)
	_, err = s.Decode(0, ids)
	require.NoError(t, err)
	require.NoError(t, s.Flush())
	kept := s.Cache().HeadPositions(0, 0, 0)
	require.Len(t, kept, (n+1)/2)
	for l := range 5 {
		for h := range 4 {
			assert.Equal(t, kept, s.Cache().HeadPositions(0, l, h))
		}
	}
	rs := ref.NewSession()
	_, err = rs.Decode(ids, nil)
	require.NoError(t, err)
	var evict []int32
	for p := range int32(n) {
		if !slices.Contains(kept, p) {
			evict = append(evict, p)
		}
	}
	rs.EvictPositions(evict)
	for step := range 8 {
		next := int32(350 + step)
		rl, err := rs.Decode([]int32{next}, nil)
		require.NoError(t, err)
		l, err := s.Decode(0, []int32{next})
		require.NoError(t, err)
		assert.LessOrEqual(t, maxDiff(rl[0], l), 1e-3, "step %d", step)
	}
}

// A prompt longer than the cache is fed in chunks: the cache compresses
// under pressure before every chunk that would not fit.
func TestPressureLongPrompt(t *testing.T) {
	for _, tc := range []struct {
		pol       *adapter.Policy
		pipelined bool
	}{{perHead(0.5), false}, {perToken(0.5), false}, {perHead(0.5), true}} {
		pol := tc.pol
		t.Run(fmt.Sprintf("%s/pipelined=%v", pol.Granularity, tc.pipelined), func(t *testing.T) {
			s := open(t, Config{Policy: pol, Context: 64, Batch: 16, Pipelined: tc.pipelined})
			var ids []int32
			for len(ids) < 200 {
				chunk, err := s.Tokenize(storyPrompt, len(ids) == 0)
				require.NoError(t, err)
				ids = append(ids, chunk...)
			}
			g, err := s.Generate(context.Background(), 0, ids, 40, GenerateOptions{IgnoreEOS: true})
			require.NoError(t, err)
			assert.Len(t, g.Tokens, 40)
			assert.Equal(t, int32(len(ids)+39), s.Len(0))
			u := s.Cache().Usage(0)
			for _, c := range u.Cells {
				assert.LessOrEqual(t, c, 64)
			}
			pressure := pressureCompressions(s)
			assert.Greater(t, pressure, 2)
			t.Logf("%d compressions under pressure; cells %v; text %q", pressure, u.Cells, g.Text)
		})
	}
	// Without a policy the same prompt does not fit.
	s := open(t, Config{Context: 64, Batch: 16})
	ids := make([]int32, 100)
	for i := range ids {
		ids[i] = int32(300 + i)
	}
	_, err := s.Decode(0, ids)
	assert.ErrorContains(t, err, "could not find a kv cache slot")
}

// In the runner's pipelined mode the prompt is compressed inside the graph
// of the second generated token, keeping the first one (whose norms are not
// read yet); the logits match the reference model with the same eviction.
func TestPipelinedMatchesReference(t *testing.T) {
	ref, err := reference.LoadGGUF(storiesGGUF(t))
	require.NoError(t, err)
	both(t, func(t *testing.T, fa bool) {
		s := open(t, Config{Policy: perHead(0.5), Pipelined: true, FlashAttention: fa, CacheType: "f32", Batch: 16})
		ids, err := s.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		n := len(ids)
		rs := ref.NewSession()
		_, err = rs.Decode(ids, nil)
		require.NoError(t, err)
		_, err = s.Decode(0, ids)
		require.NoError(t, err)
		// The first generated token sees the whole prompt.
		l1, err := s.Decode(0, []int32{400})
		require.NoError(t, err)
		r1, err := rs.Decode([]int32{400}, nil)
		require.NoError(t, err)
		assert.LessOrEqual(t, maxDiff(r1[0], l1), 1e-3)
		assert.Empty(t, s.Cache().Stats(), "not compressed yet")

		// The second is decoded after the compaction, in the same graph.
		l2, err := s.Decode(0, []int32{401})
		require.NoError(t, err)
		st := s.Cache().Stats()
		require.Len(t, st, 1)
		assert.Equal(t, "prefill", st[0].Trigger)
		half := (n + 1) / 2
		assert.Equal(t, []int{n + 2, n + 2, half + 2, half + 2, half + 2}, s.Cache().Usage(0).Cells)
		for l := 2; l < 5; l++ {
			for h := range 4 {
				kept := s.Cache().HeadPositions(0, l, h)
				assert.Equal(t, []int32{int32(n), int32(n + 1)}, kept[half:], "the unread token is kept")
				var evict []int32
				for p := range int32(n) {
					if !slices.Contains(kept, p) {
						evict = append(evict, p)
					}
				}
				_, err := rs.EvictHead(l, h, evict)
				require.NoError(t, err)
			}
		}
		r2, err := rs.Decode([]int32{401}, nil)
		require.NoError(t, err)
		assert.LessOrEqual(t, maxDiff(r2[0], l2), 1e-3)
		for step := range 6 {
			next := int32(402 + step)
			rl, err := rs.Decode([]int32{next}, nil)
			require.NoError(t, err)
			l, err := s.Decode(0, []int32{next})
			require.NoError(t, err)
			assert.LessOrEqual(t, maxDiff(rl[0], l), 1e-3, "step %d", step)
		}
	})
}
