//go:build cgo

package llamacpp_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp"
)

const story = "Once upon a time, there was a little boy named Tim. Tim had a big red ball. He liked to play with " +
	"his ball in the park. One day, Tim saw a little bird on a tree. The bird was sad because it could not fly. " +
	"Tim wanted to help the bird. He gave the bird some food and water. The bird was happy and said thank you. " +
	"Tim and the bird became good friends, and they played together every day in the sun."

// storyTokens returns n tokens of story text (repeated as needed), BOS first.
func storyTokens(t testing.TB, m *llamacpp.Model, n int) []llamacpp.Token {
	t.Helper()
	toks, err := m.Tokenize(story, true)
	require.NoError(t, err)
	body := toks[1:]
	for len(toks) < n {
		toks = append(toks, body...)
	}
	return toks[:n]
}

func policy(keep float64) adapter.Policy {
	p := adapter.DefaultPolicy()
	p.Keep = keep
	return p
}

func TestConvertedModelGreedyText(t *testing.T) {
	const want = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
	for _, typ := range []string{"f32", "f16"} {
		for _, fa := range []llamacpp.FlashAttn{llamacpp.FlashAttnOn, llamacpp.FlashAttnOff} {
			t.Run(fmt.Sprintf("type=%s/flash=%s", typ, fa), func(t *testing.T) {
				m := openStories(t, typ)
				c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, FlashAttn: fa})
				g, err := c.Generate(context.Background(), 0, []llamacpp.Token{m.Info().BOS}, llamacpp.GenerateOptions{MaxTokens: 40})
				require.NoError(t, err)
				assert.True(t, strings.HasPrefix(strings.TrimSpace(g.Text), want), "greedy text from BOS: %q", g.Text)
			})
		}
	}
}

func TestModelInfo(t *testing.T) {
	m := openStories(t, "f32")
	in := m.Info()
	assert.Equal(t, 5, in.Layers)
	assert.Equal(t, 8, in.Heads)
	assert.Equal(t, 4, in.KVHeads)
	assert.Equal(t, 8, in.HeadDim)
	assert.Equal(t, 512, in.Vocab)
	assert.Equal(t, llamacpp.Token(1), in.BOS)
	assert.Equal(t, llamacpp.Token(2), in.EOS)
	assert.True(t, m.IsEOG(in.EOS))
	assert.False(t, m.IsEOG(in.BOS))
}

func TestTokenizerRoundTrip(t *testing.T) {
	m := openStories(t, "f32")
	for _, s := range []string{
		"Once upon a time, there was a little girl named Lily.",
		"She said, \"Can I play too?\" and smiled.",
		"The dog ran fast. The cat was slow!",
		"Numbers 123 and 4567 are fine.",
		"Line one.\nLine two.",
		"Café, naïve, 東京 and 🙂 fall back to bytes.",
		"x",
	} {
		toks, err := m.Tokenize(s, true)
		require.NoError(t, err, s)
		require.NotEmpty(t, toks)
		assert.Equal(t, m.Info().BOS, toks[0], "BOS first: %q", s)
		got, err := m.Detokenize(toks)
		require.NoError(t, err)
		assert.Equal(t, s, got)
		noBOS, err := m.Tokenize(s, false)
		require.NoError(t, err)
		assert.Equal(t, toks[1:], noBOS)
	}
	// Pieces concatenate to the text (with the leading word space).
	toks, err := m.Tokenize("The bird was happy.", false)
	require.NoError(t, err)
	var b strings.Builder
	for _, tok := range toks {
		p, err := m.Piece(tok)
		require.NoError(t, err)
		b.WriteString(p)
	}
	assert.Equal(t, " The bird was happy.", b.String())
	// Empty text has only BOS.
	toks, err = m.Tokenize("", true)
	require.NoError(t, err)
	assert.Equal(t, []llamacpp.Token{m.Info().BOS}, toks)
}

