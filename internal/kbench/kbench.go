// Package kbench measures the norm and selection kernels of package kernels
// for the command "kvnorm bench kernels".
//
// Norm kernels are memory-bound on real cache sizes, so their throughput is
// reported next to an honest baseline: the fastest plain read of the same
// buffer that this machine manages (an AVX2 load loop on amd64, an unrolled
// 64-bit load loop elsewhere), measured in the same run, interleaved with the
// kernel chunk by chunk, on one goroutine locked to its thread. The ratio
// kernel/read says how close a kernel comes to streaming its input at memory
// speed.
//
// Times are the CPU time of the measuring thread where the OS offers it
// (Linux), so that other processes taking turns on the same core do not
// count; elsewhere they are wall-clock times.
package kbench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"time"

	"github.com/kvnorm/kvnorm/kernels"
)

// KernelResult is the throughput of one norm kernel over the whole buffer.
type KernelResult struct {
	DType string `json:"dtype"`
	Dim   int    `json:"dim"`
	Impl  string `json:"impl"`
	// GBps is bytes of key data read by the kernel per second, in 1e9 B/s.
	GBps float64 `json:"gbps"`
	// ReadGBps is the plain read loop over the same buffer, same run.
	ReadGBps float64 `json:"read_gbps"`
	// Ratio is GBps/ReadGBps.
	Ratio float64 `json:"ratio"`
}

// SelectResult is the throughput of kernels.LowestK keeping k = n/2 of n
// norm-like scores (10 + N(0,1)).
type SelectResult struct {
	N            int     `json:"n"`
	ScoresPerSec float64 `json:"scores_per_s"`
	// Seconds is the best time of one LowestK call.
	Seconds float64 `json:"seconds"`
}

// MinBufferBytes is the smallest buffer RunKernels accepts unless
// Options.AllowSmall is set: large enough to defeat the CPU caches.
const MinBufferBytes = 64 << 20

// ErrOptions is wrapped by errors about invalid Options.
var ErrOptions = errors.New("kbench: bad options")

// Options configures a run. Zero fields take their defaults.
type Options struct {
	// BufferBytes is the size of the key buffer each kernel pass reads
	// whole; default and minimum 64 MiB.
	BufferBytes int
	// Dims are the row sizes to measure; default 64 and 128.
	Dims []int
	// MinTime is the least time spent measuring each kernel (and as much
	// again on the read loop); at least 3 repetitions run regardless. The
	// best repetition counts. Default 250ms.
	MinTime time.Duration
	// SelectNs are the score counts for RunSelect; default 1e4, 1e6, 1e7.
	SelectNs []int
	// AllowSmall permits BufferBytes below MinBufferBytes, for tests; such
	// results measure caches, not memory.
	AllowSmall bool
}

func (o Options) withDefaults() (Options, error) {
	if o.BufferBytes == 0 {
		o.BufferBytes = MinBufferBytes
	}
	if o.BufferBytes < 0 || (o.BufferBytes < MinBufferBytes && !o.AllowSmall) {
		return o, fmt.Errorf("%w: BufferBytes=%d is below %d (64 MiB)", ErrOptions, o.BufferBytes, MinBufferBytes)
	}
	if len(o.Dims) == 0 {
		o.Dims = []int{64, 128}
	}
	for _, d := range o.Dims {
		if d <= 0 {
			return o, fmt.Errorf("%w: dim=%d must be positive", ErrOptions, d)
		}
	}
	if o.MinTime <= 0 {
		o.MinTime = 250 * time.Millisecond
	}
	if len(o.SelectNs) == 0 {
		o.SelectNs = []int{10_000, 1_000_000, 10_000_000}
	}
	for _, n := range o.SelectNs {
		if n <= 0 {
			return o, fmt.Errorf("%w: select n=%d must be positive", ErrOptions, n)
		}
	}
	return o, nil
}

// RunKernels measures, for each dtype (f32, f16, bf16, q8_0) and each dim
// (dims that q8_0 cannot take, not multiples of 32, are skipped for it), the
// active implementation and "generic", each beside the read loop over the
// same buffer. It switches implementations with kernels.UseImpl and restores
// the active one before returning, so it must not run concurrently with other
// users of package kernels that care which implementation runs.
func RunKernels(opts Options) ([]KernelResult, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	buf := make([]byte, opts.BufferBytes)
	impls := []string{kernels.Impl()}
	if impls[0] != "generic" {
		impls = append(impls, "generic")
	}
	var results []KernelResult
	for _, dt := range []kernels.DType{kernels.F32, kernels.F16, kernels.BF16, kernels.Q8_0} {
		fill(buf, dt)
		for _, dim := range opts.Dims {
			rb, err := dt.RowBytes(dim)
			if err != nil {
				continue // q8_0 needs dim%32 == 0
			}
			n := len(buf) / rb
			if n == 0 {
				return nil, fmt.Errorf("%w: BufferBytes=%d holds no row of %d bytes (dtype=%v, dim=%d)", ErrOptions, len(buf), rb, dt, dim)
			}
			src, dst := buf[:n*rb], make([]float32, n)
			rowsPerChunk := max(1, chunkBytes/rb)
			chunks := (n + rowsPerChunk - 1) / rowsPerChunk
			kernel := func(c int) error {
				lo, hi := c*rowsPerChunk, min(n, (c+1)*rowsPerChunk)
				return kernels.Norms(dst[lo:hi], src[lo*rb:hi*rb], dt, dim)
			}
			read := func(c int) {
				sink ^= readAll(buf[c*len(buf)/chunks : (c+1)*len(buf)/chunks])
			}
			for _, impl := range impls {
				restore, err := kernels.UseImpl(impl)
				if err != nil {
					return nil, err
				}
				kernelSec, readSec, err := measureInterleaved(opts.MinTime, chunks, kernel, read)
				restore()
				if err != nil {
					return nil, err
				}
				r := KernelResult{
					DType:    dt.String(),
					Dim:      dim,
					Impl:     impl,
					GBps:     float64(len(src)) / kernelSec / 1e9,
					ReadGBps: float64(len(buf)) / readSec / 1e9,
				}
				r.Ratio = r.GBps / r.ReadGBps
				results = append(results, r)
			}
		}
	}
	return results, nil
}

