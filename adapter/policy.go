package adapter

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/kvnorm/kvnorm/hooks"
)

// ErrPolicy is wrapped by every policy validation error.
var ErrPolicy = errors.New("adapter: invalid policy")

// Method is how a policy scores positions; the lowest scores are kept.
type Method uint8

const (
	// KNorm keeps the keys of lowest L2 norm (Devoto et al. 2024).
	KNorm Method = iota
	// Random keeps a seeded uniformly random subset (a baseline).
	Random
	// Streaming keeps the sinks and the most recent positions only
	// (StreamingLLM-style baseline).
	Streaming
	// Inverse keeps the keys of highest L2 norm (a control that should do worse).
	Inverse
)

var methodNames = [...]string{KNorm: "knorm", Random: "random", Streaming: "streaming", Inverse: "inverse"}

// String returns the method's name as ParseMethod accepts it.
func (m Method) String() string {
	if int(m) < len(methodNames) {
		return methodNames[m]
	}
	return fmt.Sprintf("method(%d)", uint8(m))
}

// ParseMethod parses knorm, random, streaming or inverse.
func ParseMethod(s string) (Method, error) {
	for i, n := range methodNames {
		if strings.EqualFold(s, n) {
			return Method(i), nil
		}
	}
	return 0, fmt.Errorf("%w: policy=%q: want one of %s", ErrPolicy, s, strings.Join(methodNames[:], ", "))
}

// Aggregation turns the per-head norms of one position into one score, for
// per-token granularity. Skipped layers do not vote.
type Aggregation uint8

const (
	// MeanRank ranks positions by norm within each (layer, head) and averages
	// the ranks: every head has the same say whatever its norm scale.
	MeanRank Aggregation = iota
	// MeanNorm averages the norms over (layer, head).
	MeanNorm
	// MinNorm takes the smallest norm over (layer, head): a position is kept
	// if any head finds it important.
	MinNorm
	// MaxNorm takes the largest norm over (layer, head): a position is kept
	// only if every head finds it important.
	MaxNorm
)

var aggregationNames = [...]string{MeanRank: "mean-rank", MeanNorm: "mean-norm", MinNorm: "min-norm", MaxNorm: "max-norm"}

// String returns the aggregation's name as ParseAggregation accepts it.
func (a Aggregation) String() string {
	if int(a) < len(aggregationNames) {
		return aggregationNames[a]
	}
	return fmt.Sprintf("aggregation(%d)", uint8(a))
}

// ParseAggregation parses mean-rank, mean-norm, min-norm or max-norm.
func ParseAggregation(s string) (Aggregation, error) {
	for i, n := range aggregationNames {
		if strings.EqualFold(s, n) {
			return Aggregation(i), nil
		}
	}
	return 0, fmt.Errorf("%w: aggregate=%q: want one of %s", ErrPolicy, s, strings.Join(aggregationNames[:], ", "))
}

// Policy says what a sequence keeps when it is compressed.
//
// The budget is Budget positions per head when Budget > 0, else
// ceil(Keep × live positions). Sinks (the first Sinks live positions), the
// recent window (the last Window) and the last position are kept before any
// score is looked at; the rest of the budget goes to the lowest scores.
type Policy struct {
	Method Method
	// Keep is the fraction of positions kept, in (0, 1]; used when Budget is 0.
	Keep float64
	// Budget is an absolute number of positions kept per head; 0 uses Keep.
	Budget int
	// SkipLayers keep every position in per-head mode and do not vote in
	// per-token mode (the paper skips layers 0 and 1). Under cache pressure
	// they are compressed too, since every layer must fit the cache.
	SkipLayers []int
	// Sinks protects the first Sinks live positions; Window the last Window.
	Sinks, Window int
	Granularity   hooks.Granularity
	// Aggregate combines per-head norms for per-token granularity.
	Aggregate Aggregation
	// MinPrompt: a prefill of fewer positions is not compressed.
	MinPrompt int
	// Seed drives the Random method.
	Seed uint64
	// Reserve is how many extra cells a pressure compression frees beyond
	// the incoming batch, so decoding does not compress at every token.
	// 0 means live/16 (at least 1).
	Reserve int
}

