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
	Runtime string `json:"runtime"`
	Rows    int    `json:"rows"`
	Pairs   int    `json:"pairs"`
	// Cost is the mean over rows of (tokens/s with ÷ without) − 1, each
	// row weighing the same; CI a 95% bootstrap interval of it, resampling
	// the pairs within each row (stratified by row).
	Cost float64    `json:"cost"`
	CI   [2]float64 `json:"ci"`
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

// PairedPool is the paired decode ratio (compressed ÷ uncompressed, in
// tokens/s) pooled over the rows of one runtime, prompt length, keep and
// thread count, and the A/A ratio of the control engine when every row has
// one.
type PairedPool struct {
	Runtime      string  `json:"runtime"`
	PromptTokens int     `json:"prompt_tokens"`
	Keep         float64 `json:"keep"`
	Threads      int     `json:"threads"`
	Rows         int     `json:"rows"`
	Blocks       int     `json:"turns"` // turns pooled: one block of each side per turn
	// Ratio is the mean over rows of the row's ×paired (each row weighing
	// the same); CI a 95% bootstrap interval of it, resampling the turns
	// within each row (a turn's block of the compressed engine with the
	// uncompressed engine's block of the same turn).
	Ratio float64    `json:"ratio"`
	CI    [2]float64 `json:"ci"`
	// Control and ControlCI: the same for the control engine ÷ the
	// uncompressed one (0 when a row has no control).
	Control   float64    `json:"control,omitempty"`
	ControlCI [2]float64 `json:"control_ci"`
	TwinRows  int        `json:"twin_rows"` // rows whose uncompressed engines were twins (Row.PairedTwins)
	EvenRows  int        `json:"even_rows"` // rows whose engines grew alike (Row.PairedEvenGrowth)
}

// PoolPaired pools the paired ratio of the rows that hold per-token
// latencies (Row.PairedLatencyMs "with" and "base"), grouped by runtime,
// prompt length, keep and threads, in order of first appearance.
func PoolPaired(rows []*Row) []PairedPool {
	type key struct {
		rt      string
		prompt  int
		keep    float64
		threads int
	}
	type group struct {
		ratio, control [][2][]float64
		twins, even    int
	}
	by := map[key]*group{}
	var order []key
	// blocks sums a side's latencies per turn.
	blocks := func(l []float64, b, n int) []float64 {
		out := make([]float64, 0, (n+b-1)/b)
		for i := 0; i < n; i += b {
			var s float64
			for _, x := range l[i:min(i+b, n)] {
				s += x
			}
			out = append(out, s)
		}
		return out
	}
	for _, r := range rows {
		with, base := r.PairedLatencyMs["with"], r.PairedLatencyMs["base"]
		n := min(len(with), len(base))
		if n == 0 {
			continue
		}
		k := key{r.Runtime, r.PromptTokens, r.Keep, r.Threads}
		g := by[k]
		if g == nil {
			g = &group{}
			by[k] = g
			order = append(order, k)
		}
		b := r.PairedBlock
		if b <= 0 {
			b = DefaultPairedBlock // rows from before the block was recorded
		}
		g.ratio = append(g.ratio, [2][]float64{blocks(with, b, n), blocks(base, b, n)})
		if r.PairedTwins {
			g.twins++
		}
		if r.PairedEvenGrowth {
			g.even++
		}
		if ctl := r.PairedLatencyMs["control"]; len(ctl) >= n {
			g.control = append(g.control, [2][]float64{blocks(ctl, b, n), blocks(base, b, n)})
		}
	}
	var out []PairedPool
	for i, k := range order {
		g := by[k]
		p := PairedPool{Runtime: k.rt, PromptTokens: k.prompt, Keep: k.keep, Threads: k.threads, Rows: len(g.ratio), TwinRows: g.twins, EvenRows: g.even}
		for _, r := range g.ratio {
			p.Blocks += len(r[0])
		}
		var c float64
		c, p.CI = costCI(g.ratio, 100+uint64(i))
		p.Ratio, p.CI[0], p.CI[1] = 1+c, 1+p.CI[0], 1+p.CI[1]
		if len(g.control) == len(g.ratio) {
			c, p.ControlCI = costCI(g.control, 200+uint64(i))
			p.Control, p.ControlCI[0], p.ControlCI[1] = 1+c, 1+p.ControlCI[0], 1+p.ControlCI[1]
		}
		out = append(out, p)
	}
	return out
}

// WritePairedPool prints one line per group.
func WritePairedPool(w io.Writer, pools []PairedPool) error {
	for _, p := range pools {
		loads := fmt.Sprintf("twins in %d", p.TwinRows)
		switch p.TwinRows {
		case p.Rows:
			loads = "twins"
		case 0:
			loads = "separate loads"
		}
		switch p.EvenRows {
		case p.Rows:
			loads += ", even growth"
		case 0:
		default:
			loads += fmt.Sprintf(", even growth in %d", p.EvenRows)
		}
		ctl := ""
		if p.Control > 0 {
			ctl = fmt.Sprintf("; A/A control ×%.3f (95%% CI ×%.3f … ×%.3f)", p.Control, p.ControlCI[0], p.ControlCI[1])
		}
		threads := "threads"
		if p.Threads == 1 {
			threads = "thread"
		}
		if _, err := fmt.Fprintf(w, "%s: %d tokens keep %g, %d %s: paired decode, pooled over %d rows (%d turns, %s): ×%.3f (95%% CI ×%.3f … ×%.3f)%s\n",
			p.Runtime, p.PromptTokens, p.Keep, p.Threads, threads, p.Rows, p.Blocks, loads, p.Ratio, p.CI[0], p.CI[1], ctl); err != nil {
			return err
		}
	}
	return nil
}
