package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// oracleLowestK is the sort-based reference: indices stably sorted by score
// (NaN above everything, -0 equal to +0 by float comparison), the first k
// taken, then sorted ascending.
func oracleLowestK(scores []float32, k int) []int32 {
	idx := make([]int32, len(scores))
	for i := range idx {
		idx[i] = int32(i)
	}
	less := func(a, b float32) bool {
		an, bn := a != a, b != b
		if an || bn {
			return !an && bn
		}
		return a < b
	}
	sort.SliceStable(idx, func(i, j int) bool { return less(scores[idx[i]], scores[idx[j]]) })
	if k == 0 {
		return nil // LowestK returns dst[:0], nil for a nil dst
	}
	out := slices.Clone(idx[:k])
	slices.Sort(out)
	return out
}

var (
	posInf = float32(math.Inf(1))
	negInf = float32(math.Inf(-1))
	nanF   = float32(math.NaN())
	negZ   = float32(math.Copysign(0, -1))
)

func TestLowestKCases(t *testing.T) {
	tests := []struct {
		name   string
		scores []float32
		k      int
		want   []int32
	}{
		{"empty k=0", nil, 0, nil},
		{"k=0", []float32{3, 1, 2}, 0, nil},
		{"k=n", []float32{3, 1, 2}, 3, []int32{0, 1, 2}},
		{"simple", []float32{3, 1, 2, 0}, 2, []int32{1, 3}},
		{"ties lower index wins", []float32{1, 2, 1, 1, 0}, 3, []int32{0, 2, 4}},
		{"all equal", []float32{5, 5, 5, 5, 5}, 2, []int32{0, 1}},
		{"nan evicted first", []float32{nanF, posInf, 1, nanF}, 2, []int32{1, 2}},
		{"nan kept last", []float32{nanF, posInf, 1, nanF}, 3, []int32{0, 1, 2}},
		{"negative nan is nan", []float32{math.Float32frombits(0xffc00000), -1e30}, 1, []int32{1}},
		{"-inf lowest", []float32{0, negInf, -1e38}, 1, []int32{1}},
		{"+inf above finite", []float32{posInf, math.MaxFloat32, 0}, 2, []int32{1, 2}},
		{"-0 equals +0", []float32{0, negZ, -1, 0}, 2, []int32{0, 2}},
		{"-0 equals +0 reversed", []float32{negZ, 0, 1}, 1, []int32{0}},
		{"negative", []float32{-1, -3, -2}, 2, []int32{1, 2}},
		{"denormals", []float32{math.Float32frombits(2), math.Float32frombits(1), 0}, 2, []int32{1, 2}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := LowestK(nil, tc.scores, tc.k)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			assert.Equal(t, oracleLowestK(tc.scores, tc.k), got, "oracle agrees")
		})
	}
}

// scoreGens produce n scores in different shapes, many ties included.
var scoreGens = []struct {
	name string
	gen  func(rng *rand.Rand, i int) float32
}{
	{"uniform", func(rng *rand.Rand, _ int) float32 { return rng.Float32() }},
	{"normal", func(rng *rand.Rand, _ int) float32 { return float32(rng.NormFloat64()) }},
	{"norms", func(rng *rand.Rand, _ int) float32 { return float32(10 + rng.NormFloat64()*0.01) }},
	{"fewvalues", func(rng *rand.Rand, _ int) float32 { return float32(rng.IntN(4)) }},
	{"allequal", func(*rand.Rand, int) float32 { return 7 }},
	{"ascending", func(_ *rand.Rand, i int) float32 { return float32(i) }},
	{"descending", func(_ *rand.Rand, i int) float32 { return -float32(i) }},
	{"specials", func(rng *rand.Rand, _ int) float32 {
		return []float32{nanF, posInf, negInf, 0, negZ, 1, -1, math.Float32frombits(1)}[rng.IntN(8)]
	}},
	{"bits", func(rng *rand.Rand, _ int) float32 { return math.Float32frombits(rng.Uint32()) }},
}

func TestLowestKRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(6, 6))
	var sel Selector
	for _, g := range scoreGens {
		t.Run("scores="+g.name, func(t *testing.T) {
			for _, n := range []int{1, 2, 3, 10, 255, 256, 257, 1000, 4097, 20000, sampleMinN, 50001} {
				if raceEnabled && n > 5000 {
					continue
				}
				scores := make([]float32, n)
				for i := range scores {
					scores[i] = g.gen(rng, i)
				}
				ks := []int{0, 1, 2, n / 3, n / 2, n - 1, n}
				if n > 20000 {
					ks = []int{1, n / 3, n - 1}
				}
				for _, k := range ks {
					if k > n {
						continue
					}
					want := oracleLowestK(scores, k)
					got, err := sel.LowestK(nil, scores, k)
					require.NoError(t, err)
					require.Equal(t, want, got, "n=%d k=%d", n, k)
					if k >= 1 && k < n { // the radix path, whatever n
						got = sel.lowestKRadix(make([]int32, 0, k), scores, k)
						require.Equal(t, want, got, "radix n=%d k=%d", n, k)
					}
				}
			}
		})
	}
}

// TestLowestKSampleMiss feeds periodic scores that mislead the strided
// sample, so that the sampled guess misses and the fallback runs.
func TestLowestKSampleMiss(t *testing.T) {
	n := 4 * sampleMinN
	step := n / sampleSize
	scores := make([]float32, n)
	for i := range scores {
		if i%step != 0 {
			scores[i] = 1 + float32(i%5) // the sample sees only zeros
		}
	}
	var sel Selector
	for _, k := range []int{1, sampleSize, n / 2, n - 1} {
		got, err := sel.LowestK(nil, scores, k)
		require.NoError(t, err)
		require.Equal(t, oracleLowestK(scores, k), got, "k=%d", k)
	}
	assert.Positive(t, sel.sampleMisses, "the fallback ran")
}

