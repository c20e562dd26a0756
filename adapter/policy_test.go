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
		// Near MaxInt, sinks+window would overflow and every plan fail.
		{"huge sinks", func(p *Policy) { p.Sinks = math.MaxInt - 1 }, "sinks=9223372036854775806 exceeds 2147483647"},
		{"huge window", func(p *Policy) { p.Window = math.MaxInt }, "window=9223372036854775807 exceeds"},
		{"huge sinks and window", func(p *Policy) { p.Sinks, p.Window = math.MaxInt/2+1, math.MaxInt/2+1 }, "sinks="},
		{"huge budget", func(p *Policy) { p.Budget = math.MaxInt32 + 1 }, "budget=2147483648 exceeds"},
		{"huge skip layer", func(p *Policy) { p.SkipLayers = []int{math.MaxInt} }, "skip layer 9223372036854775807"},
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

func TestCheckModel(t *testing.T) {
	with := func(edit func(p *Policy)) Policy {
		p := DefaultPolicy()
		edit(&p)
		require.NoError(t, p.Validate())
		return p
	}
	cases := []struct {
		name            string
		p               Policy
		layers, context int
		want            []string // one Mismatch each, in order: field and a fragment of the problem
		off             bool
	}{
		{"default fits", DefaultPolicy(), 5, 512, nil, false},
		{"unknown model", with(func(p *Policy) { p.SkipLayers = []int{40}; p.Budget = 1 << 20 }), 0, 0, nil, false},
		{"skip beyond the model", with(func(p *Policy) { p.SkipLayers = []int{0, 1, 7, 9} }), 5, 512,
			[]string{"SkipLayers: layer(s) 7,9 do not exist: the model has 5 layers (0-4); they are ignored"}, false},
		{"skip all per head", with(func(p *Policy) { p.SkipLayers = []int{0, 1, 2}; p.Granularity = hooks.PerHead }), 3, 512,
			[]string{"SkipLayers: 0,1,2 skips every one of the model's 3 layers: no layer is compressed; compression is off"}, true},
		{"skip all per token, and more", with(func(p *Policy) { p.SkipLayers = []int{2, 1, 0, 1, 5} }), 3, 512,
			[]string{"SkipLayers: layer(s) 5 do not exist", "SkipLayers: 2,1,0,1,5 skips every one of the model's 3 layers: no layer votes"}, true},
		{"budget covers the context", with(func(p *Policy) { p.Budget = 512 }), 5, 512,
			[]string{"Budget: budget=512 >= the context of 512 cells: every position fits the budget, so a prompt is never compressed after prefill"}, false},
		{"budget below the context", with(func(p *Policy) { p.Budget = 511 }), 5, 512, nil, false},
		{"sinks and window cover the context", with(func(p *Policy) { p.Sinks, p.Window = 100, 28 }), 5, 128,
			[]string{"Sinks+Window: sinks+window=100+28 (with the last position) cover the context of 128 cells"}, true},
		{"sinks and the last position cover the context", with(func(p *Policy) { p.Sinks = 127 }), 5, 128,
			[]string{"Sinks+Window: sinks+window=127+0"}, true},
		{"sinks leave one position", with(func(p *Policy) { p.Sinks = 126 }), 5, 128, nil, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := c.p.CheckModel(c.layers, c.context)
			require.Len(t, got, len(c.want), "%v", got)
			off := false
			for i, m := range got {
				assert.Contains(t, m.Error(), c.want[i])
				off = off || m.Off
			}
			assert.Equal(t, c.off, off)
		})
	}
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
