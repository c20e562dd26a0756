package ollama

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// newSeq returns a layout of 3 layers × 2 heads with seq 0 holding
// positions 0..n-1.
func newSeq(t *testing.T, n int) (*layout, *seqCells) {
	t.Helper()
	l := newLayout(3, 2, 2, uniform(3, 16), uniform(3, 12))
	s, err := l.seq(0, true)
	require.NoError(t, err)
	pos := make([]int32, n)
	for i := range pos {
		pos[i] = int32(i)
	}
	require.NoError(t, l.appendTokens(s, pos))
	return l, s
}

func TestLayoutAppend(t *testing.T) {
	l, s := newSeq(t, 4)
	assert.Equal(t, 4, s.used())
	assert.ErrorContains(t, l.appendTokens(s, []int32{3}), "does not follow")
	assert.ErrorContains(t, l.appendTokens(s, []int32{5, 5}), "does not follow")
	assert.ErrorContains(t, l.appendTokens(s, make9(4)), "exceed its capacity")
	assert.Equal(t, 4, s.used(), "failed appends change nothing")

	// Slots are handed out and reused.
	s1, err := l.seq(1, true)
	require.NoError(t, err)
	assert.Equal(t, 1, s1.slab)
	_, err = l.seq(2, true)
	assert.ErrorContains(t, err, "no free sequence slot")
	l.free(0)
	s2, err := l.seq(2, true)
	require.NoError(t, err)
	assert.Equal(t, 0, s2.slab)
}

func make9(from int32) []int32 {
	out := make([]int32, 9)
	for i := range out {
		out[i] = from + int32(i)
	}
	return out
}

func TestLayoutCompact(t *testing.T) {
	l, s := newSeq(t, 6)
	tests := []struct {
		name string
		keep [][]int32
		want string
	}{
		{"heads", [][]int32{{1}}, "plan has 1 heads"},
		{"uneven", [][]int32{{1, 5}, {5}}, "head 1 keeps 1"},
		{"absent", [][]int32{{1, 5}, {2, 9}}, "position 9 is not in the cache"},
		{"order", [][]int32{{5, 1}, {1, 5}}, "not ascending"},
	}
	for _, tt := range tests {
		_, err := l.compactPlan(s, 1, tt.keep)
		assert.ErrorContains(t, err, tt.want, tt.name)
	}

	keep := [][]int32{{0, 2, 5}, {1, 4, 5}}
	src, err := l.compactPlan(s, 1, keep)
	require.NoError(t, err)
	assert.Equal(t, [][]int32{{0, 2, 5}, {1, 4, 5}}, src)
	assert.False(t, identity(src))
	l.applyCompact(s, 1, keep)
	lc := &s.layers[1]
	assert.True(t, lc.perHead())
	assert.Equal(t, []int32{visiblePos, visiblePos, visiblePos}, lc.mask)
	assert.Equal(t, []int32{1, 4, 5}, lc.head(1))
	assert.Equal(t, 6, s.used(), "other layers keep their cells")

	// Appended positions go after the compacted cells in every head.
	require.NoError(t, l.appendTokens(s, []int32{6}))
	assert.Equal(t, []int32{0, 2, 5, 6}, lc.head(0))
	assert.Equal(t, []int32{visiblePos, visiblePos, visiblePos, 6}, lc.mask)

	// A per-token plan keeps exact positions.
	l.applyCompact(s, 2, [][]int32{{3, 6}, {3, 6}})
	assert.False(t, s.layers[2].perHead())
	assert.Equal(t, []int32{3, 6}, s.layers[2].mask)
}

func TestLayoutRemove(t *testing.T) {
	l, s := newSeq(t, 6)
	l.applyCompact(s, 1, [][]int32{{0, 2, 5}, {1, 4, 5}})
	// Tail above every compacted position: fine.
	require.NoError(t, l.removeTail(s, 5))
	assert.Equal(t, []int{5, 2, 5}, []int{s.layers[0].n(), s.layers[1].n(), s.layers[2].n()})
	// Head 0 holds {0,2}, head 1 {1,4}: removing >= 3 drops 0 and 1 cells.
	err := l.removeTail(s, 3)
	assert.ErrorIs(t, err, errUneven)
	assert.Equal(t, 5, s.used(), "a refused removal changes nothing")
	require.NoError(t, l.removeTail(s, 0))
	assert.Equal(t, 0, s.used())

	_, _, err = l.removeMiddle(s, 1, 2)
	require.NoError(t, err, "empty layers agree")
	l2, s2 := newSeq(t, 6)
	keep, shifted, err := l2.removeMiddle(s2, 1, 3)
	require.NoError(t, err)
	assert.Equal(t, []int32{0, 3, 4, 5}, keep[0])
	assert.Equal(t, 1, shifted[0])
	assert.Equal(t, []int32{0, 1, 2, 3}, s2.layers[0].shared)
	l2.applyCompact(s2, 0, [][]int32{{0, 3}, {1, 3}})
	_, _, err = l2.removeMiddle(s2, 0, 1)
	assert.ErrorContains(t, err, "different positions per head")
}

func TestLayoutPrefix(t *testing.T) {
	l, s := newSeq(t, 6)
	l.applyCompact(s, 1, [][]int32{{0, 2, 5}, {1, 4, 5}})
	got, exact := prefixOf(&s.layers[1], 3)
	assert.False(t, exact)
	assert.Equal(t, 1, got.n(), "cut to what every head holds below 3")
	got, exact = prefixOf(&s.layers[1], 6)
	assert.True(t, exact)
	assert.Equal(t, 3, got.n())
	got, exact = prefixOf(&s.layers[0], 4)
	assert.True(t, exact)
	assert.Equal(t, []int32{0, 1, 2, 3}, got.shared)
}

func TestLayoutMask(t *testing.T) {
	l := newLayout(1, 1, 2, uniform(1, 4), uniform(1, 4))
	a, _ := l.seq(0, true)
	b, _ := l.seq(1, true)
	require.NoError(t, l.appendTokens(a, []int32{0, 1}))
	require.NoError(t, l.appendTokens(b, []int32{0, 1, 2}))
	lo, length := l.rangeFor([]*seqCells{a, b}, 0, 1)
	assert.Equal(t, 0, lo)
	assert.Equal(t, 7, length)
	lo, length = l.rangeFor([]*seqCells{b}, 0, 4)
	assert.Equal(t, 4, lo)
	assert.Equal(t, 4, length, "padded to 4 and capped at the cache end")

	mask := make([]float32, 2*7)
	l.maskFor(mask, 0, 7, 0, []int{0, 1}, []int32{1, 1})
	x := float32(math.Inf(-1))
	assert.Equal(t, []float32{
		0, 0, x, x, x, x, x, // seq 0 at position 1 sees its cells 0, 1
		x, x, x, x, 0, 0, x, // seq 1 at position 1 sees its positions 0, 1, not 2
	}, mask)
}
