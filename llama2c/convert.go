package llama2c

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/kvnorm/kvnorm/gguf"
)

// GGUF metadata written by [ToGGUF].
const (
	// RMSNormEps is llama2.c's RMSNorm epsilon.
	RMSNormEps = 1e-5
	// RopeFreqBase is llama2.c's RoPE base. It must be written: Ollama's
	// llama engine assumes 1e5 when llama.rope.freq_base is missing.
	RopeFreqBase = 10000
)

// llama.cpp file types (general.file_type) for the tensor types ToGGUF
// accepts.
var fileTypes = map[gguf.TensorType]uint32{gguf.F32: 0, gguf.F16: 1, gguf.Q4_0: 2, gguf.Q8_0: 7, gguf.BF16: 32}

// ToGGUF lays a checkpoint and its tokenizer out as a llama-architecture
// GGUF model: tensors token_embd.weight, blk.N.{attn_norm, attn_q, attn_k,
// attn_v, attn_output, ffn_norm, ffn_gate (w1), ffn_down (w2), ffn_up
// (w3)}.weight and output_norm.weight, plus output.weight only when the
// classifier is not shared (llama.cpp and Ollama fall back to token_embd).
// A row-major [out][in] matrix becomes ggml dims {in, out} with the same
// bytes. wq and wk are not permuted: llama2.c rotates adjacent pairs
// (x[2i], x[2i+1]), which is ggml's normal RoPE mode that llama.cpp uses for
// llama. Matrices and the embedding are stored as typ (F32, F16, BF16, or
// Q8_0/Q4_0 when every row length is a multiple of 32); norm weights stay
// F32. The metadata is general.name "llama2c" (change it with SetString) and
// the llama.* hyperparameters and tokenizer.ggml.* vocabulary llama.cpp's
// "llama" architecture and SentencePiece tokenizer read.
func ToGGUF(ck *Checkpoint, tok *Tokenizer, typ gguf.TensorType) (*gguf.Writer, error) {
	if err := ck.check(); err != nil {
		return nil, err
	}
	c := ck.Config
	if tok.VocabSize() != c.VocabSize {
		return nil, fmt.Errorf("%w: tokenizer has %d pieces, checkpoint vocab_size is %d", ErrInvalid, tok.VocabSize(), c.VocabSize)
	}
	ft, ok := fileTypes[typ]
	if !ok {
		return nil, fmt.Errorf("%w: tensor type %s (want F32, F16, BF16, Q8_0 or Q4_0)", ErrInvalid, typ)
	}

	w := gguf.NewWriter()
	w.SetString("general.architecture", "llama")
	w.SetString("general.name", "llama2c")
	w.SetUint32("general.file_type", ft)
	if typ == gguf.Q8_0 || typ == gguf.Q4_0 {
		w.SetUint32("general.quantization_version", 2)
	}
	w.SetUint32("llama.context_length", uint32(c.SeqLen))
	w.SetUint32("llama.embedding_length", uint32(c.Dim))
	w.SetUint32("llama.block_count", uint32(c.NLayers))
	w.SetUint32("llama.feed_forward_length", uint32(c.HiddenDim))
	w.SetUint32("llama.rope.dimension_count", uint32(c.HeadSize()))
	w.SetUint32("llama.attention.head_count", uint32(c.NHeads))
	w.SetUint32("llama.attention.head_count_kv", uint32(c.NKVHeads))
	w.SetFloat32("llama.attention.layer_norm_rms_epsilon", RMSNormEps)
	w.SetFloat32("llama.rope.freq_base", RopeFreqBase)
	w.SetUint32("llama.vocab_size", uint32(c.VocabSize))

	types := make([]int32, len(tok.Types))
	for i, tt := range tok.Types {
		types[i] = int32(tt)
	}
	w.SetString("tokenizer.ggml.model", "llama")
	w.SetStrings("tokenizer.ggml.tokens", tok.GGUFTokens())
	w.SetFloat32s("tokenizer.ggml.scores", tok.Scores)
	w.SetInt32s("tokenizer.ggml.token_type", types)
	w.SetUint32("tokenizer.ggml.bos_token_id", uint32(tok.BOS))
	w.SetUint32("tokenizer.ggml.eos_token_id", uint32(tok.EOS))
	w.SetUint32("tokenizer.ggml.unknown_token_id", uint32(tok.Unknown))
	w.SetBool("tokenizer.ggml.add_bos_token", true)
	w.SetBool("tokenizer.ggml.add_eos_token", false)

	matrix := func(name string, rows, cols int, v []float32) error {
		return w.AddFloat32s(name, typ, []uint64{uint64(cols), uint64(rows)}, v)
	}
	norm := func(name string, v []float32) error {
		return w.AddFloat32s(name, gguf.F32, []uint64{uint64(len(v))}, v)
	}
	d, h, kv := c.Dim, c.HiddenDim, c.KVDim()
	if err := matrix("token_embd.weight", c.VocabSize, d, ck.TokenEmbedding); err != nil {
		return nil, err
	}
	for i, l := range ck.Layers {
		p := fmt.Sprintf("blk.%d.", i)
		for _, err := range []error{
			norm(p+"attn_norm.weight", l.AttnNorm),
			matrix(p+"attn_q.weight", d, d, l.WQ),
			matrix(p+"attn_k.weight", kv, d, l.WK),
			matrix(p+"attn_v.weight", kv, d, l.WV),
			matrix(p+"attn_output.weight", d, d, l.WO),
			norm(p+"ffn_norm.weight", l.FFNNorm),
			matrix(p+"ffn_gate.weight", h, d, l.W1),
			matrix(p+"ffn_down.weight", d, h, l.W2),
			matrix(p+"ffn_up.weight", h, d, l.W3),
		} {
			if err != nil {
				return nil, err
			}
		}
	}
	if err := norm("output_norm.weight", ck.FinalNorm); err != nil {
		return nil, err
	}
	if !c.SharedClassifier {
		if err := matrix("output.weight", c.VocabSize, d, ck.Classifier); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// ParseTensorType parses a tensor type name as ConvertFile takes it:
// "f32", "f16", "bf16", "q8_0" or "q4_0" (any case).
func ParseTensorType(s string) (gguf.TensorType, error) {
	switch strings.ToLower(s) {
	case "f32":
		return gguf.F32, nil
	case "f16":
		return gguf.F16, nil
	case "bf16":
		return gguf.BF16, nil
	case "q8_0":
		return gguf.Q8_0, nil
	case "q4_0":
		return gguf.Q4_0, nil
	}
	return 0, fmt.Errorf("%w: tensor type %q (want f32, f16, bf16, q8_0 or q4_0)", ErrInvalid, s)
}

// ConvertFile converts the llama2.c checkpoint at ckptPath and the tokenizer
// at tokPath to a GGUF file at outPath with matrices of type typ (see
// [ParseTensorType]). general.name is the checkpoint's base name without
// extension.
func ConvertFile(ckptPath, tokPath, outPath, typ string) error {
	tt, err := ParseTensorType(typ)
	if err != nil {
		return err
	}
	ck, err := ReadCheckpoint(ckptPath)
	if err != nil {
		return err
	}
	tok, err := ReadTokenizer(tokPath, ck.Config.VocabSize)
	if err != nil {
		return err
	}
	w, err := ToGGUF(ck, tok, tt)
	if err != nil {
		return err
	}
	w.SetString("general.name", strings.TrimSuffix(filepath.Base(ckptPath), filepath.Ext(ckptPath)))
	return w.WriteFile(outPath)
}
