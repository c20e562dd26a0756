package gguf

import (
	"errors"
	"fmt"
)

// Errors wrapped by this package. Use errors.Is to test for them.
var (
	// ErrFormat marks a malformed file: bad magic, an unknown type code, an
	// impossible count or dimension, a duplicate key or tensor, a misaligned
	// offset.
	ErrFormat = errors.New("gguf: malformed file")
	// ErrTruncated marks a file that ends before something it declares: a
	// string, an array, a tensor descriptor or tensor data. Every error that
	// wraps ErrTruncated also matches ErrFormat.
	ErrTruncated error = &subError{"gguf: truncated file", ErrFormat}
	// ErrUnsupported marks a well-formed file or request this package does not
	// handle: another GGUF version, or dequantising a tensor type that
	// [Dequantize] does not know.
	ErrUnsupported = errors.New("gguf: unsupported")
	// ErrNotFound marks a metadata key or tensor name absent from a file.
	ErrNotFound = errors.New("gguf: not found")
	// ErrType marks a metadata value of another type than the one asked for.
	ErrType = errors.New("gguf: wrong value type")
	// ErrInvalid marks an invalid argument given to a [Writer] or to
	// [Quantize].
	ErrInvalid = errors.New("gguf: invalid argument")
)

// subError is a sentinel error that also matches a more general one.
type subError struct {
	msg    string
	parent error
}

func (e *subError) Error() string        { return e.msg }
func (e *subError) Is(target error) bool { return target == e.parent }

// Magic is the four bytes every GGUF file starts with.
const Magic = "GGUF"

// Version is the GGUF version this package writes. [Read] also accepts
// version 2, whose layout is identical for little-endian files.
const Version = 3

// DefaultAlignment is the alignment of tensor data when the file has no
// general.alignment key.
const DefaultAlignment = 32

// KeyAlignment is the metadata key holding the tensor data alignment (uint32).
const KeyAlignment = "general.alignment"

// MaxDims is the largest number of dimensions a tensor may have.
const MaxDims = 4

// ValueType is the type code of a metadata value.
type ValueType uint32

// Metadata value types, with the Go type that carries each in [KV.Value].
const (
	TypeUint8   ValueType = 0  // uint8
	TypeInt8    ValueType = 1  // int8
	TypeUint16  ValueType = 2  // uint16
	TypeInt16   ValueType = 3  // int16
	TypeUint32  ValueType = 4  // uint32
	TypeInt32   ValueType = 5  // int32
	TypeFloat32 ValueType = 6  // float32
	TypeBool    ValueType = 7  // bool
	TypeString  ValueType = 8  // string
	TypeArray   ValueType = 9  // a slice of one of the other types, never of arrays
	TypeUint64  ValueType = 10 // uint64
	TypeInt64   ValueType = 11 // int64
	TypeFloat64 ValueType = 12 // float64
)

var valueTypeNames = [...]string{
	"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool",
	"string", "array", "uint64", "int64", "float64",
}

// String returns the GGUF name of the type, such as "uint32".
func (t ValueType) String() string {
	if int(t) < len(valueTypeNames) {
		return valueTypeNames[t]
	}
	return fmt.Sprintf("ValueType(%d)", uint32(t))
}

// valid reports whether t is a known type code.
func (t ValueType) valid() bool { return t <= TypeFloat64 }

// size is the encoded size of a scalar of type t, or 0 for string and array.
func (t ValueType) size() int {
	switch t {
	case TypeUint8, TypeInt8, TypeBool:
		return 1
	case TypeUint16, TypeInt16:
		return 2
	case TypeUint32, TypeInt32, TypeFloat32:
		return 4
	case TypeUint64, TypeInt64, TypeFloat64:
		return 8
	}
	return 0
}

// minSize is the smallest encoded size of one value of type t: strings need
// their 8-byte length, arrays their element type and count.
func (t ValueType) minSize() int {
	switch t {
	case TypeString:
		return 8
	case TypeArray:
		return 12
	}
	return t.size()
}

// TensorType is the ggml element type of a tensor.
type TensorType uint32

