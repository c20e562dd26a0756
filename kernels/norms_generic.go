package kernels

import (
	"encoding/binary"
	"math"
)

// This file holds the plain-Go reference kernels. They are always compiled,
// they are the "generic" implementation, and every other implementation is
// tested against them.
//
// Each kernel takes validated arguments: n = len(dst) rows of dim elements,
// little-endian, len(src) == n*rowBytes. When sqrt is set it stores the norm,
// otherwise the squared norm.
//
// Accumulation: the sum of squares is accumulated in float64 (four partial
// sums), rounded once to float32, and only then square-rooted. Rounding the
// squared sum to float32 before the root keeps overflow behaviour identical to
// the float32 SIMD kernels: a row whose squared norm exceeds MaxFloat32 has
// norm +Inf in every implementation.

// finish rounds a float64 sum of squares to float32 and takes the root if
// asked to.
func finish(sum float64, sqrt bool) float32 {
	s := float32(sum)
	if sqrt {
		// The float64 root of a float32, rounded to float32, is the correctly
		// rounded float32 root.
		s = float32(math.Sqrt(float64(s)))
	}
	return s
}

func normsF32Generic(dst []float32, src []byte, dim int, sqrt bool) {
	rb := 4 * dim
	for i := range dst {
		row := src[i*rb : (i+1)*rb]
		var s0, s1, s2, s3 float64
		j := 0
		for ; j+16 <= len(row); j += 16 {
			x0 := float64(math.Float32frombits(binary.LittleEndian.Uint32(row[j:])))
			x1 := float64(math.Float32frombits(binary.LittleEndian.Uint32(row[j+4:])))
			x2 := float64(math.Float32frombits(binary.LittleEndian.Uint32(row[j+8:])))
			x3 := float64(math.Float32frombits(binary.LittleEndian.Uint32(row[j+12:])))
			s0 += x0 * x0
			s1 += x1 * x1
			s2 += x2 * x2
			s3 += x3 * x3
		}
		for ; j < len(row); j += 4 {
			x := float64(math.Float32frombits(binary.LittleEndian.Uint32(row[j:])))
			s0 += x * x
		}
		dst[i] = finish((s0+s1)+(s2+s3), sqrt)
	}
}

func normsF16Generic(dst []float32, src []byte, dim int, sqrt bool) {
	rb := 2 * dim
	for i := range dst {
		row := src[i*rb : (i+1)*rb]
		var s0, s1, s2, s3 float64
		j := 0
		for ; j+8 <= len(row); j += 8 {
			x0 := float64(f16ToF32Fast(binary.LittleEndian.Uint16(row[j:])))
			x1 := float64(f16ToF32Fast(binary.LittleEndian.Uint16(row[j+2:])))
			x2 := float64(f16ToF32Fast(binary.LittleEndian.Uint16(row[j+4:])))
			x3 := float64(f16ToF32Fast(binary.LittleEndian.Uint16(row[j+6:])))
			s0 += x0 * x0
			s1 += x1 * x1
			s2 += x2 * x2
			s3 += x3 * x3
		}
		for ; j < len(row); j += 2 {
			x := float64(f16ToF32Fast(binary.LittleEndian.Uint16(row[j:])))
			s0 += x * x
		}
		dst[i] = finish((s0+s1)+(s2+s3), sqrt)
	}
}

// f16ToF32Fast is F16ToF32 in a form the compiler inlines: the exponent and
// mantissa bits, moved into binary32 position, are a binary32 whose value is
// 2^-112 times the binary16 value (denormals included, exactly), so one
// multiplication by 2^112 finishes the job. Inf and NaN get the all-ones
// exponent directly.
func f16ToF32Fast(h uint16) float32 {
	bits := uint32(h&0x7fff) << 13
	sign := uint32(h&0x8000) << 16
	if h&0x7c00 == 0x7c00 { // Inf or NaN: exponent field all ones
		if bits != 0x0f800000 {
			bits |= 0x00400000 // quiet the NaN, as VCVTPH2PS does
		}
		return math.Float32frombits(sign | 0x70000000 | bits)
	}
	return math.Float32frombits(math.Float32bits(math.Float32frombits(bits)*0x1p112) | sign)
}

func normsBF16Generic(dst []float32, src []byte, dim int, sqrt bool) {
	rb := 2 * dim
	for i := range dst {
		row := src[i*rb : (i+1)*rb]
		var s0, s1, s2, s3 float64
		j := 0
		for ; j+8 <= len(row); j += 8 {
			x0 := float64(BF16ToF32(binary.LittleEndian.Uint16(row[j:])))
			x1 := float64(BF16ToF32(binary.LittleEndian.Uint16(row[j+2:])))
			x2 := float64(BF16ToF32(binary.LittleEndian.Uint16(row[j+4:])))
			x3 := float64(BF16ToF32(binary.LittleEndian.Uint16(row[j+6:])))
			s0 += x0 * x0
			s1 += x1 * x1
			s2 += x2 * x2
			s3 += x3 * x3
		}
		for ; j < len(row); j += 2 {
			x := float64(BF16ToF32(binary.LittleEndian.Uint16(row[j:])))
			s0 += x * x
		}
		dst[i] = finish((s0+s1)+(s2+s3), sqrt)
	}
}

// normsQ8_0Generic sums q*q exactly in integers per block and scales by d*d:
// the squared norm of a block is d² Σq².
func normsQ8_0Generic(dst []float32, src []byte, dim int, sqrt bool) {
	blocks := dim / Q8_0BlockSize
	rb := blocks * q8_0BlockBytes
	for i := range dst {
		row := src[i*rb : (i+1)*rb]
		var s float64
		for b := 0; b < blocks; b++ {
			blk := row[b*q8_0BlockBytes : (b+1)*q8_0BlockBytes]
			d := float64(f16ToF32Fast(binary.LittleEndian.Uint16(blk)))
			var qq int32
			for _, q := range blk[2:] {
				qq += int32(int8(q)) * int32(int8(q))
			}
			if qq != 0 { // an all-zero block adds 0, whatever its scale (even Inf or NaN)
				s += d * d * float64(qq)
			}
		}
		dst[i] = finish(s, sqrt)
	}
}
