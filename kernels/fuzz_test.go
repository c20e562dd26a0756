package kernels

import (
	"encoding/binary"
	"math"
	"testing"
)

// fuzzNorms interprets data[off%4:] as rows of dim elements of dt and checks
// every available implementation against generic, for norms and squared
// norms. Random bytes reach NaN, Inf, denormals and overflowing sums.
func fuzzNorms(t *testing.T, dt DType, data []byte, dim int, off int) {
	if off%4 < len(data) {
		data = data[off%4:]
	}
	rb, err := dt.RowBytes(dim)
	if err != nil {
		t.Skip()
	}
	n := 0
	if rb > 0 {
		n = len(data) / rb
	}
	src := data[:n*rb]
	for _, sqrt := range []bool{false, true} {
		want := make([]float32, n)
		genericNorms(want, src, dt, dim, sqrt)
		got, all := guarded(n)
		var err error
		if sqrt {
			err = Norms(got, src, dt, dim)
		} else {
			err = SquaredNorms(got, src, dt, dim)
		}
		if err != nil {
			t.Fatal(err)
		}
		requireGuards(t, all)
		requireClose(t, want, got, sqrt, "impl", Impl(), "dtype", dt, "dim", dim, "sqrt", sqrt)
		for _, im := range implementations {
			if !im.available {
				continue
			}
			got, all := guarded(n)
			im.norms[dt](got, src, dim, sqrt)
			requireGuards(t, all)
			requireClose(t, want, got, sqrt, "impl", im.name, "dtype", dt, "dim", dim, "sqrt", sqrt)
		}
	}
}

func f32Bytes(vals ...float32) []byte {
	out := make([]byte, 0, 4*len(vals))
	for _, v := range vals {
		out = binary.LittleEndian.AppendUint32(out, math.Float32bits(v))
	}
	return out
}

func u16Bytes(vals ...uint16) []byte {
	out := make([]byte, 0, 2*len(vals))
	for _, v := range vals {
		out = binary.LittleEndian.AppendUint16(out, v)
	}
	return out
}

func FuzzNormsF32(f *testing.F) {
	f.Add(f32Bytes(1, 2, 3, 4, 5, 6, 7, 8, 9), uint16(3), uint8(0))
	f.Add(f32Bytes(1e30, 1, float32(math.Inf(-1)), float32(math.NaN()), math.Float32frombits(1)), uint16(1), uint8(1))
	f.Add(make([]byte, 4*300+3), uint16(300), uint8(3))
	f.Add(f32Bytes(1e19, 1e19, 1e19, 1e19), uint16(4), uint8(0))
	f.Fuzz(func(t *testing.T, data []byte, dim uint16, off uint8) {
		fuzzNorms(t, F32, data, int(dim%512), int(off))
	})
}

func FuzzNormsF16(f *testing.F) {
	f.Add(u16Bytes(0x3c00, 0x4000, 0xc000, 0x7bff, 0x0001, 0x7c00, 0x7e00), uint16(7), uint8(0))
	f.Add(u16Bytes(0x7bff, 0x7bff, 0x7bff, 0x7bff, 0x7bff, 0x7bff, 0x7bff, 0x7bff, 0x7bff), uint16(9), uint8(1))
	f.Add(make([]byte, 2*129), uint16(43), uint8(2))
	f.Fuzz(func(t *testing.T, data []byte, dim uint16, off uint8) {
		fuzzNorms(t, F16, data, int(dim%512), int(off))
	})
}

func FuzzNormsBF16(f *testing.F) {
	f.Add(u16Bytes(0x3f80, 0x4000, 0xc000, 0x7f7f, 0x0001, 0x7f80, 0x7fc0), uint16(7), uint8(0))
	f.Add(u16Bytes(0x7f7f, 0x7f7f, 0x7f7f, 0x7f7f), uint16(2), uint8(3))
	f.Fuzz(func(t *testing.T, data []byte, dim uint16, off uint8) {
		fuzzNorms(t, BF16, data, int(dim%512), int(off))
	})
}

func FuzzNormsQ8_0(f *testing.F) {
	blk := make([]byte, 34)
	blk[0], blk[1] = 0x00, 0x3c // d = 1
	for i := range 32 {
		blk[2+i] = byte(int8(i*8 - 128))
	}
	f.Add(append(append([]byte{}, blk...), blk...), uint8(1), uint8(0))
	inf := append([]byte{0x00, 0x7c}, make([]byte, 32)...) // Inf scale, zero quants
	f.Add(append(inf, blk...), uint8(2), uint8(1))
	f.Fuzz(func(t *testing.T, data []byte, blocks uint8, off uint8) {
		fuzzNorms(t, Q8_0, data, 32*int(blocks%16), int(off))
	})
}

func FuzzLowestK(f *testing.F) {
	f.Add(f32Bytes(3, 1, 2, 1, float32(math.NaN()), 0, float32(math.Copysign(0, -1))), uint32(3))
	f.Add(f32Bytes(float32(math.Inf(1)), float32(math.Inf(-1)), float32(math.NaN())), uint32(2))
	f.Add(make([]byte, 4*300), uint32(150)) // all equal, above the small-n path
	seq := make([]float32, 1000)
	for i := range seq {
		seq[i] = float32(i % 7)
	}
	f.Add(f32Bytes(seq...), uint32(500))
	f.Fuzz(func(t *testing.T, data []byte, k uint32) {
		scores := make([]float32, len(data)/4)
		for i := range scores {
			scores[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
		}
		kk := int(k % uint32(len(scores)+1))
		got, err := LowestK(nil, scores, kk)
		if err != nil {
			t.Fatal(err)
		}
		want := oracleLowestK(scores, kk)
		requireIndices(t, want, got, "LowestK", kk)
		// Inputs long enough for the radix path are rare in fuzzing: run it
		// directly on short ones too.
		if kk >= 1 && kk < len(scores) {
			var sel Selector
			requireIndices(t, want, sel.lowestKRadix(make([]int32, 0, kk), scores, kk), "radix", kk)
		}
	})
}

func requireIndices(t *testing.T, want, got []int32, path string, k int) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s k=%d: got %d indices, want %d", path, k, len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("%s k=%d: got %v, want %v", path, k, got, want)
		}
	}
}
