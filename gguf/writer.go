package gguf

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
)

// MaxNameLen is the longest tensor name ggml accepts (its name buffer holds
// 64 bytes including the terminating NUL). [Writer.AddTensor] enforces it;
// [Read] accepts longer names.
const MaxNameLen = 63

// Writer builds a GGUF version 3 file in memory and writes it out. Metadata
// keys and tensors are written in the order they were first added, so the
// output is deterministic. The zero value is not usable; call [NewWriter].
type Writer struct {
	kvs     []KV
	kvIndex map[string]int
	tensors []writerTensor
	tIndex  map[string]int
}

type writerTensor struct {
	info TensorInfo
	data []byte
	// gen, when set, produces the data at write time (see AddTensorFunc).
	gen func() ([]byte, error)
}

// NewWriter returns an empty Writer.
func NewWriter() *Writer {
	return &Writer{kvIndex: map[string]int{}, tIndex: map[string]int{}}
}

// Set sets a metadata key to value, which must have one of the Go types
// listed in [KV]. Setting an existing key replaces its value in place. The
// writer keeps slices as given: do not modify them before writing.
func (w *Writer) Set(key string, value any) error {
	if _, _, ok := valueTypeOf(value); !ok {
		return fmt.Errorf("%w: key %q: GGUF cannot store a %T", ErrInvalid, key, value)
	}
	if i, ok := w.kvIndex[key]; ok {
		w.kvs[i].Value = value
		return nil
	}
	w.kvIndex[key] = len(w.kvs)
	w.kvs = append(w.kvs, KV{Key: key, Value: value})
	return nil
}

// set is Set for values whose type is known to be valid.
func (w *Writer) set(key string, value any) {
	if err := w.Set(key, value); err != nil {
		panic(err) // unreachable: callers pass GGUF types
	}
}

// SetUint8 sets a uint8 metadata value.
func (w *Writer) SetUint8(key string, v uint8) { w.set(key, v) }

// SetInt8 sets an int8 metadata value.
func (w *Writer) SetInt8(key string, v int8) { w.set(key, v) }

// SetUint16 sets a uint16 metadata value.
func (w *Writer) SetUint16(key string, v uint16) { w.set(key, v) }

// SetInt16 sets an int16 metadata value.
func (w *Writer) SetInt16(key string, v int16) { w.set(key, v) }

// SetUint32 sets a uint32 metadata value.
func (w *Writer) SetUint32(key string, v uint32) { w.set(key, v) }

// SetInt32 sets an int32 metadata value.
func (w *Writer) SetInt32(key string, v int32) { w.set(key, v) }

// SetUint64 sets a uint64 metadata value.
func (w *Writer) SetUint64(key string, v uint64) { w.set(key, v) }

// SetInt64 sets an int64 metadata value.
func (w *Writer) SetInt64(key string, v int64) { w.set(key, v) }

// SetFloat32 sets a float32 metadata value.
func (w *Writer) SetFloat32(key string, v float32) { w.set(key, v) }

// SetFloat64 sets a float64 metadata value.
func (w *Writer) SetFloat64(key string, v float64) { w.set(key, v) }

// SetBool sets a bool metadata value.
func (w *Writer) SetBool(key string, v bool) { w.set(key, v) }

// SetString sets a string metadata value.
func (w *Writer) SetString(key, v string) { w.set(key, v) }

// SetStrings sets a string array metadata value.
func (w *Writer) SetStrings(key string, v []string) { w.set(key, v) }

// SetFloat32s sets a float32 array metadata value.
func (w *Writer) SetFloat32s(key string, v []float32) { w.set(key, v) }

// SetInt32s sets an int32 array metadata value.
func (w *Writer) SetInt32s(key string, v []int32) { w.set(key, v) }

// SetUint32s sets a uint32 array metadata value.
func (w *Writer) SetUint32s(key string, v []uint32) { w.set(key, v) }

// SetAlignment sets general.alignment, the alignment of tensor data, which
// must be a power of two. Without it the alignment is [DefaultAlignment].
func (w *Writer) SetAlignment(a uint32) error {
	if a == 0 || a&(a-1) != 0 {
		return fmt.Errorf("%w: alignment %d is not a power of two", ErrInvalid, a)
	}
	w.SetUint32(KeyAlignment, a)
	return nil
}

// KVs returns the metadata pairs set so far, in output order.
func (w *Writer) KVs() []KV { return append([]KV(nil), w.kvs...) }

