package statemode

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// maxStateBytes bounds what llama_state_seq_get_size may ask for (1 TiB).
const maxStateBytes = 1 << 40

// CheckMemory refuses a context whose memory state mode cannot compress,
// before any state is read: a recurrent or hybrid model (the state holds
// recurrent rows, not one K cache per layer), or a sliding-window model
// (llama.cpp's iSWA cache writes two K caches per sequence). The error wraps
// ErrMemoryType and names the memory type and the llama.cpp call that told.
func CheckMemory(f *Funcs, ctx uintptr) error {
	if err := f.Check(); err != nil {
		return err
	}
	if ctx == 0 {
		return fmt.Errorf("%w: nil llama_context", ErrBadInput)
	}
	model := f.GetModel(ctx)
	if model == 0 {
		return fmt.Errorf("%w: llama_get_model returned NULL", ErrState)
	}
	switch {
	case f.ModelIsRecurrent(model):
		return fmt.Errorf("%w: recurrent memory (llama_model_is_recurrent): state mode reads one K cache per layer", ErrMemoryType)
	case f.ModelIsHybrid(model):
		return fmt.Errorf("%w: hybrid attention/recurrent memory (llama_model_is_hybrid): state mode reads one K cache per layer", ErrMemoryType)
	}
	if swa := f.ModelNSwa(model); swa > 0 {
		return fmt.Errorf("%w: sliding-window memory (llama_model_n_swa=%d, an iSWA cache with two K caches per sequence)", ErrMemoryType, swa)
	}
	return nil
}

// ReadBytes copies llama_state_seq_get_data of seq. It refuses a sequence
// whose extent (llama_memory_seq_pos_min/max) changed while it was read: the
// context was decoding in another goroutine.
func ReadBytes(f *Funcs, ctx uintptr, seq int32) ([]byte, error) {
	if err := CheckMemory(f, ctx); err != nil {
		return nil, err
	}
	if seq < 0 {
		return nil, fmt.Errorf("%w: sequence %d must be >= 0", ErrBadInput, seq)
	}
	mem := f.GetMemory(ctx)
	if mem == 0 {
		return nil, fmt.Errorf("%w: llama_get_memory returned NULL (a context without a KV cache)", ErrMemoryType)
	}
	lo, hi := f.MemorySeqPosMin(mem, seq), f.MemorySeqPosMax(mem, seq)
	n := f.StateSeqGetSize(ctx, seq)
	if n == 0 {
		return nil, fmt.Errorf("%w: seq %d: llama_state_seq_get_size returned 0", ErrState, seq)
	}
	if n > maxStateBytes {
		return nil, fmt.Errorf("%w: seq %d: llama_state_seq_get_size returned %d bytes", ErrState, seq, n)
	}
	buf := make([]byte, int(n))
	got := f.StateSeqGetData(ctx, unsafe.Pointer(&buf[0]), n, seq)
	if got != n {
		return nil, fmt.Errorf("%w: seq %d: llama_state_seq_get_data wrote %d of %d bytes (the sequence changed while it was read: is the context decoding?)", ErrState, seq, got, n)
	}
	if lo2, hi2 := f.MemorySeqPosMin(mem, seq), f.MemorySeqPosMax(mem, seq); lo2 != lo || hi2 != hi {
		return nil, fmt.Errorf("%w: seq %d went from positions [%d,%d] to [%d,%d] while its state was read: the context is decoding", ErrState, seq, lo, hi, lo2, hi2)
	}
	return buf, nil
}

// Read returns the parsed state of seq of the context.
func Read(f *Funcs, ctx uintptr, seq int32) (*SeqState, error) {
	b, err := ReadBytes(f, ctx, seq)
	if err != nil {
		return nil, err
	}
	return ParseSeqState(b)
}

// evictor is the hooks.PositionEvictor of an app's context: it evicts with
// llama_memory_seq_rm, one run of consecutive positions at a time, and only
// while the sequence still ends where it ended when its state was read.
type evictor struct {
	mu    sync.Mutex
	f     *Funcs
	ctx   uintptr
	seq   hooks.SeqID
	last  hooks.Pos // llama_memory_seq_pos_max when the state was read
	shape hooks.CacheShape
}

func (r *evictor) CacheShape() hooks.CacheShape { return r.shape }

