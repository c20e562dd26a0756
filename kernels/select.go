package kernels

import (
	"fmt"
	"math"
	"math/bits"
	"slices"
	"sync"
)

// Selection finds the k lowest scores in O(n) with a radix select on
// order-preserving integer keys:
//
//  1. scoreKey maps each float32 to a uint32 whose unsigned order is the
//     wanted score order (NaN highest, -0 equal to +0).
//  2. Three histogram passes over 11, 11 and 10 bits of the keys find the key
//     T of the k-th lowest score and the count of keys below T; each pass
//     looks only at the keys that share the bits already fixed. For large
//     inputs a strided sample first guesses a narrow key range around T, so
//     that one pass over the scores gathers the few candidate keys and the
//     histogram passes run on those alone.
//  3. One pass in index order emits every index whose key is below T and the
//     first k-below indices whose key equals T. The result is therefore in
//     ascending index order, and ties go to the lower index.
//
// Small inputs take a simpler sort-based path.

// smallSelect is the largest n handled by sorting (key, index) pairs.
const smallSelect = 256

// Radix digits of the 32-bit key: 11 high bits, 11 middle bits, 10 low bits.
const (
	hiShift  = 21
	midShift = 10
	midMask  = 1<<11 - 1
	loMask   = 1<<10 - 1
)

// scoreKey maps a score to a key whose unsigned order is the score order:
// -Inf < negative < ±0 < positive < +Inf < NaN. Every NaN maps to the highest
// key and -0 to the key of +0, so they tie (and the lower index wins).
func scoreKey(f float32) uint32 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return math.MaxUint32
	}
	if b == 0x80000000 {
		b = 0
	}
	// Negative: flip all bits (larger magnitude sorts lower). Non-negative:
	// set the sign bit (sorts above every negative).
	return b ^ (uint32(int32(b)>>31) | 0x80000000)
}

// Selector computes lowest-k selections, keeping its scratch space between
// calls so that repeated calls of similar size do not allocate. The zero
// value is ready to use. A Selector must not be used by several goroutines at
// once; the package-level [LowestK] and [LowestKBatched] draw Selectors from a
// pool.
type Selector struct {
	hiHist  [1 << 11]uint32
	midHist [1 << 11]uint32
	loHist  [1 << 10]uint32
	cand    []uint32 // keys that may hold the threshold
	sample  []uint32 // sampled keys of a large input
	pairs   []uint64 // key<<32 | index, for the small path

	sampleMisses int // sampled guesses that missed, for tests
}

var selectorPool = sync.Pool{New: func() any { return new(Selector) }}

// LowestK returns the indices of the k lowest scores, in ascending index
// order, appended to dst[:0]. Equal scores are ranked by index (the lower
// index is kept first); -0 and +0 are equal; NaN ranks above +Inf, so NaN
// scores are the last to be kept. k must be in [0, len(scores)] and
// len(scores) at most MaxInt32; otherwise the error wraps [ErrShape]. It runs
// in O(len(scores)) time.
func LowestK(dst []int32, scores []float32, k int) ([]int32, error) {
	s := selectorPool.Get().(*Selector)
	defer selectorPool.Put(s)
	return s.LowestK(dst, scores, k)
}

// LowestKBatched selects independently for each of heads rows of n scores:
// scores is heads×n row-major, and the result, appended to dst[:0], is
// heads×k row-major, row h holding the indices (0..n-1, within that row) of
// the k lowest scores of head h in ascending order, with the tie rules of
// [LowestK]. len(scores) must be heads*n and k in [0, n].
func LowestKBatched(dst []int32, scores []float32, heads, n, k int) ([]int32, error) {
	s := selectorPool.Get().(*Selector)
	defer selectorPool.Put(s)
	return s.LowestKBatched(dst, scores, heads, n, k)
}

// LowestK is the package-level [LowestK] using s's scratch space.
func (s *Selector) LowestK(dst []int32, scores []float32, k int) ([]int32, error) {
	n := len(scores)
	if n > math.MaxInt32 {
		return dst[:0], fmt.Errorf("%w: len(scores)=%d exceeds MaxInt32", ErrShape, n)
	}
	if k < 0 || k > n {
		return dst[:0], fmt.Errorf("%w: k=%d is not in [0, len(scores)=%d]", ErrShape, k, n)
	}
	return s.lowestK(dst[:0], scores, k), nil
}