// TestKeepOneIdenticalLogits: a compressor that keeps everything (and streams
// every key through cb_eval) changes no logit, bit for bit.
func TestKeepOneIdenticalLogits(t *testing.T) {
	m := openStories(t, "f32")
	prompt := storyTokens(t, m, 90)
	for _, fa := range []llamacpp.FlashAttn{llamacpp.FlashAttnOn, llamacpp.FlashAttnOff} {
		t.Run("flash="+fa.String(), func(t *testing.T) {
			run := func(compress bool) [][]float32 {
				c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 32, FlashAttn: fa})
				if compress {
					comp, err := c.EnableCompression(policy(1))
					require.NoError(t, err)
					t.Cleanup(func() {
						// The prompt's keys are streamed as it is decoded; the
						// generated tokens' keys are read once a plan needs them.
						_, entries := comp.Live(0)
						assert.Equal(t, int64(len(prompt)*5*4), entries, "norms of the prompt streamed")
						_, err := comp.PlanFor(0, -1)
						require.NoError(t, err)
						_, entries = comp.Live(0)
						assert.Equal(t, int64((len(prompt)+12)*5*4), entries, "norms of every key recorded for a plan")
					})
				}
				var all [][]float32
				logits, st, err := c.Prompt(0, prompt)
				require.NoError(t, err)
				if compress {
					assert.True(t, st.Skipped)
				}
				all = append(all, logits)
				for range 12 {
					tok := llamacpp.Greedy().Sample(logits)
					logits, err = c.Decode(0, []llamacpp.Token{tok})
					require.NoError(t, err)
					all = append(all, logits)
				}
				assert.Equal(t, len(prompt)+12, c.Cells(0))
				return all
			}
			plain, kept := run(false), run(true)
			require.Equal(t, len(plain), len(kept))
			for i := range plain {
				require.Equal(t, plain[i], kept[i], "logits of step %d", i)
			}
		})
	}
}

// TestKeepHalfLeavesPlannedCells: after the prefill compression the cache
// holds exactly the plan's positions, as llama.cpp reports them.
func TestKeepHalfLeavesPlannedCells(t *testing.T) {
	m := openStories(t, "f32")
	prompt := storyTokens(t, m, 101)
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 64})
	comp, err := c.EnableCompression(policy(0.5))
	require.NoError(t, err)
	_, err = c.Decode(0, prompt)
	require.NoError(t, err)
	plan, err := comp.PlanFor(0, -1)
	require.NoError(t, err)
	require.NotNil(t, plan.Token)
	keep := plan.Token.Keep
	require.Len(t, keep, 51) // ceil(0.5 × 101)
	assert.Len(t, plan.Token.Evict, 50)
	assert.Equal(t, hooks.Pos(100), keep[len(keep)-1], "the last position stays")

	st, err := c.PrefillDone(0)
	require.NoError(t, err)
	assert.Equal(t, 101, st.PositionsBefore)
	assert.Equal(t, 51, st.PositionsAfter)

	assert.Equal(t, keep, c.Positions(0))
	assert.Equal(t, 51, c.Cells(0))
	lo, hi, err := c.PosRange(0)
	require.NoError(t, err)
	assert.Equal(t, keep[0], lo)
	assert.Equal(t, keep[len(keep)-1], hi)
	state, err := llamacpp.ReadState(c.Raw(), 0)
	require.NoError(t, err)
	cells := state.Positions()
	slices.Sort(cells)
	assert.Equal(t, keep, cells, "state cell list")
	live, _ := comp.Live(0)
	assert.Equal(t, keep, live)
	// Resync from the state agrees with the context's own account.
	require.NoError(t, c.Resync(0))
	assert.Equal(t, keep, c.Positions(0))
}

