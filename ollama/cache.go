package ollama

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"

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
	// adapter.Compressor and compress by it, and sizes each layer for what
	// the policy keeps (see Init). Nil: a plain cache.
	Policy *adapter.Policy
	// Shift re-ropes keys after a context shift; nil refuses context shifts.
	Shift ShiftFunc
	// Strict returns compression errors from StartForward and Flush. When
	// false (the runner), they are logged and the sequence keeps its cells.
	Strict bool
	// Pipelined is the runner's mode: the runner builds a batch while the
	// previous one computes (and reads that batch's outputs after the next
	// one is built), so the cache waits for the backend only when the last
	// batch it placed has no outputs, and otherwise reads the norms of the
	// batches the runner has waited for (norms.go). Off: every batch is
	// computed before the next is built (Session), and the norms of every
	// placed batch are read when due.
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
// granularity), and whose compressed layers are allocated for what the
// policy keeps.
//
// Per layer, keys are stored as a [headDim, cells, kvHeads] tensor and values
// likewise ([cells, headDim, kvHeads] when the backend wants V permuted for
// its non-flash attention), so that the cells of one head are contiguous and
// ggml's get_rows/set_rows move every head's own cells in one op. Each
// sequence slot owns a slab of cells per layer; in every layer a sequence's
// cells are packed at the front of its slab, so attention runs over kept
// cells only.
//
// Key norms are computed in the graph of every forward pass (sqrt of the sum
// of squares of each head's key) into a small per-layer buffer kept by batch,
// not by cell (one batch of rows, whatever the context), until the
// observer has them. They are read back only when a compression is due or
// the buffer is full (norms.go): observing costs no transfer while nothing
// is due.
//
// The jobs live in one file each: this file holds the kvcache.Cache methods
// that build a forward pass; norms.go reads norms back; compact.go plans and
// applies compressions (after a prompt, under pressure); remove.go removes
// positions and shifts; prefix.go copies prefixes; deferred.go runs their
// device work in the next batch's graph; stats.go reports.
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
	lay      *layout
	// squeezed is the cell count of the layers sized for the policy's
	// budget (0 when every layer holds the whole context).
	squeezed int

	ctxs         map[int]ml.Context
	keys, values map[int]ml.Tensor
	// ring holds the norms of fresh positions, by batch (norms.go); spills
	// hold those of batches that did not fit in it.
	ring   *normSeg
	spills []*normSeg

	cur   forward
	graph ml.Context // the graph being built, inside StartForward
	// graphOps is set once cache operations went into graph.
	graphOps bool
	// pending is device work the bookkeeping has already done (prefix
	// copies, the moves and re-roping of a shift), in order: it runs first
	// in the next batch's graph (deferred.go).
	pending []deviceOp
	// why names the trigger of the compression running (for its stats).
	why string
	// syncs and fetches count waits for the backend and norm tensors read
	// back (tests check that nothing is read while nothing is due).
	syncs, fetches int
	// batches counts the batches placed; the last one may still be
	// computing in pipelined mode.
	batches uint64
	// synced is the last batch known to have run on the device (norms.go);
	// lastOut and prevOut say whether the last two batches placed had
	// outputs.
	synced           uint64
	lastOut, prevOut bool
	// flushing is set inside Flush: every placed batch has been computed.
	flushing bool
	// inPressure is set while the external observer handles a pressure
	// call: what it may read back has been reported (see Engine).
	inPressure bool
	// awaitDevice, set by tests only, runs before the cache computes a
	// graph of its own: a test device whose computes complete late runs
	// what was submitted before (a backend's graphs run in order).
	awaitDevice func()

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
	seqs       []int
	positions  []int32 // as the cache numbers them (runner position + offset)
	groups     []group
	layerGroup []int
	// norms and normRows are where Put writes the batch's key norms (nil:
	// nowhere).
	norms    *normSeg
	normRows ml.Tensor
}

// group is what layers with the same cell layout share in one forward pass:
// the cells attended over, where the batch's keys go, and the mask.
type group struct {
	rep        int // a layer of the group
	lo, length int
	locs       ml.Tensor
	mask       ml.Tensor
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

// tracking reports whether key norms are computed.
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
//
// With compression on, every layer the policy compresses holds, per slot,
// Target(capacity) cells (ceil(keep × capacity), or BUDGET, at least the
// sinks, the window and the last position) plus maxBatch cells of headroom
// for the batch being placed, at most capacity; layers the policy keeps
// whole (per-head skip layers) hold capacity cells. The tensors are
// allocated at that size on first use, so Ollama's memory report (the
// runner's "kv cache" line, /api/ps, the scheduler) sees the smaller cache.
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
	maxBatch = max(maxBatch, 1)
	c.backend, c.dtype, c.maxBatch = backend, dtype, maxBatch
	c.shape.Capacity = capacity
	kt, kerr := kernelDType(dtype)
	if kerr == nil {
		c.shape.KType, c.shape.VType = kt, kt
	}
	caps := uniform(c.opts.Layers, capacity)
	defer func() {
		// Slabs are padded to the backend's padding (see rangeFor).
		slabs := make([]int, len(caps))
		for i, n := range caps {
			slabs[i] = roundUp(n, c.config.CachePadding)
		}
		c.lay = newLayout(c.opts.Layers, c.opts.KVHeads, maxSequences, slabs, caps)
		if c.tracking() && c.ring == nil {
			c.ring = newNormSeg(ringRows(maxBatch), false)
		}
	}()
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
	caps = c.policyCells(capacity, maxBatch)
	c.log.Info("kvnorm: KV cache sized by the policy", "arch", c.opts.Arch, "num_ctx", capacity, "num_batch", maxBatch,
		"slots", maxSequences, "cells_per_layer", fmt.Sprint(caps))
}

