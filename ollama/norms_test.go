//go:build cgo

package ollama

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/hooks"
)

// recorded returns what the compressor recorded for (seq, layer, head).
func recorded(t *testing.T, s *Session, seq, l, h int) ([]int32, []float32) {
	t.Helper()
	p, n, err := s.Cache().Compressor().Norms(hooks.SeqID(seq), l, h)
	require.NoError(t, err)
	return p, n
}

// Norms are kept by batch, not by cell: a copied prefix gets the norms of
// its positions (shared rows for those not read yet, the compressor's record
// for the others), and a context shift renumbers them. Both give exactly
// the norms the source recorded.
func TestNormsFollowCopiesAndShifts(t *testing.T) {
	pol := perHead(0.5)
	pol.MinPrompt = 1000 // nothing compressed: every position stays
	s := open(t, Config{Policy: pol, Sequences: 2, Batch: 16})
	ids := longPrompt(t, s, 30)
	_, err := s.Decode(0, ids[:10])
	require.NoError(t, err)
	require.NoError(t, s.Flush()) // positions 0-9 recorded
	_, err = s.Decode(0, ids[10:20])
	require.NoError(t, err) // positions 10-19 fresh
	require.Len(t, s.Cache().lay.seqs[0].fresh, 10)
	s.CopyPrefix(0, 1, 15)
	require.NoError(t, s.Flush())
	for l := range 5 {
		for h := range 4 {
			ps, ns := recorded(t, s, 0, l, h)
			require.Len(t, ps, 20)
			pd, nd := recorded(t, s, 1, l, h)
			assert.Equal(t, ps[:15], pd, "layer %d head %d", l, h)
			assert.Equal(t, ns[:15], nd, "layer %d head %d", l, h)
		}
	}

	// A shift of [4, 10) of seq 0: positions 10-19 become 4-13, with
	// their norms; position 20-23 are fresh when it happens.
	var before [5][4][]float32
	for l := range 5 {
		for h := range 4 {
			_, before[l][h] = recorded(t, s, 0, l, h)
		}
	}
	_, err = s.Decode(0, ids[20:24])
	require.NoError(t, err)
	require.NoError(t, s.Remove(0, 4, 10))
	require.NoError(t, s.Flush())
	for l := range 5 {
		for h := range 4 {
			ps, ns := recorded(t, s, 0, l, h)
			require.Len(t, ps, 18)
			for i, p := range ps {
				assert.Equal(t, int32(i), p)
			}
			assert.Equal(t, before[l][h][:4], ns[:4], "layer %d head %d: below the shift", l, h)
			assert.Equal(t, before[l][h][10:20], ns[4:14], "layer %d head %d: renumbered", l, h)
			assert.Len(t, ns[14:], 4)
		}
	}
}
