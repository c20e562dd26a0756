//go:build cgo

package ollama

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/ollama/ollama/kvcache"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// cacheBytes is what the backend reports allocated for the KV cache (what
// the runner's "kv cache" line sums).
func cacheBytes(s *Session) uint64 {
	var sum uint64
	for _, b := range s.Model().Backend().BackendMemory().CPU.Cache {
		sum += b
	}
	return sum
}

// longPrompt returns n tokens of stories text, BOS first.
func longPrompt(t *testing.T, s *Session, n int) []int32 {
	t.Helper()
	var ids []int32
	for len(ids) < n {
		chunk, err := s.Tokenize(storyPrompt, len(ids) == 0)
		require.NoError(t, err)
		ids = append(ids, chunk...)
	}
	return ids[:n]
}

// Each layer's tensors are allocated for what the policy keeps: layers kept
// whole hold the context, compressed layers Target(context) plus one batch,
// and the backend's memory report (the runner's "kv cache" line, /api/ps)
// sees it.
func TestAllocationFollowsPolicy(t *testing.T) {
	// The backend pads every layer's tensor to 256 cells: sizes that are
	// multiples of 256 show the policy's cells exactly.
	const ctx, batch = 1024, 256
	none := perHead(0.5)
	none.SkipLayers = nil
	keep25 := perHead(0.25)
	tests := []struct {
		name  string
		pol   *adapter.Policy
		cells []int
	}{
		{"off", nil, []int{1024, 1024, 1024, 1024, 1024}},
		{"keep=1", perHead(1), []int{1024, 1024, 1024, 1024, 1024}},
		{"keep=0.5", perHead(0.5), []int{1024, 1024, 768, 768, 768}},
		{"keep=0.25", keep25, []int{1024, 1024, 512, 512, 512}},
		{"keep=0.5/skip=none", none, []int{768, 768, 768, 768, 768}},
		{"keep=0.5/per-token", perToken(0.5), []int{768, 768, 768, 768, 768}},
	}
	var off uint64
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t, Config{Policy: tt.pol, Context: ctx, Batch: batch})
			_, err := s.Decode(0, []int32{1})
			require.NoError(t, err, "tensors are allocated on first use")
			assert.Equal(t, tt.cells, s.Cache().LayerCells())
			got := cacheBytes(s)
			require.NotZero(t, got)
			if tt.pol == nil {
				off = got
				return
			}
			require.NotZero(t, off)
			// K and V (f16) of every cell, 4 heads × 2×8×2 bytes, and
			// per layer the norm ring: one batch of rows, 4 heads × 4
			// bytes each, whatever the layer's cells.
			want := 0
			for _, c := range tt.cells {
				want += c*4*(2*8*2) + batch*4*4
			}
			assert.Equal(t, want, int(got), "allocated bytes")
			t.Logf("%s: %d bytes, %.3f of a full-size cache", tt.name, got, float64(got)/float64(off))
		})
	}
}

// A prompt of the whole context is served by the smaller cache: chunks that
// would not fit a compressed layer make room by evicting lowest norms.
func TestPromptOfTheWholeContext(t *testing.T) {
	for _, pol := range []*adapter.Policy{perHead(0.5), perToken(0.5)} {
		t.Run(pol.Granularity.String(), func(t *testing.T) {
			s := open(t, Config{Policy: pol, Context: 256, Batch: 16, Pipelined: true})
			ids := longPrompt(t, s, 256)
			_, err := s.Decode(0, ids)
			require.NoError(t, err)
			assert.Equal(t, int32(256), s.Len(0))
			cells := s.Cache().LayerCells()
			u := s.Cache().Usage(0)
			for l, n := range u.Cells {
				assert.LessOrEqual(t, n, cells[l])
			}
			if pol.Granularity == hooks.PerHead {
				assert.Equal(t, 256, u.Cells[0], "a layer kept whole holds the whole prompt")
			}
			pressure := pressureCompressions(s)
			assert.Positive(t, pressure)
		})
	}
}