// policyCells returns the cells per slot of every layer under the policy.
func (c *Cache) policyCells(capacity, maxBatch int) []int {
	p := *c.opts.Policy
	squeezed := min(capacity, p.Target(capacity)+maxBatch)
	caps := uniform(c.opts.Layers, squeezed)
	if p.Granularity == hooks.PerHead {
		for _, l := range p.SkipLayers {
			if l < len(caps) {
				caps[l] = capacity
			}
		}
	}
	if squeezed < capacity {
		c.squeezed = squeezed
	}
	return caps
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
	if c.ring != nil {
		c.ring.close()
	}
	for _, g := range c.spills {
		g.close()
	}
	c.spills = nil
}

// SetLayer selects the layer of the following Put and Get (kvcache.Cache).
func (c *Cache) SetLayer(layer int) { c.cur.layer = layer }

// CanResume reports whether seq can continue at pos (kvcache.Cache). With
// compression on, never past position 0: a prompt resumed after a reused
// prefix is fed in chunks that start where the prefix ends, so the
// compressions it makes under pressure (at chunk boundaries) and the batch
// sizes it is computed in differ from a fresh server's, and so can its
// answer; the runner decodes the whole prompt again instead, so that an
// answer never depends on what the server served before. Without
// compression (no policy) a sequence that holds exactly what decoding its
// first pos inputs gives (never shifted) is resumed as upstream resumes it.
func (c *Cache) CanResume(seq int, pos int32) bool {
	if pos <= 0 {
		return true
	}
	if c.lay == nil || c.comp != nil {
		return false
	}
	s := c.lay.seqs[seq]
	return s != nil && s.exact() && s.last() >= pos-1
}

