package kernels

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// relTol is the relative tolerance between an implementation and the generic
// reference. The generic kernels sum squares in float64 and round once; the
// SIMD kernels sum in float32 across 8 lanes × 4 accumulators, so each lane
// adds at most ceil(300/32)+8 terms before a 5-step horizontal reduction.
// With every term non-negative there is no cancellation, and the relative
// error of the squared norm is bounded by about (10+8+5)·2⁻²⁴ ≈ 1.4e-6 for
// dim ≤ 300 (plus one rounding of d² for Q8_0); the square root halves it.
// 1e-5 leaves a margin of about 7×.
const relTol = 1e-5

// denormTol is the absolute tolerance on squared norms. Squares below the
// float32 normal range (about 1.2e-38) are summed on the denormal grid of
// 2⁻¹⁴⁹ ≈ 1.4e-45, each float32 addition losing up to half a step, whereas
// the float64 reference keeps them exact: 512 terms lose at most about
// 3.6e-43.
const denormTol = 1e-42

// closeEnough reports whether got matches want within relTol, comparing
// squared norms (sqrt false) or norms (sqrt true, compared as their squares
// so that the denormal tolerance applies where it arises). NaN matches only
// NaN, an infinity only the same infinity (or a value within rounding of
// overflow).
func closeEnough(want, got float32, sqrt bool) bool {
	w, g := float64(want), float64(got)
	switch {
	case math.IsNaN(w) || math.IsNaN(g):
		return math.IsNaN(w) && math.IsNaN(g)
	case math.IsInf(w, 0) || math.IsInf(g, 0):
		// A sum of squares within rounding of MaxFloat32 may overflow in
		// float32 accumulation and not in float64 (or the reverse); so may
		// its root near sqrt(MaxFloat32).
		x := math.Abs(w)
		if math.IsInf(w, 0) {
			x = math.Abs(g)
		}
		return w == g || x >= (1-relTol)*math.MaxFloat32 ||
			math.Abs(x-math.Sqrt(math.MaxFloat32)) <= relTol*math.Sqrt(math.MaxFloat32)
	}
	if math.Abs(w-g) <= relTol*max(math.Abs(w), math.Abs(g)) {
		return true
	}
	if sqrt {
		w, g = w*w, g*g
	}
	return math.Abs(w-g) <= denormTol
}

func requireClose(t testing.TB, want, got []float32, sqrt bool, msgAndArgs ...any) {
	t.Helper()
	require.Len(t, got, len(want), msgAndArgs...)
	for i := range want {
		if !closeEnough(want[i], got[i], sqrt) {
			require.Failf(t, "norm mismatch", "row %d: want %v (generic), got %v; %v", i, want[i], got[i], msgAndArgs)
		}
	}
}

// forEachImpl runs f once per available implementation, as subtest
// "impl=NAME", with that implementation active.
func forEachImpl(t *testing.T, f func(t *testing.T, impl string)) {
	for _, name := range Impls() {
		t.Run("impl="+name, func(t *testing.T) {
			restore, err := UseImpl(name)
			require.NoError(t, err)
			defer restore()
			f(t, name)
		})
	}
}

// genericNorms is the oracle: the generic kernel on validated input.
func genericNorms(dst []float32, src []byte, dt DType, dim int, sqrt bool) {
	generic.norms[dt](dst, src, dim, sqrt)
}

// guardBits marks the float32 slots around dst; a kernel writing outside dst
// changes them.
const guardBits = 0x7fc0dead

const guardLen = 8

// guarded returns a dst of n elements surrounded by guard values, and the
// backing slice to check with requireGuards.
func guarded(n int) (dst, all []float32) {
	all = make([]float32, n+2*guardLen)
	for i := range all {
		all[i] = math.Float32frombits(guardBits)
	}
	return all[guardLen : guardLen+n : guardLen+n], all
}

func requireGuards(t testing.TB, all []float32) {
	t.Helper()
	n := len(all) - 2*guardLen
	for i, v := range all {
		if i >= guardLen && i < guardLen+n {
			continue
		}
		require.Equal(t, uint32(guardBits), math.Float32bits(v), "guard %d of %d overwritten", i, len(all))
	}
}

// randRows returns n random rows of dim elements of type dt as little-endian
// bytes. scale sets the magnitude of the values.
func randRows(rng *rand.Rand, dt DType, n, dim int, scale float64) []byte {
	rb, err := dt.RowBytes(dim)
	if err != nil {
		panic(err)
	}
	out := make([]byte, n*rb)
	vals := make([]float32, n*dim)
	for i := range vals {
		vals[i] = float32(rng.NormFloat64() * scale)
	}
	putValues(out, vals, dt)
	return out
}

// putValues encodes vals as dt into out (len(out) must match).
func putValues(out []byte, vals []float32, dt DType) {
	switch dt {
	case F32:
		for i, v := range vals {
			binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(v))
		}
	case F16:
		for i, v := range vals {
			binary.LittleEndian.PutUint16(out[2*i:], F32ToF16(v))
		}
	case BF16:
		for i, v := range vals {
			binary.LittleEndian.PutUint16(out[2*i:], F32ToBF16(v))
		}
	case Q8_0:
		if err := QuantizeQ8_0(out, vals); err != nil {
			panic(err)
		}
	}
}

var allDTypes = []DType{F32, F16, BF16, Q8_0}
