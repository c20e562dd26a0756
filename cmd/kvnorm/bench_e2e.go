package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/internal/e2ebench"
)

func init() {
	benchCommands["e2e"] = runBenchE2E
}

// benchChildFlag makes `kvnorm bench e2e` measure one spec (JSON) in this
// process and print its result as JSON: the parent re-execs itself with it
// for every row, so that each row's peak RSS (VmHWM) is its own. It is not
// listed among the flags.
const benchChildFlag = "-child-spec"

// benchChildEnv is set in the environment of a child; a test binary's
// TestMain looks for it to run the CLI instead of the tests.
const benchChildEnv = "KVNORM_BENCH_CHILD"

func runBenchE2E(args []string, stdout, stderr io.Writer) error {
	if len(args) == 2 && args[0] == benchChildFlag {
		return runBenchChild(args[1], stdout, stderr)
	}
	fs := newFlagSet("bench e2e", stderr)
	rt := fs.String("runtime", "llamacpp", "runtime: "+strings.Join(engineNames(), "|"))
	model := fs.String("model", "", "GGUF file, llama2.c checkpoint, or (ollama) an Ollama model name")
	tok := fs.String("tokenizer", "", "llama2.c tokenizer (with a llama2.c checkpoint)")
	prompts := fs.String("prompt-tokens", "512,2048,8192", "prompt lengths in tokens")
	keeps := fs.String("keep", "1,0.5,0.25", "keep ratios (1, the uncompressed row, is added when missing: ratios are to it); --chunked uses the smallest")
	decode := fs.Int("decode", 32, "tokens decoded after each prompt (decode tokens/s)")
	ctxLen := fs.Int("ctx", 0, "cells per sequence (0: rows get the prompt + decode + 2 × paired rounded up to 256, at least 2048; --chunked gets 1024)")
	threads := fs.Int("threads", runtime.NumCPU(), "CPU threads for the runtime")
	gran := fs.String("granularity", "auto", "per-token|per-head|auto (per-head where the runtime can compact heads)")
	skip := fs.String("skip-layers", "0,1", "layers that keep every key (comma list or none)")
	repeat := fs.Int("repeat", 2, "prefills without and with key capture, alternated; the fastest of each is kept")
	paired := fs.Int("paired", 64, "tokens each side decodes in the paired decode measurement of compressed rows (a second engine holds the prompt uncompressed; the two alternate in one process); 0: none")
	decObs := fs.Bool("decode-observer", true, "keep the compressor attached while decoding compressed rows (as a deployment must)")
	block := fs.Int("paired-block", e2ebench.DefaultPairedBlock, "--paired: timed tokens one side decodes before the next takes its turn (each turn adds one untimed token per side)")
	separate := fs.Bool("separate-loads", false, "--paired: load the model again for the uncompressed engines instead of opening them as twins of the compressed one (one copy of the weights; Ollama's engine)")
	control := fs.Bool("control", false, "--paired: also decode on a second uncompressed engine (one more prefill), whose ratio to the first (A/A) shows what the paired measurement can resolve")
	pairedOnly := fs.Bool("paired-only", false, "measure the compressed rows' paired decode alone: no keep-1 row, and one prefill per row (with the compressor) instead of --repeat prefills without and with capture; the prefill columns stay empty")
	chunked := fs.Bool("chunked", false, "the chunked-prefill memory experiment instead of the rows: a prompt of --chunk-factor × --ctx tokens at the smallest --keep, RSS after each chunk")
	factor := fs.Int("chunk-factor", 4, "--chunked: prompt length in multiples of the cache")
	baseline := fs.Bool("chunked-baseline", true, "--chunked: also measure the prompt uncompressed in a cache that holds it")
	maxLoad := fs.Float64("max-load", 0, "on a shared machine: before each row, wait until the 1-minute load average is below this (0: do not wait)")
	loadWait := fs.Duration("max-load-wait", 15*time.Minute, "the longest --max-load waits before a row (then it measures anyway, and the row's load says so)")
	inProc := fs.Bool("in-process", false, "measure in this process instead of one child process per row (peak RSS is then cumulative)")
	asJSON := fs.Bool("json", false, "print JSON (a list of rows; with --chunked, the chunked result; with --pool-observer, the pools unrounded) instead of tables")
	fromJSON := fs.String("from-json", "", "measure nothing: print and write (--out) the tables and plots of a JSON file an earlier run wrote (rows or --chunked)")
	pool := fs.String("pool-observer", "", "measure nothing: pool the observer's decode cost (with against without it, token by token) by runtime, and the paired ratio (and A/A control) by runtime, prompt, keep and threads, over the rows of earlier runs' JSON files or --out directories, comma-separated, with 95% bootstrap intervals")
	out := fs.String("out", "", "directory for the JSON, a markdown table and the plot (e2e-RUNTIME.*, chunked-RUNTIME.*)")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *fromJSON != "" {
		return replayE2E(*fromJSON, *chunked, *out, *asJSON, stdout)
	}
	if *pool != "" {
		return poolObserver(strings.Split(*pool, ","), *asJSON, stdout)
	}
	if *model == "" {
		return errors.New("--model is required")
	}
	if _, ok := engines[*rt]; !ok {
		return fmt.Errorf("--runtime %q: want one of %s", *rt, strings.Join(engineNames(), ", "))
	}
	ps, err := parseInts("--prompt-tokens", *prompts)
	if err != nil {
		return err
	}
	ks, err := parseKeeps(*keeps)
	if err != nil {
		return err
	}
	skipLayers, err := adapter.ParseLayers(*skip)
	if err != nil {
		return err
	}
	if *decode < 0 || *paired < 0 || *block < 1 || *repeat < 1 || *threads < 0 || *ctxLen < 0 || *factor < 1 {
		return errors.New("--decode, --paired, --threads and --ctx must be >= 0, --repeat, --chunk-factor and --paired-block >= 1")
	}
	if *pairedOnly {
		if *paired == 0 || *chunked {
			return errors.New("--paired-only needs --paired > 0 and no --chunked")
		}
		ks = slices.DeleteFunc(ks, func(k float64) bool { return k == 1 })
		if len(ks) == 0 {
			return errors.New("--paired-only: --keep has no compressed row (below 1)")
		}
	}
	if skipLayers == nil {
		skipLayers = []int{}
	}
	base := e2ebench.Spec{Runtime: *rt, Model: *model, Tokenizer: *tok, Decode: *decode, Ctx: *ctxLen, Threads: *threads,
		Granularity: *gran, SkipLayers: skipLayers, Repeat: *repeat, DecodeObserver: *decObs, Paired: *paired, Control: *control, SeparateLoads: *separate, PairedBlock: *block, PairedOnly: *pairedOnly}
	if *out != "" {
		if err := os.MkdirAll(*out, 0o755); err != nil {
			return err
		}
	}
	measure := func(s e2ebench.Spec, dst any) error {
		if *maxLoad > 0 {
			waitLoad(*maxLoad, *loadWait, stderr)
		}
		if *inProc {
			return measureSpec(s, dst, stderr)
		}
		return measureChild(s, dst, stderr)
	}

	if *chunked {
		s := base
		s.Kind, s.Keep = "chunked", ks[len(ks)-1]
		if s.Ctx == 0 {
			s.Ctx = 1024
		}
		s.PromptTokens = *factor * s.Ctx
		var res e2ebench.Chunked
		if err := measure(s, &res); err != nil {
			return err
		}
		if *baseline {
			b := s
			b.Uncompressed = true
			res.Baseline = &e2ebench.Chunked{}
			if err := measure(b, res.Baseline); err != nil {
				return fmt.Errorf("uncompressed baseline: %w", err)
			}
		}
		return reportChunked(&res, *out, *asJSON, stdout)
	}

	var rows []*e2ebench.Row
	for _, p := range ps {
		for _, k := range ks {
			s := base
			s.Kind, s.PromptTokens, s.Keep = "row", p, k
			r := &e2ebench.Row{}
			if err := measure(s, r); err != nil {
				return fmt.Errorf("%d tokens, keep %g: %w", p, k, err)
			}
			rows = append(rows, r)
		}
	}
	e2ebench.SetRatios(rows)
	return reportRows(rows, *out, *asJSON, stdout)
}

