package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/term"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/conformance/refengine"
)

// engines maps a --runtime name to the factory that opens it for the
// conformance suite. A factory returns a hooks.Engine that also implements
// hooks.PositionEvictor or hooks.HeadCompactor (and, optionally,
// conformance.AttentionRecorder for the attention task). Each runtime adds
// one line once its engine exists, e.g.
//
//	"llamacpp": llamacpp.ConformanceEngine, // PositionEvictor: per-head rows are n/a
//	"ollama":   ollama.ConformanceEngine,   // HeadCompactor: per-head and per-token
//
// (or registers itself from its own file: engines["ollama"] = ...).
var engines = map[string]conformance.EngineFactory{
	"reference": refengine.Factory,
}

// engineNames lists the registered runtimes, the reference first.
func engineNames() []string {
	names := make([]string, 0, len(engines))
	for n := range engines {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool {
		if (names[i] == "reference") != (names[j] == "reference") {
			return names[i] == "reference"
		}
		return names[i] < names[j]
	})
	return names
}

func init() {
	register(command{name: "conformance", summary: "measure compressed against uncompressed outputs (lm, passkey, needle, greedy, attention)", run: runConformance})
}

func runConformance(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("conformance", stderr)
	model := fs.String("model", "", "GGUF file, llama2.c checkpoint, or (ollama) an Ollama model name")
	tok := fs.String("tokenizer", "", "llama2.c tokenizer (with a llama2.c checkpoint)")
	rt := fs.String("runtime", "all", "runtimes, comma-separated, or all: "+strings.Join(engineNames(), "|"))
	policies := fs.String("policies", "knorm,random,streaming,inverse", "eviction policies to sweep")
	gran := fs.String("granularity", "per-head,per-token", "granularities to sweep (a runtime that cannot apply one reports n/a)")
	keeps := fs.String("keep", "1,0.9,0.75,0.5,0.3,0.1", "keep ratios to sweep")
	tasks := fs.String("tasks", strings.Join(conformance.AllTasks, ","), "tasks: "+strings.Join(conformance.AllTasks, ",")+" or all")
	textFile := fs.String("text", "", "text file for lm, needle, greedy and attention (default: text sampled from the model)")
	quick := fs.Bool("quick", false, "small sizes: 4 samples, short prompts, one passkey/needle length")
	samples := fs.Int("samples", 0, "text samples of lm, greedy and attention (0: 16, or 4 with --quick)")
	prefill := fs.Int("prefill", 0, "prompt tokens of lm, greedy and attention (0: half the context for lm and attention, a quarter for greedy; half that with --quick)")
	scoreN := fs.Int("score", 0, "tokens after the prompt: lm scored, greedy generated, attention decoded (0: a quarter of the context for lm and attention, an eighth for greedy; half that with --quick)")
	lengths := fs.String("lengths", "", "passkey/needle prompt lengths in tokens, comma-separated (default: 1/2, 3/4, 7/8 of the context)")
	depths := fs.String("depths", "", "passkey/needle depths in [0,1], comma-separated (default: 0,0.25,0.5,0.75,1)")
	seeds := fs.Int("seeds", 0, "passkey/needle prompts per length and depth (0: 2, or 1 with --quick)")
	chunked := fs.Bool("chunked", true, "lm and greedy also run knorm under pressure: the prompt decoded in chunks into a cache of keep × prompt + the tokens after it (one more engine per keep ratio), against knorm once after prefill")
	bootstrap := fs.Int("bootstrap", conformance.DefaultBootstrap, "bootstrap resamples behind every interval")
	out := fs.String("out", "conformance-out", "directory for results.json, report.md and the plots")
	asJSON := fs.Bool("json", false, "print results.json to stdout instead of the summary")
	seed := fs.Uint64("seed", 1, "seed of sampling, pass keys, needles and the random policy")
	ctxLen := fs.Int("ctx", 0, "context size in cells (0: the runtime's default)")
	threads := fs.Int("threads", 0, "CPU threads for the runtime (0: its default)")
	skip := fs.String("skip-layers", "0,1", "layers that keep every key (comma list or none; with --recommend, alternatives separated by ';', e.g. '0,1;none')")
	sinks := fs.String("sinks", "0", "first positions always kept (with --recommend, a comma list of values to try)")
	window := fs.String("window", "0", "last positions always kept (with --recommend, a comma list of values to try)")
	recommend := fs.Bool("recommend", false, "search the sweep (and the --skip-layers/--sinks/--window alternatives) for the most compressing policy whose intervals stay within every tolerance; print it as OLLAMA_KV_NORM_* lines and a Go adapter.Policy")
	targetCtx := fs.Int("target-ctx", 0, "context length for --recommend's KV memory figure (0: the runtime's context)")
	aggregate := fs.String("aggregate", "mean-rank", "per-token score from per-head norms: mean-rank|mean-norm|min-norm|max-norm")
	maxPPL := fs.String("max-ppl-increase", "1%", "largest perplexity increase over the baseline (1% or 0.01)")
	maxKL := fs.Float64("max-kl", 0, "largest mean KL(baseline‖compressed) in nats/token (0: not checked)")
	minPass := fs.String("min-passkey", "0.95", "smallest passkey accuracy as a fraction of the baseline's")
	minNeedle := fs.String("min-needle", "0.95", "smallest needle accuracy as a fraction of the baseline's")
	minGreedy := fs.String("min-greedy-match", "0.9", "smallest fraction of greedy tokens equal to the baseline's")
	strict := fs.Bool("strict", false, "exit with an error when a row fails its tolerance")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *model == "" {
		return errors.New("--model is required")
	}
	cfg := conformance.Config{Model: *model, Tokenizer: *tok, Context: *ctxLen, Threads: *threads, Quick: *quick, Seed: *seed,
		Bootstrap: *bootstrap, Chunked: *chunked}
	var err error
	if cfg.Overrides, err = sizeOverrides(*samples, *prefill, *scoreN, *seeds, *lengths, *depths); err != nil {
		return err
	}
	if cfg.Runtimes, err = selectRuntimes(*rt); err != nil {
		return err
	}
	if cfg.Methods, err = conformance.ParseMethods(*policies); err != nil {
		return fmt.Errorf("--policies: %w", err)
	}
	if cfg.Granularities, err = conformance.ParseGranularities(*gran); err != nil {
		return fmt.Errorf("--granularity: %w", err)
	}
	if cfg.Keeps, err = conformance.ParseKeeps(*keeps); err != nil {
		return fmt.Errorf("--keep: %w", err)
	}
	if cfg.Tasks, err = conformance.ParseTasks(*tasks); err != nil {
		return fmt.Errorf("--tasks: %w", err)
	}
	if *recommend {
		// Unless asked otherwise, recommend knorm (the method kvnorm is
		// for) and judge it on the tasks that have tolerances.
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		if !set["policies"] {
			cfg.Methods = []adapter.Method{adapter.KNorm}
		}
		if !set["tasks"] {
			cfg.Tasks = slices.DeleteFunc(cfg.Tasks, func(t string) bool { return t == conformance.TaskAttention })
		}
		if !set["chunked"] {
			cfg.Chunked = false // chunked rows are not candidates
		}
	}
	cfg.Base = adapter.DefaultPolicy()
	bases, err := basePolicies(*skip, *sinks, *window, *recommend)
	if err != nil {
		return err
	}
	if *targetCtx < 0 {
		return fmt.Errorf("--target-ctx %d: want a context length >= 0", *targetCtx)
	}
	if cfg.Base.Aggregate, err = adapter.ParseAggregation(*aggregate); err != nil {
		return err
	}
	for i := range bases {
		bases[i].Aggregate = cfg.Base.Aggregate
	}
	cfg.Base = bases[0]
	tol := conformance.DefaultTolerances()
	for _, f := range []struct {
		name, val string
		dst       *float64
	}{
		{"--max-ppl-increase", *maxPPL, &tol.MaxPPLIncrease},
		{"--min-passkey", *minPass, &tol.MinPasskey},
		{"--min-needle", *minNeedle, &tol.MinNeedle},
		{"--min-greedy-match", *minGreedy, &tol.MinGreedyMatch},
	} {
		if *f.dst, err = conformance.ParseFraction(f.val); err != nil {
			return fmt.Errorf("%s: %w", f.name, err)
		}
	}
	tol.MaxKL = *maxKL
	cfg.Tolerances = tol
	if *textFile != "" {
		b, err := os.ReadFile(*textFile)
		if err != nil {
			return fmt.Errorf("--text: %w", err)
		}
		cfg.Text, cfg.TextName = string(b), *textFile
	}
	cfg.Progress = stderr
	if f, ok := stderr.(*os.File); ok {
		cfg.Terminal = term.IsTerminal(int(f.Fd()))
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if *recommend {
		return runRecommend(ctx, cfg, bases, *targetCtx, *out, stdout)
	}
	res, runErr := conformance.Run(ctx, cfg)
	if res == nil {
		return runErr
	}
	files, err := conformance.Write(*out, res)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return err
		}
	} else {
		printSummary(stdout, res)
		fmt.Fprintf(stdout, "\nwrote %s\n", strings.Join(files, ", "))
	}
	if runErr != nil {
		return runErr
	}
	failed, opened := 0, 0
	for _, rr := range res.Runtimes {
		if rr.Error != "" {
			fmt.Fprintf(stderr, "kvnorm conformance: runtime %s: %s\n", rr.Runtime, rr.Error)
			continue
		}
		opened++
		for _, tr := range rr.Tasks {
			for _, r := range tr.Rows {
				if r.Verdict == conformance.VerdictFail {
					failed++
				}
			}
		}
	}
	if opened == 0 {
		return errors.New("no runtime could run")
	}
	if *strict && failed > 0 {
		return fmt.Errorf("%d rows outside the tolerances (see %s/report.md)", failed, *out)
	}
	return nil
}

