package conformance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"time"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// runSeq is the sequence every task runs in.
const runSeq hooks.SeqID = 0

// Run runs every task of cfg on every runtime and returns what it measured.
// It does not stop at a failing row or runtime: errors are recorded in the
// results (Row.Status, TaskResult.Status, RuntimeResult.Error). It returns
// an error only for an invalid configuration or a cancelled context.
func Run(ctx context.Context, cfg Config) (*Results, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	res := &Results{Settings: settings(&cfg)}
	for _, rt := range cfg.Runtimes {
		rr := runRuntime(ctx, &cfg, rt)
		res.Runtimes = append(res.Runtimes, rr)
		if err := ctx.Err(); err != nil {
			return res, err
		}
	}
	return res, nil
}

func settings(cfg *Config) Settings {
	s := Settings{Model: cfg.Model, Tokenizer: cfg.Tokenizer, Tasks: cfg.Tasks, Keeps: cfg.Keeps,
		Seed: cfg.Seed, Bootstrap: bootstrapN(cfg.Bootstrap), Quick: cfg.Quick, Tolerances: cfg.Tolerances, Text: "sampled from the model under test (temperature 1, fixed seeds)"}
	if cfg.Text != "" {
		s.Text = cfg.TextName
		if s.Text == "" {
			s.Text = "user text"
		}
	}
	for _, m := range cfg.Methods {
		s.Policies = append(s.Policies, m.String())
	}
	for _, g := range cfg.Granularities {
		s.Granularities = append(s.Granularities, g.String())
	}
	p := cfg.Base
	p.Keep = 1
	s.BasePolicy = fmt.Sprintf("skip=%s sinks=%d window=%d aggregate=%s min-prompt=%d",
		adapter.FormatLayers(p.SkipLayers), p.Sinks, p.Window, p.Aggregate, p.MinPrompt)
	return s
}

// variant is one compressed configuration of the sweep.
type variant struct {
	method adapter.Method
	gran   hooks.Granularity
	keep   float64
}

func (c *Config) variants() []variant {
	var vs []variant
	for _, g := range c.Granularities {
		for _, m := range c.Methods {
			for _, k := range c.Keeps {
				vs = append(vs, variant{m, g, k})
			}
		}
	}
	return vs
}

// runner runs the tasks of one runtime.
type runner struct {
	ctx   context.Context
	cfg   *Config
	rt    Runtime
	name  string
	eng   hooks.Engine
	sizes Sizes
	corp  *corpus
	prog  *progress
}

func runRuntime(ctx context.Context, cfg *Config, rt Runtime) (rr RuntimeResult) {
	start := time.Now()
	rr.Runtime = rt.Name
	defer func() { rr.Seconds = time.Since(start).Seconds() }()
	logw := cfg.Progress
	if logw == nil {
		logw = io.Discard
	}
	needAttn := false
	for _, t := range cfg.Tasks {
		needAttn = needAttn || t == TaskAttention
	}
	eng, err := rt.Open(EngineOptions{Model: cfg.Model, Tokenizer: cfg.Tokenizer, Context: cfg.Context,
		Threads: cfg.Threads, Attention: needAttn, Log: logw})
	if err != nil {
		rr.Error = fmt.Sprintf("open: %v", err)
		return rr
	}
	defer eng.Close()
	info := eng.Info()
	rr.Info = &info
	shape := eng.CacheShape()
	rr.Shape = &shape
	sizes := cfg.Overrides.Apply(DefaultSizes(info.Context, cfg.Quick))
	if cfg.Sizes != nil {
		sizes = *cfg.Sizes
	}
	if err := sizes.validate(); err != nil {
		rr.Error = err.Error()
		return rr
	}
	if info.Context > 0 && sizes.Context > info.Context {
		rr.Error = fmt.Sprintf("the tasks need %d tokens of context, the runtime has %d", sizes.Context, info.Context)
		return rr
	}
	rr.Sizes = &sizes
	r := &runner{ctx: ctx, cfg: cfg, rt: rt, name: rt.Name, eng: eng, sizes: sizes}
	r.prog = newProgress(cfg.Progress, cfg.Terminal, rt.Name, r.estimate())
	defer r.prog.finish()
	if r.corp, err = newCorpus(eng, cfg.Seed, r.corpusLength(), cfg.Text); err != nil {
		rr.Error = err.Error()
		return rr
	}
	r.corp.onSample = func() { r.prog.advance(1, "sampling text") }
	for _, task := range cfg.Tasks {
		if ctx.Err() != nil {
			break
		}
		t0 := time.Now()
		var tr TaskResult
		if task == TaskAttention {
			tr = r.runAttention()
		} else {
			tr = r.runSweep(task)
		}
		tr.Seconds = time.Since(t0).Seconds()
		rr.Tasks = append(rr.Tasks, tr)
		r.prog.logf("%s: %s done in %s", rt.Name, task, time.Since(t0).Round(time.Millisecond))
	}
	return rr
}

