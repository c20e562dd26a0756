//go:build cgo

package ollama

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// fakeConfig answers the few keys Install reads.
type fakeConfig struct {
	fs.Config
	arch string
	kv   map[string]uint32
}

func (c fakeConfig) Architecture() string { return c.arch }
func (c fakeConfig) Uint(k string, def ...uint32) uint32 {
	if v, ok := c.kv[k]; ok {
		return v
	}
	if len(def) > 0 {
		return def[0]
	}
	return 0
}

type fakeBackend struct {
	ml.Backend
	cfg fakeConfig
}

func (b fakeBackend) Config() fs.Config { return b.cfg }

// fakeModel is a model.Model whose cache and configuration a test chooses.
type fakeModel struct {
	model.Base
	b fakeBackend
}

func (m *fakeModel) Backend() ml.Backend { return m.b }
func (m *fakeModel) Forward(ml.Context, input.Batch) (ml.Tensor, error) {
	return nil, errors.New("fake model")
}

func newFake(arch string, cache kvcache.Cache, kv map[string]uint32) *fakeModel {
	m := &fakeModel{b: fakeBackend{cfg: fakeConfig{arch: arch, kv: kv}}}
	m.Cache = cache
	return m
}

var llamaShape = map[string]uint32{"block_count": 4, "attention.head_count": 8, "attention.head_count_kv": 2, "embedding_length": 64}

func TestInstallRefuses(t *testing.T) {
	tests := []struct {
		name, arch string
		cache      kvcache.Cache
		kv         map[string]uint32
		want       string
	}{
		{"wrapper", "gemma3", kvcache.NewWrapperCache(kvcache.NewSWACache(4, nil), kvcache.NewCausalCache(nil)), llamaShape, `"gemma3" uses a *kvcache.WrapperCache`},
		{"no cache", "bert", nil, llamaShape, `"bert" has no KV cache`},
		{"recurrent", "lfm2", kvcache.NewRecurrentCache(kvcache.RecurrentConfig{}), llamaShape, `"lfm2" uses a *kvcache.Recurrent`},
		{"latent", "deepseek2", kvcache.NewCausalCache(nil), llamaShape, `"deepseek2" caches one latent vector per token`},
		{"no shape", "llama", kvcache.NewCausalCache(nil), map[string]uint32{}, "cannot read the attention shape"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newFake(tt.arch, tt.cache, tt.kv)
			_, err := Install(m, adapter.DefaultPolicy())
			require.ErrorIs(t, err, ErrUnsupportedModel)
			assert.ErrorContains(t, err, tt.want)
			assert.Equal(t, tt.cache, m.Config().Cache, "the model's cache is left alone")
		})
	}
	_, err := Install(nil, adapter.DefaultPolicy())
	assert.ErrorIs(t, err, ErrUnsupportedModel)

	bad := adapter.DefaultPolicy()
	bad.Keep = 0
	_, err = Install(newFake("llama", kvcache.NewCausalCache(nil), llamaShape), bad)
	assert.ErrorIs(t, err, adapter.ErrPolicy)
}

func TestInstallReplacesCache(t *testing.T) {
	m := newFake("qwen3", kvcache.NewCausalCache(nil), llamaShape)
	c, err := Install(m, adapter.DefaultPolicy())
	require.NoError(t, err)
	assert.Same(t, c, m.Config().Cache)
	assert.Equal(t, hooks.CacheShape{Layers: 4, KVHeads: 2, HeadDim: 8}, hooks.CacheShape{Layers: c.shape.Layers, KVHeads: c.shape.KVHeads, HeadDim: c.shape.HeadDim})
}