// basePolicies returns the base policies: one, or with --recommend every
// combination of the skip-layers, sinks and window alternatives.
func basePolicies(skip, sinks, window string, recommend bool) ([]adapter.Policy, error) {
	var skips [][]int
	for _, alt := range strings.Split(skip, ";") {
		l, err := adapter.ParseLayers(strings.TrimSpace(alt))
		if err != nil {
			return nil, fmt.Errorf("--skip-layers: %w", err)
		}
		skips = append(skips, l)
	}
	ints := func(name, v string) ([]int, error) {
		var out []int
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 0 {
				return nil, fmt.Errorf("%s %q: want counts >= 0", name, f)
			}
			out = append(out, n)
		}
		return out, nil
	}
	ss, err := ints("--sinks", sinks)
	if err != nil {
		return nil, err
	}
	ws, err := ints("--window", window)
	if err != nil {
		return nil, err
	}
	if !recommend && (len(skips) > 1 || len(ss) > 1 || len(ws) > 1) {
		return nil, errors.New("--skip-layers, --sinks and --window take one value unless --recommend is set")
	}
	var out []adapter.Policy
	for _, sk := range skips {
		for _, s := range ss {
			for _, w := range ws {
				p := adapter.DefaultPolicy()
				p.SkipLayers, p.Sinks, p.Window = sk, s, w
				out = append(out, p)
			}
		}
	}
	return out, nil
}

