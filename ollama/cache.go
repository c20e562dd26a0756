package ollama

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model/input"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// ErrPlan is wrapped by the errors CompactHeads returns for a plan that does
// not match what the cache holds.
var ErrPlan = errors.New("ollama: plan does not match the cache")

// ShiftFunc re-applies a model's rotary embedding to cached keys whose
// positions moved by shift (the models' Shift method).
type ShiftFunc func(ctx ml.Context, layer int, key, shift ml.Tensor) (ml.Tensor, error)

// Options configure a Cache.
type Options struct {
	// Layers, KVHeads and HeadDim are the model's attention shape; Put
	// panics on keys of another shape.
	Layers, KVHeads, HeadDim int
	// Policy, when set, makes the cache report key norms to an
	// adapter.Compressor and compress by it. Nil: a plain cache.
	Policy *adapter.Policy
	// Shift re-ropes keys after a context shift; nil refuses context shifts.
	Shift ShiftFunc
	// Strict returns compression errors from StartForward and Flush. When
	// false (the runner), they are logged and the sequence keeps its cells.
	Strict bool
	// Pipelined is the runner's mode: the runner builds a batch while the
	// previous one computes, so the cache reads a batch's key norms two
	// batches later (without waiting) and applies compressions inside the
	// graph of the batch being built. Compression after a prompt then
	// happens after the first generated token. Off: every batch is computed
	// before the next is built (Session), and norms are read at once.
	Pipelined bool
	// Logger receives one line per compression (and compression errors).
	Logger *slog.Logger
	// Arch names the model architecture in messages.
	Arch string
	// Observe computes key norms even without a policy, for an observer set
	// later with SetObserver (Engine).
	Observe bool
}

// Cache is a kvcache.Cache whose every KV head can hold its own set of
// positions, so that each head keeps its own lowest-norm keys (the paper's
// granularity).
//
// Per layer, keys are stored as a [headDim, cells, kvHeads] tensor and values
// likewise ([cells, headDim, kvHeads] when the backend wants V permuted for
// its non-flash attention), so that the cells of one head are contiguous and
// ggml's get_rows/set_rows move every head's own cells in one op. Each
// sequence slot owns a slab of cells; in every layer a sequence's cells are
// packed at the front of its slab, so attention runs over kept cells only.
//
// Key norms are computed in the graph of every forward pass (sqrt of the sum
// of squares of each head's key) into a small buffer per layer and read back
// at the start of the next forward pass (or Flush), once the backend has
// computed them: only norms leave the device.
//
// Like Ollama's own caches, a Cache is not safe for concurrent use: the runner
// serialises calls to it.
type Cache struct {
	opts   Options
	log    *slog.Logger
	shape  hooks.CacheShape
	comp   *adapter.Compressor
	noComp error // why compression is off although a policy was given
	// ext, when set (SetObserver), receives the key norms, cache pressure
	// and forgotten positions instead of comp; its owner (Engine) reports
	// the end of a prompt itself.
	ext hooks.Observer

	backend  ml.Backend
	dtype    ml.DType
	config   *ml.CacheConfig
	maxBatch int
	total    int // cells per layer tensor: slots × slab cells
	lay      *layout

	ctxs         map[int]ml.Context
	keys, values map[int]ml.Tensor
	norms        map[int][]ml.Tensor // two buffers per layer, by batch parity

	cur     forward
	pend    []*pendingBatch // batches whose norms have not been read, oldest first
	batches uint64
	graph   ml.Context // the graph being built, inside StartForward
	// graphOps is set once cache operations went into graph.
	graphOps bool
	copies   []copyOp

	statsMu sync.Mutex
	history []hooks.Stats
	errs    int
}

var (
	_ kvcache.Cache       = (*Cache)(nil)
	_ hooks.HeadCompactor = (*Cache)(nil)
)

// forward is the state of the batch being built.
type forward struct {
	layer      int
	n          int
	reserve    bool
	buf        int // norm buffer of this batch
	seqs       []int
	positions  []int32
	groups     []group
	layerGroup []int
}

// group is what layers with the same cell layout share in one forward pass:
// the cells attended over, where the batch's keys go, and the mask.
type group struct {
	rep        int // a layer of the group
	lo, length int
	locs       ml.Tensor
	mask       ml.Tensor
}

// pendingBatch is a built batch whose key norms have not been read: row i
// of its norm buffer in each layer belongs to the entries with row == i.
type pendingBatch struct {
	id      uint64
	buf     int
	entries []pendingEntry
	layers  []bool
}

type pendingEntry struct {
	seq int
	pos int32
	row int
}

// copyOp is a prefix copy between slabs, deferred until the batches built
// before it have been computed.
type copyOp struct {
	src, dst int // slabs
	cells    []int
}

// NewCache returns a cache for a model of the given shape. Install builds
// one from a loaded model and puts it in place of the model's own cache.
func NewCache(o Options) (*Cache, error) {
	if o.Layers <= 0 || o.KVHeads <= 0 || o.HeadDim <= 0 {
		return nil, fmt.Errorf("ollama: cache shape: layers=%d, kv heads=%d, head dim=%d must be > 0", o.Layers, o.KVHeads, o.HeadDim)
	}
	if o.Policy != nil {
		if err := o.Policy.Validate(); err != nil {
			return nil, err
		}
	}
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Cache{
		opts: o,
		log:  log,
		shape: hooks.CacheShape{Layers: o.Layers, KVHeads: o.KVHeads, HeadDim: o.HeadDim,
			KType: kernels.F16, VType: kernels.F16},
		ctxs:   map[int]ml.Context{},
		keys:   map[int]ml.Tensor{},
		values: map[int]ml.Tensor{},
		norms:  map[int][]ml.Tensor{},
	}, nil
}

