package adapter_test

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/hooks/hookstest"
)

// clearingRuntime counts clears per sequence; with clearAfterRead set, the
// sequence is cleared and refilled right after the compressor reads its
// epoch, before the plan it makes reaches the runtime (what another
// goroutine's Clear and Prompt can do while a compression is planned).
type clearingRuntime struct {
	*hookstest.Shared
	epoch          map[hooks.SeqID]uint64
	clearAfterRead bool
	refill         func()
}

func (r *clearingRuntime) SeqEpoch(seq hooks.SeqID) uint64 {
	e := r.epoch[seq]
	if r.clearAfterRead {
		r.clearAfterRead = false
		r.epoch[seq]++
		r.refill()
	}
	return e
}

func (r *clearingRuntime) EvictPositionsInEpoch(seq hooks.SeqID, epoch uint64, positions []hooks.Pos) error {
	if r.epoch[seq] != epoch {
		return fmt.Errorf("%w: seq %d", hooks.ErrStalePlan, seq)
	}
	return r.EvictPositions(seq, positions)
}

func TestStalePlanRefused(t *testing.T) {
	rt := &clearingRuntime{Shared: hookstest.NewShared(shape), epoch: map[hooks.SeqID]uint64{}}
	c, err := adapter.New(rt, adapter.DefaultPolicy())
	require.NoError(t, err)
	rng := rand.New(rand.NewPCG(5, 6))
	decode(t, rt, c, rng, 0, 0, 80)

	// Planned on 80 positions; meanwhile the sequence is cleared and a new
	// prompt of 80 is decoded at the same positions.
	rt.clearAfterRead = true
	rt.refill = func() {
		rt.Clear(0)
		c.Forget(0, 0, -1)
		decode(t, rt, c, rng, 0, 0, 80)
	}
	before := rt.Lane(0, 3, 0)
	_, err = c.PrefillDone(0)
	require.ErrorIs(t, err, hooks.ErrStalePlan)
	assert.Equal(t, before, rt.Lane(0, 3, 0), "the new prompt's cells are untouched")
	assert.Len(t, rt.Lane(0, 3, 0), 80)

	// The next compression plans on the new prompt and applies.
	st, err := c.PrefillDone(0)
	require.NoError(t, err)
	assert.Equal(t, 40, st.PositionsAfter)
	assert.Len(t, rt.Lane(0, 3, 0), 40)
}
