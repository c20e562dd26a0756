package conformance

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"

	"github.com/kvnorm/kvnorm/hooks"
)

// Num is a float64 that encodes NaN and ±Inf as JSON null (a metric that
// could not be computed, such as a correlation over constant values).
type Num float64

// MarshalJSON implements json.Marshaler.
func (n Num) MarshalJSON() ([]byte, error) {
	f := float64(n)
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return []byte("null"), nil
	}
	return strconv.AppendFloat(nil, f, 'g', -1, 64), nil
}

// UnmarshalJSON implements json.Unmarshaler; null is NaN.
func (n *Num) UnmarshalJSON(b []byte) error {
	if bytes.Equal(b, []byte("null")) {
		*n = Num(math.NaN())
		return nil
	}
	var f float64
	if err := json.Unmarshal(b, &f); err != nil {
		return err
	}
	*n = Num(f)
	return nil
}

// Metrics maps a metric name to its value.
type Metrics map[string]Num

// Results is everything one run of the suite measured: results.json.
type Results struct {
	Settings Settings        `json:"settings"`
	Runtimes []RuntimeResult `json:"runtimes"`
}

// Settings echo the configuration.
type Settings struct {
	Model         string     `json:"model"`
	Tokenizer     string     `json:"tokenizer,omitempty"`
	Text          string     `json:"text"`
	Tasks         []string   `json:"tasks"`
	Policies      []string   `json:"policies"`
	Granularities []string   `json:"granularities"`
	Keeps         []float64  `json:"keeps"`
	BasePolicy    string     `json:"base_policy"`
	Seed          uint64     `json:"seed"`
	Bootstrap     int        `json:"bootstrap"`
	Quick         bool       `json:"quick"`
	Tolerances    Tolerances `json:"tolerances"`
}

// RuntimeResult is the results of one runtime.
type RuntimeResult struct {
	Runtime string            `json:"runtime"`
	Info    *hooks.EngineInfo `json:"info,omitempty"`
	// Shape is the runtime's cache shape (what one entry costs).
	Shape *hooks.CacheShape `json:"shape,omitempty"`
	// Error is set when the runtime could not be opened or failed as a whole.
	Error   string       `json:"error,omitempty"`
	Sizes   *Sizes       `json:"sizes,omitempty"`
	Tasks   []TaskResult `json:"tasks"`
	Seconds float64      `json:"seconds"`
}

// Row statuses.
const (
	StatusOK    = "ok"
	StatusNA    = "n/a"
	StatusError = "error"
)

// Verdicts of a row against the tolerances.
const (
	VerdictPass = "pass"
	VerdictFail = "FAIL"
	VerdictNA   = "n/a"
	// VerdictUncertain: the interval straddles the tolerance; more samples
	// would be needed to tell.
	VerdictUncertain = "uncertain"
)

// TaskResult is one task on one runtime.
type TaskResult struct {
	Task   string `json:"task"`
	Status string `json:"status"`
	Note   string `json:"note,omitempty"`
	// Inputs describe the task's seeded instances.
	Inputs []Input `json:"inputs,omitempty"`
	// Rows are the baseline, then one per granularity × policy × keep.
	Rows []Row `json:"rows,omitempty"`
	// Attention is set for the attention task.
	Attention *AttentionResult `json:"attention,omitempty"`
	Seconds   float64          `json:"seconds"`
}

// Input describes one instance of a task.
type Input struct {
	ID     string  `json:"id"`
	Tokens int     `json:"tokens"`
	Depth  Num     `json:"depth,omitempty"`
	Answer string  `json:"answer,omitempty"`
	Text   string  `json:"text,omitempty"`
	Sample int     `json:"sample"`
	Extra  Metrics `json:"extra,omitempty"`
}

// Row is one policy, granularity and keep ratio (or the baseline) on one
// task: its aggregate metrics, its verdict and every instance's numbers.
type Row struct {
	Baseline    bool    `json:"baseline,omitempty"`
	Policy      string  `json:"policy"`
	Granularity string  `json:"granularity"`
	Keep        float64 `json:"keep"`
	// Mode is "" for compression once after prefill, ModeChunked for
	// compression under pressure while the prompt is decoded into a cache
	// smaller than it.
	Mode    string  `json:"mode,omitempty"`
	Status  string  `json:"status"`
	Note    string  `json:"note,omitempty"`
	Metrics Metrics `json:"metrics,omitempty"`
	// CI holds the bootstrap interval of each metric that has one.
	CI map[string]Interval `json:"ci,omitempty"`
	// Compare are paired comparisons of the task's main metric with the
	// baseline and with knorm at the same granularity and keep.
	Compare []Comparison `json:"compare,omitempty"`
	Verdict string       `json:"verdict,omitempty"`
	Reason  string       `json:"reason,omitempty"`
	// Instances are the per-instance metrics, in Inputs order.
	Instances []InstanceResult `json:"instances,omitempty"`
}

