package kvnormhook

import (
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

func TestCheckServer(t *testing.T) {
	t.Setenv(EnvKeep, "")
	assert.NoError(t, CheckServer(true))
	t.Setenv(EnvKeep, "0.5")
	assert.NoError(t, CheckServer(false))
	t.Setenv(EnvKeep, "half")
	assert.ErrorContains(t, CheckServer(true), "OLLAMA_KV_NORM_KEEP=\"half\"")
}
