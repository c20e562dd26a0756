package kernels

import (
	"fmt"
	"math"
)

// F16ToF32 returns the binary32 value of the IEEE 754 binary16 bits h. Every
// binary16 value, denormals included, is exactly representable, so the
// conversion is exact; a NaN stays a NaN (quieted, payload kept), as the F16C
// instruction VCVTPH2PS does.
func F16ToF32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	man := uint32(h & 0x3ff)
	switch exp {
	case 0x1f: // Inf or NaN
		if man != 0 {
			man |= 0x200 // quiet the NaN
		}
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	case 0: // zero or denormal: man * 2^-24, exact in binary32
		f := float32(man) * (1.0 / (1 << 24))
		return math.Float32frombits(sign | math.Float32bits(f))
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | man<<13)
}

// F32ToF16 returns the IEEE 754 binary16 bits nearest to f, ties to even.
// Values beyond the binary16 range become ±Inf, values too small become
// denormals or ±0, and a NaN stays a NaN (quiet, with the top bits of its
// payload).
func F32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23) & 0xff
	man := b & 0x7fffff
	if exp == 0xff {
		if man == 0 {
			return sign | 0x7c00
		}
		return sign | 0x7e00 | uint16(man>>13)
	}
	e := exp - 127 + 15 // biased binary16 exponent
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		// Denormal (or zero) in binary16: count units of 2^-24.
		// f = m24 * 2^(exp-150), so units = m24 >> (126-exp).
		shift := uint(126 - exp)
		if exp == 0 || shift > 24 {
			return sign // below half the smallest denormal
		}
		m24 := man | 0x800000
		return sign | uint16(roundShiftRNE(m24, shift))
	}
	return sign | uint16(roundShiftRNE(uint32(e)<<23|man, 13))
}

// roundShiftRNE returns v >> shift rounded to nearest, ties to even.
// 1 <= shift <= 31. A carry out of the mantissa bumps the exponent, which is
// the correct result for both normals (up to Inf) and denormals (up to the
// smallest normal).
func roundShiftRNE(v uint32, shift uint) uint32 {
	q := v >> shift
	rem := v & (1<<shift - 1)
	half := uint32(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return q
}

// BF16ToF32 returns the binary32 value of the bfloat16 bits b (exact: bfloat16
// is the upper half of a binary32).
func BF16ToF32(b uint16) float32 {
	return math.Float32frombits(uint32(b) << 16)
}

// F32ToBF16 returns the bfloat16 bits nearest to f, ties to even. A NaN stays
// a NaN (quiet).
func F32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	return uint16((b + 0x7fff + (b>>16)&1) >> 16)
}

// QuantizeQ8_0 encodes src as Q8_0 blocks into dst with ggml's reference
// semantics: for each block of 32 values, d = max|x|/127 is stored as F16 and
// each q = round(x/d) (half away from zero) as int8; an all-zero block gets
// d = 0 and q = 0. len(src) must be a multiple of 32 and len(dst) exactly
// len(src)/32*34.
func QuantizeQ8_0(dst []byte, src []float32) error {
	if len(src)%Q8_0BlockSize != 0 {
		return fmt.Errorf("%w: len(src)=%d is not a multiple of %d (dtype=q8_0)", ErrShape, len(src), Q8_0BlockSize)
	}
	want := len(src) / Q8_0BlockSize * q8_0BlockBytes
	if len(dst) != want {
		return fmt.Errorf("%w: len(dst)=%d is not %d for len(src)=%d (dtype=q8_0)", ErrShape, len(dst), want, len(src))
	}
	for b := 0; b < len(src)/Q8_0BlockSize; b++ {
		x := src[b*Q8_0BlockSize : (b+1)*Q8_0BlockSize]
		out := dst[b*q8_0BlockBytes : (b+1)*q8_0BlockBytes]
		var amax float32
		for _, v := range x {
			amax = max(amax, float32(math.Abs(float64(v))))
		}
		d := amax / 127
		var id float32
		if d != 0 {
			id = 1 / d
		}
		h := F32ToF16(d)
		out[0], out[1] = byte(h), byte(h>>8)
		for j, v := range x {
			out[2+j] = byte(int8(math.Round(float64(v * id))))
		}
	}
	return nil
}