// InstanceResult is one instance of one row.
type InstanceResult struct {
	ID      string  `json:"id"`
	Metrics Metrics `json:"metrics"`
	// Output is the generated text (generation tasks).
	Output string `json:"output,omitempty"`
}

// AttentionResult is the attention analysis of one runtime: how the key norm
// of a position relates to the attention it receives, on the uncompressed
// model. Each sample is a prefill of Length tokens followed by Decode
// teacher-forced continuation tokens.
type AttentionResult struct {
	Samples int `json:"samples"`
	Length  int `json:"length"`
	Decode  int `json:"decode"`
	// Layers is the decoding-phase measure, Devoto et al.'s: the attention
	// the Decode queries after the prefill give to the prefill's keys.
	Layers []LayerAttention `json:"layers"`
	// Prompt is the prompt-internal measure: the attention each prefill key
	// receives from the later prefill queries.
	Prompt []LayerAttention `json:"prompt"`
}

// LayerAttention is the analysis of one layer.
type LayerAttention struct {
	Layer int `json:"layer"`
	// Spearman is the mean over KV heads (and samples) of the rank
	// correlation between a key's L2 norm and the mean attention it
	// receives from the queries counted. Negative: low-norm keys get more.
	// SpearmanCI is its bootstrap interval over samples.
	Spearman     Num      `json:"spearman"`
	SpearmanCI   Interval `json:"spearman_ci"`
	HeadSpearman []Num    `json:"head_spearman"`
	// ShareLowHalf is the mean share of a query's attention (among the keys
	// counted) that falls on the lowest-norm half of those keys;
	// ShareUniform is that share under uniform attention (just under 0.5
	// for odd key counts).
	ShareLowHalf     Num      `json:"share_low_half"`
	ShareLowHalfCI   Interval `json:"share_low_half_ci"`
	HeadShareLowHalf []Num    `json:"head_share_low_half"`
	ShareUniform     Num      `json:"share_uniform"`
}

// ModeChunked marks rows compressed under pressure (see Row.Mode).
const ModeChunked = "chunked"

// Label is the row's policy as the tables show it ("knorm chunked" for a
// chunked row).
func (r *Row) Label() string {
	if r.Mode != "" {
		return r.Policy + " " + r.Mode
	}
	return r.Policy
}

// Row returns the row of a task compressed after prefill for a policy,
// granularity and keep, or nil.
func (t *TaskResult) Row(policy, granularity string, keep float64) *Row {
	return t.ModeRow("", policy, granularity, keep)
}

// ModeRow returns the row of a task for a mode, policy, granularity and
// keep, or nil.
func (t *TaskResult) ModeRow(mode, policy, granularity string, keep float64) *Row {
	for i := range t.Rows {
		r := &t.Rows[i]
		if r.Mode == mode && r.Policy == policy && r.Granularity == granularity && r.Keep == keep {
			return r
		}
	}
	return nil
}

// labelRow returns the row whose Label is label, or nil.
func (t *TaskResult) labelRow(label, granularity string, keep float64) *Row {
	for i := range t.Rows {
		r := &t.Rows[i]
		if !r.Baseline && r.Label() == label && r.Granularity == granularity && r.Keep == keep {
			return r
		}
	}
	return nil
}

// BaselineRow returns the task's baseline row, or nil.
func (t *TaskResult) BaselineRow() *Row {
	for i := range t.Rows {
		if t.Rows[i].Baseline {
			return &t.Rows[i]
		}
	}
	return nil
}

// Task returns the result of a task, or nil.
func (r *RuntimeResult) Task(name string) *TaskResult {
	for i := range r.Tasks {
		if r.Tasks[i].Task == name {
			return &r.Tasks[i]
		}
	}
	return nil
}

// ClearTimings zeroes every wall-clock figure, leaving what must be
// identical between repeated runs.
func (r *Results) ClearTimings() {
	for i := range r.Runtimes {
		r.Runtimes[i].Seconds = 0
		for j := range r.Runtimes[i].Tasks {
			r.Runtimes[i].Tasks[j].Seconds = 0
		}
	}
}