// sink keeps the read loop's result alive.
var sink uint64

// chunkBytes is the size of the slices the buffer is timed in.
const chunkBytes = 1 << 20

// measureInterleaved times the kernel and the read loop chunk by chunk,
// alternating: kernel on chunk c, then read on chunk c+chunks/2 (mod
// chunks), so that every chunk either of them touches was last touched a
// whole buffer of traffic earlier and comes from memory, not cache. Passes
// over the buffer repeat until each side has run for minTime, and at least
// 3 times. For each chunk the best time over the passes counts, and the
// sums of those are returned: a disturbance (another process on the core)
// spoils one chunk of one pass, not the whole measurement, and both sides
// are treated alike.
func measureInterleaved(minTime time.Duration, chunks int, kernel func(c int) error, read func(c int)) (kernelSec, readSec float64, err error) {
	runtime.GC()
	bestK := make([]time.Duration, chunks)
	bestR := make([]time.Duration, chunks)
	for c := range chunks {
		bestK[c], bestR[c] = 1<<62, 1<<62
	}
	var spentK, spentR time.Duration
	// Pass -1 is untimed: it faults the pages in and warms the predictors.
	for pass := -1; pass < 3 || spentK < minTime || spentR < minTime; pass++ {
		for c := range chunks {
			rc := (c + chunks/2) % chunks
			t0 := threadClock()
			if err := kernel(c); err != nil {
				return 0, 0, err
			}
			t1 := threadClock()
			read(rc)
			t2 := threadClock()
			if pass < 0 {
				continue
			}
			k, r := t1-t0, t2-t1
			spentK, spentR = spentK+k, spentR+r
			bestK[c], bestR[rc] = min(bestK[c], k), min(bestR[rc], r)
		}
	}
	var sumK, sumR time.Duration
	for c := range chunks {
		sumK += bestK[c]
		sumR += bestR[c]
	}
	return sumK.Seconds(), sumR.Seconds(), nil
}

// RunSelect measures kernels.LowestK keeping n/2 of n scores for each n in
// opts.SelectNs, with a reused Selector; the best of at least 3 repetitions
// and opts.MinTime counts.
func RunSelect(opts Options) ([]SelectResult, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	rng := rand.New(rand.NewPCG(1, 2))
	var sel kernels.Selector
	var results []SelectResult
	for _, n := range opts.SelectNs {
		scores := make([]float32, n)
		for i := range scores {
			scores[i] = float32(10 + rng.NormFloat64())
		}
		dst := make([]int32, 0, n/2)
		runtime.GC()
		if dst, err = sel.LowestK(dst, scores, n/2); err != nil { // warm-up
			return nil, err
		}
		var spent time.Duration
		best := time.Duration(1 << 62)
		for reps := 0; reps < 3 || spent < opts.MinTime; reps++ {
			start := threadClock()
			dst, _ = sel.LowestK(dst, scores, n/2)
			d := threadClock() - start
			spent += d
			best = min(best, d)
		}
		sec := best.Seconds()
		results = append(results, SelectResult{N: n, ScoresPerSec: float64(n) / sec, Seconds: sec})
	}
	return results, nil
}

// fill writes random keys of type dt over all of buf: N(0,1) values, encoded
// as dt; for q8_0, whole 34-byte blocks from position 0 (rows of any valid
// dim are whole blocks), the remainder zero.
func fill(buf []byte, dt kernels.DType) {
	rng := rand.New(rand.NewPCG(uint64(dt), 7))
	const chunk = 32 // a Q8_0 block's worth of values
	var vals [chunk]float32
	var blk [34]byte
	elem, _ := dt.RowBytes(chunk) // bytes per chunk of 32 values
	off := 0
	for ; off+elem <= len(buf); off += elem {
		for i := range vals {
			vals[i] = float32(rng.NormFloat64())
		}
		out := buf[off : off+elem]
		switch dt {
		case kernels.F32:
			for i, v := range vals {
				binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(v))
			}
		case kernels.F16:
			for i, v := range vals {
				binary.LittleEndian.PutUint16(out[2*i:], kernels.F32ToF16(v))
			}
		case kernels.BF16:
			for i, v := range vals {
				binary.LittleEndian.PutUint16(out[2*i:], kernels.F32ToBF16(v))
			}
		case kernels.Q8_0:
			_ = kernels.QuantizeQ8_0(blk[:], vals[:])
			copy(out, blk[:])
		}
	}
	clear(buf[off:])
}
