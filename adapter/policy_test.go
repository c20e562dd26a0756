package adapter

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
)

func TestPolicyValidate(t *testing.T) {
	ok := DefaultPolicy()
	require.NoError(t, ok.Validate())
	cases := []struct {
		name  string
		edit  func(p *Policy)
		field string
	}{
		{"keep zero", func(p *Policy) { p.Keep = 0 }, "keep=0"},
		{"keep negative", func(p *Policy) { p.Keep = -0.5 }, "keep=-0.5"},
		{"keep above one", func(p *Policy) { p.Keep = 1.5 }, "keep=1.5"},
		{"keep NaN", func(p *Policy) { p.Keep = math.NaN() }, "keep=NaN"},
		{"negative budget", func(p *Policy) { p.Budget = -3 }, "budget=-3"},
		{"sinks+window over budget", func(p *Policy) { p.Budget = 10; p.Sinks = 4; p.Window = 8 }, "sinks+window=4+8 exceeds budget=10"},
		{"unknown granularity", func(p *Policy) { p.Granularity = 7 }, "granularity=granularity(7)"},
		{"unknown aggregation", func(p *Policy) { p.Aggregate = 9 }, "aggregate=aggregation(9)"},
		{"unknown method", func(p *Policy) { p.Method = 9 }, "policy=method(9)"},
		{"negative sinks", func(p *Policy) { p.Sinks = -1 }, "sinks=-1"},
		{"negative window", func(p *Policy) { p.Window = -2 }, "window=-2"},
		{"negative skip layer", func(p *Policy) { p.SkipLayers = []int{-1} }, "skip layer -1"},
		{"negative min prompt", func(p *Policy) { p.MinPrompt = -1 }, "min prompt=-1"},
		{"negative reserve", func(p *Policy) { p.Reserve = -1 }, "reserve=-1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := DefaultPolicy()
			c.edit(&p)
			err := p.Validate()
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrPolicy)
			assert.Contains(t, err.Error(), c.field)
		})
	}
	// A budget makes Keep irrelevant.
	p := DefaultPolicy()
	p.Keep, p.Budget = 0, 8
	assert.NoError(t, p.Validate())
}

func TestParsers(t *testing.T) {
	for _, m := range []Method{KNorm, Random, Streaming, Inverse} {
		got, err := ParseMethod(m.String())
		require.NoError(t, err)
		assert.Equal(t, m, got)
	}
	for _, a := range []Aggregation{MeanRank, MeanNorm, MinNorm, MaxNorm} {
		got, err := ParseAggregation(a.String())
		require.NoError(t, err)
		assert.Equal(t, a, got)
	}
	_, err := ParseMethod("h2o")
	assert.ErrorContains(t, err, `policy="h2o"`)
	_, err = ParseAggregation("median")
	assert.ErrorContains(t, err, `aggregate="median"`)
	l, err := ParseLayers("0, 1,5")
	require.NoError(t, err)
	assert.Equal(t, []int{0, 1, 5}, l)
	l, err = ParseLayers("none")
	require.NoError(t, err)
	assert.Empty(t, l)
	_, err = ParseLayers("0,x")
	assert.ErrorContains(t, err, `"x"`)
	assert.Equal(t, "0,1,5", FormatLayers([]int{0, 1, 5}))
	_, err = hooks.ParseGranularity("per-layer")
	assert.ErrorContains(t, err, "per-layer")
}

func TestTarget(t *testing.T) {
	p := DefaultPolicy()
	cases := []struct {
		keep         float64
		budget       int
		sinks, win   int
		live, target int
	}{
		{0.5, 0, 0, 0, 300, 150},
		{0.5, 0, 0, 0, 301, 151},
		{1, 0, 0, 0, 17, 17},
		{0.1, 0, 0, 0, 5, 1},
		{0.1, 0, 4, 8, 20, 12}, // protected positions raise the target
		{1, 64, 0, 0, 100, 64},
		{1, 64, 0, 0, 10, 10}, // never above live
		{0.5, 0, 0, 0, 0, 0},
	}
	for _, c := range cases {
		p.Keep, p.Budget, p.Sinks, p.Window = c.keep, c.budget, c.sinks, c.win
		assert.Equal(t, c.target, p.Target(c.live), "%+v", c)
	}
}
