//go:build cgo

package llamacpp

/*
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kvn_llama.h"

// What cb_eval asks the scheduler for (bits of kvn_cb.enabled).
enum {
	KVN_KEYS = 1,  // the post-RoPE keys of every layer: ROPE nodes "Kcur-N"
	KVN_ATTN = 2,  // the attention probabilities of every layer: SOFT_MAX nodes "kq_soft_max-N"
	KVN_CELLS = 4, // the cache rows the batch is written to: the first SET_ROWS into a "cache_k_l*" tensor
};

// kvn_cb is the C-owned user data of one context's cb_eval: the cgo.Handle
// of the Go Context, what it wants now, and whether this decode's cache rows
// were captured (reset before each llama_decode: every layer writes the same
// rows, one capture is enough).
typedef struct {
	uintptr_t handle;
	int enabled;
	int cells_seen;
} kvn_cb;

// Defined in callback.go (an //export'ed Go function).
extern void kvnormObserve(uintptr_t handle, int kind, void *tensor);

static int kvn_kind(const struct ggml_tensor *t, const kvn_cb *cb) {
	if ((cb->enabled & KVN_KEYS) && t->op == GGML_OP_ROPE && strncmp(t->name, "Kcur-", 5) == 0) {
		return KVN_KEYS;
	}
	if ((cb->enabled & KVN_ATTN) && t->op == GGML_OP_SOFT_MAX && strncmp(t->name, "kq_soft_max-", 12) == 0) {
		return KVN_ATTN;
	}
	if ((cb->enabled & KVN_CELLS) && !cb->cells_seen && t->op == GGML_OP_SET_ROWS &&
	    t->src[2] != NULL && strncmp(t->src[2]->name, "cache_k_l", 9) == 0) {
		return KVN_CELLS;
	}
	return 0;
}

// kvn_cb_eval asks the scheduler for the nodes kvn_kind selects (other nodes
// may share their names: the op is checked too) and hands each to Go once
// computed. After a computed tensor it always returns true: false would stop
// the rest of the graph.
static bool kvn_cb_eval(struct ggml_tensor *t, bool ask, void *user_data) {
	kvn_cb *cb = (kvn_cb *)user_data;
	int kind = (cb == NULL || !cb->enabled) ? 0 : kvn_kind(t, cb);
	if (kind == 0) {
		return !ask;
	}
	if (ask) {
		return true;
	}
	if (kind == KVN_CELLS) {
		cb->cells_seen = 1;
	}
	kvnormObserve(cb->handle, kind, t);
	return true;
}

static kvn_cb *kvn_cb_new(uintptr_t handle) {
	kvn_cb *cb = (kvn_cb *)calloc(1, sizeof(kvn_cb));
	if (cb != NULL) cb->handle = handle;
	return cb;
}

static void kvn_set_cb(struct llama_context_params *p, kvn_cb *cb) {
	p->cb_eval = kvn_cb_eval;
	p->cb_eval_user_data = cb;
}

// kvn_key_tensor describes the tensor the callback got, for Go.
typedef struct {
	int layer;
	int type;
	int64_t ne0, ne1, ne2, ne3;
	int contiguous;
	size_t nbytes;
} kvn_key_tensor;

static kvn_key_tensor kvn_describe(const struct ggml_tensor *t) {
	kvn_key_tensor d;
	d.layer = -1;
	if (sscanf(t->name, "Kcur-%d", &d.layer) != 1) d.layer = -1;
	d.type = (int)t->type;
	d.ne0 = t->ne[0]; d.ne1 = t->ne[1]; d.ne2 = t->ne[2]; d.ne3 = t->ne[3];
	d.contiguous = ggml_is_contiguous(t);
	d.nbytes = ggml_nbytes(t);
	return d;
}

static size_t kvn_row_size(int type, int64_t n) { return ggml_row_size((enum ggml_type)type, n); }
*/
import "C"

import (
	"context"
	"fmt"
	"math"
	"runtime"
	"runtime/cgo"
	"slices"
	"sync"
	"time"
	"unsafe"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
	"github.com/kvnorm/kvnorm/llamacpp/statemode"
)