// corpusLength is the number of tokens of each text sample.
func (r *runner) corpusLength() int {
	s := r.sizes
	n := 0
	for _, t := range r.cfg.Tasks {
		switch t {
		case TaskLM:
			n = max(n, s.LMPrefill+s.LMScore)
		case TaskGreedy:
			n = max(n, s.GreedyPrompt)
		case TaskAttention:
			n = max(n, s.AttentionLength+s.AttentionScore)
		case TaskNeedle:
			for _, l := range s.Lengths {
				n = max(n, l)
			}
		}
	}
	return min(max(n, 2), s.Context)
}

// samplesNeeded is the number of text samples the tasks read.
func (r *runner) samplesNeeded() int {
	s := r.sizes
	n := 0
	for _, t := range r.cfg.Tasks {
		switch t {
		case TaskLM:
			n = max(n, s.LMSamples)
		case TaskGreedy:
			n = max(n, s.GreedySamples)
		case TaskAttention:
			n = max(n, s.AttentionSamples)
		case TaskNeedle:
			n = max(n, s.Seeds)
		}
	}
	return n
}

// estimate is the work of the whole runtime in tokens decoded, for the ETA.
func (r *runner) estimate() float64 {
	s := r.sizes
	runs := float64(1 + len(r.cfg.variants()))
	total := 0.0
	if r.cfg.Text == "" {
		total += float64(r.samplesNeeded() * r.corpusLength())
	}
	chunked := 0.0
	if r.cfg.Chunked && slices.Contains(r.cfg.Methods, adapter.KNorm) {
		for _, k := range r.cfg.Keeps {
			if k < 1 {
				chunked += float64(len(r.cfg.Granularities))
			}
		}
	}
	for _, t := range r.cfg.Tasks {
		switch t {
		case TaskLM:
			total += (runs + chunked) * float64(s.LMSamples*(s.LMPrefill+s.LMScore))
		case TaskPasskey, TaskNeedle:
			for _, l := range s.Lengths {
				total += runs * float64(len(s.Depths)*s.Seeds*(l+8))
			}
		case TaskGreedy:
			total += (runs + chunked) * float64(s.GreedySamples*(s.GreedyPrompt+s.GreedyTokens))
		case TaskAttention:
			total += float64(s.AttentionSamples * (s.AttentionLength + s.AttentionScore))
		}
	}
	return total
}

// instance is one seeded input of a task.
type instance struct {
	input  Input
	prompt []int32
	// cont is the continuation the lm task scores, teacher-forced.
	cont []int32
	// gen is the number of tokens generation tasks produce greedily.
	gen int
	// check scores a generated answer (retrieval tasks).
	check func(text string) (exact bool, partial float64)
}

func (in *instance) cost() float64 { return float64(len(in.prompt) + len(in.cont) + in.gen) }

// output is what one run of an instance produced.
type output struct {
	logits [][]float32 // lm: the rows predicting cont
	tokens []int32     // generated
	text   string
	kept   Metrics
}

