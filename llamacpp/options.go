package llamacpp

import (
	"fmt"
	"strings"
	"time"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// Token is a llama.cpp token id (llama_token).
type Token = int32

// CacheType is the storage type of the K or V cache.
type CacheType uint8

const (
	// CacheF16 is llama.cpp's default cache type.
	CacheF16 CacheType = iota
	// CacheQ8_0 stores 8-bit blocks of 32 (about half of F16).
	CacheQ8_0
	// CacheQ4_0 stores 4-bit blocks of 32 (about a quarter of F16).
	CacheQ4_0
	// CacheF32 stores float32 (exact keys; mostly for tests).
	CacheF32
	// CacheBF16 stores bfloat16.
	CacheBF16
)

var cacheTypeNames = [...]string{CacheF16: "f16", CacheQ8_0: "q8_0", CacheQ4_0: "q4_0", CacheF32: "f32", CacheBF16: "bf16"}

// String returns the name ParseCacheType accepts.
func (t CacheType) String() string {
	if int(t) < len(cacheTypeNames) {
		return cacheTypeNames[t]
	}
	return fmt.Sprintf("cachetype(%d)", uint8(t))
}

// ParseCacheType parses f16, q8_0, q4_0, f32 or bf16.
func ParseCacheType(s string) (CacheType, error) {
	for i, n := range cacheTypeNames {
		if strings.EqualFold(s, n) {
			return CacheType(i), nil
		}
	}
	return 0, fmt.Errorf("%w: cache type %q: want one of %s", ErrBadInput, s, strings.Join(cacheTypeNames[:], ", "))
}

// quantized reports whether values of this type need flash attention in
// llama.cpp when used for the V cache.
func (t CacheType) quantized() bool { return t == CacheQ8_0 || t == CacheQ4_0 }

// dtype is the kernels type of the cache, when the kernels can read a row of
// dim elements of it.
func (t CacheType) dtype(dim int) (kernels.DType, bool) {
	var d kernels.DType
	switch t {
	case CacheF16:
		d = kernels.F16
	case CacheF32:
		d = kernels.F32
	case CacheBF16:
		d = kernels.BF16
	case CacheQ8_0:
		d = kernels.Q8_0
	default:
		return 0, false
	}
	if _, err := d.RowBytes(dim); err != nil {
		return 0, false
	}
	return d, true
}

// FlashAttn says whether a context uses flash attention. The zero value is
// on, the default this package recommends: eviction works either way, and a
// quantized V cache needs it.
type FlashAttn uint8

const (
	FlashAttnOn   FlashAttn = iota // always (the default)
	FlashAttnOff                   // never
	FlashAttnAuto                  // llama.cpp decides
)

// String returns "on", "off" or "auto".
func (f FlashAttn) String() string {
	switch f {
	case FlashAttnOn:
		return "on"
	case FlashAttnOff:
		return "off"
	case FlashAttnAuto:
		return "auto"
	}
	return fmt.Sprintf("flashattn(%d)", uint8(f))
}

// ContextOptions configure a Context. The zero value is usable.
type ContextOptions struct {
	// NCtx is the number of KV cells of each sequence; llama.cpp pads it up
	// to a multiple of 256. 0 means 2048.
	NCtx int
	// NBatch is the most tokens one llama_decode call takes: longer inputs
	// are decoded in chunks of NBatch (and compressed between chunks when a
	// compressor is attached). It must fit in the cache. 0 means
	// min(512, cells per sequence).
	NBatch int
	// Threads used by llama.cpp; 0 means runtime.NumCPU(). Tiny models run
	// best on 1.
	Threads int
	// Seqs is the number of sequences the context holds, each with its own
	// NCtx cells (llama.cpp streams, kv_unified off). 0 means 1.
	Seqs int
	// FlashAttn defaults to on.
	FlashAttn FlashAttn
	// KType and VType are the cache types; they default to F16. A quantized
	// V cache needs flash attention.
	KType, VType CacheType
	// KeepHoles leaves evicted cells where they were. By default an
	// eviction ends with a compaction of the sequence (see
	// Context.EvictPositions): llama.cpp attends over every cell up to the
	// highest one in use, so without it a cache evicted to half still
	// costs each decoded token the width it had before.
	KeepHoles bool
}

// ModelInfo describes a loaded model.
type ModelInfo struct {
	Path      string
	Arch      string // general.architecture, e.g. "llama"
	Desc      string // llama_model_desc, e.g. "llama ?B all F32"
	Layers    int    // layers with a KV cache
	Heads     int    // query heads
	KVHeads   int    // key/value heads
	Embd      int    // model width
	HeadDim   int    // elements of one key: n_embd_k_gqa / n_head_kv
	Vocab     int    // tokens in the vocabulary
	TrainCtx  int    // context length the model was trained with
	BOS, EOS  Token
	AddBOS    bool // the vocabulary asks for BOS at the start of a prompt
	Recurrent bool // recurrent models have no KV cache to compress
	// NoRoPE: llama_model_rope_type is none (ALiBi or learned positions), so
	// the graph has no RoPE'd "Kcur-N" node for the callback to read.
	NoRoPE bool
	// MRoPE: multi-section RoPE (llama_model_rope_type mrope or imrope): its
	// cells carry extra position data that llama.cpp v0.24.0 does not
	// restore from a sequence's state, so eviction leaves holes (KeepHoles).
	MRoPE bool
	// MLA: multi-head latent attention (<arch>.attention.kv_lora_rank is set):
	// keys are assembled from a compressed latent, not one "Kcur-N" ROPE node.
	MLA bool
}

// keysReadable refuses, before any token enters a cache, a model whose
// graph the key callback cannot read (EnableCompression calls it).
func (in ModelInfo) keysReadable() error {
	switch {
	case in.NoRoPE:
		return fmt.Errorf("%w: %s (%s) has no RoPE (llama_model_rope_type: none, e.g. ALiBi): kvnorm reads keys from the ROPE node Kcur-N", hooks.ErrUnsupported, in.Path, in.Arch)
	case in.MLA:
		return fmt.Errorf("%w: %s (%s) uses multi-head latent attention (%s.attention.kv_lora_rank): its keys are not one ROPE node Kcur-N", hooks.ErrUnsupported, in.Path, in.Arch, in.Arch)
	}
	return nil
}

// GenerateOptions configure Context.Generate.
type GenerateOptions struct {
	// MaxTokens is the most tokens generated (0 generates none: only the
	// prompt is decoded and compressed).
	MaxTokens int
	// Sampler picks each token; nil is greedy.
	Sampler *Sampler
	// IgnoreEOG keeps generating past end-of-generation tokens.
	IgnoreEOG bool
	// OnToken, if set, sees every generated token and its text as it comes;
	// returning false stops the generation.
	OnToken func(tok Token, piece string) bool
}

// Generation is the outcome of Context.Generate.
type Generation struct {
	PromptTokens int
	Tokens       []Token // generated tokens
	Text         string  // their text
	// CellsBefore is the number of KV cells of the sequence once the prompt
	// has been decoded, before the prefill compression; CellsAfter after it.
	// A prompt longer than the cache was already compressed in chunks, so
	// CellsBefore is then at most the capacity.
	CellsBefore, CellsAfter int
	// CellsEnd is the number of KV cells at the end of the generation.
	CellsEnd int
	// Prefill is the prefill compression (zero without a compressor).
	Prefill     hooks.Stats
	PrefillTime time.Duration // decoding the prompt, chunk compressions included
	// CompressTime is the prefill compression (planning and evicting).
	CompressTime time.Duration
	DecodeTime   time.Duration // generating the tokens
	// Decoded counts the generated tokens decoded into the cache: the last
	// one sampled is not (the first comes from the prompt's logits).
	Decoded int
	// Stop is why generation ended: "max_tokens", "eog" or "callback".
	Stop string
}

// DecodeTokensPerSecond is the decoding speed: tokens decoded per second of
// DecodeTime (0 when none was decoded).
func (g *Generation) DecodeTokensPerSecond() float64 {
	if g.DecodeTime <= 0 || g.Decoded == 0 {
		return 0
	}
	return float64(g.Decoded) / g.DecodeTime.Seconds()
}
