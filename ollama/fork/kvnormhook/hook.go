// Package kvnormhook is the code kvnorm's Ollama fork calls: four calls
// inserted in Ollama v0.24.0 by kvnorm's build tool (package fork), the
// first three no-ops unless OLLAMA_KV_NORM_KEEP or OLLAMA_KV_NORM_BUDGET is
// set, the fourth a fix of a leak of Ollama's (DrainStream).
//
//	llm/server.go, NewLlamaServer, after Ollama's own choice of the Go engine:
//	    if tok, err = kvnormhook.CheckServer(tok, modelPath, f, len(projectors), opts.NumCtx); err != nil { return nil, err }
//	runner/ollamarunner/runner.go, allocModel, after model.New:
//	    if err := kvnormhook.Install(s.model, kvSize/max(parallel, 1)); err != nil { return err }
//	runner/ollamarunner/runner.go, forwardBatch, before a sequence's inputs join the batch:
//	    if len(batchInputs) > 0 && kvnormhook.OneSequencePerBatch() { ...; break }
//	server/routes.go, streamResponse, first statement:
//	    defer kvnormhook.DrainStream(ch)
//
// The build tool also adds a case to scheduleRunner's select (server/routes.go),
// a fix of another leak of Ollama's that needs no code of kvnorm: a request
// whose client left while it waited for a runner returns ctx.Err().
//
// CheckServer validates the environment in the server, so that an invalid
// value refuses to start the runner with a message naming the variable;
// warns, one line each, about settings this model cannot use (adapter.Policy
// CheckModel); and routes: a model Ollama would send to its llama.cpp runner
// (which kvnorm does not hook) goes to the Go engine when the Go engine runs
// its architecture and kvnorm can replace its cache, with a log line saying
// so, so that OLLAMA_NEW_ENGINE=1 is not needed. A model it cannot compress
// stays on llama.cpp with a warning saying why. Install replaces the model's
// KV cache with kvnorm's (package ollama) before the runner initialises it;
// the cache logs one line per compression ("kvnorm: compressed ...") in the
// runner's log, which the server shows.
//
// Configuration, like Ollama's own KV options:
//
//	OLLAMA_KV_NORM_KEEP         fraction of positions each head keeps, (0,1]
//	OLLAMA_KV_NORM_BUDGET       or an absolute number of positions per head
//	OLLAMA_KV_NORM_GRANULARITY  per-head (default, the paper) or per-token
//	OLLAMA_KV_NORM_SKIP_LAYERS  layers kept whole, e.g. 0,1 (default) or none
//	OLLAMA_KV_NORM_POLICY       knorm (default), random, streaming, inverse
//	OLLAMA_KV_NORM_SINKS        first positions always kept (default 0)
//	OLLAMA_KV_NORM_WINDOW       last positions always kept (default 0)
//	OLLAMA_KV_NORM_MIN_PROMPT   prompts shorter than this are not compressed
//	OLLAMA_KV_NORM_AGGREGATE    per-token score: mean-rank (default), ...
//	OLLAMA_KV_NORM_BATCHING     per-sequence (default) or shared forward passes
//
// A third call makes the runner's forward passes hold one sequence each while
// compression is on (OneSequencePerBatch), so that an answer does not depend
// on what is batched beside it:
//
//	runner/ollamarunner/runner.go, forwardBatch, before a sequence's inputs are added:
//	    if len(batchInputs) > 0 && kvnormhook.OneSequencePerBatch() { ...; break }
package kvnormhook

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// Variable names.
const (
	EnvKeep        = "OLLAMA_KV_NORM_KEEP"
	EnvBudget      = "OLLAMA_KV_NORM_BUDGET"
	EnvGranularity = "OLLAMA_KV_NORM_GRANULARITY"
	EnvSkipLayers  = "OLLAMA_KV_NORM_SKIP_LAYERS"
	EnvPolicy      = "OLLAMA_KV_NORM_POLICY"
	EnvSinks       = "OLLAMA_KV_NORM_SINKS"
	EnvWindow      = "OLLAMA_KV_NORM_WINDOW"
	EnvMinPrompt   = "OLLAMA_KV_NORM_MIN_PROMPT"
	EnvAggregate   = "OLLAMA_KV_NORM_AGGREGATE"
)

// ErrEnv is wrapped by every error about an OLLAMA_KV_NORM_* value.
var ErrEnv = errors.New("kvnorm: invalid environment")