func (r *runner) prepare(task string) ([]instance, error) {
	s := r.sizes
	var out []instance
	switch task {
	case TaskLM:
		for i := range s.LMSamples {
			smp, err := r.corp.sample(i)
			if err != nil {
				return nil, err
			}
			if len(smp) < s.LMPrefill+s.LMScore {
				return nil, fmt.Errorf("text sample %d has %d tokens, lm needs %d", i, len(smp), s.LMPrefill+s.LMScore)
			}
			out = append(out, instance{
				input:  Input{ID: fmt.Sprintf("sample=%d", i), Tokens: s.LMPrefill, Sample: i, Extra: Metrics{"scored": Num(s.LMScore)}},
				prompt: smp[:s.LMPrefill], cont: smp[s.LMPrefill : s.LMPrefill+s.LMScore],
			})
		}
	case TaskGreedy:
		for i := range s.GreedySamples {
			smp, err := r.corp.sample(i)
			if err != nil {
				return nil, err
			}
			if len(smp) < s.GreedyPrompt {
				return nil, fmt.Errorf("text sample %d has %d tokens, greedy needs %d", i, len(smp), s.GreedyPrompt)
			}
			out = append(out, instance{
				input:  Input{ID: fmt.Sprintf("sample=%d", i), Tokens: s.GreedyPrompt, Sample: i},
				prompt: smp[:s.GreedyPrompt], gen: s.GreedyTokens,
			})
		}
	case TaskPasskey, TaskNeedle:
		idx := 0
		for _, length := range s.Lengths {
			for _, depth := range s.Depths {
				for j := range s.Seeds {
					in, err := r.retrieval(task, length, depth, j, idx)
					if err != nil {
						return nil, err
					}
					out = append(out, in)
					idx++
				}
			}
		}
	}
	return out, nil
}

func (r *runner) retrieval(task string, length int, depth float64, seed, idx int) (instance, error) {
	var (
		p      *Prompt
		answer string
		check  func(string) (bool, float64)
		err    error
		sample = -1
	)
	if task == TaskPasskey {
		answer = PasskeyKey(r.cfg.Seed, idx)
		if p, err = BuildPasskey(r.eng, length, depth, answer); err != nil {
			return instance{}, err
		}
		check = func(text string) (bool, float64) { return ScorePasskey(text, answer) }
	} else {
		n := Needles[mix(r.cfg.Seed, 0x4ee, uint64(seed))%uint64(len(Needles))]
		smp, err := r.corp.sample(seed)
		if err != nil {
			return instance{}, err
		}
		sample = seed
		text, err := r.eng.Detokenize(smp)
		if err != nil {
			return instance{}, err
		}
		if p, err = BuildNeedle(r.eng, SplitSentences(text), n, length, depth); err != nil {
			return instance{}, err
		}
		answer = n.Fact
		check = func(text string) (bool, float64) {
			ok := ScoreNeedle(text, n.Fact)
			if ok {
				return true, 1
			}
			return false, 0
		}
	}
	ans, err := r.eng.Tokenize(answer, false)
	if err != nil {
		return instance{}, err
	}
	in := instance{
		input: Input{ID: fmt.Sprintf("len=%d depth=%g seed=%d", length, depth, seed), Tokens: len(p.Tokens),
			Depth: Num(depth), Answer: answer, Sample: sample, Text: p.Text,
			Extra: Metrics{"insert_token": Num(p.InsertToken), "fillers": Num(p.Fillers)}},
		prompt: p.Tokens, gen: len(ans) + 3, check: check,
	}
	if len(in.prompt)+in.gen > r.sizes.Context {
		return instance{}, fmt.Errorf("%s prompt %s: %d tokens + %d generated exceed the context %d", task, in.input.ID, len(in.prompt), in.gen, r.sizes.Context)
	}
	return in, nil
}

// run runs one instance, compressed by pol after prefill (nil: baseline, no
// compressor attached at all).
func (r *runner) run(in *instance, pol *adapter.Policy) (*output, error) {
	return r.runOn(r.eng, in, pol, false)
}