// StartForward prepares the cache for a batch (kvcache.Cache). Before placing
// the batch it runs deferred prefix copies, compresses sequences whose
// prompt has been decoded, and compresses sequences that would not fit
// (cache pressure).
func (c *Cache) StartForward(ctx ml.Context, batch input.Batch, reserve bool) (err error) {
	n := len(batch.Positions)
	if len(batch.Sequences) != n {
		return fmt.Errorf("ollama: batch has %d positions and %d sequences", n, len(batch.Sequences))
	}
	c.cur = forward{n: n, reserve: reserve, seqs: batch.Sequences, positions: batch.Positions}
	if reserve {
		return c.reserve(ctx, n)
	}
	c.noteSynced()
	c.retire()
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
	if err := c.runPending(); err != nil {
		return err
	}
	if err := c.prefillReady(batch.Sequences); err != nil {
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
		if err := c.makeRoom(seq, s, count[seq]); err != nil {
			return err
		}
		cells[i] = s
	}

	// Place the tokens after each sequence's cells, in every layer, at the
	// cache's numbering of their positions.
	positions := make([]int32, n)
	for j, seq := range batch.Sequences {
		positions[j] = batch.Positions[j] + c.lay.seqs[seq].offset
	}
	c.cur.positions = positions
	// The batch's key norms go to rows of the ring (or a spill), taken
	// before the batch counts as placed: reading what is due to make room
	// must not count it as computed.
	var rows []int32
	if c.tracking() && slices.ContainsFunc(cells, func(s *seqCells) bool { return !s.unmanaged }) {
		// This batch is now each of its sequences' newest: the norms of
		// the one before may be read to make rows free (the compressions
		// of this batch are planned already; the next batch's plan would
		// see them anyway).
		for _, s := range cells {
			s.newestBatch = c.batches + 1
		}
		g, r, err := c.normRows(n)
		if err != nil {
			return err
		}
		g.last = c.batches + 1
		c.cur.norms, c.cur.normRows, rows = g, ctx.Input().FromInts(r, n), r
	}
	c.batches++
	c.placed(batch.Outputs == nil || batch.Outputs.Dim(0) > 0)
	for i, seq := range order {
		var pos []int32
		for j, s := range batch.Sequences {
			if s == seq {
				pos = append(pos, positions[j])
			}
		}
		s := cells[i]
		s.newestBatch = c.batches
		if err := c.lay.appendTokens(s, pos); err != nil {
			return fmt.Errorf("ollama: seq %d: %w", seq, err)
		}
		if rows != nil && !s.unmanaged {
			for j, q := range batch.Sequences {
				if q == seq {
					s.fresh = append(s.fresh, freshNorm{pos: positions[j], seg: c.cur.norms, row: rows[j], batch: c.batches})
					c.cur.norms.ref(rows[j])
				}
			}
		}
		// A batch with an output ends a prompt: its compression is due
		// before the sequence's next batch (prefillReady).
		if (outputs == nil || outputs[seq]) && !s.prefilled && !s.prefillDue {
			s.prefillDue, s.prefillBatch = true, c.batches
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

// reserve builds the worst case of every layer: a batch of n tokens
// attending over all of the layer's cells.
func (c *Cache) reserve(ctx ml.Context, n int) error {
	locs := make([]int32, n)
	for i := range locs {
		locs[i] = int32(i)
	}
	locsT := ctx.Input().FromInts(locs, n)
	if c.ring != nil {
		rows := make([]int32, n)
		for i := range rows {
			rows[i] = int32(i % c.ring.rows)
		}
		c.cur.norms, c.cur.normRows = c.ring, ctx.Input().FromInts(rows, n)
	}
	c.cur.layerGroup = make([]int, c.opts.Layers)
	for li := range c.opts.Layers {
		total := c.lay.total(li)
		found := slices.IndexFunc(c.cur.groups, func(g group) bool { return g.length == total })
		if found < 0 {
			mask := ctx.Input().FromFloats(make([]float32, total*n), total, n)
			if c.config.MaskDType != ml.DTypeF32 {
				mask = mask.Cast(ctx, c.config.MaskDType)
			}
			c.cur.groups = append(c.cur.groups, group{rep: li, lo: 0, length: total, locs: locsT, mask: mask})
			found = len(c.cur.groups) - 1
		}
		c.cur.layerGroup[li] = found
	}
	return nil
}

// buildGroups computes, for every layer, the cells the batch attends over,
// where its tokens go and the mask; layers laid out alike share them.
func (c *Cache) buildGroups(ctx ml.Context, batch input.Batch, cells []*seqCells) error {
	n := c.cur.n
	c.cur.layerGroup = make([]int, c.opts.Layers)
	for li := range c.opts.Layers {
		lo, length := c.lay.rangeFor(cells, li, c.config.CachePadding)
		found := -1
		for g, gr := range c.cur.groups {
			if gr.lo != lo || gr.length != length || c.lay.slabCells[gr.rep] != c.lay.slabCells[li] {
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
				locs[j] = int32(c.lay.slabStart(s.slab, li) + first + k)
			}
			m := make([]float32, n*length)
			c.lay.maskFor(m, lo, length, li, batch.Sequences, c.cur.positions)
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

// alloc creates the tensors of a layer on first use, at the layer's size.
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
	total := c.lay.total(layer)
	ctx := c.backend.NewContextSize(3).Layer(layer)
	c.ctxs[layer] = ctx
	c.keys[layer] = ctx.Zeros(c.dtype, kDim, total, kvHeads)
	if c.config.PermutedV {
		c.values[layer] = ctx.Zeros(c.dtype, total, vDim, kvHeads)
	} else {
		c.values[layer] = ctx.Zeros(c.dtype, vDim, total, kvHeads)
	}
	if c.ring != nil {
		c.ring.t[layer] = ctx.Zeros(ml.DTypeF32, 1, c.ring.rows, kvHeads)
	}
}

// Put stores the keys and values of the batch, [headDim, kvHeads, batch],
// and their norms (kvcache.Cache).
func (c *Cache) Put(ctx ml.Context, key, value ml.Tensor) {
	kDim, kvHeads, n := key.Dim(0), key.Dim(1), key.Dim(2)
	vDim := value.Dim(0)
	if n != c.cur.n {
		panic(fmt.Errorf("ollama: layer %d: batch of %d keys, the forward pass has %d tokens", c.cur.layer, n, c.cur.n))
	}
	layer := c.cur.layer
	c.alloc(layer, kDim, vDim, kvHeads)
	locs := c.cur.groups[c.cur.layerGroup[layer]].locs
	total := c.lay.total(layer)

	// [headDim, kvHeads, n] -> [headDim, n, kvHeads]: one row per (token, head).
	keys := c.keys[layer]
	ctx.Forward(keys.SetRows(ctx, key.Permute(ctx, 0, 2, 1, 3), locs))
	values := c.values[layer]
	if c.config.PermutedV {
		v := value.Reshape(ctx, vDim*kvHeads, 1, n).Permute(ctx, 2, 0, 1, 3)
		ctx.Forward(values.Reshape(ctx, 1, total, vDim*kvHeads).SetRows(ctx, v, locs))
	} else {
		ctx.Forward(values.SetRows(ctx, value.Permute(ctx, 0, 2, 1, 3), locs))
	}

	if c.cur.norms != nil {
		nt := c.normTensor(c.cur.norms, layer, kvHeads)
		k := key
		if k.DType() != ml.DTypeF32 {
			k = k.Cast(ctx, ml.DTypeF32)
		}
		// [1, kvHeads, n] -> [1, n, kvHeads], in the batch's rows.
		norms := k.Sqr(ctx).SumRows(ctx).Sqrt(ctx).Permute(ctx, 0, 2, 1, 3)
		ctx.Forward(nt.SetRows(ctx, norms, c.cur.normRows))
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