// Tensor element types. [Quantize] and [Dequantize] handle F32, F16, BF16,
// Q8_0 and Q4_0; the others can be read and written as raw bytes. Codes 4, 5
// and 31 to 38 were removed from ggml and are rejected.
const (
	F32     TensorType = 0
	F16     TensorType = 1
	Q4_0    TensorType = 2
	Q4_1    TensorType = 3
	Q5_0    TensorType = 6
	Q5_1    TensorType = 7
	Q8_0    TensorType = 8
	Q8_1    TensorType = 9
	Q2_K    TensorType = 10
	Q3_K    TensorType = 11
	Q4_K    TensorType = 12
	Q5_K    TensorType = 13
	Q6_K    TensorType = 14
	Q8_K    TensorType = 15
	IQ2_XXS TensorType = 16
	IQ2_XS  TensorType = 17
	IQ3_XXS TensorType = 18
	IQ1_S   TensorType = 19
	IQ4_NL  TensorType = 20
	IQ3_S   TensorType = 21
	IQ2_S   TensorType = 22
	IQ4_XS  TensorType = 23
	I8      TensorType = 24
	I16     TensorType = 25
	I32     TensorType = 26
	I64     TensorType = 27
	F64     TensorType = 28
	IQ1_M   TensorType = 29
	BF16    TensorType = 30
	TQ1_0   TensorType = 34
	TQ2_0   TensorType = 35
	MXFP4   TensorType = 39
)

// typeTraits gives, per tensor type, the name, the elements per block and the
// bytes per block. Block sizes follow the block layouts of ggml (32 elements
// for the legacy quantisations, 256 for the K and most IQ ones).
type typeTraits struct {
	name      string
	blockSize uint64
	typeSize  uint64
}

var tensorTraits = map[TensorType]typeTraits{
	F32:     {"F32", 1, 4},
	F16:     {"F16", 1, 2},
	Q4_0:    {"Q4_0", 32, 18},
	Q4_1:    {"Q4_1", 32, 20},
	Q5_0:    {"Q5_0", 32, 22},
	Q5_1:    {"Q5_1", 32, 24},
	Q8_0:    {"Q8_0", 32, 34},
	Q8_1:    {"Q8_1", 32, 36},
	Q2_K:    {"Q2_K", 256, 84},
	Q3_K:    {"Q3_K", 256, 110},
	Q4_K:    {"Q4_K", 256, 144},
	Q5_K:    {"Q5_K", 256, 176},
	Q6_K:    {"Q6_K", 256, 210},
	Q8_K:    {"Q8_K", 256, 292},
	IQ2_XXS: {"IQ2_XXS", 256, 66},
	IQ2_XS:  {"IQ2_XS", 256, 74},
	IQ3_XXS: {"IQ3_XXS", 256, 98},
	IQ1_S:   {"IQ1_S", 256, 50},
	IQ4_NL:  {"IQ4_NL", 32, 18},
	IQ3_S:   {"IQ3_S", 256, 110},
	IQ2_S:   {"IQ2_S", 256, 82},
	IQ4_XS:  {"IQ4_XS", 256, 136},
	I8:      {"I8", 1, 1},
	I16:     {"I16", 1, 2},
	I32:     {"I32", 1, 4},
	I64:     {"I64", 1, 8},
	F64:     {"F64", 1, 8},
	IQ1_M:   {"IQ1_M", 256, 56},
	BF16:    {"BF16", 1, 2},
	TQ1_0:   {"TQ1_0", 256, 54},
	TQ2_0:   {"TQ2_0", 256, 66},
	MXFP4:   {"MXFP4", 32, 17},
}

// Valid reports whether t is a tensor type known to this package.
func (t TensorType) Valid() bool {
	_, ok := tensorTraits[t]
	return ok
}

// String returns the ggml name of the type, such as "Q8_0".
func (t TensorType) String() string {
	if tr, ok := tensorTraits[t]; ok {
		return tr.name
	}
	return fmt.Sprintf("TensorType(%d)", uint32(t))
}

// BlockSize returns the number of elements in one block of type t (1 for
// plain types, 32 or 256 for quantised ones), or 0 for an unknown type.
func (t TensorType) BlockSize() uint64 { return tensorTraits[t].blockSize }

// TypeSize returns the number of bytes of one block of type t, or 0 for an
// unknown type.
func (t TensorType) TypeSize() uint64 { return tensorTraits[t].typeSize }