// TestGenerateAfterEviction: generation continues after the prefill
// eviction, with flash attention on and off and with a q8_0 cache.
func TestGenerateAfterEviction(t *testing.T) {
	stories := openStories(t, "f32")
	wide, err := llamacpp.Open(wideGGUF(t))
	require.NoError(t, err)
	t.Cleanup(func() { wide.Close() })
	for _, tc := range []struct {
		name string
		m    *llamacpp.Model
		o    llamacpp.ContextOptions
	}{
		{"stories/flash=on/f16", stories, llamacpp.ContextOptions{FlashAttn: llamacpp.FlashAttnOn}},
		{"stories/flash=off/f16", stories, llamacpp.ContextOptions{FlashAttn: llamacpp.FlashAttnOff}},
		{"hd32/flash=on/q8_0", wide, llamacpp.ContextOptions{FlashAttn: llamacpp.FlashAttnOn, KType: llamacpp.CacheQ8_0, VType: llamacpp.CacheQ8_0}},
		{"hd32/flash=off/q8_0-K", wide, llamacpp.ContextOptions{FlashAttn: llamacpp.FlashAttnOff, KType: llamacpp.CacheQ8_0}},
		{"hd32/flash=on/q4_0", wide, llamacpp.ContextOptions{FlashAttn: llamacpp.FlashAttnOn, KType: llamacpp.CacheQ4_0, VType: llamacpp.CacheQ4_0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prompt := storyTokens(t, tc.m, 120)
			tc.o.NCtx = 256
			c := newCtx(t, tc.m, tc.o)
			_, err := c.EnableCompression(policy(0.5))
			require.NoError(t, err)
			g, err := c.Generate(context.Background(), 0, prompt, llamacpp.GenerateOptions{MaxTokens: 40, Sampler: llamacpp.NewSampler(0.8, 40, 0.95, 7), IgnoreEOG: true})
			require.NoError(t, err)
			assert.Equal(t, 120, g.CellsBefore)
			assert.Equal(t, 60, g.CellsAfter)
			assert.Len(t, g.Tokens, 40)
			assert.Equal(t, 60+39, g.CellsEnd, "every generated token but the last was decoded")
			assert.NotEmpty(t, g.Text)
			lo, hi, err := c.PosRange(0)
			require.NoError(t, err)
			assert.Equal(t, hooks.Pos(120+39-1), hi)
			assert.GreaterOrEqual(t, lo, hooks.Pos(0))
			t.Logf("%s: %q", tc.name, g.Text)
		})
	}
}

// TestCallbackAndStateModeAgree: the norms streamed by cb_eval and those read
// back from the cache state agree (exactly for an f32 cache, to f16 or q8_0
// rounding otherwise) and give the same plan.
func TestCallbackAndStateModeAgree(t *testing.T) {
	stories := openStories(t, "f32")
	wide, err := llamacpp.Open(wideGGUF(t))
	require.NoError(t, err)
	t.Cleanup(func() { wide.Close() })
	for _, tc := range []struct {
		name     string
		m        *llamacpp.Model
		ct       llamacpp.CacheType
		rtol     float64
		samePlan bool
	}{
		{"stories", stories, llamacpp.CacheF32, 0, true},
		{"stories", stories, llamacpp.CacheF16, 2e-3, true},
		{"hd32", wide, llamacpp.CacheF16, 2e-3, true},
		{"hd32", wide, llamacpp.CacheQ8_0, 3e-2, false},
	} {
		t.Run(tc.name+"/cache="+tc.ct.String(), func(t *testing.T) {
			m := tc.m
			prompt := storyTokens(t, m, 150)
			c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 64, KType: tc.ct, VType: tc.ct})
			cb, err := c.EnableCompression(policy(0.5))
			require.NoError(t, err)
			_, err = c.Decode(0, prompt)
			require.NoError(t, err)
			sm, err := llamacpp.NewStateCompressor(c.Raw(), 0, policy(0.5))
			require.NoError(t, err)
			sh := c.CacheShape()
			for l := range sh.Layers {
				for h := range sh.KVHeads {
					p1, n1, err := cb.Norms(0, l, h)
					require.NoError(t, err)
					p2, n2, err := sm.Norms(0, l, h)
					require.NoError(t, err)
					require.Equal(t, p1, p2, "positions of layer %d head %d", l, h)
					require.Len(t, n1, len(prompt))
					for i := range n1 {
						diff := math.Abs(float64(n1[i] - n2[i]))
						require.LessOrEqual(t, diff, tc.rtol*math.Abs(float64(n1[i]))+1e-6,
							"layer %d head %d pos %d: callback %g state %g", l, h, p1[i], n1[i], n2[i])
					}
				}
			}
			plan1, err := cb.PlanFor(0, -1)
			require.NoError(t, err)
			plan2, err := sm.PlanFor(0, -1)
			require.NoError(t, err)
			if tc.samePlan {
				assert.Equal(t, plan1.Token.Keep, plan2.Token.Keep)
			} else {
				// q8_0 rounding may swap near ties; most of the plan holds.
				common := 0
				for _, p := range plan1.Token.Keep {
					if slices.Contains(plan2.Token.Keep, p) {
						common++
					}
				}
				assert.GreaterOrEqual(t, common, len(plan1.Token.Keep)*9/10)
			}
			// State mode applies its plan to the context.
			st, err := llamacpp.Compress(c.Raw(), 0, policy(0.5))
			require.NoError(t, err)
			assert.Equal(t, 150, st.PositionsBefore)
			assert.Equal(t, 75, st.PositionsAfter)
			require.NoError(t, c.Resync(0))
			assert.Equal(t, plan2.Token.Keep, c.Positions(0))
		})
	}
}

