package gguf

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// allKVs has one metadata pair of every GGUF type.
func allKVs() []KV {
	return []KV{
		{"general.architecture", "llama"},
		{"t.u8", uint8(200)},
		{"t.i8", int8(-100)},
		{"t.u16", uint16(60000)},
		{"t.i16", int16(-30000)},
		{"t.u32", uint32(4000000000)},
		{"t.i32", int32(-2000000000)},
		{"t.u64", uint64(1) << 60},
		{"t.i64", int64(-1) << 60},
		{"t.f32", float32(1.5e-5)},
		{"t.f64", math.Pi},
		{"t.bool", true},
		{"t.empty", ""},
		{"t.utf8", "▁héllo\x00world"},
		{"a.u8", []uint8{1, 2, 3}},
		{"a.i8", []int8{-1, 2}},
		{"a.u16", []uint16{1, 65535}},
		{"a.i16", []int16{-32768, 5}},
		{"a.u32", []uint32{7}},
		{"a.i32", []int32{0, 1, 2, 6}},
		{"a.u64", []uint64{math.MaxUint64}},
		{"a.i64", []int64{math.MinInt64}},
		{"a.f32", []float32{-0.5, 3}},
		{"a.f64", []float64{math.Inf(1)}},
		{"a.bool", []bool{true, false, true}},
		{"a.str", []string{"<unk>", "", "▁the"}},
		{"a.empty", []string{}},
	}
}

func randFloats(r *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64())
	}
	return v
}

type testTensor struct {
	name string
	typ  TensorType
	dims []uint64
	vals []float32
}

func testTensors() []testTensor {
	r := rand.New(rand.NewPCG(1, 2))
	return []testTensor{
		{"f32", F32, []uint64{3, 5}, randFloats(r, 15)},
		{"f16", F16, []uint64{7}, randFloats(r, 7)},
		{"bf16", BF16, []uint64{2, 3, 4}, randFloats(r, 24)},
		{"q8_0", Q8_0, []uint64{64, 2}, randFloats(r, 128)},
		{"q4_0", Q4_0, []uint64{32, 1, 1, 3}, randFloats(r, 96)},
	}
}

// buildFile writes a file with allKVs and testTensors.
func buildFile(t testing.TB, alignment uint32) []byte {
	t.Helper()
	w := NewWriter()
	for _, kv := range allKVs() {
		require.NoError(t, w.Set(kv.Key, kv.Value))
	}
	if alignment != 0 {
		require.NoError(t, w.SetAlignment(alignment))
	}
	for _, tt := range testTensors() {
		require.NoError(t, w.AddFloat32s(tt.name, tt.typ, tt.dims, tt.vals))
	}
	var buf bytes.Buffer
	n, err := w.WriteTo(&buf)
	require.NoError(t, err)
	require.Equal(t, int64(buf.Len()), n)
	return buf.Bytes()
}

func TestRoundTrip(t *testing.T) {
	for _, align := range []uint32{0, 1, 8, 64, 4096} {
		t.Run("", func(t *testing.T) {
			data := buildFile(t, align)
			f, err := Read(bytes.NewReader(data), int64(len(data)))
			require.NoError(t, err)
			want := align
			if want == 0 {
				want = DefaultAlignment
			}
			assert.Equal(t, uint32(3), f.Version)
			assert.Equal(t, want, f.Alignment)
			assert.Zero(t, f.DataOffset%int64(want))

			kvs := allKVs()
			if align != 0 {
				kvs = append(kvs, KV{KeyAlignment, align})
			}
			assert.Equal(t, kvs, f.KVs)

			tts := testTensors()
			require.Len(t, f.Tensors, len(tts))
			for i, tt := range tts {
				info := f.Tensors[i]
				assert.Equal(t, tt.name, info.Name)
				assert.Equal(t, tt.typ, info.Type)
				assert.Equal(t, tt.dims, info.Dims)
				assert.Zero(t, info.Offset%uint64(want), "tensor %s offset %d", tt.name, info.Offset)
				assert.Equal(t, uint64(len(tt.vals)), info.Elements())

				raw, err := f.TensorData(tt.name)
				require.NoError(t, err)
				enc, err := Quantize(tt.typ, tt.vals)
				require.NoError(t, err)
				assert.Equal(t, enc, raw)

				got, err := f.F32(tt.name)
				require.NoError(t, err)
				require.Len(t, got, len(tt.vals))
				tol := map[TensorType]float64{F32: 0, F16: 1e-3, BF16: 1e-2, Q8_0: 0.02, Q4_0: 0.5}[tt.typ]
				for j := range got {
					assert.InDelta(t, tt.vals[j], got[j], tol*max(1, math.Abs(float64(tt.vals[j]))), "%s[%d]", tt.name, j)
				}
			}
		})
	}
}