// runOn runs one instance on engine e. chunked: the engine's cache is
// smaller than the prompt and pol compresses under pressure; what is kept is
// measured once the prompt is in.
func (r *runner) runOn(e hooks.Engine, in *instance, pol *adapter.Policy, chunked bool) (*output, error) {
	e.SetObserver(nil)
	if err := e.RemoveSequence(runSeq); err != nil {
		return nil, err
	}
	out := &output{kept: Metrics{"kept_entries": 1, "kept_positions": 1}}
	if pol != nil {
		comp, err := adapter.New(e, *pol)
		if err != nil {
			return nil, err
		}
		comp.OnStats(func(st hooks.Stats) {
			if st.Trigger == hooks.TriggerPrefill.String() && st.EntriesBefore > 0 && st.PositionsBefore > 0 {
				out.kept["kept_entries"] = Num(float64(st.EntriesAfter) / float64(st.EntriesBefore))
				out.kept["kept_positions"] = Num(float64(st.PositionsAfter) / float64(st.PositionsBefore))
			}
		})
		e.SetObserver(comp)
	}
	defer func() {
		e.SetObserver(nil)
		_ = e.RemoveSequence(runSeq)
	}()
	rows, err := e.Prefill(runSeq, in.prompt, false)
	if err != nil {
		return nil, err
	}
	if len(rows) == 0 {
		return nil, errors.New("prefill returned no logits")
	}
	if chunked {
		pos, ent, err := e.Live(runSeq)
		if err != nil {
			return nil, err
		}
		sh := e.CacheShape()
		n := float64(len(in.prompt))
		out.kept["kept_positions"] = Num(float64(pos) / n)
		out.kept["kept_entries"] = Num(float64(ent) / (n * float64(sh.Layers*sh.KVHeads)))
	}
	last := rows[len(rows)-1]
	if in.cont != nil {
		out.logits = [][]float32{last}
		if len(in.cont) > 1 {
			more, err := e.Decode(runSeq, in.cont[:len(in.cont)-1])
			if err != nil {
				return nil, err
			}
			out.logits = append(out.logits, more...)
		}
		return out, nil
	}
	for range in.gen {
		next := Argmax(last)
		out.tokens = append(out.tokens, next)
		if len(out.tokens) == in.gen {
			break
		}
		rows, err := e.Decode(runSeq, []int32{next})
		if err != nil {
			return nil, err
		}
		last = rows[0]
	}
	if out.text, err = e.Detokenize(out.tokens); err != nil {
		return nil, err
	}
	return out, nil
}

// score compares an instance's output with the baseline's.
func score(task string, in *instance, base, got *output) InstanceResult {
	m := Metrics{}
	for k, v := range got.kept {
		m[k] = v
	}
	ir := InstanceResult{ID: in.input.ID, Metrics: m, Output: got.text}
	switch task {
	case TaskLM:
		var nll, klSum, top, maxDiff float64
		for t, tok := range in.cont {
			lb, lg := logSoftmax(base.logits[t]), logSoftmax(got.logits[t])
			nll -= lg[tok]
			klSum += kl(lb, lg)
			if Argmax(base.logits[t]) == Argmax(got.logits[t]) {
				top++
			}
			for i, v := range got.logits[t] {
				maxDiff = max(maxDiff, math.Abs(float64(v)-float64(base.logits[t][i])))
			}
		}
		n := float64(len(in.cont))
		m["loss"], m["kl"], m["top1"], m["max_abs_logit_diff"] = Num(nll/n), Num(klSum/n), Num(top/n), Num(maxDiff)
		m["identical"] = b2n(equalRows(base.logits, got.logits))
	default:
		same, first := 0, len(base.tokens)
		for i := range base.tokens {
			if i < len(got.tokens) && got.tokens[i] == base.tokens[i] {
				same++
			} else if first == len(base.tokens) {
				first = i
			}
		}
		m["identical"] = b2n(same == len(base.tokens) && len(got.tokens) == len(base.tokens))
		m["match_rate"] = Num(float64(same) / float64(max(1, len(base.tokens))))
		m["first_divergence"] = Num(first)
		if in.check != nil {
			exact, partial := in.check(got.text)
			m["correct"] = b2n(exact)
			if task == TaskPasskey {
				m["digits"] = Num(partial)
			}
		}
	}
	return ir
}

// strHash is FNV-1a of s.
func strHash(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h = (h ^ uint64(s[i])) * 1099511628211
	}
	return h
}

func b2n(b bool) Num {
	if b {
		return 1
	}
	return 0
}