// runRecommend runs the sweep once per base policy and prints, per runtime,
// the recommendation; the results of the first base go to out.
func runRecommend(ctx context.Context, cfg conformance.Config, bases []adapter.Policy, targetCtx int, out string, stdout io.Writer) error {
	recs, all, err := conformance.Recommend(ctx, cfg, bases, targetCtx)
	for i, res := range all {
		dir := out
		if len(all) > 1 {
			dir = filepath.Join(out, fmt.Sprintf("base%d", i))
		}
		if _, werr := conformance.Write(dir, res); werr != nil && err == nil {
			err = werr
		}
	}
	if err != nil {
		return err
	}
	found := 0
	for _, r := range recs {
		conformance.WriteRecommendation(stdout, r, cfg.Tolerances)
		fmt.Fprintln(stdout)
		if r.Found {
			found++
		}
	}
	fmt.Fprintf(stdout, "results of every run: %s\n", out)
	if found == 0 {
		return errors.New("no runtime has a compressed policy within the tolerances")
	}
	return nil
}

// sizeOverrides checks the size flags (0 or empty: the default).
func sizeOverrides(samples, prefill, score, seeds int, lengths, depths string) (conformance.SizeOverrides, error) {
	o := conformance.SizeOverrides{Samples: samples, Prefill: prefill, Score: score, Seeds: seeds}
	for name, v := range map[string]int{"--samples": samples, "--prefill": prefill, "--score": score, "--seeds": seeds} {
		if v < 0 {
			return o, fmt.Errorf("%s %d: want a count >= 0 (0: the default)", name, v)
		}
	}
	if lengths != "" {
		for _, f := range strings.Split(lengths, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n <= 0 {
				return o, fmt.Errorf("--lengths %q: want positive token counts, comma-separated", f)
			}
			o.Lengths = append(o.Lengths, n)
		}
	}
	if depths != "" {
		for _, f := range strings.Split(depths, ",") {
			d, err := conformance.ParseFraction(f)
			if err != nil || d < 0 || d > 1 {
				return o, fmt.Errorf("--depths %q: want fractions in [0, 1], comma-separated", f)
			}
			o.Depths = append(o.Depths, d)
		}
	}
	return o, nil
}