// AddTensor adds a tensor. dims are in ggml order, innermost first (a
// row-major [rows][cols] matrix has dims {cols, rows}); at most [MaxDims].
// data must hold exactly the bytes of a tensor of that type and shape (see
// [TensorType.ByteSize] and [Quantize]); the writer keeps it as given until
// written. The name must be new, non-empty and at most [MaxNameLen] bytes.
func (w *Writer) AddTensor(name string, typ TensorType, dims []uint64, data []byte) error {
	size, err := w.checkTensor(name, typ, dims)
	if err != nil {
		return err
	}
	if uint64(len(data)) != size {
		return fmt.Errorf("%w: tensor %q: %d bytes of data, want %d for %s %v",
			ErrInvalid, name, len(data), size, typ, dims)
	}
	w.addTensor(name, typ, dims, size, data, nil)
	return nil
}

// AddTensorFunc adds a tensor whose data gen produces when the file is
// written, so a large file (a synthetic model, say) never has all its
// tensors in memory at once. gen must return exactly the tensor's bytes.
func (w *Writer) AddTensorFunc(name string, typ TensorType, dims []uint64, gen func() ([]byte, error)) error {
	size, err := w.checkTensor(name, typ, dims)
	if err != nil {
		return err
	}
	if gen == nil {
		return fmt.Errorf("%w: tensor %q: nil data function", ErrInvalid, name)
	}
	w.addTensor(name, typ, dims, size, nil, gen)
	return nil
}

func (w *Writer) addTensor(name string, typ TensorType, dims []uint64, size uint64, data []byte, gen func() ([]byte, error)) {
	w.tIndex[name] = len(w.tensors)
	w.tensors = append(w.tensors, writerTensor{
		info: TensorInfo{Name: name, Type: typ, Dims: append([]uint64(nil), dims...), Size: size},
		data: data,
		gen:  gen,
	})
}

// checkTensor validates a new tensor's name and shape and returns its size.
func (w *Writer) checkTensor(name string, typ TensorType, dims []uint64) (uint64, error) {
	switch {
	case name == "":
		return 0, fmt.Errorf("%w: empty tensor name", ErrInvalid)
	case len(name) > MaxNameLen:
		return 0, fmt.Errorf("%w: tensor %q: name longer than %d bytes", ErrInvalid, name, MaxNameLen)
	}
	if _, dup := w.tIndex[name]; dup {
		return 0, fmt.Errorf("%w: tensor %q added twice", ErrInvalid, name)
	}
	size, err := typ.ByteSize(dims)
	if err != nil {
		return 0, fmt.Errorf("%w: tensor %q: %w", ErrInvalid, name, err)
	}
	return size, nil
}

// AddFloat32s quantizes values to typ with [Quantize] and adds the tensor.
func (w *Writer) AddFloat32s(name string, typ TensorType, dims []uint64, values []float32) error {
	data, err := Quantize(typ, values)
	if err != nil {
		return fmt.Errorf("tensor %q: %w", name, err)
	}
	return w.AddTensor(name, typ, dims, data)
}

// Tensors returns the descriptors of the tensors added so far, with the
// offsets they will have in the output.
func (w *Writer) Tensors() []TensorInfo {
	a, _ := w.alignment()
	out := make([]TensorInfo, len(w.tensors))
	var off uint64
	for i, t := range w.tensors {
		out[i] = t.info
		out[i].Dims = append([]uint64(nil), t.info.Dims...)
		out[i].Offset = off
		off += pad(t.info.Size, uint64(a))
	}
	return out
}

func (w *Writer) alignment() (uint32, error) {
	i, ok := w.kvIndex[KeyAlignment]
	if !ok {
		return DefaultAlignment, nil
	}
	a, ok := w.kvs[i].Value.(uint32)
	if !ok {
		return DefaultAlignment, fmt.Errorf("%w: %s is %s, want uint32", ErrInvalid, KeyAlignment, describe(w.kvs[i].Value))
	}
	if a == 0 || a&(a-1) != 0 {
		return DefaultAlignment, fmt.Errorf("%w: %s %d is not a power of two", ErrInvalid, KeyAlignment, a)
	}
	return a, nil
}

// pad rounds n up to a multiple of a, a power of two.
func pad(n, a uint64) uint64 { return (n + a - 1) &^ (a - 1) }