// aggregate sums a row's instances up into its metrics.
func aggregate(task string, insts []InstanceResult) Metrics {
	mean := func(k string) Num {
		v := make([]float64, len(insts))
		for i, in := range insts {
			v[i] = float64(in.Metrics[k])
		}
		return Num(meanFinite(v))
	}
	m := Metrics{"kept_entries": mean("kept_entries"), "kept_positions": mean("kept_positions"), "identical": mean("identical")}
	if len(insts) > 0 {
		if _, ok := insts[0].Metrics["cache_fraction"]; ok {
			m["cache_fraction"] = mean("cache_fraction")
		}
	}
	switch task {
	case TaskLM:
		m["loss"] = mean("loss")
		m["ppl"] = Num(math.Exp(float64(m["loss"])))
		m["kl"], m["top1"] = mean("kl"), mean("top1")
		var mx float64
		for _, in := range insts {
			mx = max(mx, float64(in.Metrics["max_abs_logit_diff"]))
		}
		m["max_abs_logit_diff"] = Num(mx)
	case TaskPasskey:
		m["accuracy"], m["digit_accuracy"] = mean("correct"), mean("digits")
		m["match_rate"] = mean("match_rate")
	case TaskNeedle:
		m["accuracy"] = mean("correct")
		m["match_rate"] = mean("match_rate")
	case TaskGreedy:
		m["match_rate"], m["first_divergence"] = mean("match_rate"), mean("first_divergence")
	}
	return m
}

// MainMetric is the metric a task's summary tables and plots show.
func MainMetric(task string) string {
	switch task {
	case TaskLM:
		return "ppl"
	case TaskPasskey, TaskNeedle:
		return "accuracy"
	case TaskGreedy:
		return "match_rate"
	}
	return ""
}

// instanceKey maps a row metric to the per-instance metric it averages.
func instanceKey(metric string) string {
	switch metric {
	case "accuracy":
		return "correct"
	case "digit_accuracy":
		return "digits"
	}
	return metric
}

// ciMetrics are the metrics of a task that get a bootstrap interval.
func ciMetrics(task string) []string {
	switch task {
	case TaskLM:
		return []string{"ppl", "kl", "top1"}
	case TaskPasskey:
		return []string{"accuracy", "digit_accuracy", "match_rate"}
	case TaskNeedle:
		return []string{"accuracy", "match_rate"}
	case TaskGreedy:
		return []string{"match_rate", "first_divergence"}
	}
	return nil
}

// chunkedMetrics are the extra metrics of chunked rows.
var chunkedMetrics = []string{"cache_fraction"}

// values returns a row's per-instance values of an instance metric.
func (r *Row) values(key string) []float64 {
	v := make([]float64, len(r.Instances))
	for i, in := range r.Instances {
		x, ok := in.Metrics[key]
		if !ok {
			x = Num(math.NaN())
		}
		v[i] = float64(x)
	}
	return v
}

// compareMain compares the main metric of row with other's on the same
// instances (ppl as a relative increase of exp(mean loss)).
func compareMain(task string, rs *resampler, row, other *Row, against string) Comparison {
	metric := MainMetric(task)
	key, rel := instanceKey(metric), false
	if task == TaskLM {
		key, rel = "loss", true
	}
	d, iv, v := rs.pairedDiff(row.values(key), other.values(key), rel)
	return Comparison{Against: against, Metric: metric, Delta: d, CI: iv, Verdict: v}
}

// addIntervals sets the bootstrap intervals and paired comparisons of every
// row of a task whose instances match the baseline's.
func addIntervals(task string, rows []Row, base *Row, rs *resampler) {
	n := len(base.Instances)
	ok := func(r *Row) bool { return r != nil && r.Status == StatusOK && len(r.Instances) == n && n > 0 }
	find := func(policy, gran string, keep float64) *Row {
		for i := range rows {
			if r := &rows[i]; !r.Baseline && r.Mode == "" && r.Policy == policy && r.Granularity == gran && r.Keep == keep {
				return r
			}
		}
		return nil
	}
	for i := range rows {
		r := &rows[i]
		if !ok(r) {
			continue
		}
		r.CI = map[string]Interval{}
		for _, m := range ciMetrics(task) {
			if m == "ppl" {
				r.CI[m] = rs.pplCI(r.values("loss"))
			} else {
				r.CI[m] = rs.meanCI(r.values(instanceKey(m)))
			}
		}
		if r.Baseline {
			continue
		}
		if task == TaskLM {
			_, r.CI["ppl_increase"], _ = rs.pairedDiff(r.values("loss"), base.values("loss"), true)
		}
		r.Compare = append(r.Compare, compareMain(task, rs, r, base, "baseline"))
		if kn := find(adapter.KNorm.String(), r.Granularity, r.Keep); (r.Mode != "" || r.Policy != kn.policyName()) && ok(kn) {
			against := kn.Policy
			if r.Mode != "" {
				against = kn.Policy + " after prefill"
			}
			r.Compare = append(r.Compare, compareMain(task, rs, r, kn, against))
		}
	}
}