// selectRuntimes resolves --runtime: a comma-separated list, or all.
func selectRuntimes(s string) ([]conformance.Runtime, error) {
	names := engineNames()
	var want []string
	if s == "all" {
		want = names
	} else {
		for _, n := range strings.Split(s, ",") {
			n = strings.TrimSpace(n)
			if _, ok := engines[n]; !ok {
				return nil, fmt.Errorf("--runtime %q: not built in (registered: %s)", n, strings.Join(names, ", "))
			}
			want = append(want, n)
		}
	}
	var out []conformance.Runtime
	for _, n := range want {
		out = append(out, conformance.Runtime{Name: n, Open: engines[n]})
	}
	return out, nil
}

// printSummary prints each runtime's policy × keep tables and attention
// correlations.
func printSummary(w io.Writer, res *conformance.Results) {
	for _, rr := range res.Runtimes {
		fmt.Fprintf(w, "== %s", rr.Runtime)
		if rr.Error != "" {
			fmt.Fprintf(w, ": error: %s\n", rr.Error)
			continue
		}
		fmt.Fprintf(w, " (%.1f s)\n", rr.Seconds)
		for i := range rr.Tasks {
			tr := &rr.Tasks[i]
			fmt.Fprintf(w, "\n-- %s\n", tr.Task)
			switch {
			case tr.Status != conformance.StatusOK:
				fmt.Fprintf(w, "%s: %s\n", tr.Status, tr.Note)
			case tr.Attention != nil:
				a := tr.Attention
				fmt.Fprintf(w, "%d samples: %d prefill + %d decoded tokens; 95%% bootstrap intervals over samples\n", a.Samples, a.Length, a.Decode)
				for _, m := range []struct {
					name   string
					layers []conformance.LayerAttention
				}{{"decoding phase (continuation queries -> prefill keys, the paper's measure)", a.Layers}, {"prompt-internal (later prompt queries -> prompt keys)", a.Prompt}} {
					fmt.Fprintf(w, "%s\nlayer  spearman(norm, attention received)   low-norm-half share (uniform)\n", m.name)
					for _, l := range m.layers {
						fmt.Fprintf(w, "%5d  %+.3f [%+.3f, %+.3f]           %.3f [%.3f, %.3f] (%.3f)\n", l.Layer,
							float64(l.Spearman), float64(l.SpearmanCI.Lo), float64(l.SpearmanCI.Hi),
							float64(l.ShareLowHalf), float64(l.ShareLowHalfCI.Lo), float64(l.ShareLowHalfCI.Hi), float64(l.ShareUniform))
					}
				}
			default:
				conformance.WriteSummary(w, tr)
				fmt.Fprintln(w)
				conformance.WriteComparisons(w, tr)
			}
			fmt.Fprintf(w, "(%s: %.1f s)\n", tr.Task, tr.Seconds)
		}
		fmt.Fprintln(w)
	}
}
