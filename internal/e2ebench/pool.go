package e2ebench

import (
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
)

// ObserverPool is the observer's cost pooled over the rows of one runtime:
// rows measured with the observer and without it on the same engine, token
// by token (Row.PairedLatencyMs "with" and "without", pair i decoded next to
// each other).
type ObserverPool struct {
	Runtime string
	Rows    int
	Pairs   int
	// Cost is the mean over rows of (tokens/s with ÷ without) − 1, each
	// row weighing the same; CI a 95% bootstrap interval of it, resampling
	// the pairs within each row (stratified by row).
	Cost float64
	CI   [2]float64
}

// PoolObserver pools the observer's cost by runtime over the rows that hold
// per-token latencies with and without the observer, runtimes in order of
// first appearance. Rows without them (older runs, no observer) are skipped.
func PoolObserver(rows []*Row) []ObserverPool {
	by := map[string][][2][]float64{}
	var order []string
	for _, r := range rows {
		with, without := r.PairedLatencyMs["with"], r.PairedLatencyMs["without"]
		n := min(len(with), len(without))
		if n == 0 {
			continue
		}
		if _, ok := by[r.Runtime]; !ok {
			order = append(order, r.Runtime)
		}
		by[r.Runtime] = append(by[r.Runtime], [2][]float64{with[:n], without[:n]})
	}
	var out []ObserverPool
	for _, rt := range order {
		rs := by[rt]
		p := ObserverPool{Runtime: rt, Rows: len(rs)}
		for _, r := range rs {
			p.Pairs += len(r[0])
		}
		p.Cost, p.CI = costCI(rs, 3)
		out = append(out, p)
	}
	return out
}

// costCI returns the mean over rows of (tokens/s with ÷ without) − 1 (each
// row a pair of latency lists, with and without, pair i decoded next to
// each other) and a 95% percentile bootstrap interval of it, resampling
// the pairs within each row from a generator seeded with stream.
func costCI(rows [][2][]float64, stream uint64) (float64, [2]float64) {
	cost := func(with, without []float64, idx func(int) int) float64 {
		var sw, so float64
		for i := range with {
			j := idx(i)
			sw += with[j]
			so += without[j]
		}
		return so/sw - 1
	}
	var mean float64
	for _, r := range rows {
		mean += cost(r[0], r[1], func(i int) int { return i }) / float64(len(rows))
	}
	const resamples = 4000
	rng := rand.New(rand.NewPCG(14, stream))
	stats := make([]float64, resamples)
	for b := range stats {
		for _, r := range rows {
			n := len(r[0])
			stats[b] += cost(r[0], r[1], func(int) int { return rng.IntN(n) }) / float64(len(rows))
		}
	}
	slices.Sort(stats)
	return mean, [2]float64{stats[resamples*25/1000], stats[resamples*975/1000-1]}
}

// WriteObserverPool prints one line per runtime.
func WriteObserverPool(w io.Writer, pools []ObserverPool) error {
	if len(pools) == 0 {
		_, err := fmt.Fprintln(w, "no rows with per-token latencies with and without the observer (bench e2e --paired with --decode-observer)")
		return err
	}
	for _, p := range pools {
		if _, err := fmt.Fprintf(w, "%s: decode with the observer vs without it, pooled over %d rows (%d token pairs): %+.2f%% (95%% CI %+.2f%% … %+.2f%%)\n",
			p.Runtime, p.Rows, p.Pairs, 100*p.Cost, 100*p.CI[0], 100*p.CI[1]); err != nil {
			return err
		}
	}
	return nil
}