// poolObserver prints the observer's cost, and the paired ratio by prompt
// length, keep and threads, pooled over the rows of the given JSON files, or
// of the e2e-*.json files in the given directories; asJSON prints them as one
// JSON object ({"observer": [...], "paired": [...]}) at full precision.
func poolObserver(paths []string, asJSON bool, stdout io.Writer) error {
	var rows []*e2ebench.Row
	for _, p := range paths {
		files := []string{p}
		if st, err := os.Stat(p); err != nil {
			return fmt.Errorf("--pool-observer: %w", err)
		} else if st.IsDir() {
			if files, err = filepath.Glob(filepath.Join(p, "e2e-*.json")); err != nil {
				return err
			}
			if len(files) == 0 {
				return fmt.Errorf("--pool-observer: %s holds no e2e-*.json", p)
			}
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return err
			}
			var rs []*e2ebench.Row
			if err := json.Unmarshal(b, &rs); err != nil {
				return fmt.Errorf("--pool-observer: %s: %w (want the rows of bench e2e)", f, err)
			}
			rows = append(rows, rs...)
		}
	}
	obs, paired := e2ebench.PoolObserver(rows), e2ebench.PoolPaired(rows)
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Observer []e2ebench.ObserverPool `json:"observer"`
			Paired   []e2ebench.PairedPool   `json:"paired"`
		}{obs, paired})
	}
	if err := e2ebench.WriteObserverPool(stdout, obs); err != nil {
		return err
	}
	return e2ebench.WritePairedPool(stdout, paired)
}