// PolicyFromEnv reads the policy from the environment through getenv (nil:
// os.Getenv). It returns nil when neither OLLAMA_KV_NORM_KEEP nor
// OLLAMA_KV_NORM_BUDGET is set: compression is off and Ollama runs as
// upstream. Every set variable is validated either way.
func PolicyFromEnv(getenv func(string) string) (*adapter.Policy, error) {
	if getenv == nil {
		getenv = os.Getenv
	}
	get := func(k string) string { return strings.TrimSpace(getenv(k)) }
	bad := func(k, v, want string) error {
		return fmt.Errorf("%w: %s=%q: %s", ErrEnv, k, v, want)
	}
	if _, err := BatchingFromEnv(getenv); err != nil {
		return nil, err
	}
	p := adapter.DefaultPolicy()
	p.Granularity = hooks.PerHead
	p.Keep = 1
	on := false
	if v := get(EnvKeep); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || math.IsNaN(f) || f <= 0 || f > 1 {
			return nil, bad(EnvKeep, v, "want a fraction in (0, 1], e.g. 0.5")
		}
		p.Keep, on = f, true
	}
	if v := get(EnvBudget); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > adapter.MaxPositions {
			return nil, bad(EnvBudget, v, fmt.Sprintf("want a number of positions from 1 to %d", adapter.MaxPositions))
		}
		p.Budget, on = n, true
	}
	if v := get(EnvGranularity); v != "" {
		g, err := hooks.ParseGranularity(v)
		if err != nil {
			return nil, bad(EnvGranularity, v, "want per-head or per-token")
		}
		p.Granularity = g
	}
	if v := get(EnvSkipLayers); v != "" {
		l, err := adapter.ParseLayers(v)
		if err != nil {
			return nil, bad(EnvSkipLayers, v, "want comma-separated layer indices, e.g. 0,1, or none")
		}
		p.SkipLayers = l
	}
	if v := get(EnvPolicy); v != "" {
		m, err := adapter.ParseMethod(v)
		if err != nil {
			return nil, bad(EnvPolicy, v, "want knorm, random, streaming or inverse")
		}
		p.Method = m
	}
	if v := get(EnvAggregate); v != "" {
		a, err := adapter.ParseAggregation(v)
		if err != nil {
			return nil, bad(EnvAggregate, v, "want mean-rank, mean-norm, min-norm or max-norm")
		}
		p.Aggregate = a
	}
	for _, iv := range []struct {
		name string
		dst  *int
	}{{EnvSinks, &p.Sinks}, {EnvWindow, &p.Window}, {EnvMinPrompt, &p.MinPrompt}} {
		if v := get(iv.name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > adapter.MaxPositions {
				return nil, bad(iv.name, v, fmt.Sprintf("want a number of positions from 0 to %d", adapter.MaxPositions))
			}
			*iv.dst = n
		}
	}
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("%w: OLLAMA_KV_NORM_*: %w", ErrEnv, err)
	}
	if !on {
		return nil, nil
	}
	return &p, nil
}

// serverModel is what the server knows of a model when NewLlamaServer loads
// it, before a runner starts.
type serverModel struct {
	Arch string
	// Layers is the model's block count; Context the cells each sequence
	// gets (num_ctx, capped at the trained context); 0 when unknown.
	Layers, Context int
	// Projectors counts the separate vision projectors (only the llama.cpp
	// runner loads them).
	Projectors int
	// GoEngine is set when Ollama already chose its Go engine
	// (OLLAMA_NEW_ENGINE=1, or an architecture only that engine runs).
	GoEngine bool
}

// logLine is one line the server logs about a model.
type logLine struct {
	level slog.Level
	msg   string
	args  []any
}

// serverDecision is what the server does with a model: run it on the Go
// engine instead of the llama.cpp runner (route), and the lines it logs.
type serverDecision struct {
	route bool
	lines []logLine
}

// envOf names the variable behind an adapter.Mismatch field.
var envOf = map[string]string{
	"SkipLayers":   EnvSkipLayers,
	"Budget":       EnvBudget,
	"Sinks+Window": EnvSinks + "+" + EnvWindow,
}

// decideServer is the server's choice for a model with compression policy p
// (nil: off, nothing to do). Settings that cannot work on this model get one
// warning each; one that turns compression off for it (every layer skipped,
// every position protected) leaves the model where Ollama put it. Otherwise a
// model bound for the llama.cpp runner goes to the Go engine when goEngine
// says the Go engine runs it and kvnorm can replace its cache (nil error);
// when it cannot, the model stays on llama.cpp, uncompressed, with a warning
// saying why.
func decideServer(p *adapter.Policy, m serverModel, goEngine func() error) serverDecision {
	var d serverDecision
	if p == nil {
		return d
	}
	warn := func(msg string, args ...any) { d.lines = append(d.lines, logLine{slog.LevelWarn, msg, args}) }
	info := func(msg string, args ...any) { d.lines = append(d.lines, logLine{slog.LevelInfo, msg, args}) }
	off := false
	for _, mm := range p.CheckModel(m.Layers, m.Context) {
		warn("kvnorm: "+envOf[mm.Field]+" does not fit this model", "arch", m.Arch, "layers", m.Layers, "num_ctx", m.Context, "problem", mm.Problem)
		off = off || mm.Off
	}
	switch {
	case off:
	case m.GoEngine:
		info("kvnorm: KV cache compression on", "arch", m.Arch, "policy", p.String())
	case m.Projectors > 0:
		warn("kvnorm: KV cache compression is off for this model: its vision projector is a separate file, which only the llama.cpp runner loads, and kvnorm does not hook that runner",
			"arch", m.Arch, "policy", p.String())
	default:
		if err := goEngine(); err != nil {
			warn("kvnorm: KV cache compression is off for this model: it runs on the llama.cpp runner, which kvnorm does not hook",
				"arch", m.Arch, "policy", p.String(), "reason", err)
			break
		}
		d.route = true
		info("kvnorm: KV cache compression on: the model runs on Ollama's Go engine (routed by kvnorm; OLLAMA_NEW_ENGINE=1 is not needed)",
			"arch", m.Arch, "policy", p.String())
	}
	return d
}

func (d serverDecision) log(l *slog.Logger) {
	for _, ln := range d.lines {
		l.Log(context.Background(), ln.level, ln.msg, ln.args...)
	}
}
