package hooks

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unsafe"

	"github.com/kvnorm/kvnorm/kernels"
)

// Errors reported through the contract. Implementations wrap them with %w and
// a message naming the value that was wrong.
var (
	// ErrBadBatch reports a KeyBatch whose fields disagree with each other or
	// with the cache shape.
	ErrBadBatch = errors.New("hooks: bad key batch")
	// ErrUnknownSequence reports an event for a sequence the observer has no
	// record of.
	ErrUnknownSequence = errors.New("hooks: unknown sequence")
	// ErrUnsupported reports a plan the runtime cannot apply, such as a
	// per-head plan sent to a runtime whose cells are shared by all heads.
	ErrUnsupported = errors.New("hooks: unsupported by this runtime")
	// ErrStalePlan reports a plan made for a sequence that was cleared (and
	// perhaps refilled) before the plan reached the runtime.
	ErrStalePlan = errors.New("hooks: stale plan: the sequence was cleared after it was planned")
)

// SeqID identifies a sequence of a runtime's cache (llama_seq_id in
// llama.cpp, the seq of an input.Batch in Ollama).
type SeqID = int32

// Pos is a token position within a sequence.
type Pos = int32

// CacheShape describes a runtime's KV cache, so the compressor can size its
// bookkeeping and count the bytes a plan frees.
type CacheShape struct {
	Layers  int // number of layers with a KV cache
	KVHeads int // KV heads per layer
	HeadDim int // elements per key (and per value) of one head
	// KType and VType are the storage types of the cached keys and values;
	// they are used only to count bytes.
	KType, VType kernels.DType
	// Capacity is the number of cells per sequence (0 if unknown).
	Capacity int
}

// Validate reports whether the shape is usable.
func (s CacheShape) Validate() error {
	switch {
	case s.Layers <= 0:
		return fmt.Errorf("%w: cache shape: layers=%d must be > 0", ErrBadBatch, s.Layers)
	case s.KVHeads <= 0:
		return fmt.Errorf("%w: cache shape: kv heads=%d must be > 0", ErrBadBatch, s.KVHeads)
	case s.HeadDim <= 0:
		return fmt.Errorf("%w: cache shape: head dim=%d must be > 0", ErrBadBatch, s.HeadDim)
	case s.Capacity < 0:
		return fmt.Errorf("%w: cache shape: capacity=%d must be >= 0", ErrBadBatch, s.Capacity)
	}
	if _, err := s.EntryBytes(); err != nil {
		return err
	}
	return nil
}

// EntryBytes is the number of bytes one (layer, head, position) entry takes
// in the cache: one key row plus one value row.
func (s CacheShape) EntryBytes() (int64, error) {
	k, err := s.KType.RowBytes(s.HeadDim)
	if err != nil {
		return 0, fmt.Errorf("cache shape: key type: %w", err)
	}
	v, err := s.VType.RowBytes(s.HeadDim)
	if err != nil {
		return 0, fmt.Errorf("cache shape: value type: %w", err)
	}
	return int64(k + v), nil
}

// KeyBatch is what a runtime reports for one layer of one forward batch: the
// post-RoPE keys (or their norms) of every token in the batch.
//
// Token i of the batch belongs to sequence Seqs[i] at position Positions[i].
// Keys are laid out as ggml's [HeadDim, KVHeads, n] tensor: token-major, then
// head, then the HeadDim elements of one key, each row encoded as DType.
// Exactly one of Keys and Norms is set; Norms is laid out [n][KVHeads].
type KeyBatch struct {
	Layer     int
	Seqs      []SeqID
	Positions []Pos
	DType     kernels.DType
	Keys      []byte
	Norms     []float32
}

// Len is the number of tokens in the batch.
func (b *KeyBatch) Len() int { return len(b.Positions) }

