package conformance

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestPairedBootstrapKnownAnswers: the same values compared with
// themselves are never distinguishable; a planted effect far larger than
// the noise always is, with the right sign; noise alone is not.
func TestPairedBootstrapKnownAnswers(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	noisy := func(n int, shift, sd float64) []float64 {
		v := make([]float64, n)
		for i := range v {
			v[i] = 1.4 + shift + sd*rng.NormFloat64()
		}
		return v
	}
	a := noisy(16, 0, 0.1)
	planted := make([]float64, len(a))
	for i := range a {
		planted[i] = a[i] + 0.05 + 0.002*rng.NormFloat64() // every instance 0.05 nats worse
	}
	small := make([]float64, len(a))
	for i := range a {
		small[i] = a[i] + 0.01*rng.NormFloat64() // no effect, only noise
	}
	cases := []struct {
		name     string
		b        []float64
		relative bool
		verdict  string
	}{
		{"identical", a, false, NotDistinguishable},
		{"identical relative", a, true, NotDistinguishable},
		{"planted worse", planted, false, Higher},
		{"planted worse relative", planted, true, Higher},
		{"noise only", small, false, NotDistinguishable},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rs := newResampler(len(a), 0, 7)
			d, iv, v := rs.pairedDiff(c.b, a, c.relative)
			assert.Equal(t, c.verdict, v, "Δ %v %v", d, iv)
			assert.True(t, iv.Contains(float64(d)), "the estimate %v lies in its interval %v", d, iv)
			// The opposite comparison mirrors the verdict.
			_, _, back := rs.pairedDiff(a, c.b, c.relative)
			switch c.verdict {
			case Higher:
				assert.Equal(t, Lower, back)
			default:
				assert.Equal(t, c.verdict, back)
			}
			if c.name == "identical" {
				assert.Equal(t, Interval{0, 0}, iv, "a paired difference of identical values is exactly 0")
			}
		})
	}
}

// TestBootstrapIsSeededAndCovers: the same seed gives the same interval; the
// interval of a mean covers the true mean of a known distribution in most
// repetitions (about 95%).
func TestBootstrapIsSeededAndCovers(t *testing.T) {
	v := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	assert.Equal(t, newResampler(len(v), 500, 1).meanCI(v), newResampler(len(v), 500, 1).meanCI(v))
	assert.NotEqual(t, newResampler(len(v), 500, 1).meanCI(v), newResampler(len(v), 500, 2).meanCI(v))

	rng := rand.New(rand.NewPCG(9, 9))
	covered, reps := 0, 200
	for r := range reps {
		x := make([]float64, 30)
		for i := range x {
			x[i] = 2 + rng.NormFloat64()
		}
		if newResampler(len(x), 400, uint64(r)).meanCI(x).Contains(2) {
			covered++
		}
	}
	// A percentile bootstrap at n = 30 covers a little under 95%.
	assert.InDelta(t, 0.93, float64(covered)/float64(reps), 0.05)

	// The perplexity interval is exp of the loss interval.
	loss := []float64{1.2, 1.4, 1.3, 1.5}
	rs := newResampler(len(loss), 300, 5)
	l, p := rs.meanCI(loss), rs.pplCI(loss)
	assert.InDelta(t, math.Exp(float64(l.Lo)), float64(p.Lo), 1e-12)
	assert.InDelta(t, math.Exp(float64(l.Hi)), float64(p.Hi), 1e-12)

	empty := newResampler(0, 10, 1).meanCI(nil)
	assert.False(t, empty.Valid())
}

// TestJudgeOnIntervals: a row is pass only when its whole interval is within
// the tolerance, FAIL when the whole interval is outside, uncertain between.
func TestJudgeOnIntervals(t *testing.T) {
	tol := DefaultTolerances()
	base := &Row{Baseline: true, Status: StatusOK, Metrics: Metrics{"ppl": 4, "match_rate": 1, "identical": 1}}
	cases := []struct {
		name    string
		task    string
		metrics Metrics
		ci      map[string]Interval
		want    string
	}{
		{"ppl within", TaskLM, Metrics{"ppl": 4.01}, map[string]Interval{"ppl_increase": {0.001, 0.004}}, VerdictPass},
		{"ppl straddles", TaskLM, Metrics{"ppl": 4.02}, map[string]Interval{"ppl_increase": {0.001, 0.02}}, VerdictUncertain},
		{"ppl outside", TaskLM, Metrics{"ppl": 4.2}, map[string]Interval{"ppl_increase": {0.03, 0.07}}, VerdictFail},
		{"greedy within", TaskGreedy, Metrics{"match_rate": 0.97}, map[string]Interval{"match_rate": {0.92, 1}}, VerdictPass},
		{"greedy straddles", TaskGreedy, Metrics{"match_rate": 0.93}, map[string]Interval{"match_rate": {0.85, 0.99}}, VerdictUncertain},
		{"greedy outside", TaskGreedy, Metrics{"match_rate": 0.5}, map[string]Interval{"match_rate": {0.4, 0.6}}, VerdictFail},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := &Row{Keep: 0.5, Status: StatusOK, Metrics: c.metrics, CI: c.ci}
			r.Metrics["identical"] = 0
			judge(c.task, r, base, tol, nil)
			require.Equal(t, c.want, r.Verdict, r.Reason)
		})
	}
}
