package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
)

// Smallest encoded sizes, used to bound counts before allocating.
const (
	headerSize     = 4 + 4 + 8 + 8 // magic, version, tensor count, metadata count
	minKVSize      = 8 + 4 + 1     // empty key, type, one-byte value
	minTensorSize  = 8 + 4 + 4 + 8 // empty name, n_dims = 0, type, offset
	maxInt64       = 1<<63 - 1
	readBufferSize = 64 << 10
)

// File is a parsed GGUF file: its metadata and tensor descriptors. Tensor
// data stays in the underlying reader and is read on demand.
type File struct {
	// Version is the GGUF version of the file (2 or 3).
	Version uint32
	// Alignment is the tensor data alignment (general.alignment or 32).
	Alignment uint32
	// KVs are the metadata pairs in file order.
	KVs []KV
	// Tensors are the tensor descriptors in file order.
	Tensors []TensorInfo
	// DataOffset is the absolute file offset of the tensor data section.
	DataOffset int64
	// Size is the size of the file in bytes.
	Size int64

	r       io.ReaderAt
	closer  io.Closer
	kvIndex map[string]int
	tIndex  map[string]int
}

// Open opens and parses the GGUF file at path. The file stays open for
// [File.TensorData] until [File.Close].
func Open(path string) (*File, error) {
	fd, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := fd.Stat()
	if err != nil {
		fd.Close()
		return nil, err
	}
	f, err := Read(fd, st.Size())
	if err != nil {
		fd.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	f.closer = fd
	return f, nil
}

// Close closes the file opened by [Open]. It does nothing for a File made
// by [Read]. It is safe to call more than once.
func (f *File) Close() error {
	c := f.closer
	f.closer = nil
	if c == nil {
		return nil
	}
	return c.Close()
}

// Read parses a GGUF file of size bytes from r. It validates the whole
// structure (header, metadata, tensor descriptors, alignment, and that every
// tensor's data lies within size and does not overlap another) without
// reading tensor data. Errors wrap ErrFormat (ErrTruncated is a kind of
// ErrFormat), ErrUnsupported, or the reader's own error.
func Read(r io.ReaderAt, size int64) (*File, error) {
	if size < 0 {
		return nil, fmt.Errorf("%w: negative size %d", ErrInvalid, size)
	}
	d := &decoder{
		r:    bufio.NewReaderSize(io.NewSectionReader(r, 0, size), readBufferSize),
		size: size,
	}
	f := &File{r: r, Size: size, kvIndex: map[string]int{}, tIndex: map[string]int{}}
	if err := d.header(f); err != nil {
		return nil, err
	}
	return f, nil
}

// decoder reads the metadata part of a file sequentially, tracking the
// position to bound every length by the bytes that remain.
type decoder struct {
	r    *bufio.Reader
	pos  int64
	size int64
	buf  [8]byte
}

func (d *decoder) remaining() int64 { return d.size - d.pos }

// bytes reads n ≤ 8 bytes into d.buf.
func (d *decoder) bytes(n int, what func() string) ([]byte, error) {
	if int64(n) > d.remaining() {
		return nil, fmt.Errorf("%w: %s: need %d bytes at offset %d, file size is %d",
			ErrTruncated, what(), n, d.pos, d.size)
	}
	b := d.buf[:n]
	if _, err := io.ReadFull(d.r, b); err != nil {
		return nil, fmt.Errorf("gguf: %s: reading at offset %d: %w", what(), d.pos, err)
	}
	d.pos += int64(n)
	return b, nil
}

func (d *decoder) u32(what func() string) (uint32, error) {
	b, err := d.bytes(4, what)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b), nil
}