// Validate checks the batch against a cache shape.
func (b *KeyBatch) Validate(shape CacheShape) error {
	n := len(b.Positions)
	if len(b.Seqs) != n {
		return fmt.Errorf("%w: layer %d: %d seqs for %d positions", ErrBadBatch, b.Layer, len(b.Seqs), n)
	}
	if b.Layer < 0 || b.Layer >= shape.Layers {
		return fmt.Errorf("%w: layer=%d out of range [0,%d)", ErrBadBatch, b.Layer, shape.Layers)
	}
	for i, p := range b.Positions {
		if p < 0 {
			return fmt.Errorf("%w: layer %d: token %d has negative position %d", ErrBadBatch, b.Layer, i, p)
		}
	}
	switch {
	case b.Keys != nil && b.Norms != nil:
		return fmt.Errorf("%w: layer %d: both keys and norms set", ErrBadBatch, b.Layer)
	case b.Norms != nil:
		if len(b.Norms) != n*shape.KVHeads {
			return fmt.Errorf("%w: layer %d: %d norms, want tokens*kvHeads = %d*%d", ErrBadBatch, b.Layer, len(b.Norms), n, shape.KVHeads)
		}
	default:
		rb, err := b.DType.RowBytes(shape.HeadDim)
		if err != nil {
			return fmt.Errorf("%w: layer %d: %w", ErrBadBatch, b.Layer, err)
		}
		if want := n * shape.KVHeads * rb; len(b.Keys) != want {
			return fmt.Errorf("%w: layer %d: %d key bytes, want tokens*kvHeads*rowBytes = %d*%d*%d = %d (dtype %s, head dim %d)",
				ErrBadBatch, b.Layer, len(b.Keys), n, shape.KVHeads, rb, want, b.DType, shape.HeadDim)
		}
	}
	return nil
}

// F32Bytes views a float32 slice as its little-endian bytes without copying,
// for runtimes that hold keys as []float32.
func F32Bytes(f []float32) []byte {
	if len(f) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&f[0])), len(f)*4)
}

// Granularity says whether all heads share one keep set or each KV head of
// each layer keeps its own.
type Granularity uint8

const (
	// PerToken keeps one set of positions for all layers and heads, for caches
	// whose cells are shared (llama.cpp).
	PerToken Granularity = iota
	// PerHead lets each KV head of each layer keep its own lowest-norm
	// positions, the same count per head (the paper).
	PerHead
)

// String returns "per-token" or "per-head".
func (g Granularity) String() string {
	switch g {
	case PerToken:
		return "per-token"
	case PerHead:
		return "per-head"
	}
	return fmt.Sprintf("granularity(%d)", uint8(g))
}

// ParseGranularity parses "per-token" or "per-head" (any case, as
// adapter.ParseMethod).
func ParseGranularity(s string) (Granularity, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "per-token", "token", "pertoken":
		return PerToken, nil
	case "per-head", "head", "perhead":
		return PerHead, nil
	}
	return 0, fmt.Errorf("granularity %q: want per-token or per-head", s)
}

// TokenPlan evicts whole positions of one sequence from every layer and head.
type TokenPlan struct {
	Seq   SeqID
	Evict []Pos // ascending
	Keep  []Pos // ascending; Keep ∪ Evict are the live positions before the plan
}

// HeadPlan keeps, in each layer and KV head, its own positions of one
// sequence. Layers[l] is nil when layer l keeps every live position;
// otherwise Layers[l][h] lists the positions head h keeps, ascending, and every
// head of a layer keeps the same count.
type HeadPlan struct {
	Seq    SeqID
	Layers [][][]Pos
}

// KeepCount returns the number of positions each head of layer l keeps, or -1
// when the layer keeps everything.
func (p *HeadPlan) KeepCount(l int) int {
	if l < 0 || l >= len(p.Layers) || p.Layers[l] == nil {
		return -1
	}
	if len(p.Layers[l]) == 0 {
		return 0
	}
	return len(p.Layers[l][0])
}

// Runtime is what every runtime tells the compressor about its cache.
type Runtime interface {
	CacheShape() CacheShape
}

// PositionEvictor is implemented by runtimes that free whole positions of a
// sequence (every layer and head at once).
type PositionEvictor interface {
	Runtime
	// EvictPositions frees the cells of seq at the given ascending positions.
	// It must not touch any other sequence and must leave the last position
	// of seq in place (the plan never lists it).
	EvictPositions(seq SeqID, positions []Pos) error
}