// LowestKBatched is the package-level [LowestKBatched] using s's scratch
// space.
func (s *Selector) LowestKBatched(dst []int32, scores []float32, heads, n, k int) ([]int32, error) {
	if heads < 0 || n < 0 {
		return dst[:0], fmt.Errorf("%w: heads=%d and n=%d must not be negative", ErrShape, heads, n)
	}
	if n > math.MaxInt32 {
		return dst[:0], fmt.Errorf("%w: n=%d exceeds MaxInt32", ErrShape, n)
	}
	if hi, total := bits.Mul64(uint64(heads), uint64(n)); hi != 0 || total != uint64(len(scores)) {
		return dst[:0], fmt.Errorf("%w: len(scores)=%d is not heads*n (heads=%d, n=%d)", ErrShape, len(scores), heads, n)
	}
	if k < 0 || k > n {
		return dst[:0], fmt.Errorf("%w: k=%d is not in [0, n=%d]", ErrShape, k, n)
	}
	dst = slices.Grow(dst[:0], heads*k)
	for h := range heads {
		row := s.lowestK(dst[len(dst):len(dst)], scores[h*n:(h+1)*n], k)
		dst = dst[:len(dst)+len(row)]
	}
	return dst, nil
}

// lowestK appends the selection to dst, which must be empty. Arguments are
// valid: 0 <= k <= len(scores) <= MaxInt32.
func (s *Selector) lowestK(dst []int32, scores []float32, k int) []int32 {
	n := len(scores)
	dst = slices.Grow(dst, k)
	switch {
	case k == 0:
		return dst
	case k == n:
		for i := range n {
			dst = append(dst, int32(i))
		}
		return dst
	case n <= smallSelect:
		return s.lowestKSmall(dst, scores, k)
	}
	return s.lowestKRadix(dst, scores, k)
}

// lowestKRadix is the radix-select path of lowestK, valid for any
// 1 <= k < len(scores); dst is empty with capacity for k.
func (s *Selector) lowestKRadix(dst []int32, scores []float32, k int) []int32 {
	t, below, equal := s.threshold(scores, k)
	dst = dst[:k]
	cnt := 0
	if below+equal == k {
		// Every score equal to the threshold is kept (the usual case: the
		// threshold score is unique), so the test is simply key <= t.
		for i := 0; i < len(scores) && cnt < k; i++ {
			dst[cnt] = int32(i)
			cnt += int(b2u(scoreKey(scores[i]) <= t))
		}
		return dst
	}
	// Emit without data-dependent branches (about half of them would be
	// mispredicted): every index is written at dst[cnt], and cnt advances
	// only when the index is kept. The loop ends once k are kept, so cnt < k
	// at every write.
	ties := uint(k - below) // keys equal to t still to keep, lowest index first
	for i := 0; i < len(scores) && cnt < k; i++ {
		key := scoreKey(scores[i])
		eq := b2u(key == t) & b2u(ties > 0)
		take := b2u(key < t) | eq
		ties -= eq
		dst[cnt] = int32(i)
		cnt += int(take)
	}
	return dst
}

// b2u is 1 for true and 0 for false; the compiler makes it a SETcc.
func b2u(b bool) uint {
	var u uint
	if b {
		u = 1
	}
	return u
}

// lowestKSmall sorts (key, index) pairs: for small n this beats clearing the
// histograms.
func (s *Selector) lowestKSmall(dst []int32, scores []float32, k int) []int32 {
	p := s.pairs[:0]
	for i, f := range scores {
		p = append(p, uint64(scoreKey(f))<<32|uint64(i))
	}
	s.pairs = p
	slices.Sort(p)
	for _, v := range p[:k] {
		dst = append(dst, int32(uint32(v)))
	}
	slices.Sort(dst)
	return dst
}