// Context is a llama.cpp context (its KV cache and compute state) on a Model,
// holding one or more sequences. It implements hooks.PositionEvictor, so a
// compressor from adapter.New(ctx, policy) can evict its cells; attach one
// with EnableCompression (or SetObserver) and every decode reports each
// layer's post-RoPE key norms to it, read through llama.cpp's cb_eval.
//
// Its methods are safe for concurrent use; llama.cpp calls are serialized.
// Close frees the C context and is safe to call twice.
type Context struct {
	mu    sync.Mutex
	model *Model
	c     *C.struct_llama_context
	mem   C.llama_memory_t
	batch C.struct_llama_batch
	cb    *C.kvn_cb
	h     cgo.Handle
	opts  ContextOptions

	nCtx, capacity, nBatch, seqs int
	shape                        hooks.CacheShape
	cellBytes                    int64

	obs      hooks.Observer
	observed bool  // obs is set: keys are streamed during decodes
	cbWant   C.int // what cb_eval asks for in a decode whose keys are read
	attnF    func(*Attention) error

	// The batch being decoded, for the callback, and what it records: the
	// per-head key norms of each layer, reported to the observer once
	// llama_decode has returned and c.mu is released.
	curSeqs  []hooks.SeqID
	curPos   []hooks.Pos
	callLen  int  // tokens of the Decode call the batch is part of
	decoding bool // inside our own llama_decode: tensors belong to curPos
	keyBuf   []float32
	norms    [][]float32 // per layer, [tokens][kv heads]
	seen     []bool      // per layer: its keys arrived in this decode
	cbErr    error

	// Attention recording (record.go): the cells the batch is written to,
	// and each layer's probabilities (buffers reused across decodes).
	curCells []int
	attnW    [][]float32 // per layer, [head][token][n_kv]; nil when unseen
	attnNKV  []int       // per layer: n_kv of its tensor

	live []posSet // per sequence
	// cells[seq][c] is the position held by cell c of the sequence's
	// stream, -1 when empty. It is kept while cells are tracked (an observer
	// or an attention recorder is attached) and valid when cellsKnown[seq].
	cells      [][]hooks.Pos
	cellsKnown []bool
	// held[seq] are positions decoded in short batches (generated tokens)
	// whose keys were not read: they are read from the sequence's state
	// when a compression needs them (ReportDeferredKeys, lazykeys.go).
	held []posSet
	// epochs[seq] counts the clears of seq (hooks.SequenceEpochs).
	epochs []uint64
}

// NewContext creates a context on m. It returns an error wrapping ErrBadInput
// for options out of range (a batch that does not fit in the cache, a
// quantized V cache without flash attention) and ErrLoad if llama.cpp fails.
func (m *Model) NewContext(o ContextOptions) (*Context, error) {
	if o.NCtx < 0 || o.NBatch < 0 || o.Threads < 0 || o.Seqs < 0 {
		return nil, fmt.Errorf("%w: context options: n_ctx=%d n_batch=%d threads=%d seqs=%d must be >= 0", ErrBadInput, o.NCtx, o.NBatch, o.Threads, o.Seqs)
	}
	if o.NCtx == 0 {
		o.NCtx = 2048
	}
	if o.Seqs == 0 {
		o.Seqs = 1
	}
	if o.Threads == 0 {
		o.Threads = runtime.NumCPU()
	}
	if o.Seqs > 256 || o.NCtx > 1<<24 || o.Threads > 1024 {
		return nil, fmt.Errorf("%w: context options: seqs=%d (max 256), n_ctx=%d (max %d), threads=%d (max 1024)", ErrBadInput, o.Seqs, o.NCtx, 1<<24, o.Threads)
	}
	if int(o.KType) >= len(cacheTypeNames) || int(o.VType) >= len(cacheTypeNames) || o.FlashAttn > FlashAttnAuto {
		return nil, fmt.Errorf("%w: context options: cache types %s/%s, flash attention %s", ErrBadInput, o.KType, o.VType, o.FlashAttn)
	}
	if o.VType.quantized() && o.FlashAttn == FlashAttnOff {
		return nil, fmt.Errorf("%w: a %s V cache needs flash attention in llama.cpp: turn it on or use f16", ErrBadInput, o.VType)
	}
	// Cells per sequence, padded as llama.cpp pads them.
	capacity := roundUp(o.NCtx, 256)
	if o.NBatch == 0 {
		o.NBatch = min(512, capacity)
	}
	if o.NBatch > capacity {
		return nil, fmt.Errorf("%w: batch of %d tokens does not fit in a context of %d cells per sequence (n_ctx %d padded to 256): one chunk must fit; lower the batch or raise n_ctx", ErrBadInput, o.NBatch, capacity, o.NCtx)
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.live(); err != nil {
		return nil, err
	}
	for _, t := range []CacheType{o.KType, o.VType} {
		// ggml quantizes whole blocks of 32 per head: llama.cpp aborts on
		// smaller heads, so refuse before it does.
		if t.quantized() && m.info.HeadDim%32 != 0 {
			return nil, fmt.Errorf("%w: a %s cache needs a head dim that is a multiple of 32; %s has %d (use f16)", ErrBadInput, t, m.info.Path, m.info.HeadDim)
		}
	}
	if m.info.Recurrent {
		return nil, fmt.Errorf("%w: %s is a recurrent model: it has no KV cache to compress", hooks.ErrUnsupported, m.info.Path)
	}
	c := &Context{model: m, opts: o, seqs: o.Seqs, live: make([]posSet, o.Seqs),
		cells: make([][]hooks.Pos, o.Seqs), cellsKnown: make([]bool, o.Seqs), held: make([]posSet, o.Seqs), epochs: make([]uint64, o.Seqs)}
	c.h = cgo.NewHandle(c)
	c.cb = C.kvn_cb_new(C.uintptr_t(c.h))
	if c.cb == nil {
		c.h.Delete()
		return nil, fmt.Errorf("%w: out of C memory", ErrLoad)
	}
	p := C.llama_context_default_params()
	p.n_ctx = C.uint32_t(capacity * o.Seqs)
	p.n_batch = C.uint32_t(o.NBatch)
	p.n_ubatch = C.uint32_t(o.NBatch) // one llama_decode = one graph: the callback knows its batch
	p.n_seq_max = C.uint32_t(o.Seqs)
	p.n_threads = C.int32_t(o.Threads)
	p.n_threads_batch = C.int32_t(o.Threads)
	p.kv_unified = false // each sequence has its own cells: compressing one never touches another
	p.type_k = ggmlType(o.KType)
	p.type_v = ggmlType(o.VType)
	switch o.FlashAttn {
	case FlashAttnOn:
		p.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
	case FlashAttnOff:
		p.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_DISABLED
	default:
		p.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_AUTO
	}
	C.kvn_set_cb(&p, c.cb)
	c.c = C.llama_init_from_model(m.m, p)
	if c.c == nil {
		C.free(unsafe.Pointer(c.cb))
		c.h.Delete()
		return nil, fmt.Errorf("%w: context n_ctx=%d seqs=%d batch=%d cache %s/%s flash attention %s (run with SetLogLevel(LogWarn) to see why)",
			ErrLoad, capacity, o.Seqs, o.NBatch, o.KType, o.VType, o.FlashAttn)
	}
	c.mem = C.llama_get_memory(c.c)
	c.nCtx = int(C.llama_n_ctx(c.c))
	c.capacity = int(C.llama_n_ctx_seq(c.c))
	c.nBatch = min(int(C.llama_n_batch(c.c)), int(C.llama_n_ubatch(c.c)))
	c.batch = C.llama_batch_init(C.int32_t(c.nBatch), 0, 1)
	c.shape, c.cellBytes = c.cacheShape()
	c.norms = make([][]float32, c.shape.Layers)
	c.seen = make([]bool, c.shape.Layers)
	c.attnW = make([][]float32, c.shape.Layers)
	c.attnNKV = make([]int, c.shape.Layers)
	for s := range c.cells {
		c.cells[s] = emptyCells(c.capacity)
		c.cellsKnown[s] = true
	}
	m.ctxs[c] = struct{}{}
	return c, nil
}

func roundUp(n, m int) int { return (n + m - 1) / m * m }

func ggmlType(t CacheType) C.enum_ggml_type {
	switch t {
	case CacheQ8_0:
		return C.GGML_TYPE_Q8_0
	case CacheQ4_0:
		return C.GGML_TYPE_Q4_0
	case CacheF32:
		return C.GGML_TYPE_F32
	case CacheBF16:
		return C.GGML_TYPE_BF16
	}
	return C.GGML_TYPE_F16
}

// cacheShape describes the cache for the compressor, and the exact bytes one
// cell takes over all layers (K + V rows as llama.cpp stores them).
func (c *Context) cacheShape() (hooks.CacheShape, int64) {
	in := c.model.info
	gqa := C.int64_t(in.HeadDim * in.KVHeads)
	cell := int64(in.Layers) * int64(C.kvn_row_size(C.int(ggmlType(c.opts.KType)), gqa)+C.kvn_row_size(C.int(ggmlType(c.opts.VType)), gqa))
	s := hooks.CacheShape{Layers: in.Layers, KVHeads: in.KVHeads, HeadDim: in.HeadDim, Capacity: c.capacity}
	// KType and VType only count bytes in the compressor's stats. A type
	// the kernels cannot size per head (q4_0, or q8_0 when a block spans
	// heads) is counted as f16: use CellBytes for exact figures.
	var ok bool
	if s.KType, ok = c.opts.KType.dtype(in.HeadDim); !ok {
		s.KType = kernels.F16
	}
	if s.VType, ok = c.opts.VType.dtype(in.HeadDim); !ok {
		s.VType = kernels.F16
	}
	return s, cell
}

// Close frees the context. It is safe to call more than once; a compressor
// attached to it must not be used afterwards.
func (c *Context) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.c == nil {
		return nil
	}
	C.llama_batch_free(c.batch)
	C.llama_free(c.c)
	C.free(unsafe.Pointer(c.cb))
	c.h.Delete()
	c.c, c.cb, c.mem = nil, nil, nil
	c.model.mu.Lock()
	delete(c.model.ctxs, c)
	c.model.mu.Unlock()
	return nil
}

