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
	"sort"
	"strings"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// generateOptions are the flags of `kvnorm generate`, shared by every runtime.
type generateOptions struct {
	Runtime   string
	Model     string
	Tokenizer string
	Prompt    string
	// Compress is false when the policy keeps everything (keep 1, no budget):
	// the runtime then runs without a compressor at all.
	Compress bool
	Policy   adapter.Policy
	N        int
	Ctx      int
	// Batch is --batch; BatchSet says the user gave it. Without it each
	// runtime chooses the prefill chunk from its cache (see prefillBatch).
	Batch     int
	BatchSet  bool
	Threads   int
	CacheType string
	FlashAttn bool
	Temp      float64
	Seed      uint64
	Log       io.Writer // progress and notes, never the JSON
}

// generateResult is what `kvnorm generate --json` prints.
type generateResult struct {
	Runtime          string  `json:"runtime"`
	Model            string  `json:"model"`
	Policy           string  `json:"policy"`
	Granularity      string  `json:"granularity"`
	Keep             float64 `json:"keep"`
	Budget           int     `json:"budget,omitempty"`
	PromptTokens     int     `json:"prompt_tokens"`
	KVCellsBefore    int     `json:"kv_cells_before"`
	KVCellsAfter     int     `json:"kv_cells_after"`
	KVBytesBefore    int64   `json:"kv_bytes_before"`
	KVBytesAfter     int64   `json:"kv_bytes_after"`
	Compressions     int     `json:"compressions"`
	GeneratedTokens  int     `json:"generated_tokens"`
	Text             string  `json:"text"`
	PrefillMs        float64 `json:"prefill_ms"`
	CompressMs       float64 `json:"compress_ms"`
	DecodeTokensPerS float64 `json:"decode_tokens_per_s"`
}

// generators maps a runtime name to its implementation; runtimes register
// themselves from their own files.
var generators = map[string]func(ctx context.Context, o generateOptions) (*generateResult, error){}

// policyFlags registers the policy flags shared by generate, conformance and demo.
type policyFlags struct {
	keep, policy, aggregate, granularity, skip *string
	budget, sinks, window, minPrompt           *int
	seed                                       *uint64
}

func addPolicyFlags(fs *flag.FlagSet, defaultGranularity string) *policyFlags {
	return &policyFlags{
		keep:        fs.String("keep", "1", "fraction of the KV cache to keep, in (0,1]"),
		budget:      fs.Int("budget", 0, "absolute number of positions to keep per head (overrides --keep)"),
		policy:      fs.String("policy", "knorm", "eviction policy: knorm|random|streaming|inverse"),
		aggregate:   fs.String("aggregate", "mean-rank", "per-token score from per-head norms: mean-rank|mean-norm|min-norm|max-norm"),
		granularity: fs.String("granularity", defaultGranularity, "per-head|per-token"),
		skip:        fs.String("skip-layers", "0,1", "layers that keep every key (comma list or none)"),
		sinks:       fs.Int("sinks", 0, "first positions always kept"),
		window:      fs.Int("window", 0, "last positions always kept"),
		minPrompt:   fs.Int("min-prompt", 0, "prompts shorter than this are not compressed"),
		seed:        fs.Uint64("policy-seed", 0, "seed of the random policy"),
	}
}

// build turns the flags into a validated policy; compress is false when the
// policy keeps everything.
func (f *policyFlags) build() (p adapter.Policy, compress bool, err error) {
	p = adapter.DefaultPolicy()
	if _, err := fmt.Sscanf(*f.keep, "%g", &p.Keep); err != nil {
		return p, false, fmt.Errorf("--keep %q: not a number", *f.keep)
	}
	if p.Method, err = adapter.ParseMethod(*f.policy); err != nil {
		return p, false, err
	}
	if p.Aggregate, err = adapter.ParseAggregation(*f.aggregate); err != nil {
		return p, false, err
	}
	if p.Granularity, err = hooks.ParseGranularity(*f.granularity); err != nil {
		return p, false, fmt.Errorf("--%w", err)
	}
	if p.SkipLayers, err = adapter.ParseLayers(*f.skip); err != nil {
		return p, false, err
	}
	p.Budget, p.Sinks, p.Window, p.MinPrompt, p.Seed = *f.budget, *f.sinks, *f.window, *f.minPrompt, *f.seed
	if err := p.Validate(); err != nil {
		return p, false, err
	}
	return p, p.Budget > 0 || p.Keep < 1, nil
}

