package kernels

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// checkNorms runs Norms and SquaredNorms of the active implementation on src
// (placed at byte offset off of a larger buffer) against the generic
// reference, with guards around dst.
func checkNorms(t *testing.T, dt DType, n, dim, off int, src []byte) {
	t.Helper()
	buf := make([]byte, off+len(src)+3)
	s := buf[off : off+len(src)]
	copy(s, src)
	for _, sqrt := range []bool{false, true} {
		want := make([]float32, n)
		genericNorms(want, s, dt, dim, sqrt)
		got, all := guarded(n)
		var err error
		if sqrt {
			err = Norms(got, s, dt, dim)
		} else {
			err = SquaredNorms(got, s, dt, dim)
		}
		require.NoError(t, err)
		requireGuards(t, all)
		requireClose(t, want, got, sqrt, fmt.Sprintf("dtype=%v n=%d dim=%d off=%d sqrt=%v", dt, n, dim, off, sqrt))
	}
}

// nsFor thins the n×dim product: every dim gets a spread of n, and every n
// in 0..64 is covered across the dims (and by TestNormsAllN). Under the race
// detector, which slows the generic loops about tenfold, fewer n per dim.
func nsFor(dim int) []int {
	if raceEnabled {
		return []int{1, 9, dim % 65}
	}
	return []int{0, 1, 2, 3, 5, 8, 17, 33, 64, dim % 65, (dim*7 + 11) % 65}
}

func TestNormsMatchGeneric(t *testing.T) {
	forEachImpl(t, func(t *testing.T, impl string) {
		for _, dt := range allDTypes {
			t.Run("dtype="+dt.String(), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(1, uint64(dt)))
				maxDim, step := 300, 1
				if dt == Q8_0 {
					maxDim, step = 320, 32
				}
				for dim := 0; dim <= maxDim; dim += step {
					for _, n := range nsFor(dim) {
						scale := []float64{1e-3, 1, 30, 1000}[rng.IntN(4)]
						src := randRows(rng, dt, n, dim, scale)
						checkNorms(t, dt, n, dim, (dim+n)%4, src)
					}
				}
			})
		}
	})
}

func TestNormsAllN(t *testing.T) {
	// Every n from 0 to 64 at a few dims, including Q8_0-compatible ones.
	forEachImpl(t, func(t *testing.T, impl string) {
		rng := rand.New(rand.NewPCG(2, 2))
		for _, dt := range allDTypes {
			for _, dim := range []int{32, 64, 96, 128} {
				for n := 0; n <= 64; n++ {
					checkNorms(t, dt, n, dim, n%4, randRows(rng, dt, n, dim, 1))
				}
			}
		}
	})
}

// TestNormsTyped checks the typed entry points against the byte ones at
// element offsets 0..3.
func TestNormsTyped(t *testing.T) {
	forEachImpl(t, func(t *testing.T, impl string) {
		rng := rand.New(rand.NewPCG(3, 3))
		for _, dim := range []int{0, 1, 5, 8, 15, 16, 31, 33, 64, 127, 128, 300} {
			for _, n := range []int{0, 1, 4, 9} {
				for off := 0; off < 4; off++ {
					f := make([]float32, off+n*dim)
					h := make([]uint16, off+n*dim)
					b := make([]uint16, off+n*dim)
					for i := range f {
						f[i] = float32(rng.NormFloat64())
						h[i], b[i] = F32ToF16(f[i]), F32ToBF16(f[i])
					}
					f, h, b = f[off:], h[off:], b[off:]
					type typedCase struct {
						dt  DType
						run func(dst []float32, sqrt bool) error
						raw []byte
					}
					cases := []typedCase{
						{F32, func(d []float32, sq bool) error {
							if sq {
								return NormsF32(d, f, dim)
							}
							return SquaredNormsF32(d, f, dim)
						}, leCopy(f)},
						{F16, func(d []float32, sq bool) error {
							if sq {
								return NormsF16(d, h, dim)
							}
							return SquaredNormsF16(d, h, dim)
						}, leCopy(h)},
						{BF16, func(d []float32, sq bool) error {
							if sq {
								return NormsBF16(d, b, dim)
							}
							return SquaredNormsBF16(d, b, dim)
						}, leCopy(b)},
					}
					for _, c := range cases {
						for _, sqrt := range []bool{false, true} {
							want := make([]float32, n)
							genericNorms(want, c.raw, c.dt, dim, sqrt)
							got, all := guarded(n)
							require.NoError(t, c.run(got, sqrt))
							requireGuards(t, all)
							requireClose(t, want, got, sqrt, c.dt, dim, n, off, sqrt)
						}
					}
				}
			}
		}
	})
}

func leCopy[E float32 | uint16](s []E) []byte { return slices.Clone(leBytes(s)) }

