package kernels

import (
	"errors"
	"fmt"
	"math"
	"strings"
)

// ErrShape is wrapped by every error about a length, a count or a dimension
// that does not fit the data it describes.
var ErrShape = errors.New("kernels: bad shape")

// ErrDType is wrapped by every error about an unknown or unsupported element
// type.
var ErrDType = errors.New("kernels: bad dtype")

// ErrImpl is wrapped by the error [UseImpl] returns for an unknown
// implementation or one this CPU cannot run.
var ErrImpl = errors.New("kernels: unknown or unavailable implementation")

// DType is the element type of a key-cache row.
type DType uint8

const (
	// F32 is IEEE 754 binary32, 4 bytes per element.
	F32 DType = iota
	// F16 is IEEE 754 binary16, 2 bytes per element.
	F16
	// BF16 is bfloat16 (the upper half of a binary32), 2 bytes per element.
	BF16
	// Q8_0 is ggml's 8-bit block quantisation: blocks of 32 elements, each
	// stored as an F16 scale d followed by 32 int8 values q, the element
	// value being d*q; 34 bytes per block.
	Q8_0
)

// Q8_0BlockSize is the number of elements in one Q8_0 block.
const Q8_0BlockSize = 32

// q8_0BlockBytes is the size of one Q8_0 block: the f16 scale, then 32 int8.
const q8_0BlockBytes = 2 + Q8_0BlockSize

var dtypeNames = [...]string{F32: "f32", F16: "f16", BF16: "bf16", Q8_0: "q8_0"}

// String returns the lower-case name of d ("f32", "f16", "bf16", "q8_0"), or
// "dtype(N)" for a value that is not a known DType.
func (d DType) String() string {
	if int(d) < len(dtypeNames) {
		return dtypeNames[d]
	}
	return fmt.Sprintf("dtype(%d)", uint8(d))
}

// ParseDType returns the DType named s, ignoring case: "f32", "f16", "bf16"
// or "q8_0". The error for any other string wraps [ErrDType] and quotes s.
func ParseDType(s string) (DType, error) {
	for i, name := range dtypeNames {
		if strings.EqualFold(s, name) {
			return DType(i), nil
		}
	}
	return 0, fmt.Errorf("%w: unknown dtype %q (want f32, f16, bf16 or q8_0)", ErrDType, s)
}

// RowBytes returns the size in bytes of one row of dim elements of type d.
// dim must be non-negative and, for Q8_0, a multiple of 32.
func (d DType) RowBytes(dim int) (int, error) {
	if dim < 0 {
		return 0, fmt.Errorf("%w: dim=%d is negative (dtype=%v)", ErrShape, dim, d)
	}
	if dim > math.MaxInt/4 { // keeps 4*dim and 34*dim/32 inside an int
		return 0, fmt.Errorf("%w: dim=%d is too large (dtype=%v)", ErrShape, dim, d)
	}
	switch d {
	case F32:
		return 4 * dim, nil
	case F16, BF16:
		return 2 * dim, nil
	case Q8_0:
		if dim%Q8_0BlockSize != 0 {
			return 0, fmt.Errorf("%w: dim=%d is not a multiple of %d (dtype=q8_0)", ErrShape, dim, Q8_0BlockSize)
		}
		return dim / Q8_0BlockSize * q8_0BlockBytes, nil
	}
	return 0, fmt.Errorf("%w: unknown dtype %d", ErrDType, uint8(d))
}