func init() {
	register(command{name: "generate", summary: "generate text with a compressed KV cache", run: runGenerate})
}

func runGenerate(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("generate", stderr)
	rt := fs.String("runtime", "llamacpp", "runtime: "+strings.Join(runtimeNames(), "|"))
	model := fs.String("model", "", "GGUF file, llama2.c checkpoint, or (ollama runtime) an Ollama model name")
	tok := fs.String("tokenizer", "", "llama2.c tokenizer (with a llama2.c checkpoint)")
	prompt := fs.String("prompt", "", "prompt text")
	promptFile := fs.String("prompt-file", "", "read the prompt from this file")
	pf := addPolicyFlags(fs, "per-token")
	n := fs.Int("n", 64, "tokens to generate")
	ctxLen := fs.Int("ctx", 2048, "context size in cells (llama.cpp pads to a multiple of 256)")
	batch := fs.Int("batch", 512, "prefill batch, the chunk size when the prompt exceeds the context; when not given: up to 512 tokens if the prompt fits the cache, else a quarter of the cache")
	threads := fs.Int("threads", 1, "CPU threads")
	cacheType := fs.String("cache-type", "f16", "KV cache type: f16|q8_0|q4_0")
	fa := fs.String("flash-attn", "on", "flash attention: on|off")
	temp := fs.Float64("temp", 0, "sampling temperature (0: greedy)")
	seed := fs.Uint64("seed", 1, "sampling seed")
	asJSON := fs.Bool("json", false, "print one JSON object")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	gen, ok := generators[*rt]
	if !ok {
		return fmt.Errorf("--runtime %q: want one of %s", *rt, strings.Join(runtimeNames(), ", "))
	}
	if *model == "" {
		return errors.New("--model is required")
	}
	text := *prompt
	if *promptFile != "" {
		if text != "" {
			return errors.New("give --prompt or --prompt-file, not both")
		}
		b, err := os.ReadFile(*promptFile)
		if err != nil {
			return fmt.Errorf("--prompt-file: %w", err)
		}
		text = string(b)
	}
	if strings.TrimSpace(text) == "" {
		return errors.New("the prompt is empty: give --prompt or --prompt-file")
	}
	pol, compress, err := pf.build()
	if err != nil {
		return err
	}
	if *n < 0 || *ctxLen <= 0 || *batch <= 0 || *threads <= 0 {
		return fmt.Errorf("--n=%d, --ctx=%d, --batch=%d, --threads=%d: n must be >= 0 and the others > 0", *n, *ctxLen, *batch, *threads)
	}
	var flash bool
	switch *fa {
	case "on", "true", "1":
		flash = true
	case "off", "false", "0":
	default:
		return fmt.Errorf("--flash-attn %q: want on or off", *fa)
	}
	switch *cacheType {
	case "f16", "q8_0", "q4_0", "f32":
	default:
		return fmt.Errorf("--cache-type %q: want f16, q8_0 or q4_0", *cacheType)
	}
	if *temp < 0 {
		return fmt.Errorf("--temp=%g must be >= 0", *temp)
	}
	batchSet := false
	fs.Visit(func(f *flag.Flag) { batchSet = batchSet || f.Name == "batch" })
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	res, err := gen(ctx, generateOptions{
		Runtime: *rt, Model: *model, Tokenizer: *tok, Prompt: text, Compress: compress, Policy: pol,
		N: *n, Ctx: *ctxLen, Batch: *batch, BatchSet: batchSet, Threads: *threads, CacheType: *cacheType, FlashAttn: flash,
		Temp: *temp, Seed: *seed, Log: stderr,
	})
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprintf(stdout, "%s\n\n", res.Text)
	fmt.Fprintf(stdout, "runtime %s, policy %s\nprompt %d tokens; KV cells %d -> %d (%d -> %d bytes); generated %d tokens\nprefill %.1f ms, compress %.2f ms, decode %.1f tokens/s\n",
		res.Runtime, res.Policy, res.PromptTokens, res.KVCellsBefore, res.KVCellsAfter, res.KVBytesBefore, res.KVBytesAfter,
		res.GeneratedTokens, res.PrefillMs, res.CompressMs, res.DecodeTokensPerS)
	return nil
}