func (d *decoder) u64(what func() string) (uint64, error) {
	b, err := d.bytes(8, what)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

// str reads a length-prefixed string, refusing lengths beyond the file.
func (d *decoder) str(what func() string) (string, error) {
	n, err := d.u64(what)
	if err != nil {
		return "", err
	}
	if n > uint64(d.remaining()) {
		return "", fmt.Errorf("%w: %s: string length %d at offset %d exceeds the %d bytes left in the file",
			ErrTruncated, what(), n, d.pos-8, d.remaining())
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(d.r, b); err != nil {
		return "", fmt.Errorf("gguf: %s: reading at offset %d: %w", what(), d.pos, err)
	}
	d.pos += int64(n)
	return string(b), nil
}

func (d *decoder) header(f *File) error {
	what := func() string { return "header" }
	b, err := d.bytes(4, what)
	if err != nil {
		return err
	}
	if string(b) != Magic {
		return fmt.Errorf("%w: bad magic %q, want %q", ErrFormat, b, Magic)
	}
	if f.Version, err = d.u32(what); err != nil {
		return err
	}
	switch f.Version {
	case 2, 3:
	case 0x02000000, 0x03000000:
		return fmt.Errorf("%w: version %d: big-endian GGUF files", ErrUnsupported, f.Version)
	default:
		return fmt.Errorf("%w: version %d (want 2 or 3)", ErrUnsupported, f.Version)
	}
	nTensors, err := d.u64(what)
	if err != nil {
		return err
	}
	nKV, err := d.u64(what)
	if err != nil {
		return err
	}
	rem := uint64(d.remaining())
	if nKV > rem/minKVSize {
		return fmt.Errorf("%w: metadata count %d: the %d bytes left in the file hold at most %d pairs",
			ErrTruncated, nKV, rem, rem/minKVSize)
	}
	if nTensors > rem/minTensorSize || nKV*minKVSize+nTensors*minTensorSize > rem {
		return fmt.Errorf("%w: tensor count %d with %d metadata pairs: the %d bytes left in the file are too few",
			ErrTruncated, nTensors, nKV, rem)
	}

	f.KVs = make([]KV, 0, nKV)
	for i := range nKV {
		if err := d.kv(f, i); err != nil {
			return err
		}
	}
	f.Alignment = DefaultAlignment
	if i, ok := f.kvIndex[KeyAlignment]; ok {
		a, ok := f.KVs[i].Value.(uint32)
		if !ok {
			return fmt.Errorf("%w: %s is %s, want uint32", ErrFormat, KeyAlignment, describe(f.KVs[i].Value))
		}
		if a == 0 || a&(a-1) != 0 {
			return fmt.Errorf("%w: %s %d is not a power of two", ErrFormat, KeyAlignment, a)
		}
		f.Alignment = a
	}

	rem = uint64(d.remaining())
	if nTensors > rem/minTensorSize {
		return fmt.Errorf("%w: tensor count %d: the %d bytes left in the file hold at most %d descriptors",
			ErrTruncated, nTensors, rem, rem/minTensorSize)
	}
	f.Tensors = make([]TensorInfo, 0, nTensors)
	for i := range nTensors {
		if err := d.tensorInfo(f, i); err != nil {
			return err
		}
	}

	// The data section starts at the next aligned offset.
	a := int64(f.Alignment)
	f.DataOffset = (d.pos + a - 1) / a * a
	if len(f.Tensors) == 0 {
		return nil
	}
	if f.DataOffset > d.size {
		return fmt.Errorf("%w: data section at offset %d beyond end of file (size %d)",
			ErrTruncated, f.DataOffset, d.size)
	}
	avail := uint64(d.size - f.DataOffset)
	for _, t := range f.Tensors {
		if t.Offset > avail || t.Size > avail-t.Offset {
			return fmt.Errorf("%w: tensor %q: data [offset %d, %d bytes) beyond end of file (size %d)",
				ErrTruncated, t.Name, uint64(f.DataOffset)+min(t.Offset, maxInt64), t.Size, d.size)
		}
	}
	// Tensor data must not overlap.
	order := make([]int, len(f.Tensors))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(i, j int) int {
		a, b := f.Tensors[i], f.Tensors[j]
		if a.Offset != b.Offset {
			if a.Offset < b.Offset {
				return -1
			}
			return 1
		}
		return i - j
	})
	var prev *TensorInfo
	for _, i := range order {
		t := &f.Tensors[i]
		if t.Size == 0 {
			continue
		}
		if prev != nil && t.Offset < prev.Offset+prev.Size {
			return fmt.Errorf("%w: tensor %q at data offset %d overlaps tensor %q [%d, %d)",
				ErrFormat, t.Name, t.Offset, prev.Name, prev.Offset, prev.Offset+prev.Size)
		}
		prev = t
	}
	return nil
}

func (d *decoder) kv(f *File, i uint64) error {
	key, err := d.str(func() string { return fmt.Sprintf("metadata pair %d: key", i) })
	if err != nil {
		return err
	}
	what := func() string { return fmt.Sprintf("key %q", key) }
	if _, dup := f.kvIndex[key]; dup {
		return fmt.Errorf("%w: %s: duplicate key", ErrFormat, what())
	}
	code, err := d.u32(what)
	if err != nil {
		return err
	}
	typ := ValueType(code)
	var v any
	if typ == TypeArray {
		v, err = d.array(what)
	} else {
		v, err = d.scalar(typ, what)
	}
	if err != nil {
		return err
	}
	f.kvIndex[key] = len(f.KVs)
	f.KVs = append(f.KVs, KV{Key: key, Value: v})
	return nil
}

func (d *decoder) scalar(typ ValueType, what func() string) (any, error) {
	if !typ.valid() {
		return nil, fmt.Errorf("%w: %s: unknown value type %d", ErrFormat, what(), uint32(typ))
	}
	if typ == TypeString {
		return d.str(what)
	}
	b, err := d.bytes(typ.size(), what)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	switch typ {
	case TypeUint8:
		return b[0], nil
	case TypeInt8:
		return int8(b[0]), nil
	case TypeUint16:
		return le.Uint16(b), nil
	case TypeInt16:
		return int16(le.Uint16(b)), nil
	case TypeUint32:
		return le.Uint32(b), nil
	case TypeInt32:
		return int32(le.Uint32(b)), nil
	case TypeFloat32:
		return math.Float32frombits(le.Uint32(b)), nil
	case TypeBool:
		if b[0] > 1 {
			return nil, fmt.Errorf("%w: %s: bool byte %d is neither 0 nor 1", ErrFormat, what(), b[0])
		}
		return b[0] == 1, nil
	case TypeUint64:
		return le.Uint64(b), nil
	case TypeInt64:
		return int64(le.Uint64(b)), nil
	case TypeFloat64:
		return math.Float64frombits(le.Uint64(b)), nil
	}
	panic("unreachable")
}

func (d *decoder) array(what func() string) (any, error) {
	code, err := d.u32(what)
	if err != nil {
		return nil, err
	}
	elem := ValueType(code)
	switch {
	case elem == TypeArray:
		return nil, fmt.Errorf("%w: %s: arrays of arrays", ErrUnsupported, what())
	case !elem.valid():
		return nil, fmt.Errorf("%w: %s: unknown array element type %d", ErrFormat, what(), code)
	}
	n, err := d.u64(what)
	if err != nil {
		return nil, err
	}
	if rem := uint64(d.remaining()); n > rem/uint64(elem.minSize()) {
		return nil, fmt.Errorf("%w: %s: array of %d %s at offset %d needs at least %d bytes, %d left in the file",
			ErrTruncated, what(), n, elem, d.pos-8, satMul(n, uint64(elem.minSize())), rem)
	}
	switch elem {
	case TypeUint8:
		return readArray(d, n, what, func(b []byte) uint8 { return b[0] })
	case TypeInt8:
		return readArray(d, n, what, func(b []byte) int8 { return int8(b[0]) })
	case TypeUint16:
		return readArray(d, n, what, binary.LittleEndian.Uint16)
	case TypeInt16:
		return readArray(d, n, what, func(b []byte) int16 { return int16(binary.LittleEndian.Uint16(b)) })
	case TypeUint32:
		return readArray(d, n, what, binary.LittleEndian.Uint32)
	case TypeInt32:
		return readArray(d, n, what, func(b []byte) int32 { return int32(binary.LittleEndian.Uint32(b)) })
	case TypeFloat32:
		return readArray(d, n, what, func(b []byte) float32 { return math.Float32frombits(binary.LittleEndian.Uint32(b)) })
	case TypeUint64:
		return readArray(d, n, what, binary.LittleEndian.Uint64)
	case TypeInt64:
		return readArray(d, n, what, func(b []byte) int64 { return int64(binary.LittleEndian.Uint64(b)) })
	case TypeFloat64:
		return readArray(d, n, what, func(b []byte) float64 { return math.Float64frombits(binary.LittleEndian.Uint64(b)) })
	case TypeBool:
		out := make([]bool, n)
		for j := range out {
			b, err := d.bytes(1, what)
			if err != nil {
				return nil, err
			}
			if b[0] > 1 {
				return nil, fmt.Errorf("%w: %s: element %d: bool byte %d is neither 0 nor 1", ErrFormat, what(), j, b[0])
			}
			out[j] = b[0] == 1
		}
		return out, nil
	case TypeString:
		out := make([]string, n)
		for j := range out {
			s, err := d.str(func() string { return fmt.Sprintf("%s: element %d", what(), j) })
			if err != nil {
				return nil, err
			}
			out[j] = s
		}
		return out, nil
	}
	panic("unreachable")
}

// readArray reads n fixed-size elements; the caller has checked that they fit
// in the file.
func readArray[T any](d *decoder, n uint64, what func() string, conv func([]byte) T) ([]T, error) {
	var zero T
	sz := binary.Size(zero)
	out := make([]T, n)
	for j := range out {
		b, err := d.bytes(sz, what)
		if err != nil {
			return nil, err
		}
		out[j] = conv(b)
	}
	return out, nil
}

func (d *decoder) tensorInfo(f *File, i uint64) error {
	name, err := d.str(func() string { return fmt.Sprintf("tensor %d: name", i) })
	if err != nil {
		return err
	}
	what := func() string { return fmt.Sprintf("tensor %q", name) }
	if _, dup := f.tIndex[name]; dup {
		return fmt.Errorf("%w: %s: duplicate tensor name", ErrFormat, what())
	}
	nDims, err := d.u32(what)
	if err != nil {
		return err
	}
	if nDims > MaxDims {
		return fmt.Errorf("%w: %s: %d dimensions, at most %d allowed", ErrFormat, what(), nDims, MaxDims)
	}
	dims := make([]uint64, nDims)
	for j := range dims {
		if dims[j], err = d.u64(what); err != nil {
			return err
		}
		if dims[j] > maxInt64 {
			return fmt.Errorf("%w: %s: dimension %d is %d, beyond int64", ErrFormat, what(), j, dims[j])
		}
	}
	code, err := d.u32(what)
	if err != nil {
		return err
	}
	typ := TensorType(code)
	if !typ.Valid() {
		return fmt.Errorf("%w: %s: unknown tensor type %d", ErrFormat, what(), code)
	}
	size, err := typ.ByteSize(dims)
	if err != nil {
		return fmt.Errorf("%s: %w", what(), err)
	}
	off, err := d.u64(what)
	if err != nil {
		return err
	}
	if off%uint64(f.Alignment) != 0 {
		return fmt.Errorf("%w: %s: data offset %d is not a multiple of the alignment %d",
			ErrFormat, what(), off, f.Alignment)
	}
	f.tIndex[name] = len(f.Tensors)
	f.Tensors = append(f.Tensors, TensorInfo{Name: name, Type: typ, Dims: dims, Offset: off, Size: size})
	return nil
}

// satMul multiplies, saturating at the largest uint64.
func satMul(a, b uint64) uint64 {
	if a != 0 && b > math.MaxUint64/a {
		return math.MaxUint64
	}
	return a * b
}

// Tensor returns the descriptor of the named tensor.
func (f *File) Tensor(name string) (TensorInfo, bool) {
	i, ok := f.tIndex[name]
	if !ok {
		return TensorInfo{}, false
	}
	return f.Tensors[i], true
}

// TensorData reads the raw bytes of the named tensor.
func (f *File) TensorData(name string) ([]byte, error) {
	t, ok := f.Tensor(name)
	if !ok {
		return nil, fmt.Errorf("%w: tensor %q", ErrNotFound, name)
	}
	b := make([]byte, t.Size) // bounded by the file size, checked in Read
	if t.Size == 0 {
		return b, nil
	}
	off := f.DataOffset + int64(t.Offset)
	n, err := f.r.ReadAt(b, off)
	if n == len(b) {
		return b, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = fmt.Errorf("%w: tensor %q: read %d of %d bytes at offset %d", ErrTruncated, name, n, len(b), off)
	}
	return nil, fmt.Errorf("gguf: tensor %q: %w", name, err)
}

// F32 reads the named tensor and converts it to float32 with [Dequantize]
// (F32, F16, BF16, Q8_0, Q4_0 and a few integer types).
func (f *File) F32(name string) ([]float32, error) {
	t, ok := f.Tensor(name)
	if !ok {
		return nil, fmt.Errorf("%w: tensor %q", ErrNotFound, name)
	}
	if _, err := Dequantize(t.Type, nil); err != nil {
		return nil, fmt.Errorf("tensor %q: %w", name, err)
	}
	b, err := f.TensorData(name)
	if err != nil {
		return nil, err
	}
	v, err := Dequantize(t.Type, b)
	if err != nil {
		return nil, fmt.Errorf("tensor %q: %w", name, err)
	}
	return v, nil
}

// Has reports whether the file has the metadata key.
func (f *File) Has(key string) bool {
	_, ok := f.kvIndex[key]
	return ok
}

// Value returns the value of a metadata key (see [KV] for its Go types).
func (f *File) Value(key string) (any, bool) {
	i, ok := f.kvIndex[key]
	if !ok {
		return nil, false
	}
	return f.KVs[i].Value, true
}

// Get returns the value of a metadata key as a T, which must be exactly the
// Go type of the stored value (see [KV]). It fails with ErrNotFound or
// ErrType, naming the key.
func Get[T any](f *File, key string) (T, error) {
	var zero T
	v, ok := f.Value(key)
	if !ok {
		return zero, fmt.Errorf("%w: key %q", ErrNotFound, key)
	}
	t, ok := v.(T)
	if !ok {
		return zero, fmt.Errorf("%w: key %q is %s, want %s", ErrType, key, describe(v), describe(zero))
	}
	return t, nil
}

// describe names the GGUF type of a Go value, such as "array of string".
func describe(v any) string {
	typ, elem, ok := valueTypeOf(v)
	switch {
	case !ok:
		return fmt.Sprintf("%T", v)
	case typ == TypeArray:
		return "array of " + elem.String()
	}
	return typ.String()
}

// String returns a string metadata value.
func (f *File) String(key string) (string, error) { return Get[string](f, key) }

// Bool returns a bool metadata value.
func (f *File) Bool(key string) (bool, error) { return Get[bool](f, key) }

// Uint32 returns a uint32 metadata value.
func (f *File) Uint32(key string) (uint32, error) { return Get[uint32](f, key) }

// Int32 returns an int32 metadata value.
func (f *File) Int32(key string) (int32, error) { return Get[int32](f, key) }

// Uint64 returns a uint64 metadata value.
func (f *File) Uint64(key string) (uint64, error) { return Get[uint64](f, key) }

// Int64 returns an int64 metadata value.
func (f *File) Int64(key string) (int64, error) { return Get[int64](f, key) }

// Float32 returns a float32 metadata value.
func (f *File) Float32(key string) (float32, error) { return Get[float32](f, key) }

// Float64 returns a float64 metadata value.
func (f *File) Float64(key string) (float64, error) { return Get[float64](f, key) }

// Strings returns a string array metadata value.
func (f *File) Strings(key string) ([]string, error) { return Get[[]string](f, key) }

// Float32s returns a float32 array metadata value.
func (f *File) Float32s(key string) ([]float32, error) { return Get[[]float32](f, key) }

// Int32s returns an int32 array metadata value.
func (f *File) Int32s(key string) ([]int32, error) { return Get[[]int32](f, key) }

// Uint32s returns a uint32 array metadata value.
func (f *File) Uint32s(key string) ([]uint32, error) { return Get[[]uint32](f, key) }

// Int returns an integer metadata value of any integer type (writers differ
// on uint32 versus uint64 and signedness) as an int64. It fails with ErrType
// for other types and for a uint64 beyond int64.
func (f *File) Int(key string) (int64, error) {
	v, ok := f.Value(key)
	if !ok {
		return 0, fmt.Errorf("%w: key %q", ErrNotFound, key)
	}
	switch x := v.(type) {
	case uint8:
		return int64(x), nil
	case int8:
		return int64(x), nil
	case uint16:
		return int64(x), nil
	case int16:
		return int64(x), nil
	case uint32:
		return int64(x), nil
	case int32:
		return int64(x), nil
	case int64:
		return x, nil
	case uint64:
		if x <= maxInt64 {
			return int64(x), nil
		}
		return 0, fmt.Errorf("%w: key %q: %d overflows int64", ErrType, key, x)
	}
	return 0, fmt.Errorf("%w: key %q is %s, want an integer", ErrType, key, describe(v))
}

// Float returns a float32 or float64 metadata value as a float64.
func (f *File) Float(key string) (float64, error) {
	v, ok := f.Value(key)
	if !ok {
		return 0, fmt.Errorf("%w: key %q", ErrNotFound, key)
	}
	switch x := v.(type) {
	case float32:
		return float64(x), nil
	case float64:
		return x, nil
	}
	return 0, fmt.Errorf("%w: key %q is %s, want a float", ErrType, key, describe(v))
}