// lockSeq takes c.mu for an operation on seq of a live context; on error it
// returns without the lock.
func (c *Context) lockSeq(seq hooks.SeqID) error {
	c.mu.Lock()
	if err := c.liveLocked(); err != nil {
		c.mu.Unlock()
		return err
	}
	if err := c.checkSeq(seq); err != nil {
		c.mu.Unlock()
		return err
	}
	return nil
}

func (c *Context) liveLocked() error {
	if c.c == nil {
		return fmt.Errorf("%w: context", ErrClosed)
	}
	return nil
}

// Model returns the model of the context.
func (c *Context) Model() *Model { return c.model }

// Raw returns the *llama_context, for state-mode calls (Compress) and for
// code that drives llama.cpp directly. It is valid until Close. Tokens
// decoded through it are not reported to the observer (the context does not
// know their positions), and the context's cell count needs a Resync (after
// which a sequence that gained tokens cannot record attention until Cleared).
func (c *Context) Raw() unsafe.Pointer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return unsafe.Pointer(c.c)
}

// Capacity is the number of KV cells of each sequence (n_ctx_seq: the
// requested n_ctx padded to a multiple of 256).
func (c *Context) Capacity() int { return c.capacity }

// Seqs is the number of sequences the context holds (ids 0..Seqs-1).
func (c *Context) Seqs() int { return c.seqs }

// FlashAttn is the flash attention setting the context was created with.
func (c *Context) FlashAttn() FlashAttn { return c.opts.FlashAttn }

