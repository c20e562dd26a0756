package gguf

import (
	"encoding/binary"
	"fmt"
	"math"
)

// Float32ToF16 converts f to IEEE 754 half precision, rounding to nearest
// with ties to even. Values beyond the half range become infinities, NaNs
// stay NaNs (keeping the sign and the top mantissa bits).
func Float32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint32(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	if exp == 0xff {
		if mant == 0 {
			return uint16(sign | 0x7c00)
		}
		m := mant >> 13
		if m == 0 {
			m = 0x200
		}
		return uint16(sign | 0x7c00 | m)
	}
	e := exp - 127 + 15 // biased half exponent
	if e >= 0x1f {
		return uint16(sign | 0x7c00)
	}
	if e <= 0 {
		// Half subnormal (or zero): the value is m * 2^-24.
		if e < -10 {
			return uint16(sign) // below half the smallest subnormal
		}
		full := mant | 0x800000
		shift := uint32(14 - e)
		return uint16(sign | roundShift(full, shift))
	}
	h := uint32(e)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // a carry into the exponent is correct, up to infinity
	}
	return uint16(sign | h)
}

// roundShift returns v >> shift rounded to nearest, ties to even.
func roundShift(v, shift uint32) uint32 {
	q := v >> shift
	rem := v & (1<<shift - 1)
	half := uint32(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++
	}
	return q
}

// F16ToFloat32 converts an IEEE 754 half precision value to float32 exactly.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	m := uint32(h & 0x3ff)
	switch exp {
	case 0:
		f := float32(m) * (1.0 / (1 << 24)) // exact: subnormal or zero
		if sign != 0 {
			f = -f
		}
		return f
	case 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | m<<13)
	}
	return math.Float32frombits(sign | (exp+112)<<23 | m<<13)
}

// Float32ToBF16 converts f to bfloat16, rounding to nearest with ties to
// even. NaNs stay (quiet) NaNs.
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// BF16ToFloat32 converts a bfloat16 value to float32 exactly.
func BF16ToFloat32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// Quantize encodes values as tensor data of type typ: F32, F16 and BF16
// (round to nearest even), Q8_0 (blocks of 32: a half scale amax/127 and 32
// int8, as ggml's reference quantiser) and Q4_0 (blocks of 32: a half scale
// and 32 4-bit values, as ggml's reference quantiser). For the block types
// len(values) must be a multiple of 32.
func Quantize(typ TensorType, values []float32) ([]byte, error) {
	bs, ts := typ.BlockSize(), typ.TypeSize()
	switch typ {
	case F32, F16, BF16, Q8_0, Q4_0:
	default:
		return nil, fmt.Errorf("%w: cannot quantize to %s", ErrUnsupported, typ)
	}
	if uint64(len(values))%bs != 0 {
		return nil, fmt.Errorf("%w: %d values is not a multiple of the %s block size %d",
			ErrInvalid, len(values), typ, bs)
	}
	out := make([]byte, uint64(len(values))/bs*ts)
	le := binary.LittleEndian
	switch typ {
	case F32:
		for i, v := range values {
			le.PutUint32(out[4*i:], math.Float32bits(v))
		}
	case F16:
		for i, v := range values {
			le.PutUint16(out[2*i:], Float32ToF16(v))
		}
	case BF16:
		for i, v := range values {
			le.PutUint16(out[2*i:], Float32ToBF16(v))
		}
	case Q8_0:
		for b := 0; b < len(values)/32; b++ {
			quantizeQ8_0(out[b*34:b*34+34], values[b*32:b*32+32])
		}
	case Q4_0:
		for b := 0; b < len(values)/32; b++ {
			quantizeQ4_0(out[b*18:b*18+18], values[b*32:b*32+32])
		}
	}
	return out, nil
}

// quantizeQ8_0 encodes 32 values: scale d = amax/127 as a half, then each
// value divided by the (unrounded) scale, rounded half away from zero.
func quantizeQ8_0(dst []byte, x []float32) {
	var amax float32
	for _, v := range x {
		amax = max(amax, float32(math.Abs(float64(v))))
	}
	d := amax / 127
	var id float32
	if d != 0 {
		id = 1 / d
	}
	binary.LittleEndian.PutUint16(dst, Float32ToF16(d))
	for j, v := range x {
		dst[2+j] = byte(int8(math.Round(float64(v * id))))
	}
}

// quantizeQ4_0 encodes 32 values: scale d = m/-8 where m is the value of
// largest magnitude (the first one on ties), then each value as
// min(15, trunc(v/d + 8.5)); element j goes in the low nibble of byte j and
// element j+16 in its high nibble.
func quantizeQ4_0(dst []byte, x []float32) {
	var amax, m float32
	for _, v := range x {
		if a := float32(math.Abs(float64(v))); amax < a {
			amax, m = a, v
		}
	}
	d := m / -8
	var id float32
	if d != 0 {
		id = 1 / d
	}
	binary.LittleEndian.PutUint16(dst, Float32ToF16(d))
	q := func(v float32) byte {
		t := int8(v*id + 8.5) // truncation toward zero, as a C cast
		return byte(min(t, 15))
	}
	for j := range 16 {
		dst[2+j] = q(x[j]) | q(x[j+16])<<4
	}
}

// Dequantize decodes tensor data of type typ into float32 values. It handles
// F32, F16, BF16, F64, I8, I16, I32, Q8_0 and Q4_0; other types fail with
// ErrUnsupported. len(data) must be a whole number of blocks.
func Dequantize(typ TensorType, data []byte) ([]float32, error) {
	bs, ts := typ.BlockSize(), typ.TypeSize()
	switch typ {
	case F32, F16, BF16, F64, I8, I16, I32, Q8_0, Q4_0:
	default:
		return nil, fmt.Errorf("%w: cannot dequantize %s", ErrUnsupported, typ)
	}
	if uint64(len(data))%ts != 0 {
		return nil, fmt.Errorf("%w: %d bytes is not a whole number of %s blocks of %d bytes",
			ErrInvalid, len(data), typ, ts)
	}
	out := make([]float32, uint64(len(data))/ts*bs)
	le := binary.LittleEndian
	switch typ {
	case F32:
		for i := range out {
			out[i] = math.Float32frombits(le.Uint32(data[4*i:]))
		}
	case F16:
		for i := range out {
			out[i] = F16ToFloat32(le.Uint16(data[2*i:]))
		}
	case BF16:
		for i := range out {
			out[i] = BF16ToFloat32(le.Uint16(data[2*i:]))
		}
	case F64:
		for i := range out {
			out[i] = float32(math.Float64frombits(le.Uint64(data[8*i:])))
		}
	case I8:
		for i := range out {
			out[i] = float32(int8(data[i]))
		}
	case I16:
		for i := range out {
			out[i] = float32(int16(le.Uint16(data[2*i:])))
		}
	case I32:
		for i := range out {
			out[i] = float32(int32(le.Uint32(data[4*i:])))
		}
	case Q8_0:
		for b := range len(out) / 32 {
			blk := data[b*34 : b*34+34]
			d := F16ToFloat32(le.Uint16(blk))
			for j := range 32 {
				out[b*32+j] = float32(int8(blk[2+j])) * d
			}
		}
	case Q4_0:
		for b := range len(out) / 32 {
			blk := data[b*18 : b*18+18]
			d := F16ToFloat32(le.Uint16(blk))
			for j := range 16 {
				out[b*32+j] = float32(int(blk[2+j]&0x0f)-8) * d
				out[b*32+j+16] = float32(int(blk[2+j]>>4)-8) * d
			}
		}
	}
	return out, nil
}
