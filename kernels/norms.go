package kernels

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"unsafe"
)

// Norms writes into dst the L2 norm of each of the n = len(dst) rows of src.
// src holds the rows back to back, row-major and little-endian, each row
// dt.RowBytes(dim) bytes, so len(src) must be exactly n*dt.RowBytes(dim).
// The squared norm is accumulated in float32 or better and rounded to float32
// before the square root, so a row whose squared norm overflows float32 has
// norm +Inf; a row holding a NaN has norm NaN. A Q8_0 block adds d²·Σq²; a
// block whose 32 quants are all zero adds 0, whatever its scale (even Inf or
// NaN). The implementations differ only in summation order and agree within
// a relative 1e-5 for dim <= 300.
func Norms(dst []float32, src []byte, dt DType, dim int) error {
	return norms(dst, src, dt, dim, true)
}

// SquaredNorms is [Norms] without the square root: it writes the squared L2
// norm of each row, which ranks rows the same way and is cheaper.
func SquaredNorms(dst []float32, src []byte, dt DType, dim int) error {
	return norms(dst, src, dt, dim, false)
}

func norms(dst []float32, src []byte, dt DType, dim int, sqrt bool) error {
	if err := checkRows(len(dst), len(src), dt, dim); err != nil {
		return err
	}
	if len(dst) == 0 {
		return nil
	}
	active.Load().norms[dt](dst, src, dim, sqrt)
	return nil
}

// checkRows validates that srcLen bytes hold exactly n rows of dim elements
// of type dt.
func checkRows(n, srcLen int, dt DType, dim int) error {
	rb, err := dt.RowBytes(dim)
	if err != nil {
		return err
	}
	if hi, want := bits.Mul64(uint64(n), uint64(rb)); hi != 0 || want != uint64(srcLen) {
		return fmt.Errorf("%w: len(src)=%d is not n*rowBytes=%d (n=%d, dim=%d, dtype=%v)",
			ErrShape, srcLen, uint64(n)*uint64(rb), n, dim, dt)
	}
	return nil
}

// NormsF32 is [Norms] for float32 rows given as a []float32: n = len(dst)
// rows of dim elements, len(src) == n*dim.
func NormsF32(dst, src []float32, dim int) error { return normsTyped(dst, src, F32, dim, true) }

// SquaredNormsF32 is [SquaredNorms] for float32 rows given as a []float32.
func SquaredNormsF32(dst, src []float32, dim int) error {
	return normsTyped(dst, src, F32, dim, false)
}

// NormsF16 is [Norms] for IEEE binary16 rows given as their bits in a
// []uint16: n = len(dst) rows of dim elements, len(src) == n*dim.
func NormsF16(dst []float32, src []uint16, dim int) error {
	return normsTyped(dst, src, F16, dim, true)
}

// SquaredNormsF16 is [SquaredNorms] for binary16 rows given as a []uint16.
func SquaredNormsF16(dst []float32, src []uint16, dim int) error {
	return normsTyped(dst, src, F16, dim, false)
}

// NormsBF16 is [Norms] for bfloat16 rows given as their bits in a []uint16:
// n = len(dst) rows of dim elements, len(src) == n*dim.
func NormsBF16(dst []float32, src []uint16, dim int) error {
	return normsTyped(dst, src, BF16, dim, true)
}

// SquaredNormsBF16 is [SquaredNorms] for bfloat16 rows given as a []uint16.
func SquaredNormsBF16(dst []float32, src []uint16, dim int) error {
	return normsTyped(dst, src, BF16, dim, false)
}

func normsTyped[E float32 | uint16](dst []float32, src []E, dt DType, dim int, sqrt bool) error {
	if _, err := dt.RowBytes(dim); err != nil {
		return err
	}
	if hi, want := bits.Mul64(uint64(len(dst)), uint64(dim)); hi != 0 || want != uint64(len(src)) {
		return fmt.Errorf("%w: len(src)=%d is not n*dim=%d (n=%d, dim=%d, dtype=%v)",
			ErrShape, len(src), uint64(len(dst))*uint64(dim), len(dst), dim, dt)
	}
	if len(dst) == 0 {
		return nil
	}
	active.Load().norms[dt](dst, leBytes(src), dim, sqrt)
	return nil
}

// hostLittleEndian reports whether the typed slices' memory is already in
// the little-endian layout the kernels read.
var hostLittleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// leBytes returns the little-endian bytes of s: a view of the same memory on
// little-endian hosts, a converted copy on big-endian ones.
func leBytes[E float32 | uint16](s []E) []byte {
	size := int(unsafe.Sizeof(E(0)))
	if hostLittleEndian {
		return unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(s))), len(s)*size)
	}
	out := make([]byte, 0, len(s)*size)
	for _, v := range s {
		switch v := any(v).(type) {
		case float32:
			out = binary.LittleEndian.AppendUint32(out, math.Float32bits(v))
		case uint16:
			out = binary.LittleEndian.AppendUint16(out, v)
		}
	}
	return out
}