// BatchSize is the most tokens one llama_decode call takes.
func (c *Context) BatchSize() int { return c.nBatch }

// CellBytes is what one KV cell takes over all layers, K and V, in the
// cache's own types.
func (c *Context) CellBytes() int64 { return c.cellBytes }

// CacheShape describes the cache; it makes Context a hooks.Runtime.
func (c *Context) CacheShape() hooks.CacheShape { return c.shape }

var _ hooks.PositionEvictor = (*Context)(nil)

// SetObserver attaches o (normally an *adapter.Compressor built on this
// context) to receive every decoded layer's keys, prefill and cache-pressure
// events; nil detaches it. Keys of tokens decoded before attaching are not
// seen.
func (c *Context) SetObserver(o hooks.Observer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.obs = o
	c.observed = o != nil
	c.setCallbacks()
}

// setCallbacks tells cb_eval what to ask for: keys for an observer (and for
// the attention recorder, which checks the batch order on them), attention
// probabilities for the recorder, and the cache rows written whenever either
// is attached (the cell map follows the sequence from then on).
func (c *Context) setCallbacks() {
	if c.cb == nil {
		return
	}
	var e C.int
	if c.observed || c.attnF != nil {
		e |= C.KVN_KEYS | C.KVN_CELLS
	}
	if c.attnF != nil {
		e |= C.KVN_ATTN
	}
	c.cbWant = e
	c.cb.enabled = e
}

// EnableCompression builds a compressor for policy on this context and
// attaches it: keys are streamed from then on, each Prompt compresses after
// prefill, and a batch that does not fit compresses its sequence first.
// llama.cpp cells are shared by all heads, so the policy must be per-token.
func (c *Context) EnableCompression(p adapter.Policy) (*adapter.Compressor, error) {
	if c.model != nil {
		if err := c.model.info.keysReadable(); err != nil {
			return nil, err
		}
	}
	comp, err := adapter.New(c, p)
	if err != nil {
		return nil, err
	}
	c.SetObserver(comp)
	return comp, nil
}

func (c *Context) observer() hooks.Observer {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.obs
}

func (c *Context) checkSeq(seq hooks.SeqID) error {
	if seq < 0 || int(seq) >= c.seqs {
		return fmt.Errorf("%w: sequence %d outside the context's %d sequences", ErrBadInput, seq, c.seqs)
	}
	return nil
}

// Cells is the number of KV cells seq holds.
func (c *Context) Cells(seq hooks.SeqID) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.checkSeq(seq) != nil {
		return 0
	}
	return c.live[seq].n
}

// Positions returns the positions seq holds in the cache, ascending.
func (c *Context) Positions(seq hooks.SeqID) []hooks.Pos {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.checkSeq(seq) != nil {
		return nil
	}
	return c.live[seq].list()
}

// PosRange returns llama.cpp's smallest and largest position of seq
// (llama_memory_seq_pos_min/max), -1 when empty. With evicted holes the range
// is not dense.
func (c *Context) PosRange(seq hooks.SeqID) (lo, hi hooks.Pos, err error) {
	if err := c.lockSeq(seq); err != nil {
		return -1, -1, err
	}
	defer c.mu.Unlock()
	return hooks.Pos(C.llama_memory_seq_pos_min(c.mem, C.llama_seq_id(seq))), hooks.Pos(C.llama_memory_seq_pos_max(c.mem, C.llama_seq_id(seq))), nil
}

// Clear removes every cell of seq and tells the observer to forget it.
func (c *Context) Clear(seq hooks.SeqID) error {
	if err := c.lockSeq(seq); err != nil {
		return err
	}
	c.dropSeqLocked(seq)
	obs := c.obs
	c.mu.Unlock()
	if obs != nil {
		obs.Forget(seq, 0, -1)
		// Again once the observer has forgotten the sequence: a plan it made
		// from the old record before that carries an older epoch, even if
		// it read the epoch after the removal above.
		c.mu.Lock()
		c.epochs[seq]++
		c.mu.Unlock()
	}
	return nil
}

// dropSeqLocked removes every cell of seq from llama.cpp and from the
// context's account, and starts a new epoch (c.mu held).
func (c *Context) dropSeqLocked(seq hooks.SeqID) {
	C.llama_memory_seq_rm(c.mem, C.llama_seq_id(seq), -1, -1)
	c.live[seq] = posSet{}
	c.held[seq] = posSet{}
	c.cells[seq] = emptyCells(c.capacity)
	c.cellsKnown[seq] = true
	c.epochs[seq]++
}

// SeqEpoch is the number of times seq was cleared; a compressor reads it
// when it plans (it implements hooks.SequenceEpochs).
func (c *Context) SeqEpoch(seq hooks.SeqID) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.checkSeq(seq) != nil {
		return 0
	}
	return c.epochs[seq]
}

// EvictPositionsInEpoch is EvictPositions for a plan made when seq's epoch
// was epoch: if seq was cleared since, it refuses with hooks.ErrStalePlan and
// touches nothing (the positions may now hold a new prompt).
func (c *Context) EvictPositionsInEpoch(seq hooks.SeqID, epoch uint64, positions []hooks.Pos) error {
	if err := c.lockSeq(seq); err != nil {
		return err
	}
	defer c.mu.Unlock()
	if c.epochs[seq] != epoch {
		return fmt.Errorf("%w: seq %d was cleared %d time(s) since the plan was made", hooks.ErrStalePlan, seq, c.epochs[seq]-epoch)
	}
	return c.evictLocked(seq, positions)
}