func (r *Row) policyName() string {
	if r == nil {
		return ""
	}
	return r.Policy
}

// judge sets a row's verdict against the tolerances: pass when the row's
// interval lies within the tolerance, FAIL when it lies outside, uncertain
// when it straddles it.
func judge(task string, row, base *Row, tol Tolerances, rs *resampler) {
	if row.Status != StatusOK || base == nil || base.Status != StatusOK {
		row.Verdict = VerdictNA
		return
	}
	m, b := row.Metrics, base.Metrics
	if task == TaskLM {
		m["ppl_increase"] = Num(float64(m["ppl"])/float64(b["ppl"]) - 1)
	}
	if row.Keep == 1 && m["identical"] != 1 {
		row.Verdict, row.Reason = VerdictFail, "keep 1 must reproduce the baseline exactly and does not: a bug in the runtime or the adapter"
		return
	}
	// within judges an interval against a bound: inside when the interval
	// lies on the good side of it.
	type check struct {
		name     string
		iv       Interval
		bound    float64
		upper    bool // the value must stay <= bound (else >= bound)
		point    float64
		describe string
	}
	var checks []check
	ci := func(k string) Interval {
		if iv, ok := row.CI[k]; ok && iv.Valid() {
			return iv
		}
		v := Num(m[k])
		return Interval{v, v}
	}
	switch task {
	case TaskLM:
		checks = append(checks, check{"perplexity", ci("ppl_increase"), tol.MaxPPLIncrease, true, float64(m["ppl_increase"]),
			fmt.Sprintf("perplexity %+.2f%% [%+.2f%%, %+.2f%%] vs ≤ +%.2f%%", 100*float64(m["ppl_increase"]), 100*float64(ci("ppl_increase").Lo), 100*float64(ci("ppl_increase").Hi), 100*tol.MaxPPLIncrease)})
		if tol.MaxKL > 0 {
			checks = append(checks, check{"KL", ci("kl"), tol.MaxKL, true, float64(m["kl"]),
				fmt.Sprintf("KL %.4g [%.4g, %.4g] vs ≤ %.4g nats/token", float64(m["kl"]), float64(ci("kl").Lo), float64(ci("kl").Hi), tol.MaxKL)})
		}
	case TaskPasskey, TaskNeedle:
		min := tol.MinPasskey
		if task == TaskNeedle {
			min = tol.MinNeedle
		}
		acc, bacc := float64(m["accuracy"]), float64(b["accuracy"])
		if bacc == 0 {
			row.Verdict, row.Reason = VerdictNA, "the baseline retrieves nothing: accuracy cannot be judged on this model"
			return
		}
		// Paired: accuracy − min × baseline accuracy on the same prompts.
		iv := Interval{Num(acc - min*bacc), Num(acc - min*bacc)}
		if rs != nil && len(row.Instances) == len(base.Instances) {
			a, c := row.values("correct"), base.values("correct")
			iv = rs.interval(func(ix []int) float64 { return meanAt(a, ix) - min*meanAt(c, ix) })
		}
		checks = append(checks, check{"accuracy", iv, 0, false, acc - min*bacc,
			fmt.Sprintf("accuracy %.3g vs ≥ %.3g × baseline %.3g (paired difference [%+.3g, %+.3g])", acc, min, bacc, float64(iv.Lo), float64(iv.Hi))})
	case TaskGreedy:
		checks = append(checks, check{"match rate", ci("match_rate"), tol.MinGreedyMatch, false, float64(m["match_rate"]),
			fmt.Sprintf("match rate %.3g [%.3g, %.3g] vs ≥ %.3g", float64(m["match_rate"]), float64(ci("match_rate").Lo), float64(ci("match_rate").Hi), tol.MinGreedyMatch)})
	}
	row.Verdict = VerdictPass
	for _, c := range checks {
		lo, hi := float64(c.iv.Lo), float64(c.iv.Hi)
		var inside, outside bool
		if c.upper {
			inside, outside = hi <= c.bound, !(lo <= c.bound)
		} else {
			inside, outside = lo >= c.bound, !(hi >= c.bound)
		}
		switch {
		case outside:
			row.Verdict, row.Reason = VerdictFail, c.describe
			return
		case !inside:
			row.Verdict, row.Reason = VerdictUncertain, c.describe+": the interval straddles the tolerance"
		}
	}
}