func TestLowestKErrors(t *testing.T) {
	for _, k := range []int{-1, 4} {
		got, err := LowestK(make([]int32, 5), []float32{1, 2, 3}, k)
		require.ErrorIs(t, err, ErrShape)
		assert.Contains(t, err.Error(), fmt.Sprintf("k=%d", k))
		assert.Empty(t, got)
	}
	batchErrs := []struct {
		heads, n, k, len int
		msg              string
	}{
		{2, 3, 1, 5, "len(scores)=5 is not heads*n (heads=2, n=3)"},
		{-1, 3, 1, 0, "heads=-1"},
		{1, -2, 0, 0, "n=-2"},
		{2, 3, 4, 6, "k=4"},
		{2, 3, -1, 6, "k=-1"},
		{math.MaxInt, 3, 0, 6, "heads*n"},
	}
	for _, e := range batchErrs {
		_, err := LowestKBatched(nil, make([]float32, e.len), e.heads, e.n, e.k)
		require.ErrorIs(t, err, ErrShape, e.msg)
		assert.Contains(t, err.Error(), e.msg)
	}
}

func TestLowestKBatched(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	for _, n := range []int{0, 1, 5, 300, 3000} {
		for _, heads := range []int{0, 1, 3, 8} {
			scores := make([]float32, heads*n)
			for h := range heads {
				g := scoreGens[h%len(scoreGens)] // heads differ in content
				for i := range n {
					scores[h*n+i] = g.gen(rng, i)
				}
			}
			for _, k := range []int{0, 1, n / 2, n} {
				if k > n {
					continue
				}
				got, err := LowestKBatched([]int32{42, 43}, scores, heads, n, k)
				require.NoError(t, err)
				require.Len(t, got, heads*k)
				for h := range heads {
					if k == 0 {
						continue
					}
					want := oracleLowestK(scores[h*n:(h+1)*n], k)
					require.Equal(t, want, got[h*k:(h+1)*k], "head %d n=%d k=%d", h, n, k)
				}
			}
		}
	}
}

func TestLowestKReusesDst(t *testing.T) {
	scores := make([]float32, 2*sampleMinN)
	rng := rand.New(rand.NewPCG(8, 8))
	for i := range scores {
		scores[i] = rng.Float32()
	}
	var sel Selector
	dst := make([]int32, 0, 5000)
	got, err := sel.LowestK(dst, scores, 5000)
	require.NoError(t, err)
	assert.Same(t, &dst[:1][0], &got[0], "result written into dst's array")

	for _, n := range []int{100, 10000, len(scores)} {
		allocs := testing.AllocsPerRun(20, func() {
			dst, _ = sel.LowestK(dst, scores[:n], n/2)
		})
		assert.Zero(t, allocs, "Selector.LowestK n=%d", n)
		batched := make([]int32, 0, 4*n/8)
		allocs = testing.AllocsPerRun(20, func() {
			batched, _ = sel.LowestKBatched(batched, scores[:n], 4, n/4, n/8)
		})
		assert.Zero(t, allocs, "Selector.LowestKBatched n=%d", n)
	}
}

func TestScoreKeyOrder(t *testing.T) {
	ordered := []float32{negInf, -math.MaxFloat32, -1, -math.SmallestNonzeroFloat32, 0, math.SmallestNonzeroFloat32, 1, math.MaxFloat32, posInf}
	for i := 1; i < len(ordered); i++ {
		assert.Less(t, scoreKey(ordered[i-1]), scoreKey(ordered[i]), "%v < %v", ordered[i-1], ordered[i])
	}
	assert.Equal(t, scoreKey(0), scoreKey(negZ))
	assert.Equal(t, uint32(math.MaxUint32), scoreKey(nanF))
	assert.Equal(t, uint32(math.MaxUint32), scoreKey(math.Float32frombits(0xff800001)))
	assert.Less(t, scoreKey(posInf), scoreKey(nanF))
}

// TestLowestKLinear checks that the selection scales linearly: 10× the
// scores should cost about 10× the time (the target is at most 12×; the
// assertion allows 14×, and the best of up to five attempts, because other
// processes share this machine's cores and caches). Timing assertions are
// flaky on a loaded machine, so this test runs only with
// KVNORM_TIMING_TESTS=1.
func TestLowestKLinear(t *testing.T) {
	if os.Getenv("KVNORM_TIMING_TESTS") != "1" || raceEnabled {
		t.Skip("timing test: set KVNORM_TIMING_TESTS=1 on a quiet machine")
	}
	rng := rand.New(rand.NewPCG(9, 9))
	big := make([]float32, 2_000_000)
	for i := range big {
		big[i] = rng.Float32()
	}
	var sel Selector
	dst := make([]int32, 0, len(big))
	timeIt := func(n, reps int) float64 {
		best := math.Inf(1)
		for range reps {
			start := time.Now()
			dst, _ = sel.LowestK(dst, big[:n], n/2)
			best = min(best, time.Since(start).Seconds())
		}
		return best
	}
	timeIt(len(big), 1) // warm up: grow the scratch space
	// Other processes share the cores: keep the best of a few attempts.
	best := math.Inf(1)
	for attempt := 0; attempt < 5 && best >= 14; attempt++ {
		small, large := timeIt(200_000, 40), timeIt(2_000_000, 8)
		t.Logf("n=2e5: %.2f ms, n=2e6: %.2f ms, ratio %.1f", small*1e3, large*1e3, large/small)
		best = min(best, large/small)
	}
	assert.Less(t, best, 14.0, "10× n should cost about 10× time")
}
