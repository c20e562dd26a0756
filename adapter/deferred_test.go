package adapter_test

import (
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/hooks/hookstest"
)

// deferringRuntime holds back the keys of the tokens it decodes one at a
// time, as llama.cpp's context does while generating, and reports them when
// the compressor asks.
type deferringRuntime struct {
	*hookstest.Shared
	rng     *rand.Rand
	held    map[hooks.SeqID][2]int // seq -> [from, n) decoded, keys not reported
	asked   int
	failing error
}

func (d *deferringRuntime) ReportDeferredKeys(seq hooks.SeqID, obs hooks.Observer) error {
	d.asked++
	if d.failing != nil {
		return d.failing
	}
	h, ok := d.held[seq]
	if !ok {
		return nil
	}
	delete(d.held, seq)
	return reportKeys(d.rng, obs, seq, h[0], h[1])
}

// reportKeys reports random f16 keys of positions [from, from+n) of seq.
func reportKeys(rng *rand.Rand, obs hooks.Observer, seq hooks.SeqID, from, n int) error {
	pos := make([]hooks.Pos, n)
	seqs := make([]hooks.SeqID, n)
	for i := range pos {
		pos[i], seqs[i] = hooks.Pos(from+i), seq
	}
	for l := range shape.Layers {
		norms := make([]float32, n*shape.KVHeads)
		for i := range norms {
			norms[i] = rng.Float32() + 0.1
		}
		if err := obs.ObserveKeys(&hooks.KeyBatch{Layer: l, Seqs: seqs, Positions: pos, Norms: norms}); err != nil {
			return err
		}
	}
	return nil
}

func TestDeferredKeysReportedBeforePlanning(t *testing.T) {
	rt := &deferringRuntime{Shared: hookstest.NewShared(shape), rng: rand.New(rand.NewPCG(3, 4)), held: map[hooks.SeqID][2]int{}}
	c, err := adapter.New(rt, adapter.DefaultPolicy())
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(1, 2))

	// A prompt of 40 reported as decoded, then 24 generated tokens held back.
	decode(t, rt, c, rng, 0, 0, 40)
	require.NoError(t, rt.Append(0, seqPositions(40, 24)...))
	rt.held[0] = [2]int{40, 24}
	pos, _ := c.Live(0)
	require.Len(t, pos, 40, "held-back keys are not recorded before a compression is due")

	plan, err := c.PlanFor(0, -1)
	require.NoError(t, err)
	assert.Equal(t, 1, rt.asked)
	pos, _ = c.Live(0)
	assert.Len(t, pos, 64, "planning first takes the held-back keys")
	assert.NotNil(t, plan)

	st, err := c.Compress(0, -1)
	require.NoError(t, err)
	assert.Equal(t, 2, rt.asked, "every compression asks")
	assert.Equal(t, 64, st.PositionsBefore)
	assert.Equal(t, 32, st.PositionsAfter)
	assert.Equal(t, 32, len(rt.Lane(0, 2, 0)), "the runtime evicted among all 64 positions")

	// A runtime that cannot report its keys makes the compression fail
	// before anything is evicted.
	rt.failing = errors.New("state unreadable")
	before := rt.Entries(0)
	_, err = c.Compress(0, 8)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "state unreadable")
	assert.Equal(t, before, rt.Entries(0))
	_, err = c.PlanFor(0, 8)
	require.Error(t, err)
}

func seqPositions(from, n int) []hooks.Pos {
	p := make([]hooks.Pos, n)
	for i := range p {
		p[i] = hooks.Pos(from + i)
	}
	return p
}