// ByteSize returns the number of bytes of a tensor of type t with the given
// dimensions (ggml order, innermost first). It fails with ErrFormat for an
// unknown type, more than [MaxDims] dimensions, an innermost dimension that
// is not a multiple of the block size, or an element count or byte size that
// does not fit in an int64.
func (t TensorType) ByteSize(dims []uint64) (uint64, error) {
	tr, ok := tensorTraits[t]
	if !ok {
		return 0, fmt.Errorf("%w: unknown tensor type %d", ErrFormat, uint32(t))
	}
	if len(dims) > MaxDims {
		return 0, fmt.Errorf("%w: %d dimensions, want at most %d", ErrFormat, len(dims), MaxDims)
	}
	const maxInt64 = 1<<63 - 1
	n := uint64(1)
	for _, d := range dims {
		if d > maxInt64 {
			return 0, fmt.Errorf("%w: dimension %d too large", ErrFormat, d)
		}
		if d != 0 && n > maxInt64/d {
			return 0, fmt.Errorf("%w: dimensions %v: element count overflows int64", ErrFormat, dims)
		}
		n *= d
	}
	row := uint64(1) // a tensor without dimensions is a scalar
	if len(dims) > 0 {
		row = dims[0]
	}
	if row%tr.blockSize != 0 {
		return 0, fmt.Errorf("%w: type %s: row of %d elements is not a multiple of the block size %d",
			ErrFormat, tr.name, row, tr.blockSize)
	}
	blocks := n / tr.blockSize
	if blocks != 0 && tr.typeSize > maxInt64/blocks {
		return 0, fmt.Errorf("%w: dimensions %v of type %s: byte size overflows int64", ErrFormat, dims, tr.name)
	}
	return blocks * tr.typeSize, nil
}

// KV is one metadata key/value pair. Value holds one of uint8, int8, uint16,
// int16, uint32, int32, uint64, int64, float32, float64, bool, string, or a
// slice of one of those.
type KV struct {
	Key   string
	Value any
}

// Type returns the GGUF type of the value, and for arrays the element type.
// ok is false when Value holds a Go type GGUF cannot represent.
func (kv KV) Type() (typ, elem ValueType, ok bool) { return valueTypeOf(kv.Value) }

func valueTypeOf(v any) (typ, elem ValueType, ok bool) {
	switch v.(type) {
	case uint8:
		return TypeUint8, 0, true
	case int8:
		return TypeInt8, 0, true
	case uint16:
		return TypeUint16, 0, true
	case int16:
		return TypeInt16, 0, true
	case uint32:
		return TypeUint32, 0, true
	case int32:
		return TypeInt32, 0, true
	case float32:
		return TypeFloat32, 0, true
	case bool:
		return TypeBool, 0, true
	case string:
		return TypeString, 0, true
	case uint64:
		return TypeUint64, 0, true
	case int64:
		return TypeInt64, 0, true
	case float64:
		return TypeFloat64, 0, true
	case []uint8:
		return TypeArray, TypeUint8, true
	case []int8:
		return TypeArray, TypeInt8, true
	case []uint16:
		return TypeArray, TypeUint16, true
	case []int16:
		return TypeArray, TypeInt16, true
	case []uint32:
		return TypeArray, TypeUint32, true
	case []int32:
		return TypeArray, TypeInt32, true
	case []float32:
		return TypeArray, TypeFloat32, true
	case []bool:
		return TypeArray, TypeBool, true
	case []string:
		return TypeArray, TypeString, true
	case []uint64:
		return TypeArray, TypeUint64, true
	case []int64:
		return TypeArray, TypeInt64, true
	case []float64:
		return TypeArray, TypeFloat64, true
	}
	return 0, 0, false
}

// TensorInfo describes one tensor of a file.
type TensorInfo struct {
	// Name is the tensor name, such as "blk.0.attn_q.weight".
	Name string
	// Type is the element type.
	Type TensorType
	// Dims are the dimensions in ggml order: Dims[0] is the innermost
	// (contiguous) one, so a row-major [rows][cols] matrix has Dims
	// {cols, rows}.
	Dims []uint64
	// Offset is the offset of the data relative to the start of the data
	// section; it is a multiple of the file's alignment.
	Offset uint64
	// Size is the number of bytes of data.
	Size uint64
}

// Elements returns the number of elements, the product of Dims.
func (t TensorInfo) Elements() uint64 {
	n := uint64(1)
	for _, d := range t.Dims {
		n *= d
	}
	return n
}