// Vision models put more than num_batch tokens in one batch (SameBatch): the
// cache takes them, also once the sequence has been compressed, their norms
// in a buffer of their own (larger than the ring of one batch).
func TestOversizedBatch(t *testing.T) {
	s := open(t, Config{Policy: perHead(0.5), Context: 256, Batch: 8})
	ids := longPrompt(t, s, 200)
	_, err := s.forwardRows(0, ids[:40], []int32{39})
	require.NoError(t, err, "a batch of 40 tokens with num_batch 8")
	require.NoError(t, s.Flush())
	assert.Empty(t, s.Cache().spills, "the batch's own norm buffer is freed once read")
	_, err = s.forwardRows(0, ids[40:100], []int32{59})
	require.NoError(t, err, "60 tokens into a compressed layer of %d cells", s.Cache().LayerCells()[4])
	_, err = s.Decode(0, ids[100:110])
	require.NoError(t, err)
	_, err = s.forwardRows(0, ids[110:110+200], nil)
	assert.ErrorIs(t, err, kvcache.ErrKvCacheFull, "more than a layer holds is refused")
}

// Observing costs nothing while nothing is due: a prompt that fits the norm
// ring (one batch) is read back only when its compression is due, and
// decode steps read nothing back until the next compression or until the
// ring is full: then once for its 32 rows (one per decoded token), not at
// every step. The runner reads the outputs of every decode step, so the
// cache never computes a graph of its own.
func TestNothingReadWhileNothingDue(t *testing.T) {
	s := open(t, Config{Policy: perHead(0.5), Context: 256, Batch: 32, Pipelined: true})
	ids := longPrompt(t, s, 24)
	_, err := s.Decode(0, ids)
	require.NoError(t, err)
	c := s.Cache()
	assert.Zero(t, c.fetches, "nothing read during the prompt")
	_, err = s.Decode(0, []int32{300})
	require.NoError(t, err)
	assert.Empty(t, c.Stats(), "the prompt's last batch may still compute")
	_, err = s.Decode(0, []int32{301})
	require.NoError(t, err)
	require.Len(t, c.Stats(), 1)
	syncs, fetches := c.syncs, c.fetches
	assert.Zero(t, syncs, "pipelined: no graph computed out of band")
	assert.Positive(t, fetches)
	for i := range 20 {
		_, err = s.Decode(0, []int32{int32(302 + i)})
		require.NoError(t, err)
	}
	assert.Equal(t, syncs, c.syncs)
	assert.Equal(t, fetches, c.fetches)
	// 100 more steps fill the ring of 32 rows three times: three reads of
	// the 5 layers.
	for i := range 100 {
		_, err = s.Decode(0, []int32{int32(322 + i%100)})
		require.NoError(t, err)
	}
	assert.Equal(t, syncs, c.syncs)
	assert.Equal(t, fetches+3*5, c.fetches, "one read per layer each time the ring is full")

	// A prompt longer than the ring, in chunks of 16, 16 and 8 (the
	// first two without outputs): each chunk after the first finds the
	// ring full and reads the chunk before, after waiting for the device
	// (the chunk before has no outputs to overwrite).
	s = open(t, Config{Policy: perHead(0.5), Context: 256, Batch: 16, Pipelined: true})
	_, err = s.Decode(0, longPrompt(t, s, 40))
	require.NoError(t, err)
	assert.Equal(t, 2, s.Cache().syncs)
	assert.Equal(t, 2*5, s.Cache().fetches)
}

// Compressions do not compound: every one keeps Target(L) positions per head
// of a context of L positions, whatever was compressed before.
func TestCompressionsDoNotCompound(t *testing.T) {
	pol := perHead(0.5)
	s := open(t, Config{Policy: pol, Context: 64, Batch: 8})
	ids := longPrompt(t, s, 20)
	_, err := s.Decode(0, ids)
	require.NoError(t, err)
	require.NoError(t, s.Flush())
	assert.Equal(t, 10, s.Cache().Usage(0).Cells[4])
	seen := 1
	pressured := 0
	for i := range 150 {
		if s.Len(0) >= 64 {
			break
		}
		l := int(s.Len(0))
		_, err := s.Decode(0, []int32{int32(300 + i%100)})
		require.NoError(t, err)
		st := s.Cache().Stats()
		if len(st) > seen {
			seen = len(st)
			assert.Equal(t, "pressure", st[len(st)-1].Trigger)
			assert.Equal(t, pol.Target(l)+1, s.Cache().Usage(0).Cells[4], "context of %d positions", l)
			pressured++
		}
	}
	assert.Positive(t, pressured)
}