// CacheShape describes the cache to the compressor (hooks.Runtime).
func (c *Cache) CacheShape() hooks.CacheShape { return c.shape }

// Compressor returns the compressor, or nil when the cache does not compress.
func (c *Cache) Compressor() *adapter.Compressor { return c.comp }

// SetObserver makes the cache report key norms, cache pressure and removed
// positions to o instead of its own compressor; nil goes back to the
// compressor (if any). While o is set the cache does not detect the end of
// a prompt: its owner calls o.PrefillDone (see Engine). Norms are computed
// only by a cache built with a policy or Options.Observe.
func (c *Cache) SetObserver(o hooks.Observer) { c.ext = o }

// observer returns where norms and events go, or nil.
func (c *Cache) observer() hooks.Observer {
	if c.ext != nil {
		return c.ext
	}
	if c.comp != nil {
		return c.comp
	}
	return nil
}

// tracking reports whether key norms are computed and read back.
func (c *Cache) tracking() bool { return c.comp != nil || c.opts.Observe }

// CompressionError says why a cache built with a policy does not compress
// (nil when it does, or when it has no policy).
func (c *Cache) CompressionError() error { return c.noComp }

func kernelDType(d ml.DType) (kernels.DType, error) {
	switch d {
	case ml.DTypeF32:
		return kernels.F32, nil
	case ml.DTypeF16:
		return kernels.F16, nil
	case ml.DTypeQ80:
		return kernels.Q8_0, nil
	}
	return 0, fmt.Errorf("ollama: KV cache type %s: kvnorm compresses f32, f16 and q8_0 caches", dtypeName(d))
}

func dtypeName(d ml.DType) string {
	switch d {
	case ml.DTypeF32:
		return "f32"
	case ml.DTypeF16:
		return "f16"
	case ml.DTypeQ80:
		return "q8_0"
	case ml.DTypeQ40:
		return "q4_0"
	}
	return fmt.Sprintf("dtype(%d)", int(d))
}

// Init allocates the bookkeeping for maxSequences slots of capacity cells
// and, with a policy, the compressor (kvcache.Cache).
func (c *Cache) Init(backend ml.Backend, dtype ml.DType, maxSequences, capacity, maxBatch int) {
	if c.config == nil {
		var cfg ml.CacheConfig
		if cc, ok := backend.(ml.BackendCacheConfig); ok {
			cfg = cc.CacheConfig()
		}
		c.config = &cfg
	}
	if c.config.CachePadding == 0 {
		c.config.CachePadding = 1
	}
	if c.config.MaskDType == ml.DTypeOther {
		c.config.MaskDType = ml.DTypeF32
	}
	maxSequences = max(maxSequences, 1)
	slab := roundUp(capacity, c.config.CachePadding)
	c.backend, c.dtype, c.maxBatch = backend, dtype, maxBatch
	c.total = maxSequences * slab
	c.lay = newLayout(c.opts.Layers, c.opts.KVHeads, maxSequences, slab, capacity)
	c.shape.Capacity = capacity
	kt, kerr := kernelDType(dtype)
	if kerr == nil {
		c.shape.KType, c.shape.VType = kt, kt
	}
	if c.opts.Policy == nil {
		return
	}
	if kerr != nil {
		c.disable(kerr)
		return
	}
	comp, err := adapter.New(c, *c.opts.Policy)
	if err != nil {
		c.disable(err)
		return
	}
	comp.OnStats(c.recordStats)
	c.comp = comp
}

func (c *Cache) disable(err error) {
	c.noComp = err
	c.log.Warn("kvnorm: compression disabled", "arch", c.opts.Arch, "error", err)
}

// SetConfig overrides the backend's cache configuration (kvcache.Cache).
func (c *Cache) SetConfig(cfg ml.CacheConfig) {
	if c.config != nil {
		panic("ollama: cache config cannot be changed once set")
	}
	c.config = &cfg
}

// Close frees the cache tensors (kvcache.Cache).
func (c *Cache) Close() {
	for _, ctx := range c.ctxs {
		ctx.Close()
	}
	clear(c.ctxs)
	clear(c.keys)
	clear(c.values)
	clear(c.norms)
}

// SetLayer selects the layer of the following Put and Get (kvcache.Cache).
func (c *Cache) SetLayer(layer int) { c.cur.layer = layer }

// CanResume reports whether seq can continue at pos (kvcache.Cache): always,
// since the cache has no sliding window.
func (c *Cache) CanResume(seq int, pos int32) bool { return true }

