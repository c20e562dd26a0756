package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkNorms measures every dtype and dim with every available
// implementation; SetBytes counts the key bytes read, so MB/s is input
// bandwidth and impl=generic in the same run is the baseline. The input is
// about 128 KiB, so this measures the kernels from L2 cache: their compute
// ceiling. internal/kbench measures them from memory against a read loop.
func BenchmarkNorms(b *testing.B) {
	for _, dt := range allDTypes {
		for _, dim := range []int{64, 128, 256} {
			rb, _ := dt.RowBytes(dim)
			rows := 128 << 10 / rb
			rng := rand.New(rand.NewPCG(1, 1))
			src := randRows(rng, dt, rows, dim, 1)
			dst := make([]float32, rows)
			for _, impl := range Impls() {
				b.Run(fmt.Sprintf("dtype=%v/dim=%d/impl=%s", dt, dim, impl), func(b *testing.B) {
					restore, err := UseImpl(impl)
					if err != nil {
						b.Fatal(err)
					}
					defer restore()
					b.SetBytes(int64(len(src)))
					for b.Loop() {
						if err := Norms(dst, src, dt, dim); err != nil {
							b.Fatal(err)
						}
					}
				})
			}
		}
	}
}

// BenchmarkLowestK selects half of n uniform random scores. SetBytes counts
// the 4-byte scores read.
func BenchmarkLowestK(b *testing.B) {
	for _, n := range []int{1_000, 10_000, 100_000, 1_000_000, 10_000_000} {
		for _, dist := range []string{"uniform", "norms"} {
			rng := rand.New(rand.NewPCG(2, 2))
			scores := make([]float32, n)
			for i := range scores {
				if dist == "uniform" {
					scores[i] = rng.Float32()
				} else {
					scores[i] = float32(10 + rng.NormFloat64()*0.5)
				}
			}
			b.Run(fmt.Sprintf("n=%d/scores=%s", n, dist), func(b *testing.B) {
				var sel Selector
				dst := make([]int32, 0, n/2)
				b.SetBytes(int64(4 * n))
				for b.Loop() {
					dst, _ = sel.LowestK(dst, scores, n/2)
				}
				b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds()/1e6, "Mscores/s")
			})
		}
	}
}
