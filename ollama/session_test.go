//go:build cgo

package ollama

import (
	"context"
	"fmt"
	"testing"

	"github.com/ollama/ollama/kvcache"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
)

func TestChunkSize(t *testing.T) {
	for _, c := range []struct {
		n, total, capacity, used, protected int
		pipelined                           bool
		want                                int
	}{
		{n: 512, total: 512, capacity: 128, used: 0, protected: 1, want: 128},                  // never more than the cache
		{n: 100, total: 100, capacity: 128, used: 20, protected: 1, want: 100},                 // fits: one pass
		{n: 512, total: 600, capacity: 128, used: 128, protected: 1, want: 64},                 // full: half the cache
		{n: 10, total: 10, capacity: 128, used: 128, protected: 1, want: 10},                   // a small pass stays whole
		{n: 512, total: 600, capacity: 128, used: 100, protected: 100, want: 28},               // what sinks+window leave free
		{n: 512, total: 600, capacity: 128, used: 128, protected: 128, want: 1},                // nothing can be freed: one token, the cache reports it
		{n: 512, total: 600, capacity: 128, used: 0, protected: 1, pipelined: true, want: 42},  // will not fit: passes whose norms can be read in time
		{n: 100, total: 100, capacity: 128, used: 0, protected: 1, pipelined: true, want: 100}, // fits: one pass
		{n: 1, total: 1, capacity: 1, used: 1, protected: 1, want: 1},
	} {
		t.Run(fmt.Sprintf("%+v", c), func(t *testing.T) {
			assert.Equal(t, c.want, chunkSize(c.n, c.total, c.capacity, c.used, c.protected, c.pipelined))
		})
	}
}

// A prompt longer than Config.Context completes with the default batch
// (512): it is fed in passes the cache can take, each after a compression
// under pressure. Before, the whole prompt went in one pass and failed with
// "could not find a kv cache slot".
func TestLongPromptDefaultBatch(t *testing.T) {
	tok := open(t, Config{Context: 64})
	var ids []int32
	for len(ids) < 301 {
		chunk, err := tok.Tokenize(storyPrompt, len(ids) == 0)
		require.NoError(t, err)
		ids = append(ids, chunk...)
	}
	ids = ids[:301]
	for _, tc := range []struct {
		pol       *adapter.Policy
		pipelined bool
	}{{perHead(0.5), false}, {perToken(0.5), false}, {perHead(0.5), true}} {
		t.Run(fmt.Sprintf("%s/pipelined=%v", tc.pol.Granularity, tc.pipelined), func(t *testing.T) {
			s := open(t, Config{Policy: tc.pol, Context: 128, Pipelined: tc.pipelined})
			g, err := s.Generate(context.Background(), 0, ids, 8, GenerateOptions{IgnoreEOS: true})
			require.NoError(t, err)
			assert.Len(t, g.Tokens, 8)
			assert.Equal(t, int32(301+7), s.Len(0))
			for _, c := range s.Cache().Usage(0).Cells {
				assert.LessOrEqual(t, c, 128)
			}
			pressure := pressureCompressions(s)
			assert.GreaterOrEqual(t, pressure, 2, "the prompt is 2.35 caches long")
		})
	}
	// Without a policy nothing can make room: Ollama's error, as before.
	s := open(t, Config{Context: 128})
	_, err := s.Decode(0, ids)
	assert.ErrorContains(t, err, "could not find a kv cache slot")
}

// A policy that cannot compress anything on the model is refused when the
// model loads; one that only partly fits is logged.
func TestOpenChecksPolicyAgainstModel(t *testing.T) {
	all := perHead(0.5)
	all.SkipLayers = []int{0, 1, 2, 3, 4} // stories260K has 5 layers
	_, err := Open(storiesGGUF(t), Config{Policy: all, Context: 64})
	require.ErrorIs(t, err, adapter.ErrPolicy)
	assert.ErrorContains(t, err, "skips every one of the model's 5 layers")

	wide := perToken(0.5)
	wide.Sinks, wide.Window = 40, 24
	_, err = Open(storiesGGUF(t), Config{Policy: wide, Context: 64})
	assert.ErrorContains(t, err, "sinks+window=40+24 (with the last position) cover the context of 64 cells")

	beyond := perHead(0.5)
	beyond.SkipLayers = []int{0, 1, 7}
	s := open(t, Config{Policy: beyond, Context: 64})
	assert.NotNil(t, s.Cache().Compressor())
}

// CheckCache needs no backend: the server asks it of the model Ollama's
// text processor builds, before any runner starts.
func TestCheckCache(t *testing.T) {
	for _, tc := range []struct {
		arch  string
		cache kvcache.Cache
		want  string // "" when kvnorm replaces it
	}{
		{"llama", kvcache.NewCausalCache(nil), ""},
		{"qwen3", kvcache.NewCausalCache(nil), ""},
		{"deepseek2", kvcache.NewCausalCache(nil), "latent vector"},
		{"gemma2", kvcache.NewWrapperCache(kvcache.NewSWACache(4, nil), kvcache.NewCausalCache(nil)), "*kvcache.WrapperCache"},
		{"lfm2", kvcache.NewRecurrentCache(kvcache.RecurrentConfig{}), "*kvcache.Recurrent"},
		{"bert", nil, "has no KV cache"},
	} {
		t.Run(tc.arch, func(t *testing.T) {
			err := CheckCache(tc.arch, tc.cache)
			if tc.want == "" {
				assert.NoError(t, err)
				return
			}
			assert.ErrorIs(t, err, ErrUnsupportedModel)
			assert.ErrorContains(t, err, tc.want)
		})
	}
}
