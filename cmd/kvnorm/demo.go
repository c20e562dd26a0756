package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/synth"
)

func init() {
	register(command{name: "demo", summary: "one prompt with and without compression, side by side (no arguments needed)", run: runDemo})
}

// demoPrompt is a TinyStories-style story: stories260K continues it sensibly,
// and any other model at least tokenizes it.
const demoPrompt = `Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. One day, Lily saw a big red ball under a tree. She ran to the ball and picked it up. It was shiny and round. Lily wanted to show the ball to her mom. She ran home as fast as she could. Her mom was in the kitchen. She was making a cake. Lily said, "Mom, look what I found!" Her mom smiled and said, "What a pretty ball, Lily! Where did you find it?" Lily told her mom about the tree in the park. They walked back to the park together. Near the tree, they saw a little boy named Tim. He was sad because he lost his ball. Lily`

// demoModel picks the model the demo runs and says why.
func demoModel(flagModel, flagTok string) (model, tok, why string, cleanup func(), err error) {
	cleanup = func() {}
	if flagModel != "" {
		return flagModel, flagTok, "given with --model", cleanup, nil
	}
	if name, path := localOllamaModel(); path != "" {
		return path, "", fmt.Sprintf("the model %s from the local Ollama store (pass --model to choose another)", name), cleanup, nil
	}
	if dir := sharedModels(); dir != "" {
		return filepath.Join(dir, "stories260K.bin"), filepath.Join(dir, "tok512.bin"),
			"stories260K from " + dir + " beside this checkout (no Ollama store model found)", cleanup, nil
	}
	tmp, err := os.MkdirTemp("", "kvnorm-demo")
	if err != nil {
		return "", "", "", cleanup, err
	}
	path := filepath.Join(tmp, "tiny.gguf")
	if err := synth.Write(path, synth.Shapes["tiny"], gguf.F16, 1); err != nil {
		os.RemoveAll(tmp)
		return "", "", "", cleanup, err
	}
	return path, "", "a tiny synthetic model with RANDOM weights (no --model, no Ollama store model, no ../shared/models): its text is noise, its cells and speeds are real",
		func() { os.RemoveAll(tmp) }, nil
}

// localOllamaModel returns a model of the local Ollama store, if any; it is
// set by the Ollama runtime's file when that runtime is built in.
var localOllamaModel = func() (name, path string) { return "", "" }