// TestNormsSpecialValues checks zero, denormal, huge, Inf and NaN inputs:
// every implementation must agree with generic, including on overflow to
// +Inf and on NaN.
func TestNormsSpecialValues(t *testing.T) {
	inf := float32(math.Inf(1))
	nan := float32(math.NaN())
	denorm := math.Float32frombits(1)
	tests := []struct {
		name  string
		dt    DType
		vals  []float32
		wantF func(dim int) float32 // expected squared norm, checked exactly when set
	}{
		{"zero/f32", F32, []float32{0}, func(int) float32 { return 0 }},
		{"negzero/f32", F32, []float32{float32(math.Copysign(0, -1))}, func(int) float32 { return 0 }},
		{"denormal/f32", F32, []float32{denorm, -denorm}, func(int) float32 { return 0 }},
		{"huge/f32", F32, []float32{1e30, -1e30}, func(int) float32 { return inf }},
		{"big-not-overflowing/f32", F32, []float32{1e18}, nil},
		{"inf/f32", F32, []float32{inf}, func(int) float32 { return inf }},
		{"neginf/f32", F32, []float32{-inf}, func(int) float32 { return inf }},
		{"nan/f32", F32, []float32{nan}, func(int) float32 { return nan }},
		{"zero/f16", F16, []float32{0}, func(int) float32 { return 0 }},
		{"denormal/f16", F16, []float32{F16ToF32(1), F16ToF32(0x3ff)}, nil},
		{"max/f16", F16, []float32{65504, -65504}, func(dim int) float32 { return float32(float64(dim) * 65504 * 65504) }},
		{"inf/f16", F16, []float32{inf}, func(int) float32 { return inf }},
		{"nan/f16", F16, []float32{nan}, func(int) float32 { return nan }},
		{"zero/bf16", BF16, []float32{0}, func(int) float32 { return 0 }},
		{"denormal/bf16", BF16, []float32{BF16ToF32(1)}, func(int) float32 { return 0 }},
		{"huge/bf16", BF16, []float32{1e30}, func(int) float32 { return inf }},
		{"inf/bf16", BF16, []float32{-inf}, func(int) float32 { return inf }},
		{"nan/bf16", BF16, []float32{nan}, func(int) float32 { return nan }},
		{"zero/q8_0", Q8_0, []float32{0}, func(int) float32 { return 0 }},
		{"max/q8_0", Q8_0, []float32{65504 * 127, -65504 * 127}, nil},
	}
	forEachImpl(t, func(t *testing.T, impl string) {
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				dims := []int{1, 3, 8, 9, 16, 31, 32, 40, 64, 100, 128, 300}
				if tc.dt == Q8_0 {
					dims = []int{32, 64, 96, 128, 320}
				}
				for _, dim := range dims {
					// Row 0: all special; row 1: one special value among
					// ordinary ones, at the last (tail) position; row 2 at
					// the first.
					n := 3
					vals := make([]float32, n*dim)
					for j := range dim {
						vals[j] = tc.vals[j%len(tc.vals)]
						vals[dim+j] = 0.5
						vals[2*dim+j] = 0.25
					}
					vals[2*dim-1] = tc.vals[0]
					vals[2*dim] = tc.vals[0]
					rb, _ := tc.dt.RowBytes(dim)
					src := make([]byte, n*rb)
					putValues(src, vals, tc.dt)
					checkNorms(t, tc.dt, n, dim, 1, src)
					if tc.wantF != nil {
						got := make([]float32, n)
						require.NoError(t, SquaredNorms(got, src, tc.dt, dim))
						want := tc.wantF(dim)
						assert.True(t, closeEnough(want, got[0], false), "dim=%d: squared norm of row 0 = %v, want %v", dim, got[0], want)
					}
				}
			})
		}
	})
}

// TestNormsQ8_0SpecialScales covers raw Q8_0 blocks whose f16 scale is
// denormal, Inf or NaN, with all-zero and non-zero quants.
func TestNormsQ8_0SpecialScales(t *testing.T) {
	scales := []uint16{0x0000, 0x0001, 0x03ff, 0x3c00, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x8001}
	forEachImpl(t, func(t *testing.T, impl string) {
		rng := rand.New(rand.NewPCG(4, 4))
		for _, sc := range scales {
			for _, zeroQ := range []bool{false, true} {
				for _, dim := range []int{32, 64, 96, 160} {
					n := 4
					src := randRows(rng, Q8_0, n, dim, 1)
					for blk := 0; blk < n*dim/32; blk++ {
						if rng.IntN(2) == 0 {
							binary.LittleEndian.PutUint16(src[34*blk:], sc)
						}
						if zeroQ {
							clear(src[34*blk+2 : 34*blk+34])
						} else if rng.IntN(3) == 0 {
							clear(src[34*blk+2 : 34*blk+18]) // half the lanes zero
						}
					}
					checkNorms(t, Q8_0, n, dim, 3, src)
				}
			}
		}
	})
}