func TestOpenBadInput(t *testing.T) {
	_, err := Open(filepath.Join(t.TempDir(), "missing.gguf"), Config{})
	assert.Error(t, err, "missing model")

	notGGUF := filepath.Join(t.TempDir(), "x.gguf")
	require.NoError(t, os.WriteFile(notGGUF, []byte("not a model"), 0o644))
	_, err = Open(notGGUF, Config{})
	assert.Error(t, err)

	path := storiesGGUF(t)
	bad := adapter.DefaultPolicy()
	bad.Keep = 1.5
	_, err = Open(path, Config{Policy: &bad})
	assert.ErrorIs(t, err, adapter.ErrPolicy)

	_, err = Open(path, Config{CacheType: "q8_0"})
	assert.ErrorContains(t, err, "multiple of 32")
	_, err = Open(path, Config{CacheType: "bf17"})
	assert.ErrorContains(t, err, "bf17")
	_, err = Open(path, Config{Upstream: true, Policy: perHead(0.5)})
	assert.Error(t, err)

	s := open(t, Config{Policy: perHead(0.5)})
	_, err = s.Decode(0, []int32{1, 99999})
	assert.ErrorContains(t, err, "outside the vocabulary")
	_, err = s.Decode(0, nil)
	assert.Error(t, err)
	require.NoError(t, s.Close())
	require.NoError(t, s.Close(), "Close twice")
	_, err = s.Decode(0, []int32{1})
	assert.ErrorContains(t, err, "closed")
}

// Plans that do not match the cache are refused before anything moves.
func TestCompactHeadsRefusesBadPlans(t *testing.T) {
	s := open(t, Config{Policy: perHead(1)})
	ids, err := s.Tokenize(storyPrompt, true)
	require.NoError(t, err)
	_, err = s.Decode(0, ids[:10])
	require.NoError(t, err)
	require.NoError(t, s.Flush(), "every norm is read: no position is kept for lack of one")
	c := s.Cache()
	before := c.Usage(0)
	keep := func(heads ...[]int32) [][][]int32 {
		l := make([][][]int32, 5)
		l[3] = heads
		return l
	}
	tests := []struct {
		name string
		plan *hooks.HeadPlan
		want error
	}{
		{"nil", nil, ErrPlan},
		{"unknown seq", &hooks.HeadPlan{Seq: 7, Layers: make([][][]int32, 5)}, hooks.ErrUnknownSequence},
		{"layers", &hooks.HeadPlan{Seq: 0, Layers: make([][][]int32, 4)}, ErrPlan},
		{"heads", &hooks.HeadPlan{Seq: 0, Layers: keep([]int32{1}, []int32{1})}, ErrPlan},
		{"uneven", &hooks.HeadPlan{Seq: 0, Layers: keep([]int32{1}, []int32{1, 2}, []int32{1}, []int32{1})}, ErrPlan},
		{"absent", &hooks.HeadPlan{Seq: 0, Layers: keep([]int32{1}, []int32{1}, []int32{1}, []int32{42})}, ErrPlan},
		{"order", &hooks.HeadPlan{Seq: 0, Layers: keep([]int32{2, 1}, []int32{1, 2}, []int32{1, 2}, []int32{1, 2})}, ErrPlan},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.ErrorIs(t, c.CompactHeads(tt.plan), tt.want)
			assert.Equal(t, before, c.Usage(0))
		})
	}
}

// Removing a tail works after per-head compression as long as every head
// drops the same count. A context shift of a compressed sequence keeps its
// cells and moves its numbering (no re-decode); its tail can then no longer
// be told apart, and its prefix is never reused.
func TestRemoveAfterCompression(t *testing.T) {
	s := open(t, Config{Policy: perHead(0.5)})
	ids, err := s.Tokenize(storyPrompt, true)
	require.NoError(t, err)
	n := int32(len(ids))
	run(t, s, 0, ids, 6)
	u := s.Cache().Usage(0)
	assert.False(t, s.Cache().CanResume(0, 4), "a compressed prefix is not reused")
	assert.True(t, s.Cache().CanResume(0, 0))

	// The generated tokens follow every kept cell in every head.
	require.NoError(t, s.Remove(0, n+2, math.MaxInt32))
	after := s.Cache().Usage(0)
	for l := range u.Cells {
		assert.Equal(t, u.Cells[l]-3, after.Cells[l])
	}
	assert.Equal(t, n+2, s.Len(0))

	// Inside the compacted cells heads disagree on what lies above n/2.
	err = s.Remove(0, n/2, math.MaxInt32)
	assert.ErrorContains(t, err, "different numbers of cells")

	// A shift keeps every cell and renumbers the later tokens.
	before := s.Cache().Usage(0)
	require.NoError(t, s.Remove(0, 1, 5))
	assert.Equal(t, before, s.Cache().Usage(0))
	assert.Equal(t, n+2-4, s.Len(0))
	_, err = s.Decode(0, []int32{300, 301})
	require.NoError(t, err, "decoding goes on after the shift")
	last := s.Cache().HeadPositions(0, 4, 0)
	assert.Equal(t, []int32{n + 2, n + 3}, last[len(last)-2:], "stored after every cached position")
	assert.ErrorIs(t, s.Remove(0, 10, math.MaxInt32), kvcache.ErrNotSupported)

	require.NoError(t, s.Remove(0, 0, math.MaxInt32))
	assert.Equal(t, Usage{}, s.Cache().Usage(0))
	live, _ := s.Cache().Compressor().Live(0)
	assert.Empty(t, live)
	// The slot is reusable.
	run(t, s, 0, ids, 4)
}