// replayE2E prints and writes the reports of a JSON file of an earlier run.
func replayE2E(path string, chunked bool, out string, asJSON bool, stdout io.Writer) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if out != "" {
		if err := os.MkdirAll(out, 0o755); err != nil {
			return err
		}
	}
	if chunked {
		var c e2ebench.Chunked
		if err := json.Unmarshal(b, &c); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		return reportChunked(&c, out, asJSON, stdout)
	}
	var rows []*e2ebench.Row
	if err := json.Unmarshal(b, &rows); err != nil {
		return fmt.Errorf("%s: %w (a --chunked result needs --chunked)", path, err)
	}
	if len(rows) == 0 {
		return fmt.Errorf("%s: no rows", path)
	}
	e2ebench.SetRatios(rows)
	return reportRows(rows, out, asJSON, stdout)
}

func reportChunked(res *e2ebench.Chunked, out string, asJSON bool, stdout io.Writer) error {
	if out != "" {
		stem := filepath.Join(out, "chunked-"+res.Runtime)
		if err := writeJSON(stem+".json", res); err != nil {
			return err
		}
		var md bytes.Buffer
		if err := e2ebench.WriteChunked(&md, res, true); err != nil {
			return err
		}
		if err := os.WriteFile(stem+".md", md.Bytes(), 0o644); err != nil {
			return err
		}
		if err := e2ebench.PlotChunked(stem+".png", res); err != nil {
			return err
		}
	}
	if asJSON {
		return encodeJSON(stdout, res)
	}
	return e2ebench.WriteChunked(stdout, res, false)
}

func reportRows(rows []*e2ebench.Row, out string, asJSON bool, stdout io.Writer) error {
	rt := rows[0].Runtime
	if out != "" {
		stem := filepath.Join(out, "e2e-"+rt)
		if err := writeJSON(stem+".json", rows); err != nil {
			return err
		}
		var md bytes.Buffer
		if err := e2ebench.WriteTable(&md, rows, true); err != nil {
			return err
		}
		if err := os.WriteFile(stem+".md", md.Bytes(), 0o644); err != nil {
			return err
		}
		if err := e2ebench.PlotRows(stem+".png", fmt.Sprintf("%s, %s", rt, filepath.Base(rows[0].Model)), rows); err != nil {
			return err
		}
	}
	if asJSON {
		return encodeJSON(stdout, rows)
	}
	if err := e2ebench.WriteTable(stdout, rows, false); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\n%s\n\ntargets:\n", e2ebench.PromptSource)
	for _, t := range e2ebench.Targets(rows) {
		mark := "ok  "
		if !t.Holds {
			mark = "MISS"
		}
		fmt.Fprintf(stdout, "  %s %s: %s\n", mark, t.Name, t.Detail)
	}
	return nil
}