// WriteTo writes the file to out and returns the number of bytes written.
// Each tensor's data starts at an aligned offset and is followed by zero
// padding up to the next multiple of the alignment.
func (w *Writer) WriteTo(out io.Writer) (int64, error) {
	a, err := w.alignment()
	if err != nil {
		return 0, err
	}
	e := &encoder{w: bufio.NewWriterSize(out, 1<<16)}
	e.raw([]byte(Magic))
	e.u32(Version)
	e.u64(uint64(len(w.tensors)))
	e.u64(uint64(len(w.kvs)))
	for _, kv := range w.kvs {
		e.str(kv.Key)
		e.value(kv.Value)
	}
	for _, t := range w.Tensors() {
		e.str(t.Name)
		e.u32(uint32(len(t.Dims)))
		for _, d := range t.Dims {
			e.u64(d)
		}
		e.u32(uint32(t.Type))
		e.u64(t.Offset)
	}
	e.pad(uint64(a))
	for _, t := range w.tensors {
		data := t.data
		if t.gen != nil && e.err == nil {
			if data, err = t.gen(); err != nil {
				return e.n, fmt.Errorf("tensor %q: %w", t.info.Name, err)
			}
			if uint64(len(data)) != t.info.Size {
				return e.n, fmt.Errorf("%w: tensor %q: generated %d bytes, want %d", ErrInvalid, t.info.Name, len(data), t.info.Size)
			}
		}
		e.raw(data)
		e.pad(uint64(a))
	}
	if e.err == nil {
		e.err = e.w.Flush()
	}
	return e.n, e.err
}

// WriteFile writes the file to path, replacing it. On error the partial file
// is removed.
func (w *Writer) WriteFile(path string) (err error) {
	fd, err := os.Create(path)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := fd.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
		}
	}()
	_, err = w.WriteTo(fd)
	return err
}

// encoder writes little-endian values, keeping the first error.
type encoder struct {
	w   *bufio.Writer
	n   int64
	err error
	buf [8]byte
}

func (e *encoder) raw(b []byte) {
	if e.err != nil {
		return
	}
	n, err := e.w.Write(b)
	e.n += int64(n)
	e.err = err
}

func (e *encoder) u8(v uint8) { e.raw([]byte{v}) }

func (e *encoder) u16(v uint16) {
	binary.LittleEndian.PutUint16(e.buf[:], v)
	e.raw(e.buf[:2])
}

func (e *encoder) u32(v uint32) {
	binary.LittleEndian.PutUint32(e.buf[:], v)
	e.raw(e.buf[:4])
}

func (e *encoder) u64(v uint64) {
	binary.LittleEndian.PutUint64(e.buf[:], v)
	e.raw(e.buf[:8])
}

func (e *encoder) str(s string) {
	e.u64(uint64(len(s)))
	if e.err == nil {
		n, err := e.w.WriteString(s)
		e.n += int64(n)
		e.err = err
	}
}

func (e *encoder) pad(a uint64) {
	var zeros [64]byte
	for r := pad(uint64(e.n), a) - uint64(e.n); r > 0 && e.err == nil; {
		k := min(r, uint64(len(zeros)))
		e.raw(zeros[:k])
		r -= k
	}
}

func b2u(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// value writes the type code(s) and the encoding of a value of a GGUF Go type.
func (e *encoder) value(v any) {
	typ, elem, ok := valueTypeOf(v)
	if !ok {
		if e.err == nil {
			e.err = errors.New("gguf: internal error: unsupported value type")
		}
		return
	}
	e.u32(uint32(typ))
	if typ == TypeArray {
		e.u32(uint32(elem))
	}
	switch x := v.(type) {
	case uint8:
		e.u8(x)
	case int8:
		e.u8(uint8(x))
	case uint16:
		e.u16(x)
	case int16:
		e.u16(uint16(x))
	case uint32:
		e.u32(x)
	case int32:
		e.u32(uint32(x))
	case float32:
		e.u32(math.Float32bits(x))
	case bool:
		e.u8(b2u(x))
	case string:
		e.str(x)
	case uint64:
		e.u64(x)
	case int64:
		e.u64(uint64(x))
	case float64:
		e.u64(math.Float64bits(x))
	case []uint8:
		e.u64(uint64(len(x)))
		e.raw(x)
	case []int8:
		writeArray(e, x, func(v int8) { e.u8(uint8(v)) })
	case []uint16:
		writeArray(e, x, e.u16)
	case []int16:
		writeArray(e, x, func(v int16) { e.u16(uint16(v)) })
	case []uint32:
		writeArray(e, x, e.u32)
	case []int32:
		writeArray(e, x, func(v int32) { e.u32(uint32(v)) })
	case []float32:
		writeArray(e, x, func(v float32) { e.u32(math.Float32bits(v)) })
	case []bool:
		writeArray(e, x, func(v bool) { e.u8(b2u(v)) })
	case []string:
		writeArray(e, x, e.str)
	case []uint64:
		writeArray(e, x, e.u64)
	case []int64:
		writeArray(e, x, func(v int64) { e.u64(uint64(v)) })
	case []float64:
		writeArray(e, x, func(v float64) { e.u64(math.Float64bits(v)) })
	}
}

func writeArray[T any](e *encoder, xs []T, put func(T)) {
	e.u64(uint64(len(xs)))
	for _, x := range xs {
		put(x)
	}
}