var _ hooks.SequenceEpochs = (*Context)(nil)

// EvictPositions frees the cells of seq at positions with
// llama_memory_seq_rm, one run of consecutive positions at a time, then moves
// the sequence's remaining cells to the front of its stream (unless the
// context was created with KeepHoles), so that decoding attends over the
// kept cells only (compact.go). Every position must be live and none may be
// the last one of seq (the next token goes after it). It implements
// hooks.PositionEvictor; it never touches another sequence.
func (c *Context) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error {
	if err := c.lockSeq(seq); err != nil {
		return err
	}
	defer c.mu.Unlock()
	return c.evictLocked(seq, positions)
}

func (c *Context) evictLocked(seq hooks.SeqID, positions []hooks.Pos) error {
	set := &c.live[seq]
	last := set.max()
	for i, p := range positions {
		switch {
		case i > 0 && p <= positions[i-1]:
			return fmt.Errorf("%w: evict seq %d: positions not ascending at index %d (%d after %d)", ErrBadInput, seq, i, p, positions[i-1])
		case !set.has(p):
			return fmt.Errorf("%w: evict seq %d: position %d is not in the cache", ErrBadInput, seq, p)
		case p == last:
			return fmt.Errorf("%w: evict seq %d: position %d is the last one; the next token goes after it", ErrBadInput, seq, p)
		}
	}
	for i := 0; i < len(positions); {
		j := i + 1
		for j < len(positions) && positions[j] == positions[j-1]+1 {
			j++
		}
		p0, p1 := positions[i], positions[j-1]+1
		if !C.llama_memory_seq_rm(c.mem, C.llama_seq_id(seq), C.llama_pos(p0), C.llama_pos(p1)) {
			return &CError{Func: "llama_memory_seq_rm", Code: 0, Msg: fmt.Sprintf("seq %d positions [%d,%d)", seq, p0, p1), Err: ErrDecode}
		}
		for p := p0; p < p1; p++ {
			set.del(p)
			c.held[seq].del(p)
		}
		i = j
	}
	c.forgetCells(seq)
	if len(positions) == 0 {
		return nil
	}
	return c.compactLocked(seq)
}

// SeqState returns llama_state_seq_get_data of seq: its cells, keys and
// values, as llama.cpp serializes them (ParseSeqState reads it).
func (c *Context) SeqState(seq hooks.SeqID) ([]byte, error) {
	if err := c.lockSeq(seq); err != nil {
		return nil, err
	}
	defer c.mu.Unlock()
	return statemode.ReadBytes(LinkedFuncs, uintptr(unsafe.Pointer(c.c)), seq)
}

// Resync re-reads which positions seq holds from llama.cpp's state. The
// context keeps its own account of the cells it decoded and evicted; call
// Resync after changing the cache behind its back (state-mode Compress on
// Raw, or llama_memory_* calls of your own). The attached observer, if any,
// is not told: Forget what it should not plan for.
func (c *Context) Resync(seq hooks.SeqID) error {
	if err := c.lockSeq(seq); err != nil {
		return err
	}
	defer c.mu.Unlock()
	b, err := statemode.ReadBytes(LinkedFuncs, uintptr(unsafe.Pointer(c.c)), seq)
	if err != nil {
		return err
	}
	st, err := ParseSeqState(b)
	if err != nil {
		return err
	}
	var set posSet
	for _, cell := range st.Cells {
		set.add(cell.Pos)
	}
	c.live[seq] = set
	for _, p := range c.held[seq].list() {
		if !set.has(p) {
			c.held[seq].del(p)
		}
	}
	// Removals behind our back keep the cell map valid; anything else
	// (tokens decoded through Raw, shifted positions) makes it unknown.
	if n := c.forgetCells(seq); n != set.n {
		c.cellsKnown[seq] = false
	}
	return nil
}

// Decode appends tokens to seq after its last position and returns the
// logits of the last token. See DecodeOutputs.
func (c *Context) Decode(seq hooks.SeqID, tokens []Token) ([]float32, error) {
	if len(tokens) == 0 {
		return nil, fmt.Errorf("%w: decode seq %d: no tokens", ErrBadInput, seq)
	}
	out, err := c.DecodeOutputs(seq, tokens, []int{len(tokens) - 1})
	if err != nil {
		return nil, err
	}
	return out[0], nil
}

