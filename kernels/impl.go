package kernels

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

// kernelFunc computes the (squared, unless sqrt) L2 norm of each of the
// len(dst) rows of src. Arguments are validated before the call:
// len(src) == len(dst)*rowBytes(dim), and dim%32 == 0 for Q8_0.
type kernelFunc func(dst []float32, src []byte, dim int, sqrt bool)

// implementation is one complete set of kernels.
type implementation struct {
	name string
	// available reports whether this CPU and build can run it.
	available bool
	norms     [len(dtypeNames)]kernelFunc
}

var generic = &implementation{
	name:      "generic",
	available: true,
	norms: [...]kernelFunc{
		F32:  normsF32Generic,
		F16:  normsF16Generic,
		BF16: normsBF16Generic,
		Q8_0: normsQ8_0Generic,
	},
}

// implementations lists every implementation compiled in, best first;
// generic is last. The arch files prepend theirs in init.
var implementations = []*implementation{generic}

// active is the implementation in use. It is chosen once at init (the first
// available entry of implementations) and changed only by UseImpl.
var active atomic.Pointer[implementation]

func init() {
	for _, im := range implementations {
		if im.available {
			active.Store(im)
			return
		}
	}
}

// Impl returns the name of the active implementation: "avx2" on amd64 CPUs
// with AVX2, FMA and F16C (unless built with noasm or purego, or run with
// GODEBUG=cpu.avx2=off), otherwise "generic".
func Impl() string { return active.Load().name }

// Impls returns the names of the implementations this CPU and build can run,
// the active one first. It always includes "generic".
func Impls() []string {
	cur := active.Load()
	names := []string{cur.name}
	for _, im := range implementations {
		if im.available && im != cur {
			names = append(names, im.name)
		}
	}
	return names
}

// UseImpl makes the implementation called name active for the whole package
// and returns a func that restores the previous one. It is meant for tests
// and benchmarks; calls running concurrently on other goroutines use either
// implementation, both giving results within the documented tolerance. The
// error for an unknown name, or one this CPU cannot run, wraps [ErrImpl].
func UseImpl(name string) (restore func(), err error) {
	i := slices.IndexFunc(implementations, func(im *implementation) bool { return im.name == name })
	if i < 0 {
		return nil, fmt.Errorf("%w: %q (available: %v)", ErrImpl, name, Impls())
	}
	im := implementations[i]
	if !im.available {
		return nil, fmt.Errorf("%w: %q is not supported by this CPU or build (available: %v)", ErrImpl, name, Impls())
	}
	prev := active.Swap(im)
	var once sync.Once
	return func() { once.Do(func() { active.Store(prev) }) }, nil
}
