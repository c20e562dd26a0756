package e2ebench

import (
	"fmt"
	"io"
	"runtime/metrics"
	"sync"
	"time"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/hooks"
)

// Sample is the memory after one chunk of a chunked prefill.
type Sample struct {
	Chunk int `json:"chunk"`
	// TokensFed is the number of prompt tokens decoded so far.
	TokensFed int `json:"tokens_fed"`
	// LiveCells is the number of distinct positions the compressor's record
	// holds after the chunk (before any compression the next chunk
	// triggers); LiveEntries its (layer, KV head, position) entries.
	// Per head, different heads keep different positions: the distinct
	// positions may exceed the cache while every head fits in it; CellsPerHead
	// (entries / (layers × KV heads)) is what each head holds on average.
	LiveCells    int     `json:"live_cells"`
	LiveEntries  int64   `json:"live_entries"`
	CellsPerHead float64 `json:"cells_per_head"`
	// GoHeapBytes is the Go heap's live and not yet collected objects;
	// GoTotalBytes all the memory the Go runtime has mapped. The rest of the
	// anonymous RSS is C's (the runtime's cache, weights and buffers).
	GoHeapBytes  int64   `json:"go_heap_bytes"`
	GoTotalBytes int64   `json:"go_total_bytes"`
	Compressions int     `json:"compressions"`
	ElapsedMs    float64 `json:"elapsed_ms"`
	Mem
}

// Chunked is the result of the chunked-prefill experiment.
type Chunked struct {
	Runtime      string  `json:"runtime"`
	Model        string  `json:"model"`
	Granularity  string  `json:"granularity"`
	Policy       string  `json:"policy"`
	Threads      int     `json:"threads"`
	Ctx          int     `json:"ctx_cells"`
	PromptTokens int     `json:"prompt_tokens"`
	PromptSource string  `json:"prompt_source"`
	Keep         float64 `json:"keep"`
	Uncompressed bool    `json:"uncompressed"`
	PrefillMs    float64 `json:"prefill_ms"`
	Compressions int     `json:"compressions"`
	// CompressMs is planning plus applying over every compression (under
	// pressure and after prefill).
	CompressMs       float64 `json:"compress_ms"`
	KVCells          int     `json:"kv_cells"`
	KVBytes          int64   `json:"kv_bytes"`
	KVBytesAllocated int64   `json:"kv_bytes_allocated"`
	// Samples is the memory after every chunk (the RSS curve).
	Samples []Sample `json:"samples"`
	// Before is the memory once the engine is open and warmed up, End once
	// the prompt is in.
	Before       Mem   `json:"before"`
	End          Mem   `json:"end"`
	PeakRSSBytes int64 `json:"peak_rss_bytes"`
	// FullAt is the index of the first sample at which the cache was full
	// (tokens fed ≥ ctx); HWMGrowthBytes is how much VmHWM grew from that
	// sample to the end, and HWMGrowthFrac that growth over the HWM at
	// FullAt. A flat curve has a growth of ~0 while 3/4 of the prompt is
	// still to come.
	FullAt         int     `json:"full_at"`
	HWMGrowthBytes int64   `json:"hwm_growth_bytes"`
	HWMGrowthFrac  float64 `json:"hwm_growth_frac"`
	AnonGrowth     int64   `json:"rss_anon_growth_bytes"`
	ChildProcess   bool    `json:"child_process"`
	LoadAvg1       float64 `json:"load_avg_1m"`
	LoadAvg1End    float64 `json:"load_avg_1m_end"`
	// Baseline is the same prompt uncompressed in a context that holds it
	// (when measured).
	Baseline *Chunked `json:"baseline,omitempty"`
}

// sampler is the observer of the chunked experiment: a compressor whose
// every report of the last layer of a batch marks the end of a chunk.
type sampler struct {
	hooks.Observer // the compressor, or nil when uncompressed
	comp           *adapter.Compressor
	last           int
	lanes          int // layers × KV heads
	start          time.Time
	mu             sync.Mutex
	fed            int
	samples        []Sample
}

