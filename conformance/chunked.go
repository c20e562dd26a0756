package conformance

import (
	"errors"
	"fmt"
	"io"
	"math"
	"slices"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// chunkedSet runs knorm under cache pressure for one task: per keep ratio
// an engine whose cache holds ceil(keep × prompt) cells plus the tokens that
// follow the prompt (the same memory as one-shot compression at that keep),
// so the runtime feeds the prompt in chunks and the compressor frees cells
// (hooks.Observer.CachePressure) whenever the next batch would not fit; the
// tokens after the prompt are then decoded under pressure too. The policy's
// own keep is 1: every eviction comes from pressure. A keep whose cache
// would hold the whole prompt has no chunked row (nothing to chunk).
type chunkedSet struct {
	rows    []Row
	pols    []*adapter.Policy
	ctxs    []int
	engines map[int]hooks.Engine // by context
	failed  map[int]error
}

// chunkedVariants prepares the chunked rows of a task (none unless
// Config.Chunked, the task is lm or greedy, and knorm is swept).
func (r *runner) chunkedVariants(task string) *chunkedSet {
	cs := &chunkedSet{engines: map[int]hooks.Engine{}, failed: map[int]error{}}
	if !r.cfg.Chunked || (task != TaskLM && task != TaskGreedy) || !slices.Contains(r.cfg.Methods, adapter.KNorm) {
		return cs
	}
	prompt, after := r.sizes.LMPrefill, r.sizes.LMScore
	if task == TaskGreedy {
		prompt, after = r.sizes.GreedyPrompt, r.sizes.GreedyTokens
	}
	for _, g := range r.cfg.Granularities {
		for _, k := range r.cfg.Keeps {
			if k >= 1 {
				continue
			}
			row := Row{Policy: adapter.KNorm.String(), Granularity: g.String(), Keep: k, Mode: ModeChunked, Status: StatusOK}
			p := r.cfg.Base
			p.Method, p.Granularity, p.Keep, p.Budget = adapter.KNorm, g, 1, 0
			c := int(math.Ceil(k*float64(prompt)-1e-9)) + after
			row.Note = fmt.Sprintf("cache of %d cells for a %d-token prompt + %d", c, prompt, after)
			if c >= prompt {
				// keep × prompt + the tokens after it hold the whole prompt:
				// nothing to chunk, no row.
				continue
			}
			if _, err := adapter.New(r.eng, p); err != nil {
				row.Status, row.Note = StatusNA, err.Error()
				if !errors.Is(err, hooks.ErrUnsupported) {
					row.Status = StatusError
				}
				cs.rows, cs.pols, cs.ctxs = append(cs.rows, row), append(cs.pols, nil), append(cs.ctxs, c)
				continue
			}
			cs.rows, cs.pols, cs.ctxs = append(cs.rows, row), append(cs.pols, &p), append(cs.ctxs, c)
		}
	}
	return cs
}

// engine opens (once) the runtime with a cache of c cells.
func (cs *chunkedSet) engine(r *runner, c int) (hooks.Engine, error) {
	if e, ok := cs.engines[c]; ok {
		return e, nil
	}
	if err, ok := cs.failed[c]; ok {
		return nil, err
	}
	e, err := r.rt.Open(EngineOptions{Model: r.cfg.Model, Tokenizer: r.cfg.Tokenizer, Context: c, Threads: r.cfg.Threads, Log: io.Discard})
	if err != nil {
		err = fmt.Errorf("open with a %d-cell cache: %w", c, err)
		cs.failed[c] = err
		return nil, err
	}
	cs.engines[c] = e
	return e, nil
}

// run runs instance ii of the task on every chunked row.
func (cs *chunkedSet) run(r *runner, task string, ii int, in *instance, bout *output, label string) {
	for i := range cs.rows {
		row := &cs.rows[i]
		if cs.pols[i] == nil || row.Status != StatusOK {
			r.prog.advance(in.cost(), "")
			continue
		}
		e, err := cs.engine(r, cs.ctxs[i])
		if err == nil && e.Info().Context >= len(in.prompt) {
			// The runtime rounded its context up to hold the whole prompt
			// (llama.cpp pads n_ctx to 256): nothing is chunked.
			row.Status = StatusNA
			row.Note = fmt.Sprintf("asked for a %d-cell cache, the runtime opened %d, which holds the whole %d-token prompt: nothing to chunk", cs.ctxs[i], e.Info().Context, len(in.prompt))
			row.Instances = nil
			r.prog.advance(in.cost(), "")
			continue
		}
		var out *output
		if err == nil {
			p := *cs.pols[i]
			p.Seed = mix(r.cfg.Seed, strHash(task), uint64(ii))
			out, err = r.runOn(e, in, &p, true)
		}
		r.prog.advance(in.cost(), fmt.Sprintf("%s knorm/%s keep=%g chunked", label, row.Granularity, row.Keep))
		if err != nil {
			row.Status, row.Note = StatusError, fmt.Sprintf("%s: %v", in.input.ID, err)
			row.Instances = nil
			continue
		}
		got := e.Info().Context
		if got != cs.ctxs[i] && len(row.Instances) == 0 {
			// A runtime may round its context (the memory compared is then
			// larger than one-shot's): say so.
			row.Note = fmt.Sprintf("asked for %d cells, the runtime opened %d", cs.ctxs[i], got)
		}
		ir := score(task, in, bout, out)
		ir.Metrics["cache_fraction"] = Num(float64(got) / in.cost())
		row.Instances = append(row.Instances, ir)
	}
}

func (cs *chunkedSet) close() {
	for _, e := range cs.engines {
		e.Close()
	}
}