// TestChunkedPrefill: prompts of 3 and 4 × n_ctx are fed in chunks,
// compressed between chunks, in an unchanged cache size.
func TestChunkedPrefill(t *testing.T) {
	m := openStories(t, "f32")
	for _, tc := range []struct {
		mult int
		keep float64
	}{{3, 0.5}, {4, 0.25}} {
		t.Run(fmt.Sprintf("prompt=%dxctx/keep=%g", tc.mult, tc.keep), func(t *testing.T) {
			c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 64})
			capacity := c.Capacity()
			require.Equal(t, 256, capacity)
			comp, err := c.EnableCompression(policy(tc.keep))
			require.NoError(t, err)
			var pressures int
			comp.OnStats(func(s hooks.Stats) {
				if s.Trigger == hooks.TriggerPressure.String() {
					pressures++
				}
			})
			prompt := storyTokens(t, m, tc.mult*capacity)
			// Chunk by chunk, checking the cache after each.
			for i := 0; i < len(prompt); i += 64 {
				_, err := c.Decode(0, prompt[i:min(i+64, len(prompt))])
				require.NoError(t, err, "chunk at %d", i)
				require.LessOrEqual(t, c.Cells(0), capacity, "after chunk at %d", i)
			}
			_, hi, err := c.PosRange(0)
			require.NoError(t, err)
			assert.Equal(t, hooks.Pos(len(prompt)-1), hi)
			assert.Greater(t, pressures, 0)
			before := c.Cells(0)
			st, err := c.PrefillDone(0)
			require.NoError(t, err)
			assert.Equal(t, int(math.Ceil(tc.keep*float64(before))), st.PositionsAfter)
			// The context still decodes.
			_, err = c.Decode(0, []llamacpp.Token{m.Info().BOS})
			require.NoError(t, err)

			// The whole prompt in one call chunks it itself.
			c2 := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 64})
			_, err = c2.EnableCompression(policy(tc.keep))
			require.NoError(t, err)
			g, err := c2.Generate(context.Background(), 0, prompt, llamacpp.GenerateOptions{MaxTokens: 8})
			require.NoError(t, err)
			assert.LessOrEqual(t, g.CellsBefore, capacity)
			assert.Len(t, g.Tokens, 8)
			assert.Equal(t, 256, c2.Capacity())
		})
	}
	t.Run("no compressor", func(t *testing.T) {
		c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 64})
		_, err := c.Decode(0, storyTokens(t, m, 300))
		require.ErrorIs(t, err, llamacpp.ErrContextFull)
	})
}

