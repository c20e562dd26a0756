// Package kernels holds the numeric inner loops of kvnorm: the per-row L2
// norms of cached attention keys and the selection of the rows with the
// lowest norms.
//
// kvnorm keeps, for every KV head, the cached keys whose L2 norm is lowest
// (Devoto et al. 2024). A runtime hands this package the raw key cache of one
// head as row-major little-endian bytes in one of the cache types it uses
// ([F32], [F16], [BF16] or [Q8_0]); the data flows in two steps:
//
//  1. [Norms] (or [SquaredNorms], enough for ranking) reduces each row of dim
//     elements to one float32 score.
//  2. [LowestK] (or [LowestKBatched] for several heads at once) returns the
//     indices of the k rows with the lowest scores, in ascending index order,
//     which the runtime then keeps while evicting the others.
//
// # Implementations
//
// Every kernel has a plain-Go reference ("generic") that is always compiled
// and is the oracle for the tests. On amd64 CPUs with AVX2, FMA and F16C an
// assembly implementation ("avx2") is chosen once at start-up; it is switched
// off by the build tags noasm or purego, or at run time by
// GODEBUG=cpu.avx2=off. [Impl], [Impls] and [UseImpl] report and switch the
// active implementation for tests and benchmarks.
//
// Every length is validated in Go before any assembly runs: bad input yields
// an error wrapping [ErrShape] or [ErrDType], never a panic.
package kernels
