//go:build amd64 && !noasm && !purego

package kernels

import "golang.org/x/sys/cpu"

// The avx2 implementation needs AVX2 and FMA for the arithmetic and F16C for
// VCVTPH2PS. x/sys/cpu reports HasAVX2 only when the OS saves the YMM state
// (it checks OSXSAVE and XCR0 itself) and honours GODEBUG=cpu.avx2=off, which
// therefore falls back to generic. Every AVX2 CPU shipped so far also has
// F16C; it is checked anyway since x/sys/cpu exposes it.
var hasAVX2 = cpu.X86.HasAVX2 && cpu.X86.HasFMA && cpu.X86.HasF16C

func init() {
	avx2 := &implementation{
		name:      "avx2",
		available: hasAVX2,
		norms: [...]kernelFunc{
			F32:  normsF32AVX2,
			F16:  normsF16AVX2,
			BF16: normsBF16AVX2,
			Q8_0: normsQ8_0AVX2,
		},
	}
	implementations = append([]*implementation{avx2}, implementations...)
	if hasAVX2 {
		active.Store(avx2)
	}
}

// The assembly kernels below trust their arguments: len(src) must be exactly
// len(dst)*rowBytes(dim) (dim%32 == 0 for Q8_0). Callers validate first.

// normsF32AVX2 computes, with float32 FMA accumulators, what this loop does:
//
//	for i := range dst {
//		var s float32
//		for j := 0; j < dim; j++ {
//			x := math.Float32frombits(binary.LittleEndian.Uint32(src[4*(i*dim+j):]))
//			s += x * x
//		}
//		if sqrt {
//			s = float32(math.Sqrt(float64(s)))
//		}
//		dst[i] = s
//	}
//
//go:noescape
func normsF32AVX2(dst []float32, src []byte, dim int, sqrt bool)

// normsF16AVX2 converts with VCVTPH2PS and computes what this loop does:
//
//	for i := range dst {
//		var s float32
//		for j := 0; j < dim; j++ {
//			x := F16ToF32(binary.LittleEndian.Uint16(src[2*(i*dim+j):]))
//			s += x * x
//		}
//		if sqrt {
//			s = float32(math.Sqrt(float64(s)))
//		}
//		dst[i] = s
//	}
//
//go:noescape
func normsF16AVX2(dst []float32, src []byte, dim int, sqrt bool)

// normsBF16AVX2 widens bfloat16 to float32 by shifting and computes what this
// loop does:
//
//	for i := range dst {
//		var s float32
//		for j := 0; j < dim; j++ {
//			x := BF16ToF32(binary.LittleEndian.Uint16(src[2*(i*dim+j):]))
//			s += x * x
//		}
//		if sqrt {
//			s = float32(math.Sqrt(float64(s)))
//		}
//		dst[i] = s
//	}
//
//go:noescape
func normsBF16AVX2(dst []float32, src []byte, dim int, sqrt bool)

// normsQ8_0AVX2 sums q*q of each block exactly in int32 lanes (VPMADDWD) and
// scales them by d*d; it computes what this loop does:
//
//	for i := range dst {
//		var s float32
//		for b := 0; b < dim/32; b++ {
//			blk := src[34*(i*dim/32+b):][:34]
//			d := F16ToF32(binary.LittleEndian.Uint16(blk))
//			var qq int32
//			for _, q := range blk[2:] {
//				qq += int32(int8(q)) * int32(int8(q))
//			}
//			if qq != 0 { // an all-zero block adds 0, whatever its scale
//				s += d * d * float32(qq)
//			}
//		}
//		if sqrt {
//			s = float32(math.Sqrt(float64(s)))
//		}
//		dst[i] = s
//	}
//
//go:noescape
func normsQ8_0AVX2(dst []float32, src []byte, dim int, sqrt bool)
