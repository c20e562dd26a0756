// Package synth writes GGUF models with random weights and the exact shape of
// common models, for measuring speed and memory only: their outputs are
// noise. Weights are deterministic in the seed and the tensor name.
package synth

import (
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"sort"
	"strings"

	"github.com/kvnorm/kvnorm/gguf"
)

// Shape is a model's architecture and sizes.
type Shape struct {
	Name     string  `json:"name"`
	Arch     string  `json:"arch"` // "llama" or "qwen3"
	Layers   int     `json:"layers"`
	Heads    int     `json:"heads"`
	KVHeads  int     `json:"kv_heads"`
	HeadDim  int     `json:"head_dim"`
	Embd     int     `json:"embd"`
	FFN      int     `json:"ffn"`
	Vocab    int     `json:"vocab"`
	Ctx      int     `json:"ctx"`
	RopeBase float32 `json:"rope_base"`
}

// Shapes are the named shapes `kvnorm synth --shape` knows.
var Shapes = map[string]Shape{
	// Llama 3.2 1B: 16 layers, 32 query heads, 8 KV heads of 64, tied embeddings.
	"llama-3.2-1b": {Name: "llama-3.2-1b", Arch: "llama", Layers: 16, Heads: 32, KVHeads: 8, HeadDim: 64, Embd: 2048, FFN: 8192, Vocab: 128256, Ctx: 131072, RopeBase: 500000},
	// Qwen3 0.6B: 28 layers, 16 query heads, 8 KV heads of 128, QK-norm, tied embeddings.
	"qwen3-0.6b": {Name: "qwen3-0.6b", Arch: "qwen3", Layers: 28, Heads: 16, KVHeads: 8, HeadDim: 128, Embd: 1024, FFN: 3072, Vocab: 151936, Ctx: 40960, RopeBase: 1000000},
	// A tiny llama for CI: every code path, in milliseconds.
	"tiny": {Name: "tiny", Arch: "llama", Layers: 4, Heads: 4, KVHeads: 2, HeadDim: 16, Embd: 64, FFN: 128, Vocab: 512, Ctx: 4096, RopeBase: 10000},
}