// TestTwoSequences: compressing sequence 0 leaves sequence 1 bit-identical:
// its state bytes, and the logits of its next tokens.
func TestTwoSequences(t *testing.T) {
	m := openStories(t, "f32")
	pa := storyTokens(t, m, 120)
	pb, err := m.Tokenize("Lily and her mom went to the store. They bought apples, bread and milk. "+
		"On the way home, Lily saw a puppy. The puppy was lost and hungry.", true)
	require.NoError(t, err)
	setup := func() (*llamacpp.Context, *adapter.Compressor) {
		c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 64, Seqs: 2})
		comp, err := c.EnableCompression(policy(0.5))
		require.NoError(t, err)
		_, err = c.Decode(0, pa)
		require.NoError(t, err)
		_, err = c.Decode(1, pb)
		require.NoError(t, err)
		return c, comp
	}
	ref, _ := setup()
	c, _ := setup()
	require.Equal(t, 2, c.Seqs())
	before, err := c.SeqState(1)
	require.NoError(t, err)
	st, err := c.PrefillDone(0)
	require.NoError(t, err)
	require.Equal(t, 60, st.PositionsAfter)
	assert.Equal(t, 60, c.Cells(0))
	assert.Equal(t, len(pb), c.Cells(1))
	after, err := c.SeqState(1)
	require.NoError(t, err)
	assert.Equal(t, before, after, "state bytes of the untouched sequence")
	refState, err := ref.SeqState(1)
	require.NoError(t, err)
	assert.Equal(t, refState, after)

	next := []llamacpp.Token{m.Info().BOS}
	for i := range 10 {
		l1, err := ref.Decode(1, next)
		require.NoError(t, err)
		l2, err := c.Decode(1, next)
		require.NoError(t, err)
		require.Equal(t, l1, l2, "logits of seq 1 at step %d", i)
		next = []llamacpp.Token{llamacpp.Greedy().Sample(l1)}
	}
	// Sequence 0 still generates.
	_, err = c.Decode(0, next)
	require.NoError(t, err)
}

func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	_, err := llamacpp.Open(filepath.Join(dir, "missing.gguf"))
	assert.ErrorIs(t, err, os.ErrNotExist)

	notGGUF := filepath.Join(dir, "not.gguf")
	require.NoError(t, os.WriteFile(notGGUF, []byte("this is not a model file at all, just text"), 0o644))
	_, err = llamacpp.Open(notGGUF)
	assert.ErrorIs(t, err, llamacpp.ErrNotGGUF)

	src, err := os.ReadFile(storiesGGUF(t, "f32"))
	require.NoError(t, err)
	for _, n := range []int{3, 24, 200, len(src) / 2, len(src) - 1} {
		trunc := filepath.Join(dir, fmt.Sprintf("trunc%d.gguf", n))
		require.NoError(t, os.WriteFile(trunc, src[:n], 0o644))
		_, err = llamacpp.Open(trunc)
		assert.ErrorIs(t, err, llamacpp.ErrNotGGUF, "truncated to %d bytes", n)
	}

	m := openStories(t, "f32")
	_, err = m.NewContext(llamacpp.ContextOptions{NCtx: 256, NBatch: 512})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput, "n_ctx smaller than one chunk")
	assert.ErrorContains(t, err, "does not fit")
	_, err = m.NewContext(llamacpp.ContextOptions{NCtx: -1})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = m.NewContext(llamacpp.ContextOptions{NCtx: 256, FlashAttn: llamacpp.FlashAttnOff, VType: llamacpp.CacheQ8_0})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = m.NewContext(llamacpp.ContextOptions{NCtx: 256, KType: llamacpp.CacheQ8_0})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput, "q8_0 with a head dim of 8: llama.cpp would abort")
	assert.ErrorContains(t, err, "multiple of 32")

	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256})
	for _, keep := range []float64{0, -0.5, 1.5, math.NaN()} {
		_, err = c.EnableCompression(policy(keep))
		assert.ErrorIs(t, err, adapter.ErrPolicy, "keep %v", keep)
	}
	ph := policy(0.5)
	ph.Granularity = hooks.PerHead
	_, err = c.EnableCompression(ph)
	assert.ErrorIs(t, err, hooks.ErrUnsupported)

	_, err = c.Decode(0, nil)
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = c.Generate(context.Background(), 0, nil, llamacpp.GenerateOptions{MaxTokens: 4})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, _, err = c.Prompt(0, []llamacpp.Token{})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = c.Decode(0, []llamacpp.Token{1, 512})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = c.Decode(0, []llamacpp.Token{-3})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = c.Decode(1, []llamacpp.Token{1})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput, "sequence outside the context")
	_, err = c.DecodeOutputs(0, []llamacpp.Token{1}, []int{5})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = m.Detokenize([]llamacpp.Token{9999})
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = llamacpp.Compress(nil, 0, policy(0.5))
	assert.ErrorIs(t, err, llamacpp.ErrBadInput)
	_, err = llamacpp.Compress(c.Raw(), 0, policy(0.5))
	assert.ErrorIs(t, err, hooks.ErrUnknownSequence, "empty sequence")

	// Evictions the context refuses.
	_, err = c.Decode(0, storyTokens(t, m, 10))
	require.NoError(t, err)
	assert.ErrorIs(t, c.EvictPositions(0, []hooks.Pos{9}), llamacpp.ErrBadInput, "the last position")
	assert.ErrorIs(t, c.EvictPositions(0, []hooks.Pos{42}), llamacpp.ErrBadInput, "not live")
	assert.ErrorIs(t, c.EvictPositions(0, []hooks.Pos{3, 2}), llamacpp.ErrBadInput, "not ascending")
	require.NoError(t, c.EvictPositions(0, []hooks.Pos{2, 3, 5}))
	assert.Equal(t, []hooks.Pos{0, 1, 4, 6, 7, 8, 9}, c.Positions(0))
	require.NoError(t, c.Clear(0))
	assert.Equal(t, 0, c.Cells(0))

	// Closed twice; calls after Close fail cleanly.
	c2, err := m.NewContext(llamacpp.ContextOptions{NCtx: 256, Threads: 1})
	require.NoError(t, err)
	require.NoError(t, c2.Close())
	require.NoError(t, c2.Close())
	_, err = c2.Decode(0, []llamacpp.Token{1})
	assert.ErrorIs(t, err, llamacpp.ErrClosed)
	_, err = c2.SeqState(0)
	assert.ErrorIs(t, err, llamacpp.ErrClosed)
	m2, err := llamacpp.Open(storiesGGUF(t, "f32"))
	require.NoError(t, err)
	c3, err := m2.NewContext(llamacpp.ContextOptions{NCtx: 256, Threads: 1})
	require.NoError(t, err)
	require.NoError(t, m2.Close(), "closes its contexts first")
	require.NoError(t, m2.Close())
	_, err = c3.Decode(0, []llamacpp.Token{1})
	assert.ErrorIs(t, err, llamacpp.ErrClosed)
	_, err = m2.Tokenize("x", true)
	assert.ErrorIs(t, err, llamacpp.ErrClosed)
	_, err = m2.NewContext(llamacpp.ContextOptions{})
	assert.ErrorIs(t, err, llamacpp.ErrClosed)
}