func TestWriterDeterministicAndOrdered(t *testing.T) {
	a, b := buildFile(t, 0), buildFile(t, 0)
	assert.Equal(t, a, b)

	w := NewWriter()
	w.SetString("z", "first")
	w.SetUint32("a", 1)
	w.SetString("z", "replaced") // keeps its position
	var buf bytes.Buffer
	_, err := w.WriteTo(&buf)
	require.NoError(t, err)
	f, err := Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	require.NoError(t, err)
	assert.Equal(t, []KV{{"z", "replaced"}, {"a", uint32(1)}}, f.KVs)
}

func TestWriteFileAndOpen(t *testing.T) {
	w := NewWriter()
	w.SetString("general.name", "x")
	require.NoError(t, w.AddFloat32s("w", F32, []uint64{2, 2}, []float32{1, 2, 3, 4}))
	path := filepath.Join(t.TempDir(), "x.gguf")
	require.NoError(t, w.WriteFile(path))
	f, err := Open(path)
	require.NoError(t, err)
	defer f.Close()
	v, err := f.F32("w")
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 2, 3, 4}, v)
	assert.NoError(t, f.Close())
	assert.NoError(t, f.Close())

	_, err = Open(filepath.Join(t.TempDir(), "missing.gguf"))
	assert.Error(t, err)
}

func TestWriterErrors(t *testing.T) {
	w := NewWriter()
	assert.ErrorIs(t, w.Set("k", 3), ErrInvalid) // int is not a GGUF type
	assert.ErrorIs(t, w.Set("k", [][]string{}), ErrInvalid)
	assert.ErrorIs(t, w.SetAlignment(48), ErrInvalid)
	assert.ErrorIs(t, w.AddTensor("", F32, []uint64{1}, make([]byte, 4)), ErrInvalid)
	assert.ErrorIs(t, w.AddTensor(string(make([]byte, 64)), F32, []uint64{1}, make([]byte, 4)), ErrInvalid)
	assert.ErrorIs(t, w.AddTensor("a", F32, []uint64{2}, make([]byte, 4)), ErrInvalid)
	assert.ErrorIs(t, w.AddTensor("a", Q8_0, []uint64{16}, make([]byte, 17)), ErrInvalid)
	assert.ErrorIs(t, w.AddTensor("a", F32, []uint64{1, 1, 1, 1, 1}, make([]byte, 4)), ErrInvalid)
	assert.ErrorIs(t, w.AddTensor("a", TensorType(4), []uint64{1}, nil), ErrInvalid)
	require.NoError(t, w.AddTensor("a", F32, []uint64{1}, make([]byte, 4)))
	assert.ErrorIs(t, w.AddTensor("a", F32, []uint64{1}, make([]byte, 4)), ErrInvalid)

	w.SetUint32(KeyAlignment, 3)
	_, err := w.WriteTo(&bytes.Buffer{})
	assert.ErrorIs(t, err, ErrInvalid)
	w.SetString(KeyAlignment, "32")
	_, err = w.WriteTo(&bytes.Buffer{})
	assert.ErrorIs(t, err, ErrInvalid)
}