// sharedModels finds ../shared/models beside the checkout the command runs
// from (the working directory or one of its parents holding go.mod).
func sharedModels() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for {
		cand := filepath.Join(dir, "..", "shared", "models", "stories260K.bin")
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			if _, err := os.Stat(cand); err == nil {
				return filepath.Clean(filepath.Dir(cand))
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

type demoRun struct {
	label        string
	promptTokens int
	cells        int
	entries      int64
	bytes        int64
	prefill      time.Duration
	compress     time.Duration
	decodeTPS    float64
	text         string
}

func runDemo(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", stderr)
	rt := fs.String("runtime", "llamacpp", "runtime: "+strings.Join(engineNames(), "|"))
	modelFlag := fs.String("model", "", "GGUF, llama2.c checkpoint or Ollama model name (default: see above)")
	tokFlag := fs.String("tokenizer", "", "llama2.c tokenizer, with a llama2.c checkpoint")
	pf := addPolicyFlags(fs, "per-token")
	fs.Lookup("keep").DefValue = "0.5"
	_ = fs.Set("keep", "0.5")
	n := fs.Int("n", 48, "tokens to generate")
	prompt := fs.String("prompt", demoPrompt, "prompt")
	threads := fs.Int("threads", 1, "CPU threads")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	open, ok := engines[*rt]
	if !ok {
		return fmt.Errorf("--runtime %q: want one of %s", *rt, strings.Join(engineNames(), ", "))
	}
	pol, _, err := pf.build()
	if err != nil {
		return err
	}
	if *n <= 0 {
		return fmt.Errorf("--n=%d must be > 0", *n)
	}
	model, tok, why, cleanup, err := demoModel(*modelFlag, *tokFlag)
	if err != nil {
		return err
	}
	defer cleanup()
	fmt.Fprintf(stdout, "model:   %s\n         (%s)\n", model, why)
	eng, err := open(conformance.EngineOptions{Model: model, Tokenizer: tok, Threads: *threads, Log: stderr})
	if err != nil {
		return err
	}
	defer eng.Close()
	info := eng.Info()
	shape := eng.CacheShape()
	fmt.Fprintf(stdout, "runtime: %s (%s, %d layers × %d KV heads × %d, cache %s, %d cells, flash attention %v)\npolicy:  %s\n\n",
		info.Runtime, info.Arch, shape.Layers, shape.KVHeads, shape.HeadDim, shape.KType, info.Context, info.FlashAttn, pol)
	tokens, err := eng.Tokenize(*prompt, true)
	if err != nil {
		return err
	}
	if len(tokens)+*n > info.Context {
		return fmt.Errorf("the prompt (%d tokens) and %d new tokens exceed the context of %d cells", len(tokens), *n, info.Context)
	}
	// Warm the runtime up (first-call allocations, page faults) so that
	// neither measured run pays for it.
	if _, err := demoOnce(eng, nil, tokens[:min(len(tokens), 16)], 4, "warm-up"); err != nil {
		return err
	}
	base, err := demoOnce(eng, nil, tokens, *n, "uncompressed")
	if err != nil {
		return err
	}
	comp, err := adapter.New(eng, pol)
	if err != nil {
		return err
	}
	small, err := demoOnce(eng, comp, tokens, *n, "compressed")
	if err != nil {
		return err
	}
	entry, err := shape.EntryBytes()
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "\t%s\t%s\t\n", base.label, small.label)
	fmt.Fprintf(tw, "prompt tokens\t%d\t%d\t\n", base.promptTokens, small.promptTokens)
	fmt.Fprintf(tw, "KV cells after prefill\t%d\t%d\t\n", base.cells, small.cells)
	fmt.Fprintf(tw, "KV entries (layer×head×cell)\t%d\t%d\t\n", base.entries, small.entries)
	fmt.Fprintf(tw, "KV bytes in use\t%s\t%s\t\n", conformance.FormatBytes(base.entries*entry), conformance.FormatBytes(small.entries*entry))
	fmt.Fprintf(tw, "prefill\t%.1f ms\t%.1f ms\t\n", msOf(base.prefill), msOf(small.prefill))
	fmt.Fprintf(tw, "compress\t-\t%.2f ms\t\n", msOf(small.compress))
	fmt.Fprintf(tw, "decode\t%.1f tokens/s\t%.1f tokens/s\t\n", base.decodeTPS, small.decodeTPS)
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\ncontinuation, uncompressed:\n  %q\ncontinuation, compressed:\n  %q\n", base.text, small.text)
	if base.text == small.text {
		fmt.Fprintln(stdout, "\nthe two continuations are identical.")
	} else {
		fmt.Fprintf(stdout, "\nthe continuations agree on the first %d characters.\n", commonPrefix(base.text, small.text))
	}
	return nil
}

// demoOnce prefills seq 0 (with the compressor attached, if any), then
// decodes n tokens greedily.
func demoOnce(eng hooks.Engine, comp *adapter.Compressor, tokens []int32, n int, label string) (*demoRun, error) {
	const seq = 0
	_ = eng.RemoveSequence(seq)
	var obs hooks.Observer
	r := &demoRun{label: label, promptTokens: len(tokens)}
	if comp != nil {
		obs = comp
		comp.OnStats(func(st hooks.Stats) { r.compress += st.PlanTime + st.ApplyTime })
	}
	eng.SetObserver(obs)
	defer eng.SetObserver(nil)
	start := time.Now()
	logits, err := eng.Prefill(seq, tokens, false)
	if err != nil {
		return nil, err
	}
	r.prefill = time.Since(start) - r.compress
	if r.cells, r.entries, err = eng.Live(seq); err != nil {
		return nil, err
	}
	out := make([]int32, 0, n)
	next := conformance.Argmax(logits[len(logits)-1])
	start = time.Now()
	for range n {
		out = append(out, next)
		l, err := eng.Decode(seq, []int32{next})
		if err != nil {
			return nil, err
		}
		next = conformance.Argmax(l[0])
	}
	r.decodeTPS = float64(n) / time.Since(start).Seconds()
	if r.text, err = eng.Detokenize(out); err != nil {
		return nil, err
	}
	return r, nil
}

func commonPrefix(a, b string) int {
	i := 0
	for i < len(a) && i < len(b) && a[i] == b[i] {
		i++
	}
	return i
}

func msOf(d time.Duration) float64 { return float64(d.Microseconds()) / 1e3 }