func TestNormsErrors(t *testing.T) {
	tests := []struct {
		name    string
		run     func() error
		wantErr error
		wantMsg string
	}{
		{"short src", func() error { return Norms(make([]float32, 1), make([]byte, 100), F16, 64) }, ErrShape,
			"kernels: bad shape: len(src)=100 is not n*rowBytes=128 (n=1, dim=64, dtype=f16)"},
		{"long src", func() error { return SquaredNorms(make([]float32, 2), make([]byte, 9), F32, 1) }, ErrShape, "len(src)=9"},
		{"negative dim", func() error { return Norms(nil, nil, F32, -1) }, ErrShape, "dim=-1"},
		{"q8_0 dim", func() error { return Norms(make([]float32, 1), make([]byte, 34), Q8_0, 33) }, ErrShape, "dim=33 is not a multiple of 32"},
		{"bad dtype", func() error { return Norms(nil, nil, DType(9), 4) }, ErrDType, "dtype 9"},
		{"huge dim", func() error { return Norms(nil, nil, F32, math.MaxInt) }, ErrShape, "too large"},
		{"typed f32", func() error { return NormsF32(make([]float32, 2), make([]float32, 7), 4) }, ErrShape,
			"len(src)=7 is not n*dim=8 (n=2, dim=4, dtype=f32)"},
		{"typed f16", func() error { return NormsF16(make([]float32, 1), make([]uint16, 3), 4) }, ErrShape, "dtype=f16"},
		{"typed bf16", func() error { return SquaredNormsBF16(make([]float32, 1), nil, 4) }, ErrShape, "dtype=bf16"},
		{"typed negative dim", func() error { return NormsF32(nil, nil, -3) }, ErrShape, "dim=-3"},
		{"quantize len", func() error { return QuantizeQ8_0(make([]byte, 34), make([]float32, 31)) }, ErrShape, "len(src)=31"},
		{"quantize dst", func() error { return QuantizeQ8_0(make([]byte, 33), make([]float32, 32)) }, ErrShape, "len(dst)=33"},
	}
	forEachImpl(t, func(t *testing.T, impl string) {
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				err := tc.run()
				require.ErrorIs(t, err, tc.wantErr)
				assert.Contains(t, err.Error(), tc.wantMsg)
			})
		}
	})
	// Zero rows are fine with any valid dim, and nil slices.
	require.NoError(t, Norms(nil, nil, Q8_0, 64))
	require.NoError(t, NormsF32(nil, nil, 0))
	require.NoError(t, Norms(make([]float32, 3), nil, F16, 0))
}

func TestDType(t *testing.T) {
	for _, dt := range allDTypes {
		got, err := ParseDType(dt.String())
		require.NoError(t, err)
		assert.Equal(t, dt, got)
		up, err := ParseDType(fmt.Sprintf("%X", dt.String()))
		_ = up
		require.Error(t, err) // hex garbage is not a name
	}
	got, err := ParseDType("Q8_0")
	require.NoError(t, err)
	assert.Equal(t, Q8_0, got)
	got, err = ParseDType("BF16")
	require.NoError(t, err)
	assert.Equal(t, BF16, got)
	_, err = ParseDType("f64")
	require.ErrorIs(t, err, ErrDType)
	assert.Contains(t, err.Error(), `"f64"`)
	assert.Equal(t, "dtype(7)", DType(7).String())

	rowBytes := []struct {
		dt   DType
		dim  int
		want int
	}{{F32, 3, 12}, {F16, 3, 6}, {BF16, 128, 256}, {Q8_0, 64, 68}, {Q8_0, 0, 0}, {F32, 0, 0}}
	for _, rb := range rowBytes {
		got, err := rb.dt.RowBytes(rb.dim)
		require.NoError(t, err)
		assert.Equal(t, rb.want, got, "%v dim=%d", rb.dt, rb.dim)
	}
	_, err = Q8_0.RowBytes(48)
	require.ErrorIs(t, err, ErrShape)
	_, err = DType(4).RowBytes(8)
	require.ErrorIs(t, err, ErrDType)
}

func TestImpls(t *testing.T) {
	names := Impls()
	require.NotEmpty(t, names)
	assert.Equal(t, Impl(), names[0], "active implementation first")
	assert.Contains(t, names, "generic")
	_, err := UseImpl("sse9")
	require.ErrorIs(t, err, ErrImpl)

	restore, err := UseImpl("generic")
	require.NoError(t, err)
	assert.Equal(t, "generic", Impl())
	restore()
	restore() // idempotent
	assert.Equal(t, names[0], Impl())
}