// DecodeOutputs appends tokens to seq after its last position (position 0 for
// an empty sequence) and returns the logits (vocabulary-sized copies) of the
// tokens at the given indices of tokens, in that order (-1 is the last).
//
// Inputs longer than BatchSize are decoded in chunks. Before a chunk that
// does not fit in the free cells of seq, the attached observer (if any) is
// told of the cache pressure and compresses seq; without one the error wraps
// ErrContextFull. It does not signal the end of a prompt: use Prompt for that.
func (c *Context) DecodeOutputs(seq hooks.SeqID, tokens []Token, outputs []int) ([][]float32, error) {
	if err := c.checkSeq(seq); err != nil {
		return nil, err
	}
	if len(tokens) == 0 {
		return nil, fmt.Errorf("%w: decode seq %d: no tokens", ErrBadInput, seq)
	}
	if err := c.model.checkTokens(tokens); err != nil {
		return nil, fmt.Errorf("decode seq %d: %w", seq, err)
	}
	want := make(map[int][]int, len(outputs)) // token index -> output slots
	for k, i := range outputs {
		if i < 0 {
			i += len(tokens)
		}
		if i < 0 || i >= len(tokens) {
			return nil, fmt.Errorf("%w: decode seq %d: output index %d outside %d tokens", ErrBadInput, seq, outputs[k], len(tokens))
		}
		want[i] = append(want[i], k)
	}
	out := make([][]float32, len(outputs))
	for start := 0; start < len(tokens); start += c.nBatch {
		end := min(start+c.nBatch, len(tokens))
		if err := c.makeRoom(seq, end-start); err != nil {
			return nil, err
		}
		r, err := c.decodeChunk(seq, tokens[start:end], len(tokens), start, want, out)
		if err != nil {
			return nil, err
		}
		// The observer is called without c.mu: it may evict through
		// EvictPositions, which takes c.mu (lock order: observer, then c.mu).
		// Keys first, then the attention that reads them.
		for _, b := range r.keys {
			if err := r.obs.ObserveKeys(b); err != nil {
				return nil, fmt.Errorf("llamacpp: seq %d: recording keys of layer %d: %w", seq, b.Layer, err)
			}
		}
		for _, a := range r.attn {
			if err := r.attnF(a); err != nil {
				return nil, fmt.Errorf("llamacpp: seq %d: attention of layer %d: %w", seq, a.Layer, err)
			}
		}
	}
	return out, nil
}

// decoded is what one chunk's decode recorded, for DecodeOutputs to hand out
// once c.mu is released.
type decoded struct {
	keys  []*hooks.KeyBatch
	obs   hooks.Observer
	attn  []*Attention
	attnF func(*Attention) error
}

// makeRoom compresses seq through the observer when n tokens do not fit.
func (c *Context) makeRoom(seq hooks.SeqID, n int) error {
	c.mu.Lock()
	if err := c.liveLocked(); err != nil {
		c.mu.Unlock()
		return err
	}
	free := c.capacity - c.live[seq].n
	obs := c.obs
	c.mu.Unlock()
	if n <= free {
		return nil
	}
	if obs == nil {
		return fmt.Errorf("%w: seq %d: %d tokens need cells but %d of %d are free and no compressor is attached", ErrContextFull, seq, n, free, c.capacity)
	}
	if err := c.ReportDeferredKeys(seq, obs); err != nil {
		return fmt.Errorf("llamacpp: make room for %d tokens in seq %d: %w", n, seq, err)
	}
	// The observer evicts through EvictPositions, which takes c.mu itself.
	if _, err := obs.CachePressure(seq, free, n); err != nil {
		return fmt.Errorf("llamacpp: make room for %d tokens in seq %d: %w", n, seq, err)
	}
	c.mu.Lock()
	free = c.capacity - c.live[seq].n
	c.mu.Unlock()
	if n > free {
		return fmt.Errorf("%w: seq %d: %d tokens need cells but only %d of %d are free after compression", ErrContextFull, seq, n, free, c.capacity)
	}
	return nil
}

// decodeChunk decodes at most one batch of tokens of one sequence (one
// llama.cpp ubatch, so the callback's tensors are exactly this batch). It
// returns the key norms the callback recorded, one batch per layer, and the
// attention of every layer when recording, for the caller to hand out once
// c.mu is released.
func (c *Context) decodeChunk(seq hooks.SeqID, toks []Token, callLen, offset int, want map[int][]int, out [][]float32) (*decoded, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.liveLocked(); err != nil {
		return nil, err
	}
	r := &decoded{obs: c.obs, attnF: c.attnF}
	var err error
	c.callLen = callLen
	r.keys, err = c.decodeLocked(seq, toks, offset, want, out)
	if err != nil {
		return nil, err
	}
	if r.attnF != nil {
		if r.attn, err = c.attentionLocked(seq); err != nil {
			return nil, err
		}
	}
	return r, nil
}