// waitLoad waits until the 1-minute load average is below limit, at most
// for wait.
func waitLoad(limit float64, wait time.Duration, log io.Writer) {
	deadline := time.Now().Add(wait)
	said := false
	for {
		l := e2ebench.LoadAvg()
		if l < limit || time.Now().After(deadline) {
			if said {
				fmt.Fprintf(log, "e2e: load %.2f, measuring\n", l)
			}
			return
		}
		if !said {
			fmt.Fprintf(log, "e2e: load %.2f ≥ %.2f: waiting (at most %s)\n", l, limit, time.Until(deadline).Round(time.Second))
			said = true
		}
		time.Sleep(5 * time.Second)
	}
}

// parseKeeps parses the keep ratios, descending, with 1 added when missing.
func parseKeeps(s string) ([]float64, error) {
	var ks []float64
	for _, f := range strings.Split(s, ",") {
		k, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || k <= 0 || k > 1 {
			return nil, fmt.Errorf("--keep %q: %q is not in (0, 1]", s, f)
		}
		if !slices.Contains(ks, k) {
			ks = append(ks, k)
		}
	}
	if !slices.Contains(ks, 1) {
		ks = append(ks, 1)
	}
	slices.SortFunc(ks, func(a, b float64) int { return cmp.Compare(b, a) })
	return ks, nil
}

// measureSpec runs one spec in this process into dst (*e2ebench.Row or
// *e2ebench.Chunked).
func measureSpec(s e2ebench.Spec, dst any, log io.Writer) error {
	f := engines[s.Runtime]
	if f == nil {
		return fmt.Errorf("runtime %q is not registered", s.Runtime)
	}
	switch d := dst.(type) {
	case *e2ebench.Row:
		r, err := e2ebench.RunRow(f, s, log)
		if err != nil {
			return err
		}
		*d = *r
	case *e2ebench.Chunked:
		r, err := e2ebench.RunChunked(f, s, log)
		if err != nil {
			return err
		}
		*d = *r
	default:
		return fmt.Errorf("measure: %T", dst)
	}
	return nil
}

// measureChild runs one spec in a child process (this executable, re-run
// with the hidden child flag) and decodes its JSON result into dst.
func measureChild(s e2ebench.Spec, dst any, stderr io.Writer) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	spec, err := json.Marshal(s)
	if err != nil {
		return err
	}
	var out bytes.Buffer
	cmd := exec.Command(exe, "bench", "e2e", benchChildFlag, string(spec))
	cmd.Env = append(os.Environ(), benchChildEnv+"=1")
	cmd.Stdout, cmd.Stderr = &out, stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("child process (%s): %w", s.Kind, err)
	}
	if err := json.Unmarshal(out.Bytes(), dst); err != nil {
		return fmt.Errorf("child process output: %w", err)
	}
	return nil
}

func runBenchChild(spec string, stdout, stderr io.Writer) error {
	var s e2ebench.Spec
	if err := json.Unmarshal([]byte(spec), &s); err != nil {
		return fmt.Errorf("%s: %w", benchChildFlag, err)
	}
	switch s.Kind {
	case "row":
		var r e2ebench.Row
		if err := measureSpec(s, &r, stderr); err != nil {
			return err
		}
		r.ChildProcess = true
		return json.NewEncoder(stdout).Encode(&r)
	case "chunked":
		var c e2ebench.Chunked
		if err := measureSpec(s, &c, stderr); err != nil {
			return err
		}
		c.ChildProcess = true
		return json.NewEncoder(stdout).Encode(&c)
	}
	return fmt.Errorf("%s: kind %q", benchChildFlag, s.Kind)
}

func writeJSON(path string, v any) error {
	var b bytes.Buffer
	if err := encodeJSON(&b, v); err != nil {
		return err
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}

func encodeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
