package kernels

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestF16RoundTrip checks every binary16 value: F16ToF32 against the
// definition, and F32ToF16 of it back to the same bits.
func TestF16RoundTrip(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		f := F16ToF32(h)
		exp, man := int(h>>10&0x1f), int(h&0x3ff)
		neg := h&0x8000 != 0
		var want float64
		switch exp {
		case 0x1f:
			if man != 0 {
				require.True(t, math.IsNaN(float64(f)), "%#04x", h)
				assert.Equal(t, h|0x200, F32ToF16(f), "NaN %#04x keeps its payload, quieted", h)
				continue
			}
			want = math.Inf(1)
		case 0:
			want = math.Ldexp(float64(man), -24)
		default:
			want = math.Ldexp(float64(1024+man), exp-25)
		}
		if neg {
			want = -want
		}
		require.Equal(t, math.Float64bits(want), math.Float64bits(float64(f)), "F16ToF32(%#04x)", h)
		require.Equal(t, h, F32ToF16(f), "F32ToF16(F16ToF32(%#04x))", h)
	}
}

// TestF32ToF16Rounding checks round-to-nearest-even at every midpoint
// between consecutive positive binary16 values, and just either side of it.
func TestF32ToF16Rounding(t *testing.T) {
	for h := uint16(0); h < 0x7bff; h++ { // 0x7bff→Inf is checked below
		lo, hi := float64(F16ToF32(h)), float64(F16ToF32(h+1))
		mid := float32((lo + hi) / 2) // exact: binary16 midpoints fit in binary32
		require.Equal(t, (lo+hi)/2, float64(mid))
		even := h
		if h&1 == 1 {
			even = h + 1
		}
		require.Equal(t, even, F32ToF16(mid), "tie between %#04x and %#04x", h, h+1)
		require.Equal(t, h, F32ToF16(math.Nextafter32(mid, 0)), "below the midpoint after %#04x", h)
		require.Equal(t, h+1, F32ToF16(math.Nextafter32(mid, 1e9)), "above the midpoint after %#04x", h)
		require.Equal(t, h|0x8000, F32ToF16(-math.Nextafter32(mid, 0)), "negative, below the midpoint after %#04x", h)
	}
	tests := []struct {
		in   float32
		want uint16
	}{
		{65504, 0x7bff},
		{65519.99, 0x7bff},
		{65520, 0x7c00}, // midpoint to the next power: rounds to even = Inf
		{1e10, 0x7c00},
		{float32(math.Inf(-1)), 0xfc00},
		{math.Float32frombits(1), 0},               // binary32 denormal
		{0x1p-25, 0},                               // half the smallest denormal: tie to even 0
		{math.Nextafter32(0x1p-25, 1), 1},          // just above: rounds up
		{-0x1p-26, 0x8000},                         // tiny negative keeps its sign
		{float32(math.Copysign(0, -1)), 0x8000},    // -0
		{math.Float32frombits(0x7f800001), 0x7e00}, // signalling NaN becomes quiet
		{math.Float32frombits(0xffc02000), 0xfe01}, // payload top bits kept
		{0x1p-14, 0x0400},                          // smallest normal
		{math.Nextafter32(0x1p-14, 0), 0x0400},     // largest denormal below it rounds up
		{0x1p-14 - 0x1p-24, 0x03ff},                // largest denormal
		{1, 0x3c00},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, F32ToF16(tc.in), "F32ToF16(%g)", tc.in)
	}
}

func TestBF16(t *testing.T) {
	for i := range 1 << 16 {
		b := uint16(i)
		f := BF16ToF32(b)
		assert.Equal(t, uint32(b)<<16, math.Float32bits(f))
		if math.IsNaN(float64(f)) {
			assert.Equal(t, b|0x40, F32ToBF16(f))
			continue
		}
		require.Equal(t, b, F32ToBF16(f), "%#04x", b)
		if b&0x7fff < 0x7f80 { // finite: test the midpoint to the next value
			mid := math.Float32frombits(uint32(b)<<16 | 0x8000)
			even := b
			if b&1 == 1 {
				even = b + 1
			}
			require.Equal(t, even, F32ToBF16(mid), "tie after %#04x", b)
			require.Equal(t, b, F32ToBF16(math.Float32frombits(uint32(b)<<16|0x7fff)))
			require.Equal(t, b+1, F32ToBF16(math.Float32frombits(uint32(b)<<16|0x8001)))
		}
	}
	assert.Equal(t, uint16(0x7f80), F32ToBF16(math.MaxFloat32), "rounds up to +Inf")
}

func TestQuantizeQ8_0(t *testing.T) {
	src := make([]float32, 64)
	for i := range 32 {
		src[i] = float32(i - 16) // max |x| = 16 → d = 16/127
	}
	// Second block stays zero.
	dst := make([]byte, 68)
	require.NoError(t, QuantizeQ8_0(dst, src))
	d := F16ToF32(uint16(dst[0]) | uint16(dst[1])<<8)
	assert.Equal(t, F32ToF16(16.0/127), uint16(dst[0])|uint16(dst[1])<<8)
	assert.InDelta(t, 16.0/127, d, 1e-4)
	assert.Equal(t, int8(-127), int8(dst[2]))   // x = -16
	assert.Equal(t, int8(0), int8(dst[2+16]))   // x = 0
	assert.Equal(t, int8(119), int8(dst[2+31])) // x = 15: round(15*127/16) = round(119.06)
	assert.Equal(t, make([]byte, 34), dst[34:], "an all-zero block is all zero")

	// Half away from zero, like C roundf: 0.5*id = 63.5 → 64.
	src = make([]float32, 32)
	src[0], src[1], src[2] = 1, 0.5, -0.5
	dst = make([]byte, 34)
	require.NoError(t, QuantizeQ8_0(dst, src))
	assert.Equal(t, int8(127), int8(dst[2]))
	assert.Equal(t, int8(64), int8(dst[3]))
	assert.Equal(t, int8(-64), int8(dst[4]))

	require.NoError(t, QuantizeQ8_0(nil, nil))
}

func TestF16ToF32Fast(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		want, got := F16ToF32(h), f16ToF32Fast(h)
		require.Equal(t, math.Float32bits(want), math.Float32bits(got), "%#04x", h)
	}
}