func (c *Context) decodeLocked(seq hooks.SeqID, toks []Token, offset int, want map[int][]int, out [][]float32) ([]*hooks.KeyBatch, error) {
	set := &c.live[seq]
	next := hooks.Pos(C.llama_memory_seq_pos_max(c.mem, C.llama_seq_id(seq))) + 1
	if m := set.max(); m+1 > next {
		next = m + 1
	}
	if int64(next)+int64(len(toks)) > math.MaxInt32 {
		return nil, fmt.Errorf("%w: seq %d: positions overflow int32", ErrBadInput, seq)
	}
	n := len(toks)
	b := &c.batch
	b.n_tokens = C.int32_t(n)
	tok := unsafe.Slice(b.token, n)
	pos := unsafe.Slice(b.pos, n)
	nseq := unsafe.Slice(b.n_seq_id, n)
	sids := unsafe.Slice(b.seq_id, n)
	logits := unsafe.Slice(b.logits, n)
	c.curSeqs = slices.Grow(c.curSeqs[:0], n)[:n]
	c.curPos = slices.Grow(c.curPos[:0], n)[:n]
	for i, t := range toks {
		tok[i] = C.llama_token(t)
		pos[i] = C.llama_pos(next + hooks.Pos(i))
		nseq[i] = 1
		*sids[i] = C.llama_seq_id(seq)
		logits[i] = 0
		if _, ok := want[offset+i]; ok {
			logits[i] = 1
		}
		c.curSeqs[i] = seq
		c.curPos[i] = next + hooks.Pos(i)
	}
	c.cbErr = nil
	clear(c.seen)
	clear(c.attnW)
	c.curCells = c.curCells[:0]
	c.cb.cells_seen = 0
	// A short batch (a generated token) of an observed sequence is decoded
	// without cb_eval asking for any node, so the scheduler runs the graph
	// whole instead of splitting it at every layer's keys; its keys are
	// read later, from the state, if a compression needs them.
	hold := c.holdKeys(c.callLen)
	c.cb.enabled = c.cbWant
	if hold {
		c.cb.enabled = 0
	}
	tracking := c.cb.enabled&C.KVN_CELLS != 0
	c.decoding = true
	rc := C.llama_decode(c.c, c.batch)
	c.decoding = false
	if rc != 0 {
		c.cellsKnown[seq] = false // whatever llama.cpp kept of the batch is not in the cell map
		return nil, decodeError(int(rc), fmt.Sprintf("seq %d, %d tokens at position %d", seq, n, next))
	}
	for i := range toks {
		set.add(next + hooks.Pos(i))
	}
	if tracking && c.cbErr == nil && len(c.curCells) != n {
		c.cbErr = fmt.Errorf("%w: the batch's cache rows were not seen (kvnorm looks for the SET_ROWS node writing cache_k_l*)", hooks.ErrUnsupported)
	}
	if tracking && c.cbErr == nil {
		for i, cell := range c.curCells {
			c.cells[seq][cell] = next + hooks.Pos(i)
		}
	} else {
		c.cellsKnown[seq] = false
	}
	if c.cbErr != nil {
		c.rollbackLocked(seq, next, n)
		return nil, fmt.Errorf("llamacpp: seq %d: recording keys: %w", seq, c.cbErr)
	}
	for i := range toks {
		slots, ok := want[offset+i]
		if !ok {
			continue
		}
		p := C.llama_get_logits_ith(c.c, C.int32_t(i))
		if p == nil {
			return nil, &CError{Func: "llama_get_logits_ith", Code: i, Msg: "no logits", Err: ErrDecode}
		}
		row := slices.Clone(unsafe.Slice((*float32)(unsafe.Pointer(p)), c.model.info.Vocab))
		for _, k := range slots {
			out[k] = row
		}
	}
	if c.obs == nil {
		return nil, nil
	}
	if hold {
		for i := range toks {
			c.held[seq].add(next + hooks.Pos(i))
		}
		return nil, nil
	}
	batches := make([]*hooks.KeyBatch, 0, c.shape.Layers)
	for l := range c.shape.Layers {
		if !c.seen[l] {
			c.rollbackLocked(seq, next, n)
			return nil, fmt.Errorf("%w: seq %d: no post-RoPE keys of layer %d in the graph (kvnorm looks for the ROPE node named Kcur-%d; %s may name it otherwise)",
				hooks.ErrUnsupported, seq, l, l, c.model.info.Arch)
		}
		batches = append(batches, &hooks.KeyBatch{
			Layer: l, Seqs: slices.Clone(c.curSeqs), Positions: slices.Clone(c.curPos),
			Norms: slices.Clone(c.norms[l][:n*c.shape.KVHeads]),
		})
	}
	return batches, nil
}

// rollbackLocked takes the n positions from next that llama_decode just
// stored in seq out of the cache again, when the batch's keys could not be
// recorded: the failed Decode then leaves the sequence as it was, and a retry
// does not hold the tokens twice.
func (c *Context) rollbackLocked(seq hooks.SeqID, next hooks.Pos, n int) {
	C.llama_memory_seq_rm(c.mem, C.llama_seq_id(seq), C.llama_pos(next), C.llama_pos(next+hooks.Pos(n)))
	for i := range n {
		c.live[seq].del(next + hooks.Pos(i))
	}
	c.cellsKnown[seq] = false
}

