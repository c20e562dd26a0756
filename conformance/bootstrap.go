package conformance

import (
	"math"
	"math/rand/v2"
	"slices"
)

// DefaultBootstrap is the number of bootstrap resamples behind every
// interval.
const DefaultBootstrap = 2000

// CILevel is the coverage of every interval the suite reports.
const CILevel = 0.95

func bootstrapN(b int) int {
	if b <= 0 {
		return DefaultBootstrap
	}
	return b
}

// Interval is a percentile bootstrap confidence interval (CILevel) of a
// statistic over a task's samples.
type Interval struct {
	Lo Num `json:"lo"`
	Hi Num `json:"hi"`
}

// Contains reports whether v lies in [Lo, Hi].
func (iv Interval) Contains(v float64) bool { return float64(iv.Lo) <= v && v <= float64(iv.Hi) }

// Valid reports whether both bounds are finite.
func (iv Interval) Valid() bool {
	return !math.IsNaN(float64(iv.Lo)) && !math.IsNaN(float64(iv.Hi)) && !math.IsInf(float64(iv.Lo), 0) && !math.IsInf(float64(iv.Hi), 0)
}

// Comparison verdicts.
const (
	Higher             = "higher"
	Lower              = "lower"
	NotDistinguishable = "not distinguishable"
)

// Comparison is a paired comparison of a row with another row of the same
// task on the same instances: the difference of a metric and its paired
// bootstrap interval (every resample draws the same instances for both).
type Comparison struct {
	// Against is "baseline" or the policy compared with (same granularity
	// and keep).
	Against string `json:"against"`
	Metric  string `json:"metric"`
	// Delta is the row's value minus the other's (for ppl: the relative
	// increase, row / other − 1).
	Delta Num      `json:"delta"`
	CI    Interval `json:"ci"`
	// Verdict is Higher or Lower when the interval excludes 0, else
	// NotDistinguishable.
	Verdict string `json:"verdict"`
}

// resampler draws B bootstrap resamples of n instance indices from a seeded
// generator. Every row of a task uses the same resampler, so comparisons are
// paired and a run is repeatable number for number.
type resampler struct {
	n   int
	idx [][]int
}

func newResampler(n, b int, seed uint64) *resampler {
	b = bootstrapN(b)
	rng := rand.New(rand.NewPCG(seed, 0xb0075))
	r := &resampler{n: n, idx: make([][]int, b)}
	for i := range r.idx {
		ix := make([]int, n)
		for j := range ix {
			ix[j] = rng.IntN(n)
		}
		r.idx[i] = ix
	}
	return r
}

// interval is the percentile interval of stat over the resamples; resamples
// where stat is not finite are left out (NaN bounds when all are).
func (r *resampler) interval(stat func(idx []int) float64) Interval {
	if r.n == 0 {
		return Interval{Num(math.NaN()), Num(math.NaN())}
	}
	vals := make([]float64, 0, len(r.idx))
	for _, ix := range r.idx {
		if v := stat(ix); !math.IsNaN(v) && !math.IsInf(v, 0) {
			vals = append(vals, v)
		}
	}
	return percentileInterval(vals)
}

// percentileInterval is the central CILevel interval of vals.
func percentileInterval(vals []float64) Interval {
	if len(vals) == 0 {
		return Interval{Num(math.NaN()), Num(math.NaN())}
	}
	slices.Sort(vals)
	a := (1 - CILevel) / 2
	return Interval{Num(quantile(vals, a)), Num(quantile(vals, 1-a))}
}

// quantile of sorted v with linear interpolation.
func quantile(v []float64, q float64) float64 {
	pos := q * float64(len(v)-1)
	i := int(math.Floor(pos))
	if i >= len(v)-1 {
		return v[len(v)-1]
	}
	f := pos - float64(i)
	return v[i]*(1-f) + v[i+1]*f
}

// meanAt is the mean of v over the indices ix (NaN values left out).
func meanAt(v []float64, ix []int) float64 {
	var s float64
	n := 0
	for _, i := range ix {
		if x := v[i]; !math.IsNaN(x) {
			s += x
			n++
		}
	}
	if n == 0 {
		return math.NaN()
	}
	return s / float64(n)
}

// all returns the identity resample 0..n-1 (the point estimate).
func (r *resampler) all() []int {
	ix := make([]int, r.n)
	for i := range ix {
		ix[i] = i
	}
	return ix
}

// meanCI is the interval of the mean of v.
func (r *resampler) meanCI(v []float64) Interval {
	return r.interval(func(ix []int) float64 { return meanAt(v, ix) })
}

// pplCI is the interval of exp(mean loss).
func (r *resampler) pplCI(loss []float64) Interval {
	return r.interval(func(ix []int) float64 { return math.Exp(meanAt(loss, ix)) })
}

// pairedDiff compares a with b on the same instances: the difference of the
// means (relative: the ratio of exp(mean) − 1, for perplexity from losses).
func (r *resampler) pairedDiff(a, b []float64, relative bool) (Num, Interval, string) {
	stat := func(ix []int) float64 {
		ma, mb := meanAt(a, ix), meanAt(b, ix)
		if relative {
			return math.Exp(ma-mb) - 1
		}
		return ma - mb
	}
	d := stat(r.all())
	iv := r.interval(stat)
	return Num(d), iv, diffVerdict(iv)
}

// diffVerdict is Higher or Lower when the interval excludes 0.
func diffVerdict(iv Interval) string {
	switch {
	case !iv.Valid():
		return NotDistinguishable
	case iv.Lo > 0:
		return Higher
	case iv.Hi < 0:
		return Lower
	}
	return NotDistinguishable
}

// sampleCI is a bootstrap interval of the mean of per-sample values drawn
// with its own seeded resampler (for the attention task, whose samples are
// not rows of a sweep).
func sampleCI(v []float64, b int, seed uint64) Interval {
	return newResampler(len(v), b, seed).meanCI(v)
}