func TestAccessors(t *testing.T) {
	data := buildFile(t, 0)
	f, err := Read(bytes.NewReader(data), int64(len(data)))
	require.NoError(t, err)

	s, err := f.String("general.architecture")
	require.NoError(t, err)
	assert.Equal(t, "llama", s)
	u, err := f.Uint32("t.u32")
	require.NoError(t, err)
	assert.Equal(t, uint32(4000000000), u)
	fl, err := f.Float32("t.f32")
	require.NoError(t, err)
	assert.Equal(t, float32(1.5e-5), fl)
	b, err := f.Bool("t.bool")
	require.NoError(t, err)
	assert.True(t, b)
	ss, err := f.Strings("a.str")
	require.NoError(t, err)
	assert.Equal(t, []string{"<unk>", "", "▁the"}, ss)
	is, err := f.Int32s("a.i32")
	require.NoError(t, err)
	assert.Equal(t, []int32{0, 1, 2, 6}, is)
	fs, err := f.Float32s("a.f32")
	require.NoError(t, err)
	assert.Equal(t, []float32{-0.5, 3}, fs)
	assert.True(t, f.Has("t.i8"))
	assert.False(t, f.Has("nope"))

	_, err = f.String("nope")
	assert.ErrorIs(t, err, ErrNotFound)
	assert.ErrorContains(t, err, `"nope"`)
	_, err = f.Uint32("t.u64")
	assert.ErrorIs(t, err, ErrType)
	assert.ErrorContains(t, err, "uint64")
	_, err = f.Strings("a.i32")
	assert.ErrorIs(t, err, ErrType)
	assert.ErrorContains(t, err, "array of int32")

	for key, want := range map[string]int64{"t.u8": 200, "t.i8": -100, "t.u16": 60000, "t.i16": -30000,
		"t.u32": 4000000000, "t.i32": -2000000000, "t.u64": 1 << 60, "t.i64": -1 << 60} {
		got, err := f.Int(key)
		require.NoError(t, err, key)
		assert.Equal(t, want, got, key)
	}
	_, err = f.Int("t.f32")
	assert.ErrorIs(t, err, ErrType)
	x, err := f.Float("t.f64")
	require.NoError(t, err)
	assert.Equal(t, math.Pi, x)

	_, err = f.TensorData("nope")
	assert.ErrorIs(t, err, ErrNotFound)
	_, ok := f.Tensor("q8_0")
	assert.True(t, ok)
}

func TestByteSize(t *testing.T) {
	for _, tc := range []struct {
		typ  TensorType
		dims []uint64
		want uint64
	}{
		{F32, []uint64{3, 5}, 60},
		{F32, nil, 4},
		{F16, []uint64{0, 9}, 0},
		{Q8_0, []uint64{64, 3}, 2 * 3 * 34},
		{Q4_0, []uint64{32}, 18},
		{Q4_K, []uint64{256, 2}, 288},
		{BF16, []uint64{5}, 10},
	} {
		got, err := tc.typ.ByteSize(tc.dims)
		require.NoError(t, err)
		assert.Equal(t, tc.want, got, "%s %v", tc.typ, tc.dims)
	}
	for _, tc := range []struct {
		typ  TensorType
		dims []uint64
	}{
		{TensorType(5), []uint64{1}},
		{Q8_0, []uint64{33}},
		{F32, []uint64{1 << 32, 1 << 32}},
		{F32, []uint64{1 << 62}},
		{F32, []uint64{1, 1, 1, 1, 1}},
		{F32, []uint64{1 << 63}},
	} {
		_, err := tc.typ.ByteSize(tc.dims)
		assert.ErrorIs(t, err, ErrFormat, "%s %v", tc.typ, tc.dims)
	}
	assert.Equal(t, "Q8_0", Q8_0.String())
	assert.Equal(t, "TensorType(99)", TensorType(99).String())
	assert.Equal(t, "float32", TypeFloat32.String())
	assert.Equal(t, "ValueType(99)", ValueType(99).String())
}