// observeTensor is called by the cb_eval callback (on the goroutine running
// llama_decode, with c.mu held) with a computed "Kcur-N" ROPE tensor: it
// copies the keys into a reused buffer and reduces them to per-head L2 norms
// (kernels.Norms, as the compressor would). The observer gets them after
// llama_decode returns, from DecodeOutputs without c.mu: calling it here,
// under c.mu, could deadlock with a compression that evicts. Errors are kept
// for decodeLocked to report; the graph always runs to the end.
func (c *Context) observeTensor(t unsafe.Pointer) {
	if !c.decoding || c.cbErr != nil {
		return // a llama_decode through Raw: its batch is unknown here
	}
	d := C.kvn_describe((*C.struct_ggml_tensor)(t))
	sh := c.shape
	n := len(c.curPos)
	if c.attnF != nil && d.layer == 0 {
		c.checkOrder(t)
	}
	if c.obs == nil {
		return // keys asked for by the attention recorder only
	}
	switch {
	case d.layer < 0 || int(d.layer) >= sh.Layers:
		c.cbErr = fmt.Errorf("%w: key tensor of layer %d outside %d layers", hooks.ErrBadBatch, d.layer, sh.Layers)
	case d._type != C.GGML_TYPE_F32 || d.contiguous == 0:
		c.cbErr = fmt.Errorf("%w: layer %d: key tensor of ggml type %d (contiguous %d): want contiguous f32", hooks.ErrBadBatch, d.layer, d._type, d.contiguous)
	case int(d.ne0) != sh.HeadDim || int(d.ne1) != sh.KVHeads || int(d.ne2) != n || d.ne3 != 1:
		c.cbErr = fmt.Errorf("%w: layer %d: key tensor [%d %d %d %d], want [head dim %d, kv heads %d, tokens %d, 1]",
			hooks.ErrBadBatch, d.layer, d.ne0, d.ne1, d.ne2, d.ne3, sh.HeadDim, sh.KVHeads, n)
	}
	if c.cbErr != nil {
		return
	}
	elems := n * sh.KVHeads * sh.HeadDim
	if int(d.nbytes) != 4*elems {
		c.cbErr = fmt.Errorf("%w: layer %d: key tensor of %d bytes, want %d", hooks.ErrBadBatch, d.layer, d.nbytes, 4*elems)
		return
	}
	l := int(d.layer)
	c.keyBuf = slices.Grow(c.keyBuf[:0], elems)[:elems]
	C.ggml_backend_tensor_get((*C.struct_ggml_tensor)(t), unsafe.Pointer(&c.keyBuf[0]), 0, C.size_t(4*elems))
	c.norms[l] = slices.Grow(c.norms[l][:0], n*sh.KVHeads)[:n*sh.KVHeads]
	if err := kernels.NormsF32(c.norms[l], c.keyBuf, sh.HeadDim); err != nil {
		c.cbErr = fmt.Errorf("%w: layer %d: %w", hooks.ErrBadBatch, l, err)
		return
	}
	c.seen[l] = true
}

// Prompt decodes a prompt into seq (in chunks, compressing between chunks
// under cache pressure when a compressor is attached), then tells the
// observer the prefill is done, which compresses seq to the policy's budget.
// It returns the logits of the last prompt token, computed with the full
// cache, and the prefill compression's stats (zero without an observer).
func (c *Context) Prompt(seq hooks.SeqID, tokens []Token) ([]float32, hooks.Stats, error) {
	logits, err := c.Decode(seq, tokens)
	if err != nil {
		return nil, hooks.Stats{}, err
	}
	st, err := c.PrefillDone(seq)
	return logits, st, err
}

// PrefillDone tells the observer that seq's prompt has been decoded; it
// compresses seq to the policy's budget. Without an observer it does nothing.
func (c *Context) PrefillDone(seq hooks.SeqID) (hooks.Stats, error) {
	obs := c.observer()
	if obs == nil {
		return hooks.Stats{}, nil
	}
	// Keys held back (a prompt shorter than holdBelow, generated tokens)
	// reach the observer first, whatever runtime it plans for.
	if err := c.ReportDeferredKeys(seq, obs); err != nil {
		return hooks.Stats{}, fmt.Errorf("llamacpp: compress seq %d after prefill: %w", seq, err)
	}
	st, err := obs.PrefillDone(seq)
	if err != nil {
		return st, fmt.Errorf("llamacpp: compress seq %d after prefill: %w", seq, err)
	}
	return st, nil
}

// Generate decodes prompt into seq (Prompt), then samples up to MaxTokens
// tokens, decoding each one so the next can be sampled. Under cache pressure
// the attached compressor makes room; without one the generation stops with
// an error wrapping ErrContextFull. ctx cancels between tokens.
func (c *Context) Generate(ctx context.Context, seq hooks.SeqID, prompt []Token, o GenerateOptions) (*Generation, error) {
	if len(prompt) == 0 {
		return nil, fmt.Errorf("%w: generate: empty prompt", ErrBadInput)
	}
	if o.MaxTokens < 0 {
		return nil, fmt.Errorf("%w: generate: max tokens %d must be >= 0", ErrBadInput, o.MaxTokens)
	}
	g := &Generation{PromptTokens: len(prompt), Stop: "max_tokens"}
	t0 := time.Now()
	logits, err := c.Decode(seq, prompt)
	if err != nil {
		return nil, err
	}
	t1 := time.Now()
	g.PrefillTime = t1.Sub(t0)
	g.CellsBefore = c.Cells(seq)
	if g.Prefill, err = c.PrefillDone(seq); err != nil {
		return nil, err
	}
	g.CompressTime = time.Since(t1)
	g.CellsAfter = c.Cells(seq)
	s := o.Sampler
	t2 := time.Now()
	var text []byte
	for len(g.Tokens) < o.MaxTokens {
		if err := ctx.Err(); err != nil {
			return g, err
		}
		tok := s.Sample(logits)
		if !o.IgnoreEOG && c.model.IsEOG(tok) {
			g.Stop = "eog"
			break
		}
		g.Tokens = append(g.Tokens, tok)
		piece, err := c.model.Piece(tok)
		if err != nil {
			return g, err
		}
		text = append(text, piece...)
		if o.OnToken != nil && !o.OnToken(tok, piece) {
			g.Stop = "callback"
			break
		}
		if len(g.Tokens) == o.MaxTokens {
			break
		}
		if logits, err = c.Decode(seq, []Token{tok}); err != nil {
			return g, err
		}
		g.Decoded++
	}
	g.DecodeTime = time.Since(t2)
	g.Text = string(text)
	g.CellsEnd = c.Cells(seq)
	return g, nil
}