// ShapeNames lists the named shapes.
func ShapeNames() []string {
	names := make([]string, 0, len(Shapes))
	for n := range Shapes {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Validate checks that the shape is consistent.
func (s Shape) Validate() error {
	switch {
	case s.Arch != "llama" && s.Arch != "qwen3":
		return fmt.Errorf("synth: arch %q: want llama or qwen3", s.Arch)
	case s.Layers <= 0 || s.Heads <= 0 || s.KVHeads <= 0 || s.HeadDim <= 0 || s.Embd <= 0 || s.FFN <= 0 || s.Ctx <= 0:
		return fmt.Errorf("synth: shape %+v: every size must be > 0", s)
	case s.Heads%s.KVHeads != 0:
		return fmt.Errorf("synth: heads=%d is not a multiple of kv heads=%d", s.Heads, s.KVHeads)
	case s.HeadDim%2 != 0:
		return fmt.Errorf("synth: head dim=%d must be even (RoPE)", s.HeadDim)
	case s.Vocab < 300:
		return fmt.Errorf("synth: vocab=%d must be at least 300 (special and byte tokens)", s.Vocab)
	case s.Arch == "llama" && s.Heads*s.HeadDim != s.Embd:
		return fmt.Errorf("synth: llama needs heads×head dim = embd, got %d×%d != %d", s.Heads, s.HeadDim, s.Embd)
	case s.RopeBase <= 0:
		return fmt.Errorf("synth: rope base=%g must be > 0", s.RopeBase)
	}
	return nil
}

// Params is the number of weights of the shape.
func (s Shape) Params() int64 {
	q, kv := int64(s.Heads*s.HeadDim), int64(s.KVHeads*s.HeadDim)
	e, f := int64(s.Embd), int64(s.FFN)
	layer := e*q + 2*e*kv + q*e + 3*e*f + 2*e
	if s.Arch == "qwen3" {
		layer += 2 * int64(s.HeadDim)
	}
	return int64(s.Vocab)*e + int64(s.Layers)*layer + e
}

// Writer returns a GGUF writer for the shape; its tensors are generated as
// the file is written. typ is the type of the matrices (f32, f16, q8_0...);
// norms stay f32.
func Writer(s Shape, typ gguf.TensorType, seed uint64) (*gguf.Writer, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	w := gguf.NewWriter()
	a := s.Arch
	w.SetString("general.architecture", a)
	w.SetString("general.name", "kvnorm synthetic "+s.Name+" (random weights: for speed and memory only)")
	w.SetUint32(a+".context_length", uint32(s.Ctx))
	w.SetUint32(a+".embedding_length", uint32(s.Embd))
	w.SetUint32(a+".block_count", uint32(s.Layers))
	w.SetUint32(a+".feed_forward_length", uint32(s.FFN))
	w.SetUint32(a+".attention.head_count", uint32(s.Heads))
	w.SetUint32(a+".attention.head_count_kv", uint32(s.KVHeads))
	w.SetUint32(a+".attention.key_length", uint32(s.HeadDim))
	w.SetUint32(a+".attention.value_length", uint32(s.HeadDim))
	w.SetUint32(a+".rope.dimension_count", uint32(s.HeadDim))
	w.SetFloat32(a+".rope.freq_base", s.RopeBase)
	w.SetFloat32(a+".attention.layer_norm_rms_epsilon", 1e-5)
	w.SetUint32(a+".vocab_size", uint32(s.Vocab))
	if err := setTokenizer(w, s); err != nil {
		return nil, err
	}
	e, q, kv, f := uint64(s.Embd), uint64(s.Heads*s.HeadDim), uint64(s.KVHeads*s.HeadDim), uint64(s.FFN)
	add := func(name string, t gguf.TensorType, dims []uint64, std float32) error {
		return w.AddTensorFunc(name, t, dims, func() ([]byte, error) { return randomTensor(name, t, dims, std, seed) })
	}
	ones := func(name string, n uint64) error { return add(name, gguf.F32, []uint64{n}, 0) }
	if err := add("token_embd.weight", typ, []uint64{e, uint64(s.Vocab)}, 1); err != nil {
		return nil, err
	}
	for l := range s.Layers {
		p := fmt.Sprintf("blk.%d.", l)
		for _, t := range []struct {
			name string
			dims []uint64
		}{
			{"attn_q.weight", []uint64{e, q}},
			{"attn_k.weight", []uint64{e, kv}},
			{"attn_v.weight", []uint64{e, kv}},
			{"attn_output.weight", []uint64{q, e}},
			{"ffn_gate.weight", []uint64{e, f}},
			{"ffn_up.weight", []uint64{e, f}},
			{"ffn_down.weight", []uint64{f, e}},
		} {
			if err := add(p+t.name, typ, t.dims, float32(1/math.Sqrt(float64(t.dims[0])))); err != nil {
				return nil, err
			}
		}
		norms := []string{"attn_norm.weight", "ffn_norm.weight"}
		for _, n := range norms {
			if err := ones(p+n, e); err != nil {
				return nil, err
			}
		}
		if s.Arch == "qwen3" {
			for _, n := range []string{"attn_q_norm.weight", "attn_k_norm.weight"} {
				if err := ones(p+n, uint64(s.HeadDim)); err != nil {
					return nil, err
				}
			}
		}
	}
	if err := ones("output_norm.weight", e); err != nil {
		return nil, err
	}
	return w, nil
}

// Write writes a synthetic model to path.
func Write(path string, s Shape, typ gguf.TensorType, seed uint64) error {
	w, err := Writer(s, typ, seed)
	if err != nil {
		return err
	}
	return w.WriteFile(path)
}

// randomTensor returns the bytes of a tensor of normal(0, std) values (std 0:
// all ones, for norm weights), seeded by the tensor's name.
func randomTensor(name string, typ gguf.TensorType, dims []uint64, std float32, seed uint64) ([]byte, error) {
	n := uint64(1)
	for _, d := range dims {
		n *= d
	}
	size, err := typ.ByteSize(dims)
	if err != nil {
		return nil, err
	}
	h := fnv.New64a()
	h.Write([]byte(name))
	rng := rand.New(rand.NewPCG(seed, h.Sum64()))
	out := make([]byte, 0, size)
	const chunk = 1 << 16 // a multiple of every block size
	buf := make([]float32, chunk)
	for done := uint64(0); done < n; done += chunk {
		m := min(chunk, n-done)
		for i := range buf[:m] {
			if std == 0 {
				buf[i] = 1
			} else {
				buf[i] = float32(rng.NormFloat64()) * std
			}
		}
		b, err := gguf.Quantize(typ, buf[:m])
		if err != nil {
			return nil, err
		}
		out = append(out, b...)
	}
	return out, nil
}

// setTokenizer writes a vocabulary that both runtimes load: SentencePiece
// ("llama") for llama, byte-level BPE ("gpt2", qwen2 pre-tokenizer) for qwen3.
func setTokenizer(w *gguf.Writer, s Shape) error {
	tokens := make([]string, 0, s.Vocab)
	types := make([]int32, 0, s.Vocab)
	if s.Arch == "llama" {
		scores := make([]float32, 0, s.Vocab)
		tokens = append(tokens, "<unk>", "<s>", "</s>")
		types = append(types, 2, 3, 3)
		scores = append(scores, 0, 0, 0)
		for b := range 256 {
			tokens = append(tokens, fmt.Sprintf("<0x%02X>", b))
			types = append(types, 6)
			scores = append(scores, 0)
		}
		for i := 0; len(tokens) < s.Vocab; i++ {
			tokens = append(tokens, piece(i))
			types = append(types, 1)
			scores = append(scores, -float32(i))
		}
		w.SetString("tokenizer.ggml.model", "llama")
		w.SetStrings("tokenizer.ggml.tokens", tokens)
		w.SetFloat32s("tokenizer.ggml.scores", scores)
		w.SetInt32s("tokenizer.ggml.token_type", types)
		w.SetUint32("tokenizer.ggml.bos_token_id", 1)
		w.SetUint32("tokenizer.ggml.eos_token_id", 2)
		w.SetUint32("tokenizer.ggml.unknown_token_id", 0)
		w.SetBool("tokenizer.ggml.add_bos_token", true)
		w.SetBool("tokenizer.ggml.add_eos_token", false)
		return nil
	}
	// Byte-level BPE: the 256 byte symbols, a few merges, then filler
	// control tokens up to the vocabulary size, and an end-of-text token.
	for _, r := range byteSymbols() {
		tokens = append(tokens, string(r))
		types = append(types, 1)
	}
	var merges []string
	for _, m := range [][2]string{{"Ġ", "t"}, {"h", "e"}, {"Ġt", "he"}, {"Ġ", "a"}, {"i", "n"}, {"o", "n"}, {"e", "r"}, {"Ġ", "s"}} {
		merges = append(merges, m[0]+" "+m[1])
		tokens = append(tokens, m[0]+m[1])
		types = append(types, 1)
	}
	for i := 0; len(tokens) < s.Vocab-1; i++ {
		tokens = append(tokens, fmt.Sprintf("<|synth_%d|>", i))
		types = append(types, 3)
	}
	tokens = append(tokens, "<|endoftext|>")
	types = append(types, 3)
	w.SetString("tokenizer.ggml.model", "gpt2")
	w.SetString("tokenizer.ggml.pre", "qwen2")
	w.SetStrings("tokenizer.ggml.tokens", tokens)
	w.SetInt32s("tokenizer.ggml.token_type", types)
	w.SetStrings("tokenizer.ggml.merges", merges)
	w.SetUint32("tokenizer.ggml.bos_token_id", uint32(len(tokens)-1))
	w.SetUint32("tokenizer.ggml.eos_token_id", uint32(len(tokens)-1))
	w.SetBool("tokenizer.ggml.add_bos_token", false)
	return nil
}

// piece returns a distinct SentencePiece-style token for index i: first the
// letters, then "▁" + letters, then two-letter pieces, and so on.
func piece(i int) string {
	const letters = "abcdefghijklmnopqrstuvwxyz"
	var b strings.Builder
	if i%2 == 1 {
		b.WriteString("\u2581")
	}
	i /= 2
	for {
		b.WriteByte(letters[i%26])
		i /= 26
		if i == 0 {
			break
		}
		i--
	}
	return b.String()
}

// byteSymbols is GPT-2's byte-to-unicode table: printable bytes stand for
// themselves, the others map to code points from 256 up.
func byteSymbols() []rune {
	out := make([]rune, 256)
	n := 0
	for b := range 256 {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			out[b] = rune(b)
		} else {
			out[b] = rune(256 + n)
			n++
		}
	}
	return out
}
