// Package e2ebench measures kvnorm end to end on a runtime driven through
// hooks.Engine: prefill time with and without key capture, compression
// time, KV cells and bytes in use, decode speed and peak RSS, for a grid of
// prompt lengths and keep ratios (RunRow), and the memory of a prompt several
// times longer than the cache fed through chunked prefill (RunChunked).
//
// Each row is meant to run in a process of its own (the kvnorm CLI re-execs
// itself) so that the peak RSS (VmHWM) is the row's own.
package e2ebench

import (
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"time"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/hooks"
)

// Text is what prompts are made of: it is tokenized once, and its token ids
// are repeated to the wanted length and fed to the engine directly.
const Text = `The committee met on a grey Tuesday morning to review the quarterly figures. Sales in the northern region had risen by four percent, while the coastal offices reported a small decline caused by the storm in early spring. After a short discussion about shipping costs, the chair asked each team to prepare a plan for the next season, listing the risks, the people responsible and the dates by which each step should be finished. Lunch was served at noon in the small hall beside the library.`

// PromptSource says how prompts are made, for the report.
const PromptSource = "token ids fed directly to Prefill: BOS + the tokens of a fixed English paragraph, repeated and cut to the exact length"

// Spec is one measurement: a row (Kind "row") or the chunked-prefill
// experiment (Kind "chunked").
type Spec struct {
	Kind         string  `json:"kind"`
	Runtime      string  `json:"runtime"`
	Model        string  `json:"model"`
	Tokenizer    string  `json:"tokenizer,omitempty"`
	PromptTokens int     `json:"prompt_tokens"`
	Keep         float64 `json:"keep"`
	// Decode is the number of tokens decoded after the prompt (rows).
	Decode int `json:"decode"`
	// Ctx is the cells per sequence asked of the engine; 0 chooses
	// (rows: the prompt and the decoded tokens rounded up to 256, at least
	// 2048; chunked: required).
	Ctx     int `json:"ctx"`
	Threads int `json:"threads"`
	// Granularity is per-token, per-head or auto (per-head when the engine
	// can compact heads, else per-token).
	Granularity string `json:"granularity"`
	SkipLayers  []int  `json:"skip_layers"`
	// Repeat runs the prefill without and with the capture observer this
	// many times each, in ABBA order, and keeps the fastest of each (at
	// least 1).
	Repeat int `json:"repeat"`
	// DecodeObserver keeps the compressor attached while decoding a
	// compressed row (as a deployment must, to compress under pressure);
	// the uncompressed row (keep 1) always decodes without an observer.
	DecodeObserver bool `json:"decode_observer"`
	// Paired is the number of tokens each side decodes in the paired decode
	// measurement of a compressed row (0: none): after the row, a second
	// engine holds the same prompt uncompressed, and the two decode in
	// alternating blocks of PairedBlock tokens in this one process, so that
	// the machine's drift between rows does not enter the ratio.
	Paired int `json:"paired,omitempty"`
	// PairedBlock is the number of timed tokens one side decodes before the
	// next side takes its turn (0: DefaultPairedBlock). Smaller blocks follow
	// the machine's drift more closely; every block also costs one untimed
	// token per side.
	PairedBlock int `json:"paired_block,omitempty"`
	// Control adds to the paired decode a side that measures the
	// measurement: a third engine holding the prompt uncompressed, like the
	// second, so that the ratio of two identical engines (A/A) says how
	// finely this machine and process resolve a ratio.
	Control bool `json:"control,omitempty"`
	// SeparateLoads opens the paired decode's uncompressed engines by loading
	// the model again, even when the runtime can open them as twins of the
	// compressed engine (conformance.Twinner: one copy of the weights in
	// memory, a cache each), which it otherwise does.
	SeparateLoads bool `json:"separate_loads,omitempty"`
	// PairedOnly measures a compressed row for its paired decode alone: the
	// prompt is prefilled once, with the compressor (Repeat is ignored and
	// no prefill is timed without it), so a row at a long prompt costs one
	// prefill instead of 2 × Repeat. The row's prefill, capture and
	// compression-share columns are then not measured.
	PairedOnly bool `json:"paired_only,omitempty"`
	// Uncompressed (chunked): no compressor; the context holds the whole
	// prompt (the memory baseline of the chunked experiment).
	Uncompressed bool `json:"uncompressed,omitempty"`
}

// WarmupTokens is the length of the prefill that warms an engine up before
// anything is timed (first-call allocations, page faults, the compute graph of
// a full batch): as long as the prompt, at most one full batch of 512.
const WarmupTokens = 512