// StartForward prepares the cache for a batch (kvcache.Cache). Before placing
// the batch it reads back the key norms of the previous batch, compresses
// sequences whose prompt has been decoded, and compresses sequences that
// would not fit (cache pressure).
func (c *Cache) StartForward(ctx ml.Context, batch input.Batch, reserve bool) (err error) {
	n := len(batch.Positions)
	if len(batch.Sequences) != n {
		return fmt.Errorf("ollama: batch has %d positions and %d sequences", n, len(batch.Sequences))
	}
	c.cur = forward{n: n, reserve: reserve, seqs: batch.Sequences, positions: batch.Positions}
	if reserve {
		return c.reserve(ctx, n)
	}
	if n > c.maxBatch {
		return fmt.Errorf("ollama: batch of %d tokens exceeds the cache's maximum batch of %d", n, c.maxBatch)
	}
	// Copies and compactions decided now run first in this batch's graph.
	c.graph, c.graphOps = ctx, false
	defer func() {
		// The bookkeeping already moved cells: if the batch fails, move
		// the data now rather than never.
		if err != nil && c.graphOps {
			ctx.Compute()
		}
		c.graph = nil
	}()
	if err := c.settle(!c.opts.Pipelined); err != nil {
		return err
	}
	c.runCopies()
	if err := c.prefillReady(); err != nil {
		return err
	}

	// The sequences of the batch, in order of appearance, and their tokens.
	var order []int
	count := map[int]int{}
	for _, s := range batch.Sequences {
		if count[s] == 0 {
			order = append(order, s)
		}
		count[s]++
	}
	outputs := c.outputSeqs(batch)

	cells := make([]*seqCells, len(order))
	for i, seq := range order {
		s, err := c.lay.seq(seq, true)
		if err != nil {
			return fmt.Errorf("%w: %w", kvcache.ErrKvCacheFull, err)
		}
		if free := c.lay.capacity - s.used(); count[seq] > free {
			if err := c.pressure(seq, s, free, count[seq]); err != nil {
				return err
			}
		}
		if free := c.lay.capacity - s.used(); count[seq] > free {
			return fmt.Errorf("%w: seq %d needs %d cells, %d of %d are free", kvcache.ErrKvCacheFull, seq, count[seq], free, c.lay.capacity)
		}
		cells[i] = s
	}

	// Place the tokens after each sequence's cells, in every layer.
	for i, seq := range order {
		var pos []int32
		for j, s := range batch.Sequences {
			if s == seq {
				pos = append(pos, batch.Positions[j])
			}
		}
		if err := c.lay.appendTokens(cells[i], pos); err != nil {
			return fmt.Errorf("ollama: seq %d: %w", seq, err)
		}
	}
	c.batches++
	c.cur.buf = int(c.batches % 2)
	if c.tracking() {
		pb := &pendingBatch{id: c.batches, buf: c.cur.buf, layers: make([]bool, c.opts.Layers)}
		for j, seq := range batch.Sequences {
			if !c.lay.seqs[seq].unmanaged {
				pb.entries = append(pb.entries, pendingEntry{seq: seq, pos: batch.Positions[j], row: j})
			}
		}
		c.pend = append(c.pend, pb)
	}
	// A run of two or more tokens ending in an output is a prompt: it is
	// compressed before the sequence's next batch.
	for i, seq := range order {
		s := cells[i]
		s.run += count[seq]
		if outputs == nil || outputs[seq] {
			if s.run >= 2 {
				s.prefill, s.prefillBatch = true, c.batches
			}
			s.run = 0
		}
	}
	return c.buildGroups(ctx, batch, cells)
}

// outputSeqs returns the sequences with an output in the batch, or nil when
// the batch does not say (every sequence then counts as having one).
func (c *Cache) outputSeqs(batch input.Batch) map[int]bool {
	if batch.Outputs == nil {
		return nil
	}
	// Outputs is an I32 input tensor; BackendGet copies its bytes out.
	raw := batch.Outputs.BackendGet()
	out := map[int]bool{}
	for _, f := range raw {
		i := int(int32(math.Float32bits(f)))
		if i >= 0 && i < len(batch.Sequences) {
			out[batch.Sequences[i]] = true
		}
	}
	return out
}

func (c *Cache) reserve(ctx ml.Context, n int) error {
	locs := make([]int32, n)
	for i := range locs {
		locs[i] = int32(i)
	}
	mask := ctx.Input().FromFloats(make([]float32, c.total*n), c.total, n)
	if c.config.MaskDType != ml.DTypeF32 {
		mask = mask.Cast(ctx, c.config.MaskDType)
	}
	c.cur.groups = []group{{lo: 0, length: c.total, locs: ctx.Input().FromInts(locs, n), mask: mask}}
	c.cur.layerGroup = make([]int, c.opts.Layers)
	return nil
}

// buildGroups computes, for every layer, the cells the batch attends over,
// where its tokens go and the mask; layers laid out alike share them.
func (c *Cache) buildGroups(ctx ml.Context, batch input.Batch, cells []*seqCells) error {
	n := c.cur.n
	c.cur.layerGroup = make([]int, c.opts.Layers)
	for li := range c.opts.Layers {
		lo, length := c.lay.rangeFor(cells, li, c.config.CachePadding, c.total)
		found := -1
		for g, gr := range c.cur.groups {
			if gr.lo != lo || gr.length != length {
				continue
			}
			same := true
			for _, s := range cells {
				if !slices.Equal(s.layers[li].mask, s.layers[gr.rep].mask) {
					same = false
					break
				}
			}
			if same {
				found = g
				break
			}
		}
		if found < 0 {
			locs := make([]int32, n)
			seen := map[int]int{}
			for j, seq := range batch.Sequences {
				s := c.lay.seqs[seq]
				k := seen[seq]
				seen[seq]++
				// The batch's tokens of seq are the last ones of the layer.
				first := s.layers[li].n() - countOf(batch.Sequences, seq)
				locs[j] = int32(c.lay.slabStart(s.slab) + first + k)
			}
			m := make([]float32, n*length)
			c.lay.maskFor(m, lo, length, li, batch.Sequences, batch.Positions)
			mask := ctx.Input().FromFloats(m, length, n)
			if c.config.MaskDType != ml.DTypeF32 {
				mask = mask.Cast(ctx, c.config.MaskDType)
			}
			c.cur.groups = append(c.cur.groups, group{rep: li, lo: lo, length: length,
				locs: ctx.Input().FromInts(locs, n), mask: mask})
			found = len(c.cur.groups) - 1
		}
		c.cur.layerGroup[li] = found
	}
	return nil
}

