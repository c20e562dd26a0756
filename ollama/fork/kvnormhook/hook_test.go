package kvnormhook

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

func env(kv map[string]string) func(string) string {
	return func(k string) string { return kv[k] }
}

func TestPolicyFromEnv(t *testing.T) {
	p, err := PolicyFromEnv(env(nil))
	require.NoError(t, err)
	assert.Nil(t, p, "unset: upstream behaviour")

	p, err = PolicyFromEnv(env(map[string]string{EnvGranularity: "per-token"}))
	require.NoError(t, err)
	assert.Nil(t, p, "no keep or budget: off")

	p, err = PolicyFromEnv(env(map[string]string{EnvKeep: "0.5"}))
	require.NoError(t, err)
	require.NotNil(t, p)
	assert.Equal(t, "knorm keep=0.5 per-head skip=0,1 sinks=0 window=0", p.String())

	p, err = PolicyFromEnv(env(map[string]string{EnvBudget: "128", EnvGranularity: "per-token", EnvSkipLayers: "none",
		EnvPolicy: "streaming", EnvSinks: "4", EnvWindow: "8", EnvMinPrompt: "16", EnvAggregate: "min-norm"}))
	require.NoError(t, err)
	assert.Equal(t, 128, p.Budget)
	assert.Equal(t, hooks.PerToken, p.Granularity)
	assert.Empty(t, p.SkipLayers)
	assert.Equal(t, adapter.Streaming, p.Method)
	assert.Equal(t, adapter.MinNorm, p.Aggregate)
	assert.Equal(t, []int{4, 8, 16}, []int{p.Sinks, p.Window, p.MinPrompt})
}

func TestPolicyFromEnvRefuses(t *testing.T) {
	for name, kv := range map[string]map[string]string{
		EnvKeep:        {EnvKeep: "abc"},
		EnvKeep + "0":  {EnvKeep: "0"},
		EnvKeep + "2":  {EnvKeep: "2"},
		EnvBudget:      {EnvBudget: "-3"},
		EnvGranularity: {EnvKeep: "0.5", EnvGranularity: "per-layer"},
		EnvSkipLayers:  {EnvKeep: "0.5", EnvSkipLayers: "0,x"},
		EnvPolicy:      {EnvKeep: "0.5", EnvPolicy: "h2o"},
		EnvSinks:       {EnvKeep: "0.5", EnvSinks: "-1"},
		EnvWindow:      {EnvWindow: "many"},
		EnvMinPrompt:   {EnvMinPrompt: "1.5"},
		EnvAggregate:   {EnvAggregate: "median"},
		EnvBatching:    {EnvKeep: "0.5", EnvBatching: "together"},
	} {
		_, err := PolicyFromEnv(env(kv))
		require.ErrorIs(t, err, ErrEnv, name)
		var named string
		for k := range kv {
			if k == name || k+"0" == name || k+"2" == name {
				named = k
			}
		}
		if named == "" {
			named = name
		}
		assert.ErrorContains(t, err, named, "the message names the variable")
	}
	_, err := PolicyFromEnv(env(map[string]string{EnvBudget: "4", EnvSinks: "3", EnvWindow: "3"}))
	assert.ErrorIs(t, err, ErrEnv)
	assert.ErrorContains(t, err, "OLLAMA_KV_NORM_")
}

// Values that parse but could never work are refused, naming the variable:
// sinks or window near MaxInt overflowed sinks+window into every compression
// failing. GRANULARITY takes any case, as POLICY does.
func TestPolicyFromEnvLimits(t *testing.T) {
	for _, tc := range []struct {
		kv   map[string]string
		want string
	}{
		{map[string]string{EnvKeep: "0.5", EnvSinks: "9223372036854775806"}, `OLLAMA_KV_NORM_SINKS="9223372036854775806": want a number of positions from 0 to 2147483647`},
		{map[string]string{EnvKeep: "0.5", EnvWindow: "2147483648"}, `OLLAMA_KV_NORM_WINDOW="2147483648"`},
		{map[string]string{EnvBudget: "9223372036854775807"}, `OLLAMA_KV_NORM_BUDGET="9223372036854775807": want a number of positions from 1 to 2147483647`},
		{map[string]string{EnvKeep: "0.5", EnvSkipLayers: "0,9223372036854775807"}, "OLLAMA_KV_NORM_SKIP_LAYERS"},
	} {
		_, err := PolicyFromEnv(env(tc.kv))
		require.ErrorIs(t, err, ErrEnv, "%v", tc.kv)
		assert.ErrorContains(t, err, tc.want)
	}
	p, err := PolicyFromEnv(env(map[string]string{EnvKeep: "0.5", EnvSinks: "2147483647", EnvWindow: "2147483647"}))
	require.NoError(t, err, "the largest counts still validate")
	assert.Equal(t, 2147483647, p.Sinks)
	for _, g := range []string{"PER-TOKEN", "Per-Head", " per-head "} {
		p, err := PolicyFromEnv(env(map[string]string{EnvKeep: "0.5", EnvGranularity: g, EnvPolicy: "KNORM"}))
		require.NoError(t, err, g)
		assert.Equal(t, strings.Contains(strings.ToLower(g), "token"), p.Granularity == hooks.PerToken, g)
	}
}