// threshold returns the key t of the score of rank k-1 (0-based, ties
// broken by index), the number of scores whose key is below t, and the
// number whose key equals t. 1 <= k < len(scores).
func (s *Selector) threshold(scores []float32, k int) (t uint32, below, equal int) {
	if len(scores) >= sampleMinN {
		if t, below, equal, ok := s.sampledThreshold(scores, k); ok {
			return t, below, equal
		}
		s.sampleMisses++
	}
	keys := s.growCand(len(scores))[:len(scores)]
	for i, f := range scores {
		keys[i] = scoreKey(f)
	}
	return s.selectKey(keys, uint32(k-1))
}

// Sampling: the threshold of a large input is first guessed from sampleSize
// keys taken at a regular stride. One pass then counts the keys below the
// guessed range and gathers those inside it; when the wanted rank falls
// inside, the radix passes run on the (small) gathered set only. Otherwise
// (a misleading sample, say periodic data) threshold falls back to all keys.
const (
	sampleSize = 2048
	sampleMinN = 16 * sampleSize
)

func (s *Selector) sampledThreshold(scores []float32, k int) (t uint32, below, equal int, ok bool) {
	n, rank := len(scores), k-1
	sample := s.sample[:0]
	for i := range sampleSize {
		sample = append(sample, scoreKey(scores[i*(n/sampleSize)]))
	}
	s.sample = sample
	slices.Sort(sample)

	// The rank's position in the sample, widened by three standard
	// deviations of a sampled quantile plus a constant.
	q := float64(rank) / float64(n)
	p := int(q * sampleSize)
	margin := int(3*math.Sqrt(sampleSize*q*(1-q))) + 16
	lo, hi := uint32(0), uint32(math.MaxUint32)
	if p-margin > 0 {
		lo = sample[p-margin]
	}
	if p+margin < sampleSize-1 {
		hi = sample[p+margin]
	}

	// One pass, no data-dependent branches: every key is written at
	// cand[c], and c advances only for keys in [lo, hi].
	cand := s.growCand(n)
	width := hi - lo
	c, lt := 0, 0
	for _, f := range scores {
		key := scoreKey(f)
		cand[c] = key
		c += int(b2u(key-lo <= width))
		lt += int(b2u(key < lo))
	}
	if rank < lt || rank >= lt+c {
		return 0, 0, 0, false
	}
	t, below, equal = s.selectKey(cand[:c], uint32(rank-lt))
	return t, lt + below, equal, true
}

// growCand returns s.cand with room for n+1 keys.
func (s *Selector) growCand(n int) []uint32 {
	if cap(s.cand) < n+1 {
		s.cand = make([]uint32, n+1)
	}
	return s.cand[:n+1]
}

// selectKey returns the key of the given rank (0-based) among keys, the
// number of keys below it and the number equal to it, with three histogram
// passes over 11, 11 and 10 bits. It reorders keys.
func (s *Selector) selectKey(keys []uint32, rank uint32) (t uint32, below, equal int) {
	clear(s.hiHist[:])
	for _, key := range keys {
		s.hiHist[key>>hiShift]++
	}
	hi, before := digitOf(s.hiHist[:], rank)
	rank -= before
	below = int(before)

	// Keep the keys with that high digit, compacted in place (m never
	// passes the read position).
	m := 0
	for _, key := range keys {
		keys[m] = key
		m += int(b2u(key>>hiShift == hi))
	}
	keys = keys[:m]
	clear(s.midHist[:])
	for _, key := range keys {
		s.midHist[key>>midShift&midMask]++
	}
	mid, before := digitOf(s.midHist[:], rank)
	rank -= before
	below += int(before)

	clear(s.loHist[:])
	for _, key := range keys {
		if key>>midShift&midMask == mid {
			s.loHist[key&loMask]++
		}
	}
	lo, before := digitOf(s.loHist[:], rank)
	below += int(before)
	return hi<<hiShift | mid<<midShift | lo, below, int(s.loHist[lo])
}

// digitOf returns the bucket holding the element of the given rank and the
// number of elements in the buckets before it.
func digitOf(hist []uint32, rank uint32) (digit, before uint32) {
	for d, c := range hist {
		if rank < c {
			return uint32(d), before
		}
		rank -= c
		before += c
	}
	panic("kernels: radix select rank beyond histogram") // unreachable: rank < total count
}