func countOf(s []int, v int) int {
	n := 0
	for _, x := range s {
		if x == v {
			n++
		}
	}
	return n
}

// alloc creates the tensors of a layer on first use.
func (c *Cache) alloc(layer, kDim, vDim, kvHeads int) {
	if _, ok := c.keys[layer]; ok {
		return
	}
	if layer < 0 || layer >= c.opts.Layers {
		panic(fmt.Errorf("ollama: %s: layer %d outside the %d layers the cache was built for", c.opts.Arch, layer, c.opts.Layers))
	}
	if kvHeads != c.opts.KVHeads || kDim != c.opts.HeadDim {
		panic(fmt.Errorf("ollama: %s: layer %d: keys are [%d dims, %d kv heads], the cache was built for [%d, %d]",
			c.opts.Arch, layer, kDim, kvHeads, c.opts.HeadDim, c.opts.KVHeads))
	}
	ctx := c.backend.NewContextSize(4).Layer(layer)
	c.ctxs[layer] = ctx
	c.keys[layer] = ctx.Zeros(c.dtype, kDim, c.total, kvHeads)
	if c.config.PermutedV {
		c.values[layer] = ctx.Zeros(c.dtype, c.total, vDim, kvHeads)
	} else {
		c.values[layer] = ctx.Zeros(c.dtype, vDim, c.total, kvHeads)
	}
	if c.tracking() {
		c.norms[layer] = []ml.Tensor{
			ctx.Zeros(ml.DTypeF32, kvHeads*max(c.maxBatch, 1)),
			ctx.Zeros(ml.DTypeF32, kvHeads*max(c.maxBatch, 1)),
		}
	}
}

// Put stores the keys and values of the batch, [headDim, kvHeads, batch],
// and adds the key norms to the graph (kvcache.Cache).
func (c *Cache) Put(ctx ml.Context, key, value ml.Tensor) {
	kDim, kvHeads, n := key.Dim(0), key.Dim(1), key.Dim(2)
	vDim := value.Dim(0)
	if n != c.cur.n {
		panic(fmt.Errorf("ollama: layer %d: batch of %d keys, the forward pass has %d tokens", c.cur.layer, n, c.cur.n))
	}
	layer := c.cur.layer
	c.alloc(layer, kDim, vDim, kvHeads)
	locs := c.cur.groups[c.cur.layerGroup[layer]].locs

	// [headDim, kvHeads, n] -> [headDim, n, kvHeads]: one row per (token, head).
	keys := c.keys[layer]
	ctx.Forward(keys.SetRows(ctx, key.Permute(ctx, 0, 2, 1, 3), locs))
	values := c.values[layer]
	if c.config.PermutedV {
		v := value.Reshape(ctx, vDim*kvHeads, 1, n).Permute(ctx, 2, 0, 1, 3)
		ctx.Forward(values.Reshape(ctx, 1, c.total, vDim*kvHeads).SetRows(ctx, v, locs))
	} else {
		ctx.Forward(values.SetRows(ctx, value.Permute(ctx, 0, 2, 1, 3), locs))
	}

	if c.tracking() {
		k := key
		if k.DType() != ml.DTypeF32 {
			k = k.Cast(ctx, ml.DTypeF32)
		}
		norms := k.Sqr(ctx).SumRows(ctx).Sqrt(ctx).Reshape(ctx, kvHeads*n)
		ctx.Forward(norms.Copy(ctx, c.norms[layer][c.cur.buf].View(ctx, 0, kvHeads*n)))
		if last := len(c.pend) - 1; !c.cur.reserve && last >= 0 && c.pend[last].id == c.batches {
			c.pend[last].layers[layer] = true
		}
	}
}

// Get returns the keys [headDim, kvHeads, cells], values and mask [cells,
// batch] of the current layer (kvcache.Cache).
func (c *Cache) Get(ctx ml.Context) (ml.Tensor, ml.Tensor, ml.Tensor) {
	g := c.cur.groups[c.cur.layerGroup[c.cur.layer]]
	key := c.keys[c.cur.layer]
	value := c.values[c.cur.layer]
	k := key.View(ctx, g.lo*key.Stride(1),
		key.Dim(0), key.Stride(2),
		key.Dim(2), key.Stride(1),
		g.length)
	var v ml.Tensor
	if c.config.PermutedV {
		v = value.View(ctx, g.lo*value.Stride(0),
			g.length, value.Stride(1),
			value.Dim(1), value.Stride(2),
			value.Dim(2))
	} else {
		v = value.View(ctx, g.lo*value.Stride(1),
			value.Dim(0), value.Stride(2),
			value.Dim(2), value.Stride(1),
			g.length)
	}
	return k, v, g.mask
}

// Flush reads back the key norms of the last computed batch, applies
// deferred copies and compresses every sequence whose prompt has been
// decoded. Call it after computing a batch to compress before the next one.
func (c *Cache) Flush() error {
	if c.lay == nil {
		return nil
	}
	if err := c.settle(true); err != nil {
		return err
	}
	c.runCopies()
	return c.prefillReady()
}