// AutoCtx is the context a row asks for when Spec.Ctx is 0: room for the
// prompt and the decoded tokens, rounded up to 256 cells, at least 2048 (so
// that an engine sizing its batches from the cache keeps batches of 512).
func AutoCtx(promptTokens, decode int) int {
	n := promptTokens + decode + 1
	n = (n + 255) / 256 * 256
	return max(n, 2048)
}

// Row is one measured (prompt length, keep) pair.
type Row struct {
	Runtime      string  `json:"runtime"`
	Model        string  `json:"model"`
	Arch         string  `json:"arch"`
	Granularity  string  `json:"granularity"`
	Policy       string  `json:"policy"`
	FlashAttn    bool    `json:"flash_attn"`
	Threads      int     `json:"threads"`
	Ctx          int     `json:"ctx_cells"`
	KType        string  `json:"k_type"`
	VType        string  `json:"v_type"`
	PromptTokens int     `json:"prompt_tokens"`
	PromptSource string  `json:"prompt_source"`
	Keep         float64 `json:"keep"`
	Repeat       int     `json:"repeat"`
	// PairedOnly: one prefill, with the compressor; PrefillMs,
	// CaptureOverhead and CompressFrac are not measured (Spec.PairedOnly).
	PairedOnly bool `json:"paired_only,omitempty"`

	// PrefillMs decodes the prompt with no observer; PrefillCaptureMs with an
	// observer that records every layer's key norms but evicts nothing
	// (PrefillDone is deferred). CaptureOverhead is their relative
	// difference; ObserveMs the part spent inside the observer (norms and
	// bookkeeping, from adapter.Totals.ObserveTime).
	PrefillMs        float64 `json:"prefill_ms"`
	PrefillCaptureMs float64 `json:"prefill_capture_ms"`
	CaptureOverhead  float64 `json:"capture_overhead"`
	ObserveMs        float64 `json:"observe_ms"`
	// CompressMs is the wall time of the prefill compression (PrefillDone:
	// plan + evict); PlanMs and ApplyMs are the compressor's own split.
	// CompressFrac is CompressMs / PrefillMs.
	CompressMs   float64 `json:"compress_ms"`
	PlanMs       float64 `json:"plan_ms"`
	ApplyMs      float64 `json:"apply_ms"`
	CompressFrac float64 `json:"compress_frac_of_prefill"`

	// KV in use before and after the compression: distinct live positions
	// (cells), live (layer, KV head, position) entries, and their K+V bytes
	// (entries × EntryBytes). KVBytesAllocated is what the cache holds room
	// for (ctx cells × layers × KV heads × EntryBytes).
	KVCellsBefore    int   `json:"kv_cells_before"`
	KVCells          int   `json:"kv_cells"`
	KVEntriesBefore  int64 `json:"kv_entries_before"`
	KVEntries        int64 `json:"kv_entries"`
	EntryBytes       int64 `json:"entry_bytes"`
	KVBytesBefore    int64 `json:"kv_bytes_before"`
	KVBytes          int64 `json:"kv_bytes"`
	KVBytesAllocated int64 `json:"kv_bytes_allocated"`

	DecodeTokens     int     `json:"decode_tokens"`
	DecodeMs         float64 `json:"decode_ms"`
	DecodeTokensPerS float64 `json:"decode_tokens_per_s"`
	DecodeObserver   bool    `json:"decode_observer"`

	// The paired decode measurement (compressed rows with Spec.Paired > 0):
	// PairedTokens tokens decoded by each side in alternating blocks (ABBA
	// order) by this row's compressed engine and by a second engine holding
	// the same prompt uncompressed, both at the same context length; the
	// tokens/s of each side, their ratio (compressed ÷ uncompressed), and the
	// median per-token latency of each side.
	PairedTokens         int     `json:"paired_tokens,omitempty"`
	PairedTokensPerS     float64 `json:"paired_tokens_per_s,omitempty"`
	PairedBaseTokensPerS float64 `json:"paired_base_tokens_per_s,omitempty"`
	PairedRatio          float64 `json:"paired_ratio,omitempty"`
	PairedMedianMs       float64 `json:"paired_median_ms,omitempty"`
	PairedBaseMedianMs   float64 `json:"paired_base_median_ms,omitempty"`
	PairedMedianRatio    float64 `json:"paired_median_ratio,omitempty"`
	// The third side when the row decodes with its observer: the same
	// compressed engine decoding without it (interleaved token by token with
	// the tokens it decodes with the observer), and its ratio to the
	// uncompressed side (what compression alone gains).
	PairedNoObserverTokensPerS float64 `json:"paired_no_observer_tokens_per_s,omitempty"`
	PairedNoObserverRatio      float64 `json:"paired_no_observer_ratio,omitempty"`
	// PairedObserverCI is a 95% bootstrap interval of (with ÷ without) − 1 in
	// tokens/s, resampling the pairs of adjacent tokens with and without the
	// observer: what one row resolves of the observer's cost.
	PairedObserverCI []float64 `json:"paired_observer_ci,omitempty"`
	// PairedLatencyMs holds every timed token's latency by side ("with":
	// the compressed engine as the row decodes, "base": uncompressed,
	// "without": the compressed engine without its observer, "control"), in
	// the order decoded, and under "<side>_first" the untimed first token
	// of each of the side's blocks ("with_first": the compressed engine's).
	PairedLatencyMs map[string][]float64 `json:"paired_latency_ms,omitempty"`
	// The control side (Spec.Control): a second uncompressed engine, and
	// its ratio to the first (1 but for what the bench cannot resolve).
	PairedControlTokensPerS float64 `json:"paired_control_tokens_per_s,omitempty"`
	PairedControlRatio      float64 `json:"paired_control_ratio,omitempty"`
	// PairedTwins is set when the uncompressed engines were twins of the
	// compressed one (the weights loaded once; Spec.SeparateLoads off and the
	// runtime a conformance.Twinner).
	PairedTwins bool `json:"paired_twins,omitempty"`
	// PairedBlock is the number of timed tokens per side and turn.
	PairedBlock int `json:"paired_block,omitempty"`
	// PairedEvenGrowth is set when the uncompressed engines decoded as many
	// tokens as the compressed one, which with an observer decodes two per
	// timed token (with and without it): every engine was at the same
	// context length at every turn. Rows without it (before 2026-12-02
	// 21:00 UTC) grew the compressed engine twice as fast, which held a
	// little more in its cache than the uncompressed ones held beyond the prompt.
	PairedEvenGrowth bool `json:"paired_even_growth,omitempty"`
	// PairedGrowth is the number of tokens each engine decoded in the
	// paired measurement, timed or not ("compressed", "base", "control").
	PairedGrowth map[string]int `json:"paired_growth,omitempty"`

	// PeakRSSBytes is VmHWM at the end of the row; the rest is the memory at
	// the end of the row.
	PeakRSSBytes int64 `json:"peak_rss_bytes"`
	RSSAnonBytes int64 `json:"rss_anon_bytes"`
	RSSFileBytes int64 `json:"rss_file_bytes"`
	// ChildProcess is true when the row ran in a process of its own (its
	// peak RSS is its own).
	ChildProcess bool `json:"child_process"`
	// LoadAvg1 is the machine's 1-minute load average when the row started,
	// LoadAvg1End when it ended (this row's own threads included).
	LoadAvg1    float64 `json:"load_avg_1m"`
	LoadAvg1End float64 `json:"load_avg_1m_end"`
	WallS       float64 `json:"wall_s"`

	// Ratios to the uncompressed row (keep 1) of the same runtime and prompt
	// length measured in the same run (0 when there is none).
	RatioKVCells   float64 `json:"ratio_kv_cells"`
	RatioKVBytes   float64 `json:"ratio_kv_bytes"`
	RatioPrefill   float64 `json:"ratio_prefill"`
	RatioDecodeTPS float64 `json:"ratio_decode_tokens_per_s"`
	RatioPeakRSS   float64 `json:"ratio_peak_rss"`
	RatioRSSAnon   float64 `json:"ratio_rss_anon"`
}