// A sequence kvnorm tracks but has not compressed shifts as Ollama's own
// cache does (the runner used to re-decode it).
func TestUncompressedShiftMatchesOllama(t *testing.T) {
	pol := perHead(0.5)
	pol.MinPrompt = 1000
	up := open(t, Config{Upstream: true, CacheType: "f32"})
	kv := open(t, Config{Policy: pol, CacheType: "f32"})
	ids, err := kv.Tokenize(storyPrompt, true)
	require.NoError(t, err)
	for _, s := range []*Session{up, kv} {
		_, err := s.Decode(0, ids)
		require.NoError(t, err)
		require.NoError(t, s.Flush())
		require.NoError(t, s.Remove(0, 4, 14))
	}
	assert.Empty(t, kv.Cache().Stats())
	for i, tok := range ids[:12] {
		lu, err := up.Decode(0, []int32{tok})
		require.NoError(t, err)
		lk, err := kv.Decode(0, []int32{tok})
		require.NoError(t, err)
		assert.LessOrEqual(t, maxDiff(lu, lk), 1e-5, "token %d", i)
	}
	assert.False(t, kv.Cache().CanResume(0, 3), "a shifted sequence is not reused")
}

// generateShifting generates n greedy tokens after prompt as Ollama's runner
// does: when the next token would not fit num_ctx positions, it shifts the
// context (drops half of what follows the first numKeep positions).
func generateShifting(t *testing.T, s *Session, prompt []int32, n, numCtx, numKeep int) []int32 {
	t.Helper()
	logits, err := s.Decode(0, prompt)
	require.NoError(t, err)
	var out []int32
	for range n {
		next := Sample(logits, 0, nil)
		out = append(out, next)
		if int(s.Len(0))+1 > numCtx {
			discard := int32(max((numCtx-numKeep)/2, 1))
			require.NoError(t, s.Remove(0, int32(numKeep), int32(numKeep)+discard), "the shift is accepted: no re-decode")
		}
		logits, err = s.Decode(0, []int32{next})
		require.NoError(t, err)
	}
	return out
}

// distinctRatio is the fraction of distinct n-grams among all n-grams of
// toks: a text stuck in a repetition loop scores low.
func distinctRatio(toks []int32, n int) float64 {
	seen := map[string]bool{}
	total := 0
	for i := 0; i+n <= len(toks); i++ {
		seen[fmt.Sprint(toks[i:i+n])] = true
		total++
	}
	if total == 0 {
		return 0
	}
	return float64(len(seen)) / float64(total)
}

// sampledTexts returns k texts of n tokens sampled (temperature 1, seeds
// 0..k-1) from the uncompressed model, BOS first: text the model itself
// finds likely, so an end-of-story token becomes a new BOS.
func sampledTexts(t *testing.T, k, n int) [][]int32 {
	t.Helper()
	texts := make([][]int32, k)
	for i := range texts {
		s := open(t, Config{Upstream: true, Context: n + 16, Batch: 16})
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		ids := []int32{1}
		logits, err := s.Decode(0, ids)
		require.NoError(t, err)
		for len(ids) < n {
			next := Sample(logits, 1, rng)
			if s.IsEOS(next) {
				next = 1
			}
			ids = append(ids, next)
			logits, err = s.Decode(0, []int32{next})
			require.NoError(t, err)
		}
		texts[i] = ids
		require.NoError(t, s.Close())
	}
	return texts
}

// logProb is the natural log of the softmax of logits at tok.
func logProb(logits []float32, tok int32) float64 {
	m := math.Inf(-1)
	for _, v := range logits {
		m = math.Max(m, float64(v))
	}
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v) - m)
	}
	return float64(logits[tok]) - m - math.Log(sum)
}

// pastTheCache runs one sampled text through a session of numCtx cells, one
// token at a time with the runner's context shift, and returns the mean
// negative log-likelihood of the text's tokens past numCtx (teacher-forced),
// then the distinct 4-gram ratio of a greedy answer of n tokens past the
// cache from the text's first 30 tokens.
func pastTheCache(t *testing.T, open func() *Session, text []int32, n, numCtx, numKeep int) (nll, distinct float64) {
	t.Helper()
	s := open()
	logits, err := s.Decode(0, text[:1])
	require.NoError(t, err)
	var sum float64
	for i := 1; i < len(text); i++ {
		if i >= numCtx {
			sum -= logProb(logits, text[i])
		}
		if int(s.Len(0))+1 > numCtx {
			discard := int32(max((numCtx-numKeep)/2, 1))
			require.NoError(t, s.Remove(0, int32(numKeep), int32(numKeep)+discard), "the shift is accepted: no re-decode")
		}
		logits, err = s.Decode(0, text[i:i+1])
		require.NoError(t, err)
	}
	require.NoError(t, s.Close())
	s = open()
	got := generateShifting(t, s, text[:30], n, numCtx, numKeep)
	require.NoError(t, s.Close())
	return sum / float64(len(text)-numCtx), distinctRatio(got[numCtx-30:], 4)
}

