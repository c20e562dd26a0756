// Package kvnormhook is the code kvnorm's Ollama fork calls: two lines
// inserted in Ollama v0.24.0 by kvnorm's build tool (package fork), both
// no-ops unless OLLAMA_KV_NORM_KEEP or OLLAMA_KV_NORM_BUDGET is set.
//
//	llm/server.go, NewLlamaServer, once the runner is chosen:
//	    if err := kvnormhook.CheckServer(tok != nil); err != nil { return nil, err }
//	runner/ollamarunner/runner.go, allocModel, after model.New:
//	    if err := kvnormhook.Install(s.model); err != nil { return err }
//
// CheckServer validates the environment in the server, so that an invalid
// value refuses to start the runner with a message naming the variable, and
// warns when the model goes to the llama.cpp runner, which kvnorm does not
// hook. Install replaces the model's KV cache with kvnorm's (package ollama)
// before the runner initialises it; the cache logs one line per compression
// ("kvnorm: compressed ...") in the runner's log, which the server shows.
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
package kvnormhook

import (
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
		if err != nil || n <= 0 {
			return nil, bad(EnvBudget, v, "want a number of positions > 0")
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
			if err != nil || n < 0 {
				return nil, bad(iv.name, v, "want a number >= 0")
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

// CheckServer is called by the server once it has chosen the runner
// (goEngine: Ollama's Go engine). It refuses invalid OLLAMA_KV_NORM_* values
// and warns when compression is on but the llama.cpp runner will run.
func CheckServer(goEngine bool) error {
	p, err := PolicyFromEnv(nil)
	if err != nil {
		return err
	}
	switch {
	case p == nil:
	case goEngine:
		slog.Info("kvnorm: KV cache compression on", "policy", p.String())
	default:
		slog.Warn("kvnorm: KV cache compression is off for this model: it runs on the llama.cpp runner, which kvnorm does not hook; set OLLAMA_NEW_ENGINE=1 to run it on Ollama's Go engine", "policy", p.String())
	}
	return nil
}
