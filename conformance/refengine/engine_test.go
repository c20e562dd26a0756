package refengine_test

import (
	"errors"
	"math"
	"slices"
	"sort"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/conformance/internal/testmodel"
	"github.com/kvnorm/kvnorm/conformance/refengine"
	"github.com/kvnorm/kvnorm/hooks"
)

const story = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " +
	"One day, she saw a big red ball under a tree. She ran to the ball and kicked it very high. " +
	"Her friend Tom came to play with her. They played all day and had lots of fun."

func open(t *testing.T, o refengine.Options) *refengine.Engine {
	t.Helper()
	model, tok := testmodel.Paths(t)
	e, err := refengine.Open(model, tok, o)
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.Close() })
	return e
}

func argmax(l []float32) int32 {
	best := 0
	for i, v := range l {
		if v > l[best] {
			best = i
		}
	}
	return int32(best)
}

// runStory prefills the story and greedily decodes n tokens, returning every
// logit row (prompt rows, then one per decoded token).
func runStory(t *testing.T, e *refengine.Engine, n int) [][]float32 {
	t.Helper()
	prompt, err := e.Tokenize(story, true)
	require.NoError(t, err)
	rows, err := e.Prefill(0, prompt, true)
	require.NoError(t, err)
	require.Len(t, rows, len(prompt))
	for range n {
		next, err := e.Decode(0, []int32{argmax(rows[len(rows)-1])})
		require.NoError(t, err)
		rows = append(rows, next...)
	}
	return rows
}

func policy(m adapter.Method, g hooks.Granularity, keep float64) adapter.Policy {
	p := adapter.DefaultPolicy()
	p.Method, p.Granularity, p.Keep = m, g, keep
	return p
}

func TestKeepOneEqualsNoCompressor(t *testing.T) {
	for _, norms := range []bool{false, true} {
		base := runStory(t, open(t, refengine.Options{Norms: norms}), 24)
		for _, g := range []hooks.Granularity{hooks.PerToken, hooks.PerHead} {
			for _, m := range []adapter.Method{adapter.KNorm, adapter.Random, adapter.Streaming, adapter.Inverse} {
				e := open(t, refengine.Options{Norms: norms})
				c, err := adapter.New(e, policy(m, g, 1))
				require.NoError(t, err)
				e.SetObserver(c)
				got := runStory(t, e, 24)
				require.Equal(t, len(base), len(got))
				for i := range base {
					require.Truef(t, slices.Equal(base[i], got[i]), "norms=%v %s %s: logits of row %d differ", norms, m, g, i)
				}
				assert.Zero(t, c.Totals().EntriesFreed)
			}
		}
	}
}

// spy records the head plans the compressor applies.
type spy struct {
	*refengine.Engine
	plans []*hooks.HeadPlan
}

func (s *spy) CompactHeads(p *hooks.HeadPlan) error {
	s.plans = append(s.plans, p)
	return s.Engine.CompactHeads(p)
}

func TestPerHeadHalfEvictsExactlyThePlan(t *testing.T) {
	e := open(t, refengine.Options{})
	sp := &spy{Engine: e}
	c, err := adapter.New(sp, policy(adapter.KNorm, hooks.PerHead, 0.5))
	require.NoError(t, err)
	e.SetObserver(c)

	// An uncompressed twin gives the keys the plan must be computed from.
	twin := open(t, refengine.Options{})
	prompt, err := e.Tokenize(story, true)
	require.NoError(t, err)
	_, err = twin.Prefill(0, prompt, false)
	require.NoError(t, err)
	_, err = e.Prefill(0, prompt, false)
	require.NoError(t, err)

	require.Len(t, sp.plans, 1)
	plan := sp.plans[0]
	n := len(prompt)
	target := int(math.Ceil(0.5 * float64(n)))
	sh := e.CacheShape()
	s, ts := e.Session(0), twin.Session(0)
	for l := range sh.Layers {
		for h := range sh.KVHeads {
			lane := s.LivePositions(l, h)
			if l < 2 {
				assert.Nilf(t, plan.Layers[l], "layer %d is skipped", l)
				assert.Len(t, lane, n)
				continue
			}
			keep := plan.Layers[l][h]
			assert.Equalf(t, keep, lane, "layer %d head %d: cache differs from the plan", l, h)
			// The plan is the last position plus the target-1 lowest norms.
			entries := ts.Entries(l, h)
			type pn struct {
				pos  int32
				norm float64
			}
			var cand []pn
			for _, en := range entries[:n-1] {
				var ss float64
				for _, v := range en.Key {
					ss += float64(v) * float64(v)
				}
				cand = append(cand, pn{en.Pos, math.Sqrt(ss)})
			}
			sort.SliceStable(cand, func(i, j int) bool { return cand[i].norm < cand[j].norm })
			var want []int32
			for _, c := range cand[:target-1] {
				want = append(want, c.pos)
			}
			want = append(want, int32(n-1))
			slices.Sort(want)
			assert.Equalf(t, want, keep, "layer %d head %d: not the lowest-norm keys", l, h)
			// Apply the same masks to the twin by hand.
			mask := make([]bool, n)
			for _, p := range keep {
				mask[p] = true
			}
			_, err := ts.KeepHead(l, h, mask)
			require.NoError(t, err)
		}
	}
	// After eviction both decode the same logits.
	got, err := e.Decode(0, []int32{42, 43})
	require.NoError(t, err)
	want, err := twin.Decode(0, []int32{42, 43})
	require.NoError(t, err)
	assert.Equal(t, want, got)
	_, entries, err := e.Live(0)
	require.NoError(t, err)
	assert.Equal(t, int64(2*sh.KVHeads*n+3*sh.KVHeads*target+2*sh.Layers*sh.KVHeads), entries)
}