// DefaultPolicy is the paper's setting: knorm, keep half, skip layers 0 and 1,
// per-token granularity (the one every runtime supports).
func DefaultPolicy() Policy {
	return Policy{Method: KNorm, Keep: 0.5, SkipLayers: []int{0, 1}, Granularity: hooks.PerToken, Aggregate: MeanRank}
}

// Validate reports the first invalid field, naming it and its value.
func (p Policy) Validate() error {
	if int(p.Method) >= len(methodNames) {
		return fmt.Errorf("%w: policy=%s", ErrPolicy, p.Method)
	}
	if p.Budget < 0 {
		return fmt.Errorf("%w: budget=%d must be >= 0", ErrPolicy, p.Budget)
	}
	if p.Budget == 0 && (math.IsNaN(p.Keep) || p.Keep <= 0 || p.Keep > 1) {
		return fmt.Errorf("%w: keep=%v must be in (0, 1]", ErrPolicy, p.Keep)
	}
	if p.Sinks < 0 {
		return fmt.Errorf("%w: sinks=%d must be >= 0", ErrPolicy, p.Sinks)
	}
	if p.Window < 0 {
		return fmt.Errorf("%w: window=%d must be >= 0", ErrPolicy, p.Window)
	}
	// Positions are int32: a larger count protects nothing more, and sums
	// of two such counts would overflow.
	for _, f := range []struct {
		name string
		v    int
	}{{"budget", p.Budget}, {"sinks", p.Sinks}, {"window", p.Window}, {"min prompt", p.MinPrompt}, {"reserve", p.Reserve}} {
		if f.v > MaxPositions {
			return fmt.Errorf("%w: %s=%d exceeds %d, the most positions a sequence can hold", ErrPolicy, f.name, f.v, MaxPositions)
		}
	}
	if p.Budget > 0 && p.Sinks+p.Window > p.Budget {
		return fmt.Errorf("%w: sinks+window=%d+%d exceeds budget=%d", ErrPolicy, p.Sinks, p.Window, p.Budget)
	}
	if p.Granularity != hooks.PerToken && p.Granularity != hooks.PerHead {
		return fmt.Errorf("%w: granularity=%s", ErrPolicy, p.Granularity)
	}
	if int(p.Aggregate) >= len(aggregationNames) {
		return fmt.Errorf("%w: aggregate=%s", ErrPolicy, p.Aggregate)
	}
	for _, l := range p.SkipLayers {
		if l < 0 || l > MaxPositions {
			return fmt.Errorf("%w: skip layer %d must be in [0, %d]", ErrPolicy, l, MaxPositions)
		}
	}
	if p.MinPrompt < 0 {
		return fmt.Errorf("%w: min prompt=%d must be >= 0", ErrPolicy, p.MinPrompt)
	}
	if p.Reserve < 0 {
		return fmt.Errorf("%w: reserve=%d must be >= 0", ErrPolicy, p.Reserve)
	}
	return nil
}

// MaxPositions is the largest count of positions a policy field may hold
// (positions are int32).
const MaxPositions = math.MaxInt32

// A Mismatch is a setting that Validate accepts but that cannot work on a
// given model: Policy.CheckModel reports one per setting. Callers print it
// under their own name for the setting (a flag, an environment variable).
type Mismatch struct {
	// Field names the Policy field: "SkipLayers", "Budget" or "Sinks+Window".
	Field string
	// Problem says what is wrong and what happens, in one line.
	Problem string
	// Off is set when nothing can be compressed on this model at all.
	Off bool
}

func (m Mismatch) Error() string { return m.Field + ": " + m.Problem }

