package adapter

import (
	"math"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

var testShape = hooks.CacheShape{Layers: 4, KVHeads: 2, HeadDim: 8, KType: kernels.F16, VType: kernels.F16, Capacity: 64}

// recordOf builds a record whose norm for (layer, head, pos) is f(layer, head, pos).
func recordOf(t *testing.T, shape hooks.CacheShape, n int, f func(l, h int, p hooks.Pos) float32) *Record {
	t.Helper()
	r, err := NewRecord(shape)
	require.NoError(t, err)
	for l := range shape.Layers {
		for h := range shape.KVHeads {
			for p := range hooks.Pos(n) {
				require.NoError(t, r.Put(l, h, p, f(l, h, p)))
			}
		}
	}
	return r
}

func TestPlanTokensKeepsLowestNorms(t *testing.T) {
	// Norm = |p - 5|: positions near 5 have the lowest norms.
	r := recordOf(t, testShape, 12, func(l, h int, p hooks.Pos) float32 { return float32(math.Abs(float64(p - 5))) })
	p := DefaultPolicy()
	p.Keep = 0.5
	plan, err := p.Plan(r, 3, -1, false)
	require.NoError(t, err)
	require.NotNil(t, plan.Token)
	assert.Equal(t, hooks.SeqID(3), plan.Token.Seq)
	// 6 kept: the last position 11, then the 5 lowest of 0..10: 5, 4, 6, 3, 7
	// (ties broken toward the lower position: 4 before 6, 3 before 7).
	assert.Equal(t, []hooks.Pos{3, 4, 5, 6, 7, 11}, plan.Token.Keep)
	assert.Equal(t, []hooks.Pos{0, 1, 2, 8, 9, 10}, plan.Token.Evict)
	assert.Equal(t, 6, plan.Target)
}

func TestPlanTokensSkippedLayersDoNotVote(t *testing.T) {
	// Layers 0 and 1 say "keep the early positions", layers 2 and 3 "keep the late ones".
	r := recordOf(t, testShape, 10, func(l, h int, p hooks.Pos) float32 {
		if l < 2 {
			return float32(p)
		}
		return float32(10 - p)
	})
	p := DefaultPolicy()
	plan, err := p.Plan(r, 0, 4, false)
	require.NoError(t, err)
	assert.Equal(t, []hooks.Pos{6, 7, 8, 9}, plan.Token.Keep)

	p.SkipLayers = []int{2, 3}
	plan, err = p.Plan(r, 0, 4, false)
	require.NoError(t, err)
	assert.Equal(t, []hooks.Pos{0, 1, 2, 9}, plan.Token.Keep)

	p.SkipLayers = []int{0, 1, 2, 3}
	_, err = p.Plan(r, 0, 4, false)
	assert.ErrorContains(t, err, "cover all 4 layers")
}

func TestPlanProtectsSinksWindowAndLast(t *testing.T) {
	// Increasing norms: knorm would keep the earliest positions.
	r := recordOf(t, testShape, 20, func(l, h int, p hooks.Pos) float32 { return float32(20 - p) })
	p := DefaultPolicy()
	p.Sinks, p.Window = 2, 3
	plan, err := p.Plan(r, 0, 8, false)
	require.NoError(t, err)
	// Sinks 0,1; window 17,18,19; the 3 lowest of 2..16 are 14,15,16.
	assert.Equal(t, []hooks.Pos{0, 1, 14, 15, 16, 17, 18, 19}, plan.Token.Keep)
	// A target below what is protected keeps the protected positions.
	plan, err = p.Plan(r, 0, 1, false)
	require.NoError(t, err)
	assert.Equal(t, []hooks.Pos{0, 1, 17, 18, 19}, plan.Token.Keep)
}

func TestPlanNaNEvictedFirst(t *testing.T) {
	nan := float32(math.NaN())
	r := recordOf(t, testShape, 6, func(l, h int, p hooks.Pos) float32 {
		if p == 1 {
			return nan
		}
		return 1 // all equal otherwise: ties go to the lower position
	})
	for _, agg := range []Aggregation{MeanRank, MeanNorm, MinNorm, MaxNorm} {
		p := DefaultPolicy()
		p.Aggregate = agg
		plan, err := p.Plan(r, 0, 5, false)
		require.NoError(t, err)
		assert.Equal(t, []hooks.Pos{1}, plan.Token.Evict, "aggregate %s", agg)
	}
	p := DefaultPolicy()
	p.Granularity = hooks.PerHead
	plan, err := p.Plan(r, 0, 5, false)
	require.NoError(t, err)
	assert.Equal(t, []hooks.Pos{0, 2, 3, 4, 5}, plan.Head.Layers[2][0])
}

func TestPlanAggregations(t *testing.T) {
	// Head 0 of every layer: norm p; head 1: a spike at position 0, else 100-p.
	// mean-norm is dominated by head 1's scale, mean-rank weighs heads equally.
	r := recordOf(t, testShape, 6, func(l, h int, p hooks.Pos) float32 {
		if h == 0 {
			return float32(p) * 0.001
		}
		if p == 0 {
			return 1000
		}
		return float32(100 - p)
	})
	keep := func(agg Aggregation) []hooks.Pos {
		p := DefaultPolicy()
		p.Aggregate = agg
		plan, err := p.Plan(r, 0, 3, false)
		require.NoError(t, err)
		return plan.Token.Keep
	}
	assert.Equal(t, []hooks.Pos{3, 4, 5}, keep(MeanNorm))
	assert.Equal(t, []hooks.Pos{0, 1, 5}, keep(MinNorm))
	assert.Equal(t, []hooks.Pos{3, 4, 5}, keep(MaxNorm))
	// Ranks: head 0 ranks 0..4 for p=0..4; head 1 ranks p=1..4 as 3,2,1,0 and p=0 as 4.
	// Mean ranks: p0 2, p1 2, p2 2, p3 2, p4 2: all tie, lower positions win.
	assert.Equal(t, []hooks.Pos{0, 1, 5}, keep(MeanRank))
}

func TestPlanHeadsEachHeadOwnSet(t *testing.T) {
	// Head h of layer l prefers positions congruent to h mod 2.
	r := recordOf(t, testShape, 10, func(l, h int, p hooks.Pos) float32 {
		if int(p)%2 == h {
			return 1
		}
		return 2
	})
	p := DefaultPolicy()
	p.Granularity = hooks.PerHead
	plan, err := p.Plan(r, 7, 5, false)
	require.NoError(t, err)
	hp := plan.Head
	require.NotNil(t, hp)
	assert.Equal(t, hooks.SeqID(7), hp.Seq)
	assert.Nil(t, hp.Layers[0], "skipped layer 0 keeps everything")
	assert.Nil(t, hp.Layers[1], "skipped layer 1 keeps everything")
	assert.Equal(t, -1, hp.KeepCount(0))
	for l := 2; l < 4; l++ {
		assert.Equal(t, []hooks.Pos{0, 2, 4, 6, 9}, hp.Layers[l][0])
		assert.Equal(t, []hooks.Pos{1, 3, 5, 7, 9}, hp.Layers[l][1])
		assert.Equal(t, 5, hp.KeepCount(l))
	}
	// Forced (cache pressure): skipped layers are compressed too.
	plan, err = p.Plan(r, 7, 5, true)
	require.NoError(t, err)
	assert.Equal(t, []hooks.Pos{0, 2, 4, 6, 9}, plan.Head.Layers[0][0])
}

func TestPlanMethods(t *testing.T) {
	r := recordOf(t, testShape, 40, func(l, h int, p hooks.Pos) float32 { return float32(p) })
	plan := func(m Method, seed uint64, g hooks.Granularity) *Plan {
		p := DefaultPolicy()
		p.Method, p.Seed, p.Granularity, p.Sinks = m, seed, g, 1
		pl, err := p.Plan(r, 0, 10, false)
		require.NoError(t, err)
		return pl
	}
	assert.Equal(t, []hooks.Pos{0, 1, 2, 3, 4, 5, 6, 7, 8, 39}, plan(KNorm, 0, hooks.PerToken).Token.Keep)
	assert.Equal(t, []hooks.Pos{0, 31, 32, 33, 34, 35, 36, 37, 38, 39}, plan(Inverse, 0, hooks.PerToken).Token.Keep)
	assert.Equal(t, []hooks.Pos{0, 31, 32, 33, 34, 35, 36, 37, 38, 39}, plan(Streaming, 0, hooks.PerToken).Token.Keep)
	r1, r2, r3 := plan(Random, 1, hooks.PerToken), plan(Random, 1, hooks.PerToken), plan(Random, 2, hooks.PerToken)
	assert.Equal(t, r1.Token.Keep, r2.Token.Keep, "same seed, same plan")
	assert.NotEqual(t, r1.Token.Keep, r3.Token.Keep, "another seed, another plan")
	assert.Len(t, r1.Token.Keep, 10)
	assert.Contains(t, r1.Token.Keep, hooks.Pos(0))
	assert.Contains(t, r1.Token.Keep, hooks.Pos(39))
	h := plan(Random, 1, hooks.PerHead).Head
	assert.NotEqual(t, h.Layers[2][0], h.Layers[2][1], "random heads draw independently")
	assert.Equal(t, []hooks.Pos{0, 31, 32, 33, 34, 35, 36, 37, 38, 39}, plan(Streaming, 0, hooks.PerHead).Head.Layers[3][1])
}

func TestPlanIsPureAndSorted(t *testing.T) {
	r := recordOf(t, testShape, 200, func(l, h int, p hooks.Pos) float32 {
		return float32((int(p)*7919 + l*31 + h*17) % 101)
	})
	for _, g := range []hooks.Granularity{hooks.PerToken, hooks.PerHead} {
		p := DefaultPolicy()
		p.Granularity = g
		a, err := p.Plan(r, 0, -1, false)
		require.NoError(t, err)
		b, err := p.Plan(r, 0, -1, false)
		require.NoError(t, err)
		assert.Equal(t, a, b)
		if a.Token != nil {
			assert.True(t, slices.IsSorted(a.Token.Keep))
			assert.True(t, slices.IsSorted(a.Token.Evict))
			assert.Len(t, a.Token.Keep, 100)
			assert.Len(t, a.Token.Evict, 100)
		} else {
			for _, heads := range a.Head.Layers[2:] {
				for _, keep := range heads {
					assert.True(t, slices.IsSorted(keep))
					assert.Len(t, keep, 100)
					assert.Equal(t, hooks.Pos(199), keep[len(keep)-1])
				}
			}
		}
	}
}