// An answer four times the context: the compressed cache keeps serving it
// (compressed layers evict by norm, the runner's shifts renumber), never
// refusing a shift. Coherence criterion, fixed before measuring: the
// distinct 4-gram ratio of the tokens generated past num_ctx is at least 3/4
// of the ratio with Ollama's own context shift. It is a mean over 6 sampled
// texts: one prompt (the first version of this test) is noise, its per-head
// ratio was 0.64 of the shift's where 6 texts give 1.07 (per-sample ratios
// of the shift itself range 0.34–0.81). The teacher-forced perplexity past
// the cache is logged, not asserted: on stories260K at keep 0.5 both
// granularities predict the text past the cache worse than the shift
// (docs/results.md).
func TestAnswerPastTheCache(t *testing.T) {
	const numCtx, numKeep, n, samples = 128, 4, 512, 6
	texts := sampledTexts(t, samples, n)
	measure := func(open func() *Session) (nll, distinct float64) {
		for _, text := range texts {
			l, d := pastTheCache(t, open, text, n, numCtx, numKeep)
			nll += l / samples
			distinct += d / samples
		}
		return nll, distinct
	}
	baseNLL, baseDistinct := measure(func() *Session { return open(t, Config{Upstream: true, Context: numCtx, Batch: 16}) })
	for _, pol := range []*adapter.Policy{perToken(0.5), perHead(0.5)} {
		t.Run(pol.Granularity.String(), func(t *testing.T) {
			nll, distinct := measure(func() *Session {
				return open(t, Config{Policy: pol, Context: numCtx, Batch: 16, Pipelined: true})
			})
			t.Logf("past the cache (%d sampled texts): distinct 4-grams of greedy answers: shift %.3f, kvnorm %.3f = %.2f of it; teacher-forced perplexity: shift %.3f, kvnorm %.3f (%+.1f%%)",
				samples, baseDistinct, distinct, distinct/baseDistinct, math.Exp(baseNLL), math.Exp(nll), 100*(math.Exp(nll-baseNLL)-1))
			assert.GreaterOrEqual(t, distinct, 0.75*baseDistinct)
		})
	}
}

// Decoding past the cache compresses under pressure and stays within the
// cells allocated.
func TestAnswerPastTheCacheStaysInCells(t *testing.T) {
	const numCtx, numKeep = 128, 4
	s := open(t, Config{Policy: perHead(0.5), Context: numCtx, Batch: 16, Pipelined: true})
	generateShifting(t, s, longPrompt(t, s, 30), 4*numCtx, numCtx, numKeep)
	cells := s.Cache().LayerCells()
	for l, c := range s.Cache().Usage(0).Cells {
		assert.LessOrEqual(t, c, cells[l])
	}
	pressure := pressureCompressions(s)
	assert.Positive(t, pressure)
}

// A shift of a compressed sequence keeps its cells and moves only its
// numbering: the next token is stored after the highest cached position.
func TestCompressedShiftKeepsCells(t *testing.T) {
	s := open(t, Config{Policy: perHead(0.5), Context: 128, Batch: 16})
	ids := longPrompt(t, s, 60)
	_, err := s.Decode(0, ids)
	require.NoError(t, err)
	require.NoError(t, s.Flush())
	before := make([][]int32, 5)
	for l := range before {
		before[l] = s.Cache().HeadPositions(0, l, 1)
	}
	require.NoError(t, s.Remove(0, 4, 40))
	for l := range before {
		assert.True(t, slices.Equal(before[l], s.Cache().HeadPositions(0, l, 1)), "layer %d", l)
	}
	_, err = s.Decode(0, []int32{300})
	require.NoError(t, err)
	assert.Equal(t, int32(60), slices.Max(s.Cache().HeadPositions(0, 4, 1)), "stored after the highest cached position")
	assert.Equal(t, int32(25), s.Len(0))
}