func TestPerTokenEvictsPositionsFromEveryHead(t *testing.T) {
	e := open(t, refengine.Options{Norms: true})
	c, err := adapter.New(e, policy(adapter.KNorm, hooks.PerToken, 0.3))
	require.NoError(t, err)
	var st []hooks.Stats
	c.OnStats(func(s hooks.Stats) { st = append(st, s) })
	e.SetObserver(c)
	prompt, err := e.Tokenize(story, true)
	require.NoError(t, err)
	_, err = e.Prefill(0, prompt, false)
	require.NoError(t, err)
	require.Len(t, st, 1)
	live, _ := c.Live(0)
	pos, _, err := e.Live(0)
	require.NoError(t, err)
	assert.Equal(t, len(live), pos)
	assert.Equal(t, int(math.Ceil(0.3*float64(len(prompt)))), pos)
	for l := range e.CacheShape().Layers {
		for h := range e.CacheShape().KVHeads {
			assert.Equal(t, live, e.Session(0).LivePositions(l, h))
		}
	}
}

func TestPressureFeedsLongPromptsInChunks(t *testing.T) {
	e := open(t, refengine.Options{Context: 64, Batch: 48})
	prompt, err := e.Tokenize(story+" "+story, true)
	require.NoError(t, err)
	require.Greater(t, len(prompt), 64)
	_, err = e.Prefill(0, prompt, false)
	require.ErrorIs(t, err, refengine.ErrContextFull)
	require.NoError(t, e.RemoveSequence(0))

	c, err := adapter.New(e, policy(adapter.KNorm, hooks.PerHead, 1))
	require.NoError(t, err)
	e.SetObserver(c)
	logits, err := e.Prefill(0, prompt, false)
	require.NoError(t, err)
	require.Len(t, logits, 1)
	for l := range e.CacheShape().Layers {
		for h := range e.CacheShape().KVHeads {
			assert.LessOrEqual(t, e.Session(0).LaneLen(l, h), 64)
		}
	}
	assert.Positive(t, c.Totals().Compressions)
	assert.Equal(t, int32(len(prompt)), e.Session(0).NextPos())
}

func TestAttentionBatches(t *testing.T) {
	e := open(t, refengine.Options{Batch: 16})
	var got []*conformance.AttentionBatch
	require.NoError(t, e.RecordAttention(func(b *conformance.AttentionBatch) error {
		got = append(got, b)
		return nil
	}))
	prompt, err := e.Tokenize(story, true)
	require.NoError(t, err)
	_, err = e.Prefill(0, prompt, false)
	require.NoError(t, err)
	sh := e.CacheShape()
	batches := (len(prompt) + 15) / 16
	require.Len(t, got, batches*sh.Layers)
	for _, b := range got {
		require.Len(t, b.Cells, sh.KVHeads)
		for h := range b.Heads {
			for q, qp := range b.Queries {
				var sum float64
				for c := range b.NumCells() {
					w := b.Weight(h, q, c)
					if b.Cells[h/(b.Heads/b.KVHeads)][c] > qp {
						assert.Zero(t, w, "masked cell has weight")
					}
					sum += float64(w)
				}
				assert.InDelta(t, 1, sum, 1e-5, "layer %d head %d query %d", b.Layer, h, qp)
			}
		}
	}
	// Stop recording: nothing more arrives.
	require.NoError(t, e.RecordAttention(nil))
	_, err = e.Decode(0, []int32{5})
	require.NoError(t, err)
	assert.Len(t, got, batches*sh.Layers)

	stop := errors.New("stop")
	require.NoError(t, e.RecordAttention(func(*conformance.AttentionBatch) error { return stop }))
	_, err = e.Decode(0, []int32{6})
	assert.ErrorIs(t, err, stop)
}

func TestPlanValidation(t *testing.T) {
	e := open(t, refengine.Options{})
	_, err := e.Prefill(0, []int32{1, 5, 6, 7}, false)
	require.NoError(t, err)
	assert.ErrorIs(t, e.EvictPositions(9, []int32{1}), hooks.ErrUnknownSequence)
	assert.Error(t, e.EvictPositions(0, []int32{3}), "the last position must stay")
	sh := e.CacheShape()
	heads := make([][]hooks.Pos, sh.KVHeads)
	for h := range heads {
		heads[h] = []hooks.Pos{0, 3}
	}
	heads[1] = []hooks.Pos{0, 9}
	layers := make([][][]hooks.Pos, sh.Layers)
	layers[3] = heads
	assert.Error(t, e.CompactHeads(&hooks.HeadPlan{Seq: 0, Layers: layers}), "position 9 is not live")
	assert.Equal(t, 4, e.Session(0).LaneLen(3, 0), "a rejected plan changes nothing")
	heads[1] = []hooks.Pos{0}
	assert.Error(t, e.CompactHeads(&hooks.HeadPlan{Seq: 0, Layers: layers}), "heads keep different counts")
	heads[1] = []hooks.Pos{1, 3}
	require.NoError(t, e.CompactHeads(&hooks.HeadPlan{Seq: 0, Layers: layers}))
	assert.Equal(t, []int32{1, 3}, e.Session(0).LivePositions(3, 1))
	assert.Equal(t, []int32{0, 1, 2, 3}, e.Session(0).LivePositions(2, 1))
}