// The server's decision for one model: validation lines, then the runner.
func TestDecideServer(t *testing.T) {
	half := &adapter.Policy{}
	*half = adapter.DefaultPolicy()
	half.Granularity = hooks.PerHead
	with := func(edit func(p *adapter.Policy)) *adapter.Policy {
		p := *half
		edit(&p)
		require.NoError(t, p.Validate())
		return &p
	}
	runs := func() error { return nil }
	cannot := func() error { return errors.New("architecture \"gemma2\" uses a *kvcache.WrapperCache") }
	llama := serverModel{Arch: "llama", Layers: 5, Context: 512}
	goEngine := llama
	goEngine.GoEngine = true
	vision := llama
	vision.Projectors = 1
	cases := []struct {
		name   string
		p      *adapter.Policy
		m      serverModel
		probe  func() error
		route  bool
		probed bool
		lines  []string // level and message fragments, in order
	}{
		{"compression off: upstream", nil, llama, runs, false, false, nil},
		{"llama bound for llama.cpp goes to the Go engine", half, llama, runs, true, true,
			[]string{"INFO kvnorm: KV cache compression on: the model runs on Ollama's Go engine (routed by kvnorm; OLLAMA_NEW_ENGINE=1 is not needed)"}},
		{"already on the Go engine", half, goEngine, runs, false, false, []string{"INFO kvnorm: KV cache compression on"}},
		{"a model kvnorm cannot compress stays, with a warning", half, llama, cannot, false, true,
			[]string{"WARN kvnorm: KV cache compression is off for this model: it runs on the llama.cpp runner"}},
		{"split vision model stays", half, vision, runs, false, false,
			[]string{"WARN kvnorm: KV cache compression is off for this model: its vision projector is a separate file"}},
		{"skip layers beyond the model: warned, still routed", with(func(p *adapter.Policy) { p.SkipLayers = []int{0, 1, 9} }), llama, runs, true, true,
			[]string{"WARN kvnorm: OLLAMA_KV_NORM_SKIP_LAYERS does not fit this model", "INFO kvnorm: KV cache compression on: the model runs"}},
		{"every layer skipped: off, not routed", with(func(p *adapter.Policy) { p.SkipLayers = []int{0, 1, 2, 3, 4} }), llama, runs, false, false,
			[]string{"WARN kvnorm: OLLAMA_KV_NORM_SKIP_LAYERS does not fit this model"}},
		{"budget >= num_ctx: warned", with(func(p *adapter.Policy) { p.Budget = 512 }), goEngine, runs, false, false,
			[]string{"WARN kvnorm: OLLAMA_KV_NORM_BUDGET does not fit this model", "INFO kvnorm: KV cache compression on"}},
		{"sinks+window cover num_ctx: off", with(func(p *adapter.Policy) { p.Sinks, p.Window = 256, 256 }), llama, runs, false, false,
			[]string{"WARN kvnorm: OLLAMA_KV_NORM_SINKS+OLLAMA_KV_NORM_WINDOW does not fit this model"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			probed := false
			d := decideServer(c.p, c.m, func() error { probed = true; return c.probe() })
			assert.Equal(t, c.route, d.route)
			assert.Equal(t, c.probed, probed, "the Go engine is asked only when it decides")
			var buf bytes.Buffer
			d.log(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
				if a.Key == slog.TimeKey {
					return slog.Attr{}
				}
				return a
			}})))
			got := strings.Split(strings.TrimSpace(buf.String()), "\n")
			if len(c.lines) == 0 {
				assert.Empty(t, strings.TrimSpace(buf.String()))
				return
			}
			require.Len(t, got, len(c.lines), buf.String())
			for i, want := range c.lines {
				level, msg, _ := strings.Cut(want, " ")
				assert.Contains(t, got[i], "level="+level, got[i])
				assert.Contains(t, got[i], `msg="`+msg, got[i])
			}
			if c.p != nil && len(d.lines) > 0 {
				assert.Contains(t, buf.String(), "arch=llama")
			}
		})
	}
}

func TestBatchingFromEnv(t *testing.T) {
	for v, want := range map[string]bool{"": true, "per-sequence": true, " Per-Sequence ": true, "shared": false, "SHARED": false} {
		got, err := BatchingFromEnv(env(map[string]string{EnvBatching: v}))
		require.NoError(t, err, v)
		assert.Equal(t, want, got, v)
	}
	_, err := BatchingFromEnv(env(map[string]string{EnvBatching: "1"}))
	assert.ErrorIs(t, err, ErrEnv)
	assert.ErrorContains(t, err, EnvBatching)
}