// A context shift and a prefix copy give what Ollama's own cache gives. F32
// cells: after a shift Ollama's cache reuses the freed cells in the middle,
// and ggml's flash attention accumulates F16 values in cell order, so F16
// caches differ by rounding (about 5e-3 in the logits, both equally far from
// the F32 result).
func TestShiftAndCopyPrefixMatchOllama(t *testing.T) {
	both(t, func(t *testing.T, fa bool) {
		up := open(t, Config{Upstream: true, FlashAttention: fa, Sequences: 2, CacheType: "f32"})
		kv := open(t, Config{FlashAttention: fa, Sequences: 2, CacheType: "f32"})
		ids, err := kv.Tokenize(storyPrompt, true)
		require.NoError(t, err)
		check := func(what string, seq int, toks []int32) {
			t.Helper()
			for i, tok := range toks {
				lu, err := up.Decode(seq, []int32{tok})
				require.NoError(t, err)
				lk, err := kv.Decode(seq, []int32{tok})
				require.NoError(t, err)
				assert.LessOrEqual(t, maxDiff(lu, lk), 1e-5, "%s: token %d", what, i)
			}
		}
		for _, s := range []*Session{up, kv} {
			_, err := s.Decode(0, ids)
			require.NoError(t, err)
			// Ollama's cache cannot shift cells shared with a copy: shift first.
			require.NoError(t, s.Remove(0, 4, 14))
			s.CopyPrefix(0, 1, 20)
		}
		assert.Equal(t, up.Len(0), kv.Len(0))
		check("after shift", 0, ids[5:15])
		assert.Equal(t, int32(20), kv.Len(1))
		check("copied prefix", 1, ids[20:30])
		check("source after copy", 0, ids[15:20])
	})
}

// A prefix copied from a compressed sequence holds the same cells: both
// sequences then decode alike. A per-head copy is not compressed again; a
// per-token one is, since the compressor gets its norms.
func TestCopyPrefixOfCompressed(t *testing.T) {
	for _, pol := range []*adapter.Policy{perHead(0.5), perToken(0.5)} {
		t.Run(pol.Granularity.String(), func(t *testing.T) {
			s := open(t, Config{Policy: pol, Sequences: 2})
			ids, err := s.Tokenize(storyPrompt, true)
			require.NoError(t, err)
			_, err = s.Decode(0, ids)
			require.NoError(t, err)
			require.NoError(t, s.Flush())
			s.CopyPrefix(0, 1, int32(len(ids)))
			assert.Equal(t, s.Cache().Usage(0), s.Cache().Usage(1))
			for i := range 6 {
				tok := []int32{int32(300 + i)}
				l0, err := s.Decode(0, tok)
				require.NoError(t, err)
				l1, err := s.Decode(1, tok)
				require.NoError(t, err)
				require.True(t, slices.Equal(l0, l1), "token %d", i)
			}
			_, err = s.Cache().Compress(1, 8)
			if pol.Granularity == hooks.PerHead {
				assert.ErrorIs(t, err, hooks.ErrUnknownSequence, "a per-head copy is unmanaged")
			} else {
				require.NoError(t, err)
				assert.Equal(t, 8, s.Cache().Usage(1).Cells[0])
			}
		})
	}
}