// raw builds GGUF bytes by hand, for malformed files.
type raw struct{ bytes.Buffer }

func (r *raw) u32(v uint32) *raw { binary.Write(r, binary.LittleEndian, v); return r }
func (r *raw) u64(v uint64) *raw { binary.Write(r, binary.LittleEndian, v); return r }
func (r *raw) str(s string) *raw { r.u64(uint64(len(s))); r.WriteString(s); return r }
func (r *raw) header(version uint32, nTensors, nKV uint64) *raw {
	r.WriteString("GGUF")
	return r.u32(version).u64(nTensors).u64(nKV)
}

// tensorFile is a file with one F32 tensor of 4 elements ([offset] given),
// padded to 32 and followed by dataLen bytes.
func tensorFile(name string, nDims uint32, dims []uint64, typ uint32, offset uint64, dataLen int) []byte {
	var r raw
	r.header(3, 1, 0)
	r.str(name).u32(nDims)
	for _, d := range dims {
		r.u64(d)
	}
	r.u32(typ).u64(offset)
	for r.Len()%32 != 0 {
		r.WriteByte(0)
	}
	r.Write(make([]byte, dataLen))
	return r.Bytes()
}

func TestReadMalformed(t *testing.T) {
	kv := func(key string, typ uint32, payload ...byte) []byte {
		var r raw
		r.header(3, 0, 1)
		r.str(key).u32(typ)
		r.Write(payload)
		return r.Bytes()
	}
	le64 := func(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
	le32 := func(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

	twoTensors := func(off2 uint64) []byte {
		var r raw
		r.header(3, 2, 0)
		r.str("a").u32(1).u64(16).u32(0).u64(0)
		r.str("b").u32(1).u64(16).u32(0).u64(off2)
		for r.Len()%32 != 0 {
			r.WriteByte(0)
		}
		r.Write(make([]byte, 256))
		return r.Bytes()
	}

	for _, tc := range []struct {
		name string
		data []byte
		is   error
		msg  string
	}{
		{"empty", nil, ErrTruncated, "header"},
		{"bad magic", []byte("GGUL\x03\x00\x00\x00" + string(make([]byte, 16))), ErrFormat, "bad magic"},
		{"version 1", new(raw).header(1, 0, 0).Bytes(), ErrUnsupported, "version 1"},
		{"version 4", new(raw).header(4, 0, 0).Bytes(), ErrUnsupported, "version 4"},
		{"big endian", new(raw).header(0x03000000, 0, 0).Bytes(), ErrUnsupported, "big-endian"},
		{"huge kv count", new(raw).header(3, 0, 1<<40).Bytes(), ErrTruncated, "metadata count"},
		{"huge tensor count", new(raw).header(3, 1<<40, 0).Bytes(), ErrTruncated, "tensor count"},
		{"huge key length", cat(new(raw).header(3, 0, 1).u64(1<<60).Bytes(), make([]byte, 16)), ErrTruncated, "string length 1152921504606846976"},
		{"huge string value", kv("k", 8, cat(le64(1<<60), make([]byte, 8))...), ErrTruncated, `key "k": string length`},
		{"huge array", kv("k", 9, cat(le32(4), le64(1<<40), make([]byte, 8))...), ErrTruncated, "array of 1099511627776 uint32"},
		{"huge string array", kv("k", 9, cat(le32(8), le64(1<<40), make([]byte, 64))...), ErrTruncated, "array of 1099511627776 string"},
		{"truncated array", kv("k", 9, cat(le32(4), le64(3), make([]byte, 8))...), ErrTruncated, `key "k"`},
		{"unknown value type", kv("k", 13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), ErrFormat, "unknown value type 13"},
		{"unknown element type", kv("k", 9, cat(le32(99), le64(0))...), ErrFormat, "unknown array element type 99"},
		{"nested array", kv("k", 9, cat(le32(9), le64(0))...), ErrUnsupported, "arrays of arrays"},
		{"bad bool", kv("k", 7, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), ErrFormat, "bool byte 2"},
		{"duplicate key", cat(new(raw).header(3, 0, 2).str("k").u32(4).u32(1).str("k").u32(4).u32(1).Bytes()), ErrFormat, `key "k": duplicate`},
		{"alignment not power of two", kv(KeyAlignment, 4, le32(48)...), ErrFormat, "not a power of two"},
		{"alignment zero", kv(KeyAlignment, 4, le32(0)...), ErrFormat, "not a power of two"},
		{"alignment wrong type", kv(KeyAlignment, 10, le64(32)...), ErrFormat, "want uint32"},
		{"too many dims", tensorFile("t", 5, []uint64{1, 1, 1, 1, 1}, 0, 0, 64), ErrFormat, `tensor "t": 5 dimensions`},
		{"dims overflow", tensorFile("t", 2, []uint64{1 << 32, 1 << 32}, 0, 0, 64), ErrFormat, "overflow"},
		{"negative dim", tensorFile("t", 1, []uint64{1 << 63}, 0, 0, 64), ErrFormat, "beyond int64"},
		{"unknown tensor type", tensorFile("t", 1, []uint64{4}, 4, 0, 64), ErrFormat, "unknown tensor type 4"},
		{"tensor type too large", tensorFile("t", 1, []uint64{4}, 1000, 0, 64), ErrFormat, "unknown tensor type 1000"},
		{"row not multiple of block", tensorFile("t", 1, []uint64{33}, 8, 0, 64), ErrFormat, "block size 32"},
		{"misaligned offset", tensorFile("t", 1, []uint64{4}, 0, 4, 64), ErrFormat, "not a multiple of the alignment"},
		{"data beyond end", tensorFile("blk.0.attn_q.weight", 2, []uint64{32, 32}, 0, 0, 2000), ErrTruncated,
			`tensor "blk.0.attn_q.weight": data [offset 96, 4096 bytes) beyond end of file (size 2096)`},
		{"offset beyond end", tensorFile("t", 1, []uint64{4}, 0, 1<<62, 64), ErrTruncated, "beyond end of file"},
		{"no data section", tensorFile("t", 1, []uint64{4}, 0, 0, 0)[:57], ErrTruncated, "data section"},
		{"duplicate tensor", cat(new(raw).header(3, 2, 0).str("t").u32(1).u64(4).u32(0).u64(0).str("t").u32(1).u64(4).u32(0).u64(32).Bytes(), make([]byte, 128)), ErrFormat, "duplicate tensor"},
		{"overlapping tensors", twoTensors(32), ErrFormat, "overlaps"},
		{"truncated tensor info", new(raw).header(3, 1, 0).str("t").u32(3).u64(1).u64(1).u64(1).Bytes(), ErrTruncated, `tensor "t"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := Read(bytes.NewReader(tc.data), int64(len(tc.data)))
			require.Error(t, err)
			assert.Nil(t, f)
			assert.ErrorIs(t, err, tc.is)
			assert.ErrorContains(t, err, tc.msg)
		})
	}

	// Adjacent tensors do not overlap.
	_, err := Read(bytes.NewReader(twoTensors(64)), int64(len(twoTensors(64))))
	assert.NoError(t, err)
}

func TestReadEveryTruncation(t *testing.T) {
	data := buildFile(t, 0)
	f, err := Read(bytes.NewReader(data), int64(len(data)))
	require.NoError(t, err)
	last := f.Tensors[len(f.Tensors)-1]
	end := f.DataOffset + int64(last.Offset+last.Size)
	for n := range int(end) {
		_, err := Read(bytes.NewReader(data[:n]), int64(n))
		require.Error(t, err, "prefix of %d bytes", n)
		assert.ErrorIs(t, err, ErrFormat, "prefix of %d bytes", n)
	}
	// Trailing padding after the last tensor is optional.
	_, err = Read(bytes.NewReader(data[:end]), end)
	assert.NoError(t, err)
}

// shortReader pretends the file is longer than the bytes it can serve.
type shortReader struct{ b []byte }

func (s shortReader) ReadAt(p []byte, off int64) (int, error) {
	return bytes.NewReader(s.b).ReadAt(p, off)
}

func TestTensorDataShortRead(t *testing.T) {
	data := buildFile(t, 0)
	f, err := Read(shortReader{data}, int64(len(data)))
	require.NoError(t, err)
	f.r = shortReader{data[:len(data)-100]} // the file shrank after parsing
	_, err = f.TensorData("q4_0")
	assert.ErrorIs(t, err, ErrTruncated)
}

func TestF16(t *testing.T) {
	// Every half value survives a round trip through float32 (NaNs stay NaNs).
	for h := range 1 << 16 {
		f := F16ToFloat32(uint16(h))
		if f != f {
			assert.True(t, math.IsNaN(float64(F16ToFloat32(Float32ToF16(f)))))
			continue
		}
		require.Equal(t, uint16(h), Float32ToF16(f), "half %#04x = %g", h, f)
	}
	for _, tc := range []struct {
		f float32
		h uint16
	}{
		{1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {65520, 0x7c00}, {65519.99, 0x7bff},
		{float32(math.Inf(-1)), 0xfc00}, {5.960464477539063e-08, 0x0001}, {2.98023223876953125e-08, 0x0000},
		{2.98023224e-08 * 1.0000001, 0x0001}, {6.103515625e-05, 0x0400}, {1.0009765625, 0x3c01},
		{1.00048828125, 0x3c00}, // tie between 0x3c00 and 0x3c01: even
		{1.00146484375, 0x3c02}, // tie between 0x3c01 and 0x3c02: even
		{float32(math.Copysign(0, -1)), 0x8000},
	} {
		assert.Equal(t, tc.h, Float32ToF16(tc.f), "%g", tc.f)
	}
	// Random floats round to the nearest half.
	r := rand.New(rand.NewPCG(3, 4))
	for range 200000 {
		f := math.Float32frombits(r.Uint32())
		if f != f || math.Abs(float64(f)) >= 65520 {
			continue
		}
		h := Float32ToF16(f)
		got := float64(F16ToFloat32(h))
		for _, nb := range []uint16{h - 1, h + 1} {
			if nb&0x7c00 == 0x7c00 || (h&0x7fff == 0 && nb&0x7fff != 1) {
				continue
			}
			alt := float64(F16ToFloat32(nb))
			d0, d1 := math.Abs(got-float64(f)), math.Abs(alt-float64(f))
			require.True(t, d0 < d1 || (d0 == d1 && h&1 == 0), "%g -> %#04x (%g), neighbour %#04x (%g)", f, h, got, nb, alt)
		}
	}
}

func TestBF16(t *testing.T) {
	assert.Equal(t, uint16(0x3f80), Float32ToBF16(1))
	assert.Equal(t, uint16(0x3f80), Float32ToBF16(math.Float32frombits(0x3f808000))) // tie to even
	assert.Equal(t, uint16(0x3f82), Float32ToBF16(math.Float32frombits(0x3f818000))) // tie to even
	assert.Equal(t, uint16(0x3f81), Float32ToBF16(math.Float32frombits(0x3f808001)))
	assert.True(t, math.IsNaN(float64(BF16ToFloat32(Float32ToBF16(float32(math.NaN()))))))
	for h := range 1 << 16 {
		f := BF16ToFloat32(uint16(h))
		if f == f {
			require.Equal(t, uint16(h), Float32ToBF16(f))
		}
	}
}

func TestQuantizeBlocks(t *testing.T) {
	x := make([]float32, 32)
	for i := range x {
		x[i] = float32(i) - 12.7
	}
	q8, err := Quantize(Q8_0, x)
	require.NoError(t, err)
	require.Len(t, q8, 34)
	d := F16ToFloat32(binary.LittleEndian.Uint16(q8))
	assert.InDelta(t, 18.3/127, d, 1e-4) // amax/127
	assert.Equal(t, int8(127), int8(q8[2+31]))
	assert.Equal(t, int8(-88), int8(q8[2])) // round(-12.7 / (18.3/127))

	q4, err := Quantize(Q4_0, x)
	require.NoError(t, err)
	require.Len(t, q4, 18)
	d4 := F16ToFloat32(binary.LittleEndian.Uint16(q4))
	assert.InDelta(t, 18.3/-8, d4, 1e-3) // the largest magnitude maps to -8
	assert.Equal(t, byte(0), q4[2+15]>>4)
	back, err := Dequantize(Q4_0, q4)
	require.NoError(t, err)
	for i := range x {
		assert.InDelta(t, x[i], back[i], math.Abs(float64(d4))/2+1e-3, "element %d", i)
	}

	zero, err := Quantize(Q8_0, make([]float32, 32))
	require.NoError(t, err)
	assert.Equal(t, make([]byte, 34), zero)

	_, err = Quantize(Q8_0, make([]float32, 31))
	assert.ErrorIs(t, err, ErrInvalid)
	_, err = Quantize(Q4_K, make([]float32, 256))
	assert.ErrorIs(t, err, ErrUnsupported)
	_, err = Dequantize(Q4_K, make([]byte, 144))
	assert.ErrorIs(t, err, ErrUnsupported)
	_, err = Dequantize(F32, make([]byte, 5))
	assert.ErrorIs(t, err, ErrInvalid)

	ints, err := Dequantize(I16, []byte{0xff, 0xff, 2, 0})
	require.NoError(t, err)
	assert.Equal(t, []float32{-1, 2}, ints)
}

func FuzzRead(f *testing.F) {
	valid := buildFile(f, 0)
	f.Add(valid)
	f.Add(buildFile(f, 64))
	f.Add(valid[:100])
	f.Add(tensorFile("t", 1, []uint64{4}, 0, 0, 64))
	f.Add(tensorFile("t", 2, []uint64{1 << 32, 1 << 32}, 0, 0, 64))
	f.Add(new(raw).header(3, 0, 1<<40).Bytes())
	for _, off := range []int{8, 16, 24, 40, 100, 300} {
		c := bytes.Clone(valid)
		c[off] ^= 0xff
		f.Add(c)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := Read(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		// A file that parses has every tensor readable, and re-encodes to a
		// file with the same metadata and tensors.
		w := NewWriter()
		for _, kv := range file.KVs {
			require.NoError(t, w.Set(kv.Key, kv.Value))
		}
		for _, ti := range file.Tensors {
			b, err := file.TensorData(ti.Name)
			require.NoError(t, err)
			require.Len(t, b, int(ti.Size))
			if len(ti.Name) <= MaxNameLen && ti.Name != "" {
				require.NoError(t, w.AddTensor(ti.Name, ti.Type, ti.Dims, b))
			}
		}
		var buf bytes.Buffer
		_, err = w.WriteTo(&buf)
		require.NoError(t, err)
		again, err := Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
		require.NoError(t, err)
		require.Equal(t, len(file.KVs), len(again.KVs))
		for i := range file.KVs {
			require.Equal(t, file.KVs[i].Key, again.KVs[i].Key)
			// NaN floats do not compare equal; compare encodings instead.
			require.Equal(t, encodeValue(file.KVs[i].Value), encodeValue(again.KVs[i].Value))
		}
		for _, ti := range again.Tensors {
			orig, ok := file.Tensor(ti.Name)
			require.True(t, ok)
			require.Equal(t, orig.Type, ti.Type)
			require.Equal(t, orig.Dims, ti.Dims)
		}
	})
}

func encodeValue(v any) []byte {
	var buf bytes.Buffer
	e := &encoder{w: bufio.NewWriter(&buf)}
	e.value(v)
	e.w.Flush()
	return buf.Bytes()
}