// cacheLimits are the facts about a runtime's cache that a prefill batch
// and a policy are checked against.
type cacheLimits struct {
	Layers   int    // the model's layers
	Capacity int    // cells per sequence
	Padding  string // how --ctx became Capacity, when it did not stay as given
}

// checkPolicy refuses a policy that cannot work on this model: adapter's
// Policy.CheckModel, each finding named by its flag.
func checkPolicy(o generateOptions, lim cacheLimits) error {
	if !o.Compress {
		return nil
	}
	flagOf := map[string]string{"SkipLayers": "--skip-layers", "Budget": "--budget", "Sinks+Window": "--sinks/--window"}
	var errs []error
	for _, mm := range o.Policy.CheckModel(lim.Layers, lim.Capacity) {
		errs = append(errs, fmt.Errorf("%s does not fit this model (%d layers, %d cells per sequence): %s", flagOf[mm.Field], lim.Layers, lim.Capacity, mm.Problem))
	}
	return errors.Join(errs...)
}

// prefillBatch chooses the batch (the prefill chunk) for a prompt of prompt
// tokens, the same way for every runtime. A prompt that fits in the cache
// goes in chunks of up to 512 tokens (--batch when given); a longer one needs
// compression, which makes room before every chunk that does not fit, so a
// chunk leaves room for what a compression always keeps (sinks, window and
// the last position): --batch when given and small enough (else an error that
// says what fits), by default a quarter of the cache, at most 512.
func prefillBatch(o generateOptions, prompt int, lim cacheLimits) (int, error) {
	capacity := lim.Capacity
	ctxNote := fmt.Sprintf("--ctx %d gives %d cells per sequence", o.Ctx, capacity)
	if lim.Padding != "" {
		ctxNote += " (" + lim.Padding + ")"
	}
	if o.BatchSet && o.Batch > capacity {
		return 0, fmt.Errorf("--batch %d does not fit in the cache: %s; give --batch <= %d, or leave --batch out to have it chosen from the cache", o.Batch, ctxNote, capacity)
	}
	if prompt <= capacity {
		if o.BatchSet {
			return o.Batch, nil
		}
		return min(512, capacity), nil
	}
	if !o.Compress {
		return 0, fmt.Errorf("the prompt has %d tokens but %s: raise --ctx, or compress (--keep < 1 or --budget) to feed it in chunks", prompt, ctxNote)
	}
	protected := o.Policy.Sinks + max(o.Policy.Window, 1)
	most := capacity - protected
	if most < 1 {
		return 0, fmt.Errorf("the prompt has %d tokens but %s, and --sinks %d and --window %d (with the last position) protect all of them: nothing can be evicted to feed it in chunks", prompt, ctxNote, o.Policy.Sinks, o.Policy.Window)
	}
	if o.BatchSet {
		if o.Batch > most {
			return 0, fmt.Errorf("--batch %d cannot be fed into a full cache: the prompt (%d tokens) is longer than the cache (%s), and a compression keeps at least %d positions (sinks %d, window %d, the last), so a chunk holds at most %d; lower --batch or leave it out to have it chosen from the cache",
				o.Batch, prompt, ctxNote, protected, o.Policy.Sinks, o.Policy.Window, most)
		}
		return o.Batch, nil
	}
	return max(1, min(512, capacity/4, most)), nil
}

func runtimeNames() []string {
	names := make([]string, 0, len(generators))
	for n := range generators {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