// TestStateParseRealTruncations: every truncation of a real state is an
// error, never a panic.
func TestStateParseRealTruncations(t *testing.T) {
	m := openStories(t, "f32")
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, Seqs: 2})
	_, err := c.Decode(1, storyTokens(t, m, 20))
	require.NoError(t, err)
	b, err := c.SeqState(1)
	require.NoError(t, err)
	st, err := llamacpp.ParseSeqState(b)
	require.NoError(t, err)
	assert.Equal(t, 2, st.Streams)
	assert.Len(t, st.Cells, 20)
	assert.Len(t, st.Layers, 5)
	for _, cell := range st.Cells {
		assert.Equal(t, []hooks.SeqID{1}, cell.Seqs)
		assert.Equal(t, 1, cell.Stream)
	}
	for n := range len(b) {
		_, err := llamacpp.ParseSeqState(b[:n])
		require.ErrorIs(t, err, llamacpp.ErrState, "truncated to %d of %d", n, len(b))
	}
	_, err = llamacpp.ParseSeqState(append(slices.Clone(b), 0))
	assert.ErrorIs(t, err, llamacpp.ErrState, "trailing byte")
}

func TestDecodeOutputs(t *testing.T) {
	m := openStories(t, "f32")
	prompt := storyTokens(t, m, 40)
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 16})
	out, err := c.DecodeOutputs(0, prompt, []int{5, 20, -1, 5})
	require.NoError(t, err)
	require.Len(t, out, 4)
	assert.Equal(t, out[0], out[3])
	// The same logits one token at a time.
	c2 := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256})
	var step [][]float32
	for _, tok := range prompt {
		l, err := c2.Decode(0, []llamacpp.Token{tok})
		require.NoError(t, err)
		step = append(step, l)
	}
	// Batched and one-token decodes run different matmul kernels (ggml's
	// tinyBLAS takes batches in a SIMD build) over an f16 cache: they agree
	// to 5e-3 (measured 1.4e-3 with -march=x86-64-v3, 0 without SIMD).
	for k, i := range []int{5, 20, 39} {
		for j := range out[k] {
			require.InDelta(t, step[i][j], out[k][j], 5e-3, "token %d logit %d", i, j)
		}
	}
}