// HeadCompactor is implemented by runtimes that keep a separate set of
// positions per layer and KV head and can compact them.
type HeadCompactor interface {
	Runtime
	// CompactHeads keeps only the plan's positions in each planned layer and
	// head of plan.Seq, moving them so attention runs over kept cells only.
	CompactHeads(plan *HeadPlan) error
}

// DeferredKeys is implemented by runtimes that hold back the keys of some
// decoded tokens instead of reporting them as they are decoded: reading keys
// back at every decode step costs more than it is worth while no compression
// is due (llama.cpp splits each graph at every node it is asked to hand out).
// Before it plans a compression of seq, the compressor calls
// ReportDeferredKeys; the runtime reports every key of seq it held back to
// obs (through ObserveKeys) before returning. It is called without the
// compressor's lock, so the runtime may take its own.
type DeferredKeys interface {
	ReportDeferredKeys(seq SeqID, obs Observer) error
}

// SequenceEpochs is implemented by runtimes whose sequences can be cleared
// and refilled between the moment a plan is made and the moment it is
// applied (the compressor plans under its lock and applies without it). A
// sequence's epoch changes every time it is cleared; the compressor reads it
// before planning and applies the plan with EvictPositionsInEpoch, which
// refuses with ErrStalePlan, touching nothing, when the epoch moved.
type SequenceEpochs interface {
	SeqEpoch(seq SeqID) uint64
	EvictPositionsInEpoch(seq SeqID, epoch uint64, positions []Pos) error
}

// Trigger says why a compression ran.
type Trigger uint8

const (
	// TriggerPrefill runs once the prompt has been decoded.
	TriggerPrefill Trigger = iota
	// TriggerPressure runs before a batch that would not fit in the cache.
	TriggerPressure
	// TriggerExplicit runs on the application's request.
	TriggerExplicit
)

// String returns "prefill", "pressure" or "explicit".
func (t Trigger) String() string {
	switch t {
	case TriggerPrefill:
		return "prefill"
	case TriggerPressure:
		return "pressure"
	case TriggerExplicit:
		return "explicit"
	}
	return fmt.Sprintf("trigger(%d)", uint8(t))
}

// Stats describe one compression of one sequence.
type Stats struct {
	Seq         SeqID  `json:"seq"`
	Trigger     string `json:"trigger"`
	Policy      string `json:"policy"`
	Granularity string `json:"granularity"`
	// Skipped is true when nothing was evicted because the sequence was
	// shorter than the policy's minimum or already within budget.
	Skipped bool `json:"skipped"`
	// PositionsBefore and PositionsAfter count the distinct live positions of
	// the sequence (cells, for a cache whose cells are shared by all heads).
	PositionsBefore int `json:"positions_before"`
	PositionsAfter  int `json:"positions_after"`
	// EntriesBefore and EntriesAfter count live (layer, head, position)
	// entries: what per-head compaction actually stores.
	EntriesBefore int64 `json:"entries_before"`
	EntriesAfter  int64 `json:"entries_after"`
	// BytesFreed is the K+V bytes the evicted entries took, for the cache's
	// shape and types.
	BytesFreed int64         `json:"bytes_freed"`
	PlanTime   time.Duration `json:"plan_ns"`
	ApplyTime  time.Duration `json:"apply_ns"`
}

// Observer receives what a runtime reports. The compressor in package adapter
// implements it; a runtime calls it from its forward pass.
type Observer interface {
	// ObserveKeys records the keys (or norms) of one layer of one batch.
	ObserveKeys(b *KeyBatch) error
	// PrefillDone compresses seq to the policy's budget once its prompt has
	// been decoded.
	PrefillDone(seq SeqID) (Stats, error)
	// CachePressure is called before a batch of incoming tokens for seq when
	// only free cells remain; it compresses seq so the batch fits.
	CachePressure(seq SeqID, free, incoming int) (Stats, error)
	// Forget drops the record of positions [from, to) of seq, for positions
	// the runtime removed itself (to < 0 means to the end).
	Forget(seq SeqID, from, to Pos)
}