// Compress compresses seq to target positions per head (target < 0: the
// policy's budget) on the application's request.
func (c *Cache) Compress(seq, target int) (hooks.Stats, error) {
	if c.comp == nil {
		return hooks.Stats{}, c.compressionOff()
	}
	if err := c.settle(true); err != nil {
		return hooks.Stats{}, err
	}
	return c.comp.Compress(hooks.SeqID(seq), target)
}

func (c *Cache) compressionOff() error {
	if c.noComp != nil {
		return fmt.Errorf("ollama: compression is off: %w", c.noComp)
	}
	return errors.New("ollama: the cache was built without a policy")
}

// settle reads the key norms of the built batches that have been computed
// and reports them to the compressor. With wait set it first waits for every
// batch submitted to the backend (a small computation orders after them);
// otherwise (pipelined) it leaves the newest batch, which may be computing.
func (c *Cache) settle(wait bool) error {
	keep := 1
	if wait {
		keep = 0
	}
	if len(c.pend) <= keep {
		return nil
	}
	ready := c.pend[:len(c.pend)-keep]
	c.pend = slices.Clone(c.pend[len(c.pend)-keep:])
	if wait {
		c.barrier()
	}
	for _, pb := range ready {
		if err := c.observe(pb); err != nil {
			return err
		}
	}
	return nil
}

// barrier waits for the graphs already submitted to the backend: computing
// on the backend orders after them, and reading the result waits for it.
func (c *Cache) barrier() {
	for _, bufs := range c.norms {
		ctx := c.backend.NewContext()
		t := bufs[0].View(ctx, 0, 1).Contiguous(ctx)
		ctx.Forward(t).Compute(t)
		t.Floats()
		ctx.Close()
		return
	}
}

// observe reports the norms of one computed batch.
func (c *Cache) observe(pb *pendingBatch) error {
	obs := c.observer()
	if obs == nil || len(pb.entries) == 0 {
		return nil
	}
	h := c.opts.KVHeads
	seqs := make([]hooks.SeqID, len(pb.entries))
	pos := make([]hooks.Pos, len(pb.entries))
	for i, e := range pb.entries {
		seqs[i], pos[i] = hooks.SeqID(e.seq), e.pos
	}
	norms := make([]float32, len(pb.entries)*h)
	for l, ok := range pb.layers {
		if !ok || c.norms[l] == nil {
			continue
		}
		// The buffer is the cache's own tensor: reading it computes nothing.
		all := c.norms[l][pb.buf].BackendGet()
		for j, e := range pb.entries {
			copy(norms[j*h:(j+1)*h], all[e.row*h:(e.row+1)*h])
		}
		if err := obs.ObserveKeys(&hooks.KeyBatch{Layer: l, Seqs: seqs, Positions: pos, Norms: norms}); err != nil {
			if err := c.fail(fmt.Errorf("ollama: report key norms of layer %d: %w", l, err)); err != nil {
				return err
			}
		}
	}
	return nil
}

// prefillReady compresses the sequences whose prompt has been decoded and
// whose prompt norms have been read.
func (c *Cache) prefillReady() error {
	for seq, s := range c.lay.seqs {
		if !s.prefill || c.pendingUpTo(seq, s.prefillBatch) {
			continue
		}
		if err := c.prefillDone(seq, s); err != nil {
			return err
		}
	}
	return nil
}

// pendingUpTo reports whether a batch up to id holds unread norms of seq.
func (c *Cache) pendingUpTo(seq int, id uint64) bool {
	for _, pb := range c.pend {
		if pb.id > id {
			break
		}
		for _, e := range pb.entries {
			if e.seq == seq {
				return true
			}
		}
	}
	return false
}