func (s *sampler) ObserveKeys(b *hooks.KeyBatch) error {
	if s.Observer != nil {
		if err := s.Observer.ObserveKeys(b); err != nil {
			return err
		}
	}
	if b.Layer != s.last {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range b.Positions {
		s.fed = max(s.fed, int(p)+1)
	}
	sm := Sample{Chunk: len(s.samples), TokensFed: s.fed, ElapsedMs: ms(time.Since(s.start))}
	if s.comp != nil {
		pos, entries := s.comp.Live(0)
		sm.LiveCells, sm.LiveEntries = len(pos), entries
		sm.CellsPerHead = float64(entries) / float64(s.lanes)
		sm.Compressions = s.comp.Totals().Compressions
	}
	sm.Mem, _ = ReadMem()
	sm.GoHeapBytes, sm.GoTotalBytes = goMem()
	s.samples = append(s.samples, sm)
	return nil
}

func (s *sampler) PrefillDone(seq hooks.SeqID) (hooks.Stats, error) {
	if s.Observer == nil {
		return hooks.Stats{Seq: seq, Skipped: true}, nil
	}
	return s.Observer.PrefillDone(seq)
}

func (s *sampler) CachePressure(seq hooks.SeqID, free, incoming int) (hooks.Stats, error) {
	if s.Observer == nil {
		return hooks.Stats{}, fmt.Errorf("e2ebench: cache pressure on an uncompressed run (%d free, %d incoming)", free, incoming)
	}
	return s.Observer.CachePressure(seq, free, incoming)
}

func (s *sampler) Forget(seq hooks.SeqID, from, to hooks.Pos) {
	if s.Observer != nil {
		s.Observer.Forget(seq, from, to)
	}
}

// goMem reads the Go runtime's heap objects and total mapped memory.
func goMem() (heap, total int64) {
	ss := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/total:bytes"}}
	metrics.Read(ss)
	if ss[0].Value.Kind() == metrics.KindUint64 {
		heap = int64(ss[0].Value.Uint64())
	}
	if ss[1].Value.Kind() == metrics.KindUint64 {
		total = int64(ss[1].Value.Uint64())
	}
	return heap, total
}

// RunChunked feeds a prompt of s.PromptTokens tokens through Prefill into a
// context of s.Ctx cells with a knorm compressor at s.Keep attached: the
// engine decodes it in chunks and compresses under cache pressure before
// every chunk that does not fit, then once more after prefill. The memory is
// sampled after every chunk. With s.Uncompressed the context is sized for the
// whole prompt and nothing is compressed (the baseline).
func RunChunked(f conformance.EngineFactory, s Spec, log io.Writer) (*Chunked, error) {
	if log == nil {
		log = io.Discard
	}
	ctx := s.Ctx
	if s.Uncompressed {
		ctx = AutoCtx(s.PromptTokens, 0)
	}
	if ctx <= 0 {
		return nil, fmt.Errorf("e2ebench: chunked run needs a context size")
	}
	load := LoadAvg()
	eng, err := open(f, s, ctx, log)
	if err != nil {
		return nil, err
	}
	defer eng.Close()
	info, shape := eng.Info(), eng.CacheShape()
	pol, entry, toks, err := prepare(eng, s, min(WarmupTokens, info.Context/2))
	if err != nil {
		return nil, err
	}
	const seq = 0
	res := &Chunked{
		Runtime: info.Runtime, Model: s.Model, Granularity: pol.Granularity.String(), Policy: pol.String(), Threads: s.Threads,
		Ctx: info.Context, PromptTokens: s.PromptTokens, PromptSource: PromptSource, Keep: s.Keep, Uncompressed: s.Uncompressed,
		KVBytesAllocated: int64(info.Context) * int64(shape.Layers*shape.KVHeads) * entry, LoadAvg1: load, FullAt: -1,
	}
	smp := &sampler{last: shape.Layers - 1, lanes: shape.Layers * shape.KVHeads}
	if s.Uncompressed {
		res.Policy, res.Keep = "none", 1
	} else {
		if smp.comp, err = adapter.New(eng, pol); err != nil {
			return nil, err
		}
		smp.Observer = smp.comp
	}
	res.Before, _ = ReadMem()
	eng.SetObserver(smp)
	smp.start = time.Now()
	if _, err := eng.Prefill(seq, toks, false); err != nil {
		return nil, fmt.Errorf("chunked prefill: %w", err)
	}
	res.PrefillMs = ms(time.Since(smp.start))
	eng.SetObserver(nil)
	res.End, _ = ReadMem()
	res.LoadAvg1End = LoadAvg()
	res.PeakRSSBytes = res.End.HWM
	res.Samples = smp.samples
	if smp.comp != nil {
		t := smp.comp.Totals()
		res.Compressions, res.CompressMs = t.Compressions, ms(t.PlanTime+t.ApplyTime)
	}
	var entries int64
	if res.KVCells, entries, err = eng.Live(seq); err != nil {
		return nil, err
	}
	res.KVBytes = entries * entry
	for i, sm := range res.Samples {
		if sm.TokensFed >= res.Ctx {
			res.FullAt = i
			break
		}
	}
	if res.FullAt >= 0 {
		ref := res.Samples[res.FullAt]
		res.HWMGrowthBytes = res.End.HWM - ref.HWM
		res.AnonGrowth = res.End.Anon - ref.Anon
		if ref.HWM > 0 {
			res.HWMGrowthFrac = float64(res.HWMGrowthBytes) / float64(ref.HWM)
		}
	}
	fmt.Fprintf(log, "e2e chunked %s: %d tokens through %d cells: %d chunks, %d compressions, peak RSS %.1f MiB\n",
		info.Runtime, s.PromptTokens, res.Ctx, len(res.Samples), res.Compressions, float64(res.PeakRSSBytes)/(1<<20))
	return res, nil
}