// runSweep runs a task's baseline and every variant over its instances.
func (r *runner) runSweep(task string) TaskResult {
	tr := TaskResult{Task: task, Status: StatusOK}
	r.prog.logf("%s: preparing %s", r.name, task)
	insts, err := r.prepare(task)
	if err != nil {
		tr.Status, tr.Note = StatusError, err.Error()
		return tr
	}
	for _, in := range insts {
		tr.Inputs = append(tr.Inputs, in.input)
	}
	vs := r.cfg.variants()
	base := Row{Baseline: true, Policy: "baseline", Granularity: "none", Keep: 1, Status: StatusOK,
		Note: "no compressor attached"}
	rows := make([]Row, len(vs))
	pols := make([]*adapter.Policy, len(vs))
	for i, v := range vs {
		rows[i] = Row{Policy: v.method.String(), Granularity: v.gran.String(), Keep: v.keep, Status: StatusOK}
		p := r.cfg.Base
		p.Method, p.Granularity, p.Keep, p.Budget = v.method, v.gran, v.keep, 0
		if _, err := adapter.New(r.eng, p); err != nil {
			rows[i].Status = StatusNA
			if !errors.Is(err, hooks.ErrUnsupported) {
				rows[i].Status = StatusError
			}
			rows[i].Note = err.Error()
			continue
		}
		pols[i] = &p
	}
	ch := r.chunkedVariants(task)
	defer ch.close()
	for ii := range insts {
		in := &insts[ii]
		if r.ctx.Err() != nil {
			tr.Status, tr.Note = StatusError, r.ctx.Err().Error()
			return tr
		}
		label := fmt.Sprintf("%s %s", task, in.input.ID)
		bout, err := r.run(in, nil)
		r.prog.advance(in.cost(), label+" baseline")
		if err != nil {
			tr.Status, tr.Note = StatusError, fmt.Sprintf("baseline of %s: %v", in.input.ID, err)
			return tr
		}
		base.Instances = append(base.Instances, score(task, in, bout, bout))
		for i := range vs {
			row := &rows[i]
			if pols[i] == nil || row.Status != StatusOK {
				r.prog.advance(in.cost(), "")
				continue
			}
			p := *pols[i]
			p.Seed = mix(r.cfg.Seed, strHash(task), uint64(ii))
			out, err := r.run(in, &p)
			r.prog.advance(in.cost(), fmt.Sprintf("%s %s/%s keep=%g", label, vs[i].method, vs[i].gran, vs[i].keep))
			if err != nil {
				row.Status, row.Note = StatusError, fmt.Sprintf("%s: %v", in.input.ID, err)
				row.Instances = nil
				continue
			}
			row.Instances = append(row.Instances, score(task, in, bout, out))
		}
		ch.run(r, task, ii, in, bout, label)
	}
	rows = append(rows, ch.rows...)
	tr.Rows = finishRows(task, base, rows, r.cfg.Tolerances, r.cfg.Bootstrap, mix(r.cfg.Seed, strHash(task), 0xc1))
	return tr
}

// finishRows aggregates the baseline and every row over their instances,
// adds bootstrap intervals and paired comparisons (one seeded resampler for
// the task), judges every row and returns the baseline first.
func finishRows(task string, base Row, rows []Row, tol Tolerances, bootstrap int, seed uint64) []Row {
	base.Metrics = aggregate(task, base.Instances)
	if task == TaskLM {
		base.Metrics["ppl_increase"] = 0
	}
	for i := range rows {
		if rows[i].Status == StatusOK {
			rows[i].Metrics = aggregate(task, rows[i].Instances)
		}
	}
	all := append([]Row{base}, rows...)
	rs := newResampler(len(base.Instances), bootstrap, seed)
	addIntervals(task, all, &all[0], rs)
	for i := range all[1:] {
		judge(task, &all[1+i], &all[0], tol, rs)
	}
	return all
}