func (r *evictor) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if seq != r.seq {
		return fmt.Errorf("%w: evict seq %d: this compressor read seq %d", ErrBadInput, seq, r.seq)
	}
	mem := r.f.GetMemory(r.ctx)
	last := hooks.Pos(r.f.MemorySeqPosMax(mem, int32(seq)))
	if last != r.last {
		return fmt.Errorf("%w: seq %d now ends at position %d, not %d as when its state was read: read it again", ErrState, seq, last, r.last)
	}
	for i := 0; i < len(positions); {
		j := i + 1
		for j < len(positions) && positions[j] == positions[j-1]+1 {
			j++
		}
		p0, p1 := positions[i], positions[j-1]+1
		if p0 < 0 || p1 > last {
			return fmt.Errorf("%w: evict seq %d: positions [%d,%d) reach the last position %d", ErrBadInput, seq, p0, p1, last)
		}
		if !r.f.MemorySeqRm(mem, int32(seq), int32(p0), int32(p1)) {
			return fmt.Errorf("%w: seq %d: llama_memory_seq_rm of positions [%d,%d) returned false", ErrState, seq, p0, p1)
		}
		i = j
	}
	return nil
}

// NewCompressor reads the keys of seq from the state of a llama.cpp context
// through f and returns a compressor that has recorded their norms and
// evicts from ctx. Use it to inspect a plan (PlanFor, Norms) before applying
// it with Compress(seq, -1); the package function Compress does both.
//
// The keys are read as the cache stores them (f32, f16, bf16 or q8_0). The
// context must not be decoding; the compressor refuses to evict once the
// sequence has grown or shrunk since its state was read.
func NewCompressor(f *Funcs, ctx uintptr, seq int32, policy adapter.Policy) (*adapter.Compressor, error) {
	st, err := Read(f, ctx, seq)
	if err != nil {
		return nil, err
	}
	if len(st.Cells) == 0 {
		return nil, fmt.Errorf("%w: seq %d has no cells", hooks.ErrUnknownSequence, seq)
	}
	model := f.GetModel(ctx)
	kvHeads, nLayer := int(f.ModelNHeadKV(model)), int(f.ModelNLayer(model))
	if kvHeads <= 0 {
		return nil, fmt.Errorf("%w: llama_model_n_head_kv returned %d", ErrState, kvHeads)
	}
	if nLayer != len(st.Layers) {
		return nil, fmt.Errorf("%w: the state has %d layers, llama_model_n_layer returned %d", ErrState, len(st.Layers), nLayer)
	}
	last := hooks.Pos(-1)
	for _, cell := range st.Cells {
		if !containsSeq(cell.Seqs, seq) {
			return nil, fmt.Errorf("%w: cell at position %d does not belong to seq %d", ErrState, cell.Pos, seq)
		}
		last = max(last, cell.Pos)
	}
	if pm := hooks.Pos(f.MemorySeqPosMax(f.GetMemory(ctx), seq)); pm != last {
		return nil, fmt.Errorf("%w: seq %d: the state ends at position %d, llama_memory_seq_pos_max says %d: the context is decoding", ErrState, seq, last, pm)
	}
	batches := make([]*hooks.KeyBatch, len(st.Layers))
	headDim := 0
	for l := range st.Layers {
		b, hd, err := st.keyBatch(l, kvHeads, seq)
		if err != nil {
			return nil, err
		}
		if l > 0 && hd != headDim {
			return nil, fmt.Errorf("%w: layer %d has head dim %d, layer 0 has %d", hooks.ErrUnsupported, l, hd, headDim)
		}
		headDim, batches[l] = hd, b
	}
	rt := &evictor{f: f, ctx: ctx, seq: seq, last: last, shape: hooks.CacheShape{
		Layers: len(st.Layers), KVHeads: kvHeads, HeadDim: headDim,
		Capacity: int(f.NCtxSeq(ctx)),
	}}
	// Only bytes are counted with these: a type the kernels cannot size per
	// head is counted as the type the keys were read in.
	rt.shape.KType, rt.shape.VType = batches[0].DType, batches[0].DType
	if _, err := rt.shape.EntryBytes(); err != nil {
		return nil, err
	}
	comp, err := adapter.New(rt, policy)
	if err != nil {
		return nil, err
	}
	for _, b := range batches {
		if err := comp.ObserveKeys(b); err != nil {
			return nil, fmt.Errorf("statemode: state of seq %d: %w", seq, err)
		}
	}
	return comp, nil
}

// Compress compresses sequence seq of a llama.cpp context in place through
// f: it reads the keys from llama_state_seq_get_data, plans by policy (which
// must be per-token: llama.cpp cells are shared by all heads) and frees the
// evicted cells with llama_memory_seq_rm. The last position always stays, so
// decoding continues at llama_memory_seq_pos_max+1 as before. Call it after
// llama_decode of the prompt returned and before the next one.
func Compress(f *Funcs, ctx uintptr, seq int32, policy adapter.Policy) (hooks.Stats, error) {
	comp, err := NewCompressor(f, ctx, seq, policy)
	if err != nil {
		return hooks.Stats{}, err
	}
	return comp.Compress(seq, -1)
}

func containsSeq(s []hooks.SeqID, seq hooks.SeqID) bool {
	for _, x := range s {
		if x == seq {
			return true
		}
	}
	return false
}