// unread returns the positions of seq whose norms have not been read: the
// cache holds them after every kept cell, in every head.
func (c *Cache) unread(seq int) []int32 {
	var out []int32
	for _, pb := range c.pend {
		for _, e := range pb.entries {
			if e.seq == seq {
				out = append(out, e.pos)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// runCopies performs the deferred prefix copies, in the graph being built or
// at once.
func (c *Cache) runCopies() {
	if len(c.copies) == 0 {
		return
	}
	ops := c.copies
	c.copies = nil
	ctx, done := c.opContext()
	defer done()
	work := false
	for _, op := range ops {
		for li, n := range op.cells {
			if n == 0 || c.keys[li] == nil {
				continue
			}
			work = true
			k := c.keys[li]
			src := k.View(ctx, c.lay.slabStart(op.src)*k.Stride(1), k.Dim(0), k.Stride(1), n, k.Stride(2), k.Dim(2))
			dst := k.View(ctx, c.lay.slabStart(op.dst)*k.Stride(1), k.Dim(0), k.Stride(1), n, k.Stride(2), k.Dim(2))
			ctx.Forward(src.Copy(ctx, dst))
			v := c.values[li]
			if c.config.PermutedV {
				src = v.View(ctx, c.lay.slabStart(op.src)*v.Stride(0), n, v.Stride(1), v.Dim(1), v.Stride(2), v.Dim(2))
				dst = v.View(ctx, c.lay.slabStart(op.dst)*v.Stride(0), n, v.Stride(1), v.Dim(1), v.Stride(2), v.Dim(2))
			} else {
				src = v.View(ctx, c.lay.slabStart(op.src)*v.Stride(1), v.Dim(0), v.Stride(1), n, v.Stride(2), v.Dim(2))
				dst = v.View(ctx, c.lay.slabStart(op.dst)*v.Stride(1), v.Dim(0), v.Stride(1), n, v.Stride(2), v.Dim(2))
			}
			ctx.Forward(src.Copy(ctx, dst))
		}
	}
	if work && ctx != c.graph {
		ctx.Compute()
	}
}

// opContext returns the context cache operations go to: the batch graph
// inside StartForward, else a new context that done closes.
func (c *Cache) opContext() (ctx ml.Context, done func()) {
	if c.graph != nil {
		c.graphOps = true
		return c.graph, func() {}
	}
	ctx = c.backend.NewContext()
	return ctx, ctx.Close
}

// fail returns err in strict mode and logs it otherwise.
func (c *Cache) fail(err error) error {
	c.statsMu.Lock()
	c.errs++
	c.statsMu.Unlock()
	if c.opts.Strict {
		return err
	}
	c.log.Warn("kvnorm: compression error", "arch", c.opts.Arch, "error", err)
	return nil
}

func (c *Cache) prefillDone(seq int, s *seqCells) error {
	s.prefill = false
	if c.comp == nil || c.ext != nil || s.unmanaged {
		return nil
	}
	if _, err := c.comp.PrefillDone(hooks.SeqID(seq)); err != nil {
		if errors.Is(err, hooks.ErrUnknownSequence) {
			return nil
		}
		return c.fail(fmt.Errorf("ollama: compress seq %d after its prompt: %w", seq, err))
	}
	return nil
}

func (c *Cache) pressure(seq int, s *seqCells, free, incoming int) error {
	obs := c.observer()
	if obs == nil || s.unmanaged {
		return nil
	}
	if _, err := obs.CachePressure(hooks.SeqID(seq), free, incoming); err != nil {
		if errors.Is(err, hooks.ErrUnknownSequence) {
			return nil
		}
		return c.fail(fmt.Errorf("ollama: compress seq %d under cache pressure: %w", seq, err))
	}
	return nil
}

// CompactHeads keeps, in every planned layer and head of plan.Seq, only the
// plan's positions, gathered into the first cells of the sequence's slab
// (hooks.HeadCompactor). The compressor calls it; applications call
// Compress or Flush.
func (c *Cache) CompactHeads(plan *hooks.HeadPlan) error {
	if plan == nil {
		return fmt.Errorf("%w: nil plan", ErrPlan)
	}
	if c.lay == nil {
		return fmt.Errorf("%w: the cache is not initialised", ErrPlan)
	}
	s := c.lay.seqs[int(plan.Seq)]
	if s == nil {
		return fmt.Errorf("%w: seq %d holds no cells", hooks.ErrUnknownSequence, plan.Seq)
	}
	if len(plan.Layers) != c.opts.Layers {
		return fmt.Errorf("%w: plan has %d layers, the cache %d", ErrPlan, len(plan.Layers), c.opts.Layers)
	}
	// Positions whose norms are still unread are newer than every planned
	// one and held by every head: they stay.
	tail := c.unread(int(plan.Seq))
	keeps := make([][][]int32, len(plan.Layers))
	srcs := make([][][]int32, len(plan.Layers))
	for li, keep := range plan.Layers {
		if keep == nil {
			continue
		}
		if len(tail) > 0 {
			withTail := make([][]int32, len(keep))
			for h := range keep {
				withTail[h] = mergeSorted(keep[h], tail)
			}
			keep = withTail
		}
		keeps[li] = keep
		src, err := c.lay.compactPlan(s, li, keep)
		if err != nil {
			return fmt.Errorf("%w: seq %d: %w", ErrPlan, plan.Seq, err)
		}
		srcs[li] = src
	}
	ctx, done := c.opContext()
	defer done()
	moved := false
	for li, src := range srcs {
		if src != nil && len(src[0]) > 0 && !identity(src) && c.keys[li] != nil {
			c.gather(ctx, li, s.slab, src)
			moved = true
		}
	}
	if moved && ctx != c.graph {
		ctx.Compute()
	}
	for li, keep := range keeps {
		if keep != nil {
			c.lay.applyCompact(s, li, keep)
		}
	}
	return nil
}

// mergeSorted returns the union of two ascending lists, ascending.
func mergeSorted(a, b []int32) []int32 {
	out := make([]int32, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case j == len(b) || (i < len(a) && a[i] < b[j]):
			out = append(out, a[i])
			i++
		case i == len(a) || b[j] < a[i]:
			out = append(out, b[j])
			j++
		default:
			out = append(out, a[i])
			i, j = i+1, j+1
		}
	}
	return out
}

// gather moves, in layer li of a slab, cell src[h][j] of head h to cell j.
func (c *Cache) gather(ctx ml.Context, li, slab int, src [][]int32) {
	heads, k := len(src), len(src[0])
	flat := make([]int32, 0, heads*k)
	for _, cells := range src {
		flat = append(flat, cells...)
	}
	dsts := make([]int32, k)
	for j := range dsts {
		dsts[j] = int32(j)
	}
	idx := ctx.Input().FromInts(flat, k, heads)
	dst := ctx.Input().FromInts(dsts, k)
	start := c.lay.slabStart(slab)
	cells := c.lay.slabCells

	key := c.keys[li]
	ks := key.View(ctx, start*key.Stride(1), key.Dim(0), key.Stride(1), cells, key.Stride(2), heads)
	ctx.Forward(ks.SetRows(ctx, ks.Rows(ctx, idx), dst))

	value := c.values[li]
	if !c.config.PermutedV {
		vs := value.View(ctx, start*value.Stride(1), value.Dim(0), value.Stride(1), cells, value.Stride(2), heads)
		ctx.Forward(vs.SetRows(ctx, vs.Rows(ctx, idx), dst))
		return
	}
	// V is [cells, headDim, kvHeads]: gather on a transposed copy and write
	// the rows back transposed.
	vs := value.View(ctx, start*value.Stride(0), cells, value.Stride(1), value.Dim(1), value.Stride(2), heads)
	rows := vs.Permute(ctx, 1, 0, 2, 3).Contiguous(ctx).Rows(ctx, idx)
	out := value.View(ctx, start*value.Stride(0), k, value.Stride(1), value.Dim(1), value.Stride(2), heads).Permute(ctx, 1, 0, 2, 3)
	ctx.Forward(rows.Copy(ctx, out))
}

// Remove deletes positions [begin, end) of seq (kvcache.Cache). Removing a
// tail works in every layout; removing from the middle (a context shift)
// renumbers later positions and needs the model's shift function and a
// sequence kvnorm has not compressed. On error the runner clears the
// sequence and decodes its inputs again.
func (c *Cache) Remove(seq int, begin, end int32) error {
	if c.lay == nil {
		return nil
	}
	s := c.lay.seqs[seq]
	if s == nil {
		return nil
	}
	if begin <= 0 && end == math.MaxInt32 {
		c.clearSeq(seq)
		return nil
	}
	if end == math.MaxInt32 {
		if err := c.lay.removeTail(s, begin); err != nil {
			return fmt.Errorf("ollama: seq %d: %w", seq, err)
		}
		c.editPending(seq, begin, end)
		if obs := c.observer(); obs != nil {
			obs.Forget(hooks.SeqID(seq), begin, -1)
		}
		return nil
	}
	if c.ext != nil && !s.unmanaged {
		return fmt.Errorf("%w: seq %d: kvnorm does not shift the context of a sequence an observer tracks", kvcache.ErrNotSupported, seq)
	}
	if c.comp != nil && !s.unmanaged {
		if _, entries := c.comp.Live(hooks.SeqID(seq)); entries > 0 || c.hasPending(seq) {
			return fmt.Errorf("%w: seq %d: kvnorm does not shift the context of a sequence it tracks", kvcache.ErrNotSupported, seq)
		}
	}
	if c.opts.Shift == nil {
		return kvcache.ErrNotSupported
	}
	keep, shifted, err := c.lay.removeMiddle(s, begin, end)
	if err != nil {
		return fmt.Errorf("%w: seq %d: %w", kvcache.ErrNotSupported, seq, err)
	}
	c.editPending(seq, begin, end)
	ctx := c.backend.NewContext()
	moved := false
	for li, cells := range keep {
		if c.keys[li] == nil || len(cells) == 0 {
			continue
		}
		src := make([][]int32, c.opts.KVHeads)
		for h := range src {
			src[h] = cells
		}
		if !identity(src) {
			c.gather(ctx, li, s.slab, src)
			moved = true
		}
	}
	if moved {
		ctx.Compute()
	}
	ctx.Close()
	return c.shiftKeys(s, shifted, begin-end)
}

// shiftKeys re-ropes cells [shifted[li], n) of every layer of s by offset.
func (c *Cache) shiftKeys(s *seqCells, shifted []int, offset int32) error {
	ctx := c.backend.NewContext()
	defer ctx.Close()
	work := false
	for li, from := range shifted {
		key := c.keys[li]
		n := s.layers[li].n()
		if key == nil || from >= n {
			continue
		}
		m := n - from
		offs := make([]int32, m)
		for i := range offs {
			offs[i] = offset
		}
		view := key.View(ctx, (c.lay.slabStart(s.slab)+from)*key.Stride(1),
			key.Dim(0), key.Stride(2),
			key.Dim(2), key.Stride(1),
			m)
		roped, err := c.opts.Shift(ctx, li, view, ctx.Input().FromInts(offs, m))
		if err != nil {
			return err
		}
		ctx.Forward(roped.Copy(ctx, view))
		work = true
	}
	if work {
		ctx.Compute()
	}
	return nil
}

// editPending drops unread norms of seq at positions [begin, end) and
// renumbers those after end, as Remove does to the cells.
func (c *Cache) editPending(seq int, begin, end int32) {
	for _, pb := range c.pend {
		out := pb.entries[:0]
		for _, e := range pb.entries {
			if e.seq == seq {
				if e.pos >= begin && e.pos < end {
					continue
				}
				if e.pos >= end && end != math.MaxInt32 {
					e.pos += begin - end
				}
			}
			out = append(out, e)
		}
		pb.entries = out
	}
}

func (c *Cache) hasPending(seq int) bool { return c.pendingUpTo(seq, math.MaxUint64) }

func (c *Cache) clearSeq(seq int) {
	s := c.lay.seqs[seq]
	if s == nil {
		return
	}
	c.copies = slices.DeleteFunc(c.copies, func(op copyOp) bool { return op.dst == s.slab })
	c.lay.free(seq)
	c.editPending(seq, 0, math.MaxInt32)
	if c.ext != nil {
		c.ext.Forget(hooks.SeqID(seq), 0, -1)
	}
	if c.comp != nil {
		c.comp.DropSequence(hooks.SeqID(seq))
	}
}

// CopyPrefix makes dstSeq hold the positions [0, length) of srcSeq
// (kvcache.Cache). The cells are copied (each sequence owns its slab) once the
// batches built so far have been computed. A layer compacted per head is cut
// to the count every head holds below length; a copy of such a layer is not
// compressed again.
func (c *Cache) CopyPrefix(srcSeq, dstSeq int, length int32) {
	if c.lay == nil {
		return
	}
	c.clearSeq(dstSeq)
	src := c.lay.seqs[srcSeq]
	if src == nil {
		return
	}
	dst, err := c.lay.seq(dstSeq, true)
	if err != nil {
		c.log.Warn("kvnorm: copy prefix", "src", srcSeq, "dst", dstSeq, "error", err)
		return
	}
	op := copyOp{src: src.slab, dst: dst.slab, cells: make([]int, c.opts.Layers)}
	uniform := !src.unmanaged
	for li := range src.layers {
		var exact bool
		dst.layers[li], exact = prefixOf(&src.layers[li], length)
		op.cells[li] = dst.layers[li].n()
		if !exact || dst.layers[li].perHead() {
			uniform = false
		}
	}
	c.copies = append(c.copies, op)
	if c.ext != nil {
		// The observer's record is not ours to copy.
		dst.unmanaged = true
		return
	}
	if c.comp == nil {
		return
	}
	if !uniform {
		dst.unmanaged = true
		return
	}
	// Give dst the norms src has recorded, and the pending ones.
	h := c.opts.KVHeads
	for li := range dst.layers {
		pos := dst.layers[li].shared
		if len(pos) == 0 {
			continue
		}
		norms := make([]float32, len(pos)*h)
		var got []hooks.Pos
		var gotNorms []float32
		for head := range h {
			lp, ln, err := c.comp.Norms(hooks.SeqID(srcSeq), li, head)
			if err != nil {
				break
			}
			for i, p := range pos {
				if k, ok := slices.BinarySearch(lp, p); ok {
					norms[i*h+head] = ln[k]
				} else {
					norms[i*h+head] = float32(math.NaN())
				}
			}
		}
		for i, p := range pos {
			if !math.IsNaN(float64(norms[i*h])) {
				got = append(got, p)
				gotNorms = append(gotNorms, norms[i*h:(i+1)*h]...)
			}
		}
		if len(got) == 0 {
			continue
		}
		seqs := make([]hooks.SeqID, len(got))
		for i := range seqs {
			seqs[i] = hooks.SeqID(dstSeq)
		}
		if err := c.comp.ObserveKeys(&hooks.KeyBatch{Layer: li, Seqs: seqs, Positions: got, Norms: gotNorms}); err != nil {
			dst.unmanaged = true
			c.log.Warn("kvnorm: copy prefix norms", "src", srcSeq, "dst", dstSeq, "error", err)
			return
		}
	}
	for _, pb := range c.pend {
		for _, e := range pb.entries {
			if e.seq == srcSeq && e.pos < length {
				pb.entries = append(pb.entries, pendingEntry{seq: dstSeq, pos: e.pos, row: e.row})
			}
		}
	}
}

func (c *Cache) recordStats(st hooks.Stats) {
	c.statsMu.Lock()
	c.history = append(c.history, st)
	if len(c.history) > 256 {
		c.history = slices.Delete(c.history, 0, len(c.history)-256)
	}
	c.statsMu.Unlock()
	c.log.Info("kvnorm: compressed", "arch", c.opts.Arch, "seq", st.Seq, "trigger", st.Trigger,
		"policy", st.Policy, "positions", fmt.Sprintf("%d->%d", st.PositionsBefore, st.PositionsAfter),
		"entries", fmt.Sprintf("%d->%d", st.EntriesBefore, st.EntriesAfter), "freed_bytes", st.BytesFreed,
		"plan", st.PlanTime.Round(time.Microsecond), "apply", st.ApplyTime.Round(time.Microsecond))
}

// Stats returns the stats of the latest compressions (at most 256), oldest
// first.
func (c *Cache) Stats() []hooks.Stats {
	c.statsMu.Lock()
	defer c.statsMu.Unlock()
	return slices.Clone(c.history)
}

// Usage is what one sequence holds.
type Usage struct {
	// Cells is the number of cells each layer holds (per head: every head
	// of a layer holds the same count).
	Cells []int `json:"cells"`
	// Positions is the number of distinct positions held by any head.
	Positions int `json:"positions"`
	// Entries is the number of (layer, head, cell) entries; Bytes their K+V
	// size for the cache's type.
	Entries int64 `json:"entries"`
	Bytes   int64 `json:"bytes"`
}

// Usage reports what seq holds.
func (c *Cache) Usage(seq int) Usage {
	var u Usage
	if c.lay == nil {
		return u
	}
	s := c.lay.seqs[seq]
	if s == nil {
		return u
	}
	seen := map[int32]bool{}
	u.Cells = make([]int, len(s.layers))
	for li := range s.layers {
		lc := &s.layers[li]
		u.Cells[li] = lc.n()
		u.Entries += int64(lc.n() * c.opts.KVHeads)
		for h := range lc.headCount() {
			for _, p := range lc.head(h) {
				seen[p] = true
			}
		}
	}
	u.Positions = len(seen)
	if eb, err := c.shape.EntryBytes(); err == nil {
		u.Bytes = u.Entries * eb
	}
	return u
}

// HeadPositions returns the positions head h of layer li of seq holds, in
// cell order.
func (c *Cache) HeadPositions(seq, li, h int) []int32 {
	if c.lay == nil || c.lay.seqs[seq] == nil || li < 0 || li >= c.opts.Layers || h < 0 || h >= c.opts.KVHeads {
		return nil
	}
	return slices.Clone(c.lay.seqs[seq].layers[li].head(h))
}