func TestSamplerSeeded(t *testing.T) {
	m := openStories(t, "f32")
	gen := func(seed uint64) string {
		c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256})
		g, err := c.Generate(context.Background(), 0, []llamacpp.Token{m.Info().BOS}, llamacpp.GenerateOptions{MaxTokens: 30, Sampler: llamacpp.NewSampler(1, 0, 0, seed)})
		require.NoError(t, err)
		return g.Text
	}
	a, b, other := gen(42), gen(42), gen(43)
	assert.Equal(t, a, b)
	assert.NotEqual(t, a, other)

	var seen []llamacpp.Token
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256})
	g, err := c.Generate(context.Background(), 0, []llamacpp.Token{m.Info().BOS}, llamacpp.GenerateOptions{MaxTokens: 30,
		OnToken: func(tok llamacpp.Token, _ string) bool { seen = append(seen, tok); return len(seen) < 5 }})
	require.NoError(t, err)
	assert.Equal(t, "callback", g.Stop)
	assert.Equal(t, seen, g.Tokens)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c2 := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256})
	_, err = c2.Generate(ctx, 0, []llamacpp.Token{m.Info().BOS}, llamacpp.GenerateOptions{MaxTokens: 30})
	assert.True(t, errors.Is(err, context.Canceled))
}

// TestConcurrentUse: goroutines sharing a context (one sequence each) and a
// compressor are serialized safely (run with -race).
func TestConcurrentUse(t *testing.T) {
	m := openStories(t, "f32")
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256, NBatch: 32, Seqs: 4})
	_, err := c.EnableCompression(policy(0.5))
	require.NoError(t, err)
	prompt := storyTokens(t, m, 100)
	errs := make(chan error, 4)
	for seq := range 4 {
		go func() {
			_, err := c.Generate(context.Background(), hooks.SeqID(seq), prompt, llamacpp.GenerateOptions{MaxTokens: 10})
			errs <- err
		}()
	}
	for range 4 {
		require.NoError(t, <-errs)
	}
	for seq := range 4 {
		assert.Equal(t, 50+9, c.Cells(hooks.SeqID(seq)))
	}
	// Every sequence was compressed from the same prompt: same cells.
	for seq := 1; seq < 4; seq++ {
		assert.Equal(t, c.Positions(0)[:50], c.Positions(hooks.SeqID(seq))[:50])
	}
}

// TestDecodeWithoutKeysRollsBack: a Decode whose keys cannot be recorded
// (a graph without the Kcur-N nodes) fails and leaves the sequence as it
// was, so a retry does not hold the prompt twice (issue 13, item 4).
func TestDecodeWithoutKeysRollsBack(t *testing.T) {
	m := openStories(t, "f32")
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 128, NBatch: 16})
	_, err := c.EnableCompression(policy(0.5))
	require.NoError(t, err)
	// A prompt long enough to have its keys read as it is decoded (shorter
	// Decode calls hold their keys back until a compression needs them).
	toks := storyTokens(t, m, 50)
	_, err = c.Decode(0, toks[:5])
	require.NoError(t, err)

	llamacpp.DropKeyCapture(c)
	_, err = c.Decode(0, toks[5:])
	require.ErrorIs(t, err, hooks.ErrUnsupported)
	assert.Contains(t, err.Error(), "no post-RoPE keys of layer 0")
	assert.Equal(t, 5, c.Cells(0), "cells after the failed decode")
	lo, hi, err := c.PosRange(0)
	require.NoError(t, err)
	assert.Equal(t, [2]hooks.Pos{0, 4}, [2]hooks.Pos{lo, hi}, "llama.cpp's positions after the failed decode")
	require.NoError(t, c.Resync(0))
	assert.Equal(t, []hooks.Pos{0, 1, 2, 3, 4}, c.Positions(0))
}