// captureOnly records key norms through its compressor but defers the
// prefill compression, so that prefill with capture is timed apart from the
// compression. Cache pressure still compresses (a prompt longer than the
// cache needs it).
type captureOnly struct{ *adapter.Compressor }

func (captureOnly) PrefillDone(seq hooks.SeqID) (hooks.Stats, error) {
	return hooks.Stats{Seq: seq, Trigger: hooks.TriggerPrefill.String(), Skipped: true}, nil
}

// Policy is the knorm policy of a spec on an engine.
func Policy(s Spec, eng hooks.Engine) (adapter.Policy, error) {
	p := adapter.DefaultPolicy()
	p.Keep = s.Keep
	if s.SkipLayers != nil {
		p.SkipLayers = s.SkipLayers
	}
	switch s.Granularity {
	case "", "auto":
		if _, ok := eng.(hooks.HeadCompactor); ok {
			p.Granularity = hooks.PerHead
		} else {
			p.Granularity = hooks.PerToken
		}
	default:
		g, err := hooks.ParseGranularity(s.Granularity)
		if err != nil {
			return p, err
		}
		p.Granularity = g
	}
	return p, p.Validate()
}

// PromptTokens returns exactly n token ids: BOS and the tokens of Text,
// repeated.
func PromptTokens(eng hooks.Engine, n int) ([]int32, error) {
	if n <= 0 {
		return nil, fmt.Errorf("e2ebench: prompt of %d tokens", n)
	}
	head, err := eng.Tokenize(Text, true)
	if err != nil {
		return nil, err
	}
	body, err := eng.Tokenize(" "+Text, false)
	if err != nil {
		return nil, err
	}
	if len(body) == 0 {
		return nil, errors.New("e2ebench: the prompt text has no tokens")
	}
	out := make([]int32, 0, n+len(body))
	out = append(out, head...)
	for len(out) < n {
		out = append(out, body...)
	}
	return out[:n], nil
}