// CheckModel reports the settings of p that cannot work on a model of
// layers layers whose sequences hold context cells (0: unknown, not
// checked): skipped layers the model does not have, every layer skipped, a
// budget that keeps every position the context can hold (the prompt is never
// compressed after prefill, only under cache pressure), and sinks plus window
// that protect the whole context. p is assumed valid (Validate).
func (p Policy) CheckModel(layers, context int) []Mismatch {
	var out []Mismatch
	if layers > 0 {
		var beyond []int
		skipped := map[int]bool{}
		for _, l := range p.SkipLayers {
			if l >= layers {
				beyond = append(beyond, l)
			} else {
				skipped[l] = true
			}
		}
		if len(beyond) > 0 {
			out = append(out, Mismatch{Field: "SkipLayers", Problem: fmt.Sprintf(
				"layer(s) %s do not exist: the model has %d layers (0-%d); they are ignored", FormatLayers(beyond), layers, layers-1)})
		}
		if len(skipped) == layers {
			what := "no layer is compressed"
			if p.Granularity == hooks.PerToken {
				what = "no layer votes, so no position can be scored"
			}
			out = append(out, Mismatch{Field: "SkipLayers", Off: true, Problem: fmt.Sprintf(
				"%s skips every one of the model's %d layers: %s; compression is off", FormatLayers(p.SkipLayers), layers, what)})
		}
	}
	if context > 0 {
		if p.Budget >= context {
			out = append(out, Mismatch{Field: "Budget", Problem: fmt.Sprintf(
				"budget=%d >= the context of %d cells: every position fits the budget, so a prompt is never compressed after prefill (only under cache pressure)", p.Budget, context)})
		}
		// The last position is always kept, hence max(window, 1).
		if p.Sinks+max(p.Window, 1) >= context {
			out = append(out, Mismatch{Field: "Sinks+Window", Off: true, Problem: fmt.Sprintf(
				"sinks+window=%d+%d (with the last position) cover the context of %d cells: every position is protected; compression is off", p.Sinks, p.Window, context)})
		}
	}
	return out
}

// String describes the policy in one line, e.g.
// "knorm keep=0.5 per-token/mean-rank skip=0,1 sinks=0 window=0".
func (p Policy) String() string {
	var b strings.Builder
	b.WriteString(p.Method.String())
	if p.Budget > 0 {
		fmt.Fprintf(&b, " budget=%d", p.Budget)
	} else {
		fmt.Fprintf(&b, " keep=%g", p.Keep)
	}
	b.WriteString(" " + p.Granularity.String())
	if p.Granularity == hooks.PerToken {
		b.WriteString("/" + p.Aggregate.String())
	}
	fmt.Fprintf(&b, " skip=%s sinks=%d window=%d", FormatLayers(p.SkipLayers), p.Sinks, p.Window)
	if p.Method == Random {
		fmt.Fprintf(&b, " seed=%d", p.Seed)
	}
	return b.String()
}

// Target is the number of positions per head the policy keeps out of live.
// It never exceeds live and never drops below what is protected.
func (p Policy) Target(live int) int {
	t := p.Budget
	if t <= 0 {
		// The small epsilon keeps 0.5×300 at 150 despite rounding.
		t = int(math.Ceil(p.Keep*float64(live) - 1e-9))
	}
	return min(max(t, p.protectedCount(live)), live)
}

// protectedCount is the number of positions kept before any score is seen.
func (p Policy) protectedCount(live int) int {
	if live == 0 {
		return 0
	}
	return min(live, p.Sinks+max(p.Window, 1))
}

func (p Policy) skips(layer int) bool {
	for _, l := range p.SkipLayers {
		if l == layer {
			return true
		}
	}
	return false
}

// ParseLayers parses a comma-separated list of layer indices such as "0,1";
// "none" or "" is the empty list.
func ParseLayers(s string) ([]int, error) {
	s = strings.TrimSpace(s)
	if s == "" || strings.EqualFold(s, "none") {
		return []int{}, nil
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 || n > MaxPositions {
			return nil, fmt.Errorf("%w: skip layers %q: %q is not a layer index", ErrPolicy, s, f)
		}
		out = append(out, n)
	}
	return out, nil
}

// FormatLayers is the inverse of ParseLayers.
func FormatLayers(l []int) string {
	if len(l) == 0 {
		return "none"
	}
	parts := make([]string, len(l))
	for i, v := range l {
		parts[i] = strconv.Itoa(v)
	}
	return strings.Join(parts, ",")
}
