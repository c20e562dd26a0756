package kernels_test

import (
	"fmt"

	"github.com/kvnorm/kvnorm/kernels"
)

// Keep the two cached keys (rows) with the lowest L2 norm out of four.
func Example() {
	const dim = 4
	keys := []float32{
		3, 0, 0, 4, // norm 5
		1, 1, 1, 1, // norm 2
		0, 0, 0, 9, // norm 9
		0, 1, 0, 0, // norm 1
	}
	norms := make([]float32, len(keys)/dim)
	if err := kernels.NormsF32(norms, keys, dim); err != nil {
		panic(err)
	}
	keep, err := kernels.LowestK(nil, norms, 2)
	if err != nil {
		panic(err)
	}
	fmt.Println(norms, keep)
	// Output: [5 2 9 1] [1 3]
}

// Norms reads raw cache bytes; here a half-precision cache of two rows.
func ExampleNorms() {
	const dim = 2
	raw := make([]byte, 0, 2*2*dim)
	for _, v := range []float32{3, 4, 0.5, 0} {
		h := kernels.F32ToF16(v)
		raw = append(raw, byte(h), byte(h>>8)) // little-endian
	}
	norms := make([]float32, 2)
	if err := kernels.Norms(norms, raw, kernels.F16, dim); err != nil {
		panic(err)
	}
	fmt.Println(norms)
	// Output: [5 0.5]
}

// Errors name the offending value and wrap a sentinel.
func ExampleNorms_error() {
	err := kernels.Norms(make([]float32, 1), make([]byte, 100), kernels.F16, 64)
	fmt.Println(err)
	// Output: kernels: bad shape: len(src)=100 is not n*rowBytes=128 (n=1, dim=64, dtype=f16)
}

// Select per head: each row of scores is one KV head.
func ExampleLowestKBatched() {
	scores := []float32{
		0.3, 0.1, 0.2, // head 0
		5, 5, 1, // head 1: ties go to the lower index
	}
	keep, err := kernels.LowestKBatched(nil, scores, 2, 3, 2)
	if err != nil {
		panic(err)
	}
	fmt.Println(keep)
	// Output: [1 2 0 2]
}

// A Selector reuses its scratch space across calls.
func ExampleSelector() {
	var sel kernels.Selector
	var keep []int32
	for _, scores := range [][]float32{{4, 3, 2, 1}, {1, 2, 3, 4}} {
		keep, _ = sel.LowestK(keep, scores, 2)
		fmt.Println(keep)
	}
	// Output:
	// [2 3]
	// [0 1]
}

func ExampleParseDType() {
	dt, err := kernels.ParseDType("BF16")
	if err != nil {
		panic(err)
	}
	rb, _ := dt.RowBytes(128)
	fmt.Println(dt, rb)
	q, _ := kernels.Q8_0.RowBytes(128)
	fmt.Println(kernels.Q8_0, q)
	// Output:
	// bf16 256
	// q8_0 136
}

func ExampleUseImpl() {
	restore, err := kernels.UseImpl("generic")
	if err != nil {
		panic(err)
	}
	defer restore()
	fmt.Println(kernels.Impl())
	// Output: generic
}