// prepare derives the policy of s on eng, the bytes of one cache entry and
// the prompt, and warms eng up with a prefill of at most warm of its tokens,
// removed (first-call allocations, page faults, the graph of a full batch).
func prepare(eng hooks.Engine, s Spec, warm int) (pol adapter.Policy, entry int64, toks []int32, err error) {
	if pol, err = Policy(s, eng); err != nil {
		return pol, 0, nil, err
	}
	if entry, err = eng.CacheShape().EntryBytes(); err != nil {
		return pol, 0, nil, err
	}
	if toks, err = PromptTokens(eng, s.PromptTokens); err != nil {
		return pol, 0, nil, err
	}
	const seq = 0
	if _, err := eng.Prefill(seq, toks[:min(len(toks), warm)], false); err != nil {
		return pol, 0, nil, fmt.Errorf("warm-up: %w", err)
	}
	return pol, entry, toks, eng.RemoveSequence(seq)
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func open(f conformance.EngineFactory, s Spec, ctx int, log io.Writer) (hooks.Engine, error) {
	if f == nil {
		return nil, fmt.Errorf("e2ebench: runtime %q is not registered", s.Runtime)
	}
	return f(conformance.EngineOptions{Model: s.Model, Tokenizer: s.Tokenizer, Context: ctx, Threads: s.Threads, Log: log})
}

// RunRow measures one row on a freshly opened engine:
//
//  1. warm-up: a prefill of up to WarmupTokens tokens, removed;
//  2. Repeat times each, in ABBA order ending with capture: the prompt
//     without an observer, and the prompt with a capture-only observer (a
//     compressor whose prefill compression is deferred); every one but the
//     last is removed;
//  3. the prefill compression (PrefillDone of that compressor), timed;
//  4. Decode tokens, one at a time (greedy), timed;
//  5. VmHWM;
//  6. with Paired, the paired decode measurement (pairedDecode).
func RunRow(f conformance.EngineFactory, s Spec, log io.Writer) (*Row, error) {
	start := time.Now()
	if log == nil {
		log = io.Discard
	}
	if s.Repeat < 1 {
		s.Repeat = 1
	}
	if s.Keep <= 0 || s.Keep > 1 {
		return nil, fmt.Errorf("e2ebench: keep %g outside (0, 1]", s.Keep)
	}
	if s.Paired < 0 {
		return nil, fmt.Errorf("e2ebench: paired %d < 0", s.Paired)
	}
	if s.PairedOnly && (s.Paired == 0 || s.Keep == 1) {
		return nil, fmt.Errorf("e2ebench: paired-only needs a compressed row (keep %g) and paired tokens (%d)", s.Keep, s.Paired)
	}
	ctx := s.Ctx
	if ctx <= 0 {
		ctx = AutoCtx(s.PromptTokens, s.Decode+2*(s.Paired+s.block())+settleTokens(s.Paired, s.block()))
	}
	load := LoadAvg()
	eng, err := open(f, s, ctx, log)
	if err != nil {
		return nil, err
	}
	defer eng.Close()
	info, shape := eng.Info(), eng.CacheShape()
	if s.PromptTokens+s.Decode > info.Context {
		return nil, fmt.Errorf("e2ebench: %d prompt + %d decoded tokens exceed the context of %d cells", s.PromptTokens, s.Decode, info.Context)
	}
	pol, entry, toks, err := prepare(eng, s, WarmupTokens)
	if err != nil {
		return nil, err
	}
	const seq = 0

	r := &Row{
		Runtime: info.Runtime, Model: s.Model, Arch: info.Arch, Granularity: pol.Granularity.String(), Policy: pol.String(),
		FlashAttn: info.FlashAttn, Threads: s.Threads, Ctx: info.Context, KType: shape.KType.String(), VType: shape.VType.String(),
		PromptTokens: s.PromptTokens, PromptSource: PromptSource, Keep: s.Keep, Repeat: s.Repeat, PairedOnly: s.PairedOnly,
		EntryBytes: entry, KVBytesAllocated: int64(info.Context) * int64(shape.Layers*shape.KVHeads) * entry,
		LoadAvg1: load,
	}
	var (
		logits  [][]float32
		comp    *adapter.Compressor
		off, on = time.Duration(math.MaxInt64), time.Duration(math.MaxInt64)
	)
	// The arms alternate in ABBA order, counted back from the last prefill,
	// which must be one with capture (its sequence is compressed next):
	// repeat 2 runs capture, plain, plain, capture. Every prefill but the last
	// is removed.
	var arms []bool // true: with capture
	if s.PairedOnly {
		arms = []bool{true}
	} else {
		for i := range s.Repeat {
			if (s.Repeat-1-i)%2 == 0 {
				arms = append(arms, false, true)
			} else {
				arms = append(arms, true, false)
			}
		}
	}
	for k, capture := range arms {
		if capture {
			if comp, err = adapter.New(eng, pol); err != nil {
				return nil, err
			}
			eng.SetObserver(captureOnly{comp})
		} else {
			eng.SetObserver(nil)
		}
		t := time.Now()
		l, err := eng.Prefill(seq, toks, false)
		if err != nil {
			if capture {
				return nil, fmt.Errorf("prefill with capture: %w", err)
			}
			return nil, fmt.Errorf("prefill: %w", err)
		}
		d := time.Since(t)
		what := "prefill"
		if capture {
			what, logits = "prefill with capture", l
			if d < on {
				on = d
				r.ObserveMs = ms(comp.Totals().ObserveTime)
			}
		} else {
			off = min(off, d)
		}
		fmt.Fprintf(log, "e2e %s: %d tokens keep %g: %s %.0f ms (%d/%d)\n",
			info.Runtime, s.PromptTokens, s.Keep, what, ms(d), k+1, len(arms))
		if k < len(arms)-1 {
			if err := eng.RemoveSequence(seq); err != nil {
				return nil, err
			}
		}
	}
	r.PrefillCaptureMs = ms(on)
	if !s.PairedOnly {
		r.PrefillMs = ms(off)
		r.CaptureOverhead = (r.PrefillCaptureMs - r.PrefillMs) / r.PrefillMs
	}

	if r.KVCellsBefore, r.KVEntriesBefore, err = eng.Live(seq); err != nil {
		return nil, err
	}
	t := time.Now()
	st, err := comp.PrefillDone(seq)
	if err != nil {
		return nil, fmt.Errorf("compress: %w", err)
	}
	r.CompressMs = ms(time.Since(t))
	r.PlanMs, r.ApplyMs = ms(st.PlanTime), ms(st.ApplyTime)
	if !s.PairedOnly {
		r.CompressFrac = r.CompressMs / r.PrefillMs
	}
	if r.KVCells, r.KVEntries, err = eng.Live(seq); err != nil {
		return nil, err
	}
	r.KVBytesBefore, r.KVBytes = r.KVEntriesBefore*entry, r.KVEntries*entry

	// The uncompressed row is the plain runtime; a compressed one keeps its
	// compressor attached (it must see new keys to compress under pressure).
	r.DecodeObserver = s.DecodeObserver && s.Keep < 1
	if r.DecodeObserver {
		eng.SetObserver(comp)
	} else {
		eng.SetObserver(nil)
	}
	next := conformance.Argmax(logits[len(logits)-1])
	if s.Decode > 0 {
		t := time.Now()
		if next, err = decodeN(eng, seq, next, s.Decode, nil); err != nil {
			return nil, err
		}
		d := time.Since(t)
		r.DecodeTokens, r.DecodeMs = s.Decode, ms(d)
		r.DecodeTokensPerS = float64(s.Decode) / d.Seconds()
	}
	if m, err := ReadMem(); err == nil {
		r.PeakRSSBytes, r.RSSAnonBytes, r.RSSFileBytes = m.HWM, m.Anon, m.File
	}
	if s.Paired > 0 && s.Keep < 1 {
		var obs hooks.Observer
		if r.DecodeObserver {
			obs = comp
		}
		if err := pairedDecode(f, s, ctx, eng, obs, next, toks, r, log); err != nil {
			return nil, fmt.Errorf("paired decode: %w", err)
		}
	}
	eng.SetObserver(nil)
	r.WallS = time.Since(start).Seconds()
	r.LoadAvg1End = LoadAvg()
	return r, nil
}

// DefaultPairedBlock is the number of tokens one side of the paired decode
// measurement decodes before the other side takes its turn, unless
// Spec.PairedBlock says otherwise.
const DefaultPairedBlock = 8

func (s Spec) block() int {
	if s.PairedBlock > 0 {
		return s.PairedBlock
	}
	return DefaultPairedBlock
}

// decodeN decodes n tokens greedily from next, one at a time, appending each
// token's latency to lat when it is not nil, and returns the next token.
func decodeN(eng hooks.Engine, seq hooks.SeqID, next int32, n int, lat *[]time.Duration) (int32, error) {
	for range n {
		t := time.Now()
		l, err := eng.Decode(seq, []int32{next})
		if err != nil {
			return 0, fmt.Errorf("decode: %w", err)
		}
		if lat != nil {
			*lat = append(*lat, time.Since(t))
		}
		next = conformance.Argmax(l[len(l)-1])
	}
	return next, nil
}

// pairedDecode measures the compressed engine eng (already decoded
// s.Decode tokens after the prompt; next is its next token) against a second
// engine holding the same prompt uncompressed: the second engine prefills the
// prompt and decodes s.Decode tokens untimed (so both are at the same
// context length), then they decode s.Paired tokens each in alternating
// blocks of Spec.PairedBlock tokens, the order reversed every round (ABBA)
// so that neither side always goes first. When the row decodes with its observer attached
// (obs), the compressed engine also decodes s.Paired tokens without it, as a
// third side: that splits the ratio into what compression gains and what
// streaming new keys to the compressor costs. The compressed engine's block
// then holds both, token by token in ABBA order (with, without, without,
// with, ...): the two run on the same engine at the same context, after the
// same other engine, so nothing but the observer differs between them (as
// separate blocks, the side that followed itself across a round's end and
// the side that always followed another engine differed in more than the
// observer); which of the two goes first alternates by round. Every timed
// block starts with one untimed token (settleTokens): the first token after
// a switch from another engine runs on caches that engine filled, and
// timing it charged whichever side happened to go first in a block. Only the
// Decode calls are timed. The second engine is opened after the row's memory
// was read, so it is not in the row's peak RSS; it is a twin of the first
// (conformance.Twinner: the same weights in memory) unless the runtime has
// none or Spec.SeparateLoads asks for a second load. With an observer the
// uncompressed engines decode two tokens for each one timed, untimed ones
// in the slots where the compressed engine decodes without its observer,
// so every engine grows by the same tokens per turn and the sides are
// compared at the same context length (PairedEvenGrowth).
func pairedDecode(f conformance.EngineFactory, s Spec, ctx int, eng hooks.Engine, obs hooks.Observer, next int32, toks []int32, r *Row, log io.Writer) error {
	const seq = 0
	// Each side first decodes one untimed block: the first block after the
	// other engine's prefill ran on cold caches and made the side that goes
	// first (the compressed engine with its observer) look slower.
	need := s.PromptTokens + s.Decode + s.Paired + s.block() + settleTokens(s.Paired, s.block()) // the compressed engine's
	if obs != nil {
		need += s.Paired + s.block()
	}
	if need > eng.Info().Context {
		return fmt.Errorf("%d prompt + %d decoded + %d paired tokens (twice with an observer) exceed the context of %d cells", s.PromptTokens, s.Decode, s.Paired, eng.Info().Context)
	}
	tw, twins := eng.(conformance.Twinner)
	twins = twins && !s.SeparateLoads
	r.PairedTwins = twins
	// uncompressed opens an engine without observer that holds the prompt
	// and s.Decode decoded tokens, and returns it and its next token.
	uncompressed := func(what string) (hooks.Engine, int32, error) {
		var e hooks.Engine
		var err error
		if twins {
			e, err = tw.Twin()
		} else {
			e, err = open(f, s, ctx, log)
		}
		if err != nil {
			return nil, 0, err
		}
		e.SetObserver(nil)
		logits, err := e.Prefill(seq, toks, false)
		if err != nil {
			e.Close()
			return nil, 0, fmt.Errorf("%s prefill: %w", what, err)
		}
		n, err := decodeN(e, seq, conformance.Argmax(logits[len(logits)-1]), s.Decode, nil)
		if err != nil {
			e.Close()
			return nil, 0, err
		}
		return e, n, nil
	}
	base, bnext, err := uncompressed("uncompressed")
	if err != nil {
		return err
	}
	defer base.Close()
	// Sides: 0 the compressed engine as the row decodes (with obs when set),
	// 1 the uncompressed engine, 2 the compressed engine without obs, 3 a
	// second uncompressed engine (the A/A control).
	sides := []int{0, 1}
	var ctl hooks.Engine
	var cnext int32
	if s.Control {
		if ctl, cnext, err = uncompressed("control"); err != nil {
			return err
		}
		defer ctl.Close()
		sides = append(sides, 3)
	}
	// step decodes on one engine, counting every token each engine decodes
	// from here on (Row.PairedGrowth).
	grown := map[string]int{}
	name := func(e hooks.Engine) string {
		switch e {
		case base:
			return "base"
		case ctl:
			return "control"
		}
		return "compressed"
	}
	step := func(e hooks.Engine, next int32, n int, lat *[]time.Duration) (int32, error) {
		grown[name(e)] += n
		return decodeN(e, seq, next, n, lat)
	}
	lat := make([][]time.Duration, 4)
	// decodeEven decodes n timed tokens on an uncompressed engine and, when
	// the compressed engine decodes 2n per block (obs set), n untimed ones
	// in its without-observer slots.
	decodeEven := func(e hooks.Engine, next int32, n int, into *[]time.Duration, round int) (int32, error) {
		if obs == nil {
			return step(e, next, n, into)
		}
		var err error
		for j := range 2 * n {
			l := into
			if !withSlot(j, round) {
				l = nil
			}
			if next, err = step(e, next, 1, l); err != nil {
				return 0, err
			}
		}
		return next, nil
	}
	// decode1 decodes the untimed first token of a side's block (its
	// latency is kept apart, in first[side]).
	first := make([][]time.Duration, 4)
	decode1 := func(side int) (err error) {
		switch side {
		case 0:
			next, err = step(eng, next, 1, &first[side])
		case 1:
			bnext, err = step(base, bnext, 1, &first[side])
		case 3:
			cnext, err = step(ctl, cnext, 1, &first[side])
		}
		return err
	}
	// decode runs n tokens of one side, timed into lat[side] when timed
	// (and, for the compressed engine with an observer, n more without it,
	// timed into lat[2]; the uncompressed engines then decode n more
	// untimed, in the same slots, to grow as fast).
	decode := func(side, n int, timed bool, round int) (err error) {
		var into, without *[]time.Duration
		if timed {
			into, without = &lat[side], &lat[2]
			if side == 0 {
				eng.SetObserver(obs)
			}
			if err := decode1(side); err != nil {
				return err
			}
		}
		switch side {
		case 0:
			if obs == nil {
				next, err = step(eng, next, n, into)
				break
			}
			// n tokens with the observer and n without, interleaved.
			for j := range 2 * n {
				o, l := hooks.Observer(nil), without
				if withSlot(j, round) {
					o, l = obs, into
				}
				eng.SetObserver(o)
				if next, err = step(eng, next, 1, l); err != nil {
					return err
				}
			}
		case 1:
			bnext, err = decodeEven(base, bnext, n, into, round)
		case 3:
			cnext, err = decodeEven(ctl, cnext, n, into, round)
		}
		return err
	}
	for _, side := range sides {
		if err := decode(side, s.block(), false, 0); err != nil {
			return err
		}
	}
	for i, done := 0, 0; done < s.Paired; i++ {
		n := min(s.block(), s.Paired-done)
		order := slices.Clone(sides)
		if i%2 == 1 {
			slices.Reverse(order)
		}
		for _, side := range order {
			if err := decode(side, n, true, i); err != nil {
				return err
			}
		}
		done += n
	}
	eng.SetObserver(obs)
	tps := func(l []time.Duration) float64 {
		var d time.Duration
		for _, x := range l {
			d += x
		}
		return float64(len(l)) / d.Seconds()
	}
	r.PairedTokens, r.PairedBlock, r.PairedEvenGrowth = s.Paired, s.block(), obs != nil
	r.PairedGrowth = grown
	r.PairedTokensPerS, r.PairedBaseTokensPerS = tps(lat[0]), tps(lat[1])
	r.PairedRatio = r.PairedTokensPerS / r.PairedBaseTokensPerS
	r.PairedMedianMs, r.PairedBaseMedianMs = ms(median(lat[0])), ms(median(lat[1]))
	r.PairedMedianRatio = r.PairedBaseMedianMs / r.PairedMedianMs
	loads := "a second load of the model"
	if twins {
		loads = "a twin: the same weights"
	}
	fmt.Fprintf(log, "e2e %s: %d tokens keep %g: paired decode %.2f tok/s vs uncompressed (%s) %.2f tok/s (×%.3f; median ×%.3f)",
		r.Runtime, s.PromptTokens, s.Keep, r.PairedTokensPerS, loads, r.PairedBaseTokensPerS, r.PairedRatio, r.PairedMedianRatio)
	if obs != nil {
		r.PairedNoObserverTokensPerS = tps(lat[2])
		r.PairedNoObserverRatio = r.PairedNoObserverTokensPerS / r.PairedBaseTokensPerS
		r.PairedObserverCI = observerCI(lat[0], lat[2])
		fmt.Fprintf(log, "; without the observer %.2f tok/s (×%.3f; with/without %+.1f%%, 95%% CI %+.1f%% … %+.1f%%)", r.PairedNoObserverTokensPerS, r.PairedNoObserverRatio,
			100*(r.PairedRatio/r.PairedNoObserverRatio-1), 100*r.PairedObserverCI[0], 100*r.PairedObserverCI[1])
	}
	if ctl != nil {
		r.PairedControlTokensPerS = tps(lat[3])
		r.PairedControlRatio = r.PairedControlTokensPerS / r.PairedBaseTokensPerS
		fmt.Fprintf(log, "; control (a second uncompressed engine) %.2f tok/s (×%.3f)", r.PairedControlTokensPerS, r.PairedControlRatio)
	}
	fmt.Fprintln(log)
	r.PairedLatencyMs = map[string][]float64{}
	for side, name := range []string{"with", "base", "without", "control"} {
		for suffix, l := range map[string][]time.Duration{"": lat[side], "_first": first[side]} {
			if len(l) > 0 {
				r.PairedLatencyMs[name+suffix] = make([]float64, len(l))
				for i, d := range l {
					r.PairedLatencyMs[name+suffix][i] = ms(d)
				}
			}
		}
	}
	return nil
}

// observerCI returns a 95% percentile bootstrap interval of the tokens/s of
// with over those of without, minus 1. with[i] and without[i] were decoded
// next to each other on the same engine (pairedDecode), so the pairs are
// resampled together; the seed is fixed, so a row's interval is
// reproducible from its latencies.
func observerCI(with, without []time.Duration) []float64 {
	n := min(len(with), len(without))
	if n == 0 {
		return nil
	}
	w, o := make([]float64, n), make([]float64, n)
	for i := range n {
		w[i], o[i] = ms(with[i]), ms(without[i])
	}
	_, ci := costCI([][2][]float64{{w, o}}, 2)
	return ci[:]
}

// withSlot reports whether token j of the compressed engine's block in
// round decodes with the observer: with, without, without, with, ...,
// which of the two goes first alternating by round.
func withSlot(j, round int) bool { return (j%4 == 0 || j%4 == 3) == (round%2 == 0) }

// settleTokens is the number of untimed tokens each engine decodes in the
// paired measurement beside its blocks: one per round.
func settleTokens(paired, block int) int { return (paired + block - 1) / block }

func median(l []time.Duration) time.Duration {
	s := slices.Clone(l)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// SetRatios fills every row's ratios to the keep-1 row of the same runtime
// and prompt length.
func SetRatios(rows []*Row) {
	div := func(a, b float64) float64 {
		if b == 0 {
			return 0
		}
		return a / b
	}
	for _, r := range rows {
		var base *Row
		for _, b := range rows {
			if b.Keep == 1 && b.Runtime == r.Runtime && b.PromptTokens == r.PromptTokens {
				base = b
				break
			}
		}
		if base == nil {
			continue
		}
		r.RatioKVCells = div(float64(r.KVCells), float64(base.KVCells))
		r.RatioKVBytes = div(float64(r.KVBytes), float64(base.KVBytes))
		r.RatioPrefill = div(r.PrefillMs, base.PrefillMs)
		r.RatioDecodeTPS = div(r.DecodeTokensPerS, base.DecodeTokensPerS)
		r.RatioPeakRSS = div(float64(r.PeakRSSBytes), float64(base.PeakRSSBytes))
		r.RatioRSSAnon = div(float64(r.RSSAnonBytes), float64(base.RSSAnonBytes))
	}
}
