package llama2c

import (
	"bytes"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/gguf"
)

// modelPath returns ../shared/models/name relative to the module root, or
// skips the test when it is absent.
func modelPath(t testing.TB, name string) string {
	t.Helper()
	dir, err := os.Getwd()
	require.NoError(t, err)
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Skip("go.mod not found above the package directory")
		}
		dir = parent
	}
	p := filepath.Join(dir, "..", "shared", "models", name)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("test model not available: %v", err)
	}
	return p
}

func loadStories(t testing.TB) (*Checkpoint, *Tokenizer) {
	t.Helper()
	ck, err := ReadCheckpoint(modelPath(t, "stories260K.bin"))
	require.NoError(t, err)
	tok, err := ReadTokenizer(modelPath(t, "tok512.bin"), ck.Config.VocabSize)
	require.NoError(t, err)
	return ck, tok
}

// tinyConfig is a small model shape with GQA.
var tinyConfig = Config{Dim: 16, HiddenDim: 24, NLayers: 2, NHeads: 4, NKVHeads: 2, VocabSize: 11, SeqLen: 8, SharedClassifier: true}

// randomCheckpoint fills a checkpoint of shape c with seeded random weights.
func randomCheckpoint(t testing.TB, c Config, seed uint64) *Checkpoint {
	t.Helper()
	ck, err := NewCheckpoint(c)
	require.NoError(t, err)
	r := rand.New(rand.NewPCG(seed, 1))
	for _, nt := range ck.tensors() {
		for i := range nt.data {
			nt.data[i] = float32(r.NormFloat64() * 0.5)
		}
	}
	return ck
}

func checkpointBytes(t testing.TB, ck *Checkpoint) []byte {
	t.Helper()
	var buf bytes.Buffer
	n, err := ck.WriteTo(&buf)
	require.NoError(t, err)
	require.Equal(t, int64(buf.Len()), n)
	require.Equal(t, ck.Config.FileSize(), n)
	return buf.Bytes()
}

func TestReadStories260K(t *testing.T) {
	ck, tok := loadStories(t)
	assert.Equal(t, Config{Dim: 64, HiddenDim: 172, NLayers: 5, NHeads: 8, NKVHeads: 4, VocabSize: 512, SeqLen: 512,
		SharedClassifier: true}, ck.Config)
	assert.Equal(t, 8, ck.Config.HeadSize())
	assert.Equal(t, 32, ck.Config.KVDim())
	assert.Equal(t, int64(1056540), ck.Config.FileSize())
	require.Len(t, ck.Layers, 5)
	assert.Len(t, ck.Layers[4].WK, 32*64)
	assert.Len(t, ck.Layers[0].W2, 64*172)
	assert.Same(t, &ck.TokenEmbedding[0], &ck.Classifier[0])

	// Writing the checkpoint back reproduces the file outside the RoPE
	// tables (which are recomputed in float64 and may differ in the last bit).
	orig, err := os.ReadFile(modelPath(t, "stories260K.bin"))
	require.NoError(t, err)
	again := checkpointBytes(t, ck)
	require.Len(t, again, len(orig))
	ropeStart := int(headerSize + 4*ck.Config.weightCount())
	assert.Equal(t, orig[:ropeStart], again[:ropeStart])
	for i := ropeStart; i < len(orig); i += 4 {
		a := math.Float32frombits(binary.LittleEndian.Uint32(orig[i:]))
		b := math.Float32frombits(binary.LittleEndian.Uint32(again[i:]))
		require.InDelta(t, a, b, 1e-5, "RoPE table value at offset %d", i)
	}

	assert.Equal(t, 512, tok.VocabSize())
	assert.Equal(t, 7, tok.MaxTokenLength)
	assert.Equal(t, "<unk>", tok.Pieces[0])
	assert.Equal(t, "\n<s>\n", tok.Pieces[1])
	assert.Equal(t, []TokenType{TokenUnknown, TokenControl, TokenControl, TokenByte}, tok.Types[:4])
	assert.Equal(t, TokenByte, tok.Types[258])
	assert.Equal(t, TokenNormal, tok.Types[259])
	assert.Equal(t, " t", tok.Pieces[259])
	assert.Equal(t, "\n", tok.Piece(3+'\n'))
	assert.Equal(t, "", tok.Piece(BOSID))
}

func TestCheckpointRoundTripSeparateClassifier(t *testing.T) {
	c := tinyConfig
	c.SharedClassifier = false
	ck := randomCheckpoint(t, c, 7)
	data := checkpointBytes(t, ck)
	assert.Equal(t, int32(-11), int32(binary.LittleEndian.Uint32(data[20:])))
	got, err := ReadCheckpointFrom(bytes.NewReader(data), int64(len(data)))
	require.NoError(t, err)
	assert.Equal(t, ck.Config, got.Config)
	assert.Equal(t, ck.Classifier, got.Classifier)
	assert.Equal(t, ck.Layers, got.Layers)
	assert.NotSame(t, &got.TokenEmbedding[0], &got.Classifier[0])
}

func TestReadCheckpointMalformed(t *testing.T) {
	valid := checkpointBytes(t, randomCheckpoint(t, tinyConfig, 1))
	withHeader := func(field int, v int32) []byte {
		b := bytes.Clone(valid)
		binary.LittleEndian.PutUint32(b[4*field:], uint32(v))
		return b
	}
	nan := bytes.Clone(valid)
	binary.LittleEndian.PutUint32(nan[headerSize+4*(11*16+3):], math.Float32bits(float32(math.NaN())))

	for _, tc := range []struct {
		name string
		data []byte
		is   error
		msg  string
	}{
		{"empty", nil, ErrTruncated, "shorter than the 28-byte header"},
		{"header only", valid[:20], ErrTruncated, "header"},
		{"zero dim", withHeader(0, 0), ErrFormat, "dim 0 out of range"},
		{"negative hidden", withHeader(1, -5), ErrFormat, "hidden_dim -5 out of range"},
		{"huge dim", withHeader(0, 1<<20), ErrFormat, "dim 1048576 out of range"},
		{"zero layers", withHeader(2, 0), ErrFormat, "n_layers 0"},
		{"heads do not divide dim", withHeader(3, 3), ErrFormat, "n_heads 3 does not divide dim 16"},
		{"kv heads do not divide heads", withHeader(4, 3), ErrFormat, "n_kv_heads 3 does not divide n_heads 4"},
		{"odd head size", withHeader(3, 16), ErrFormat, "head size 1"},
		{"zero vocab", withHeader(5, 0), ErrFormat, "vocab_size 0"},
		{"min int vocab", withHeader(5, math.MinInt32), ErrFormat, "vocab_size"},
		{"zero seq_len", withHeader(6, 0), ErrFormat, "seq_len 0"},
		{"large valid header, small file", withHeader(0, 4096), ErrTruncated, "too short for its header"},
		{"separate classifier missing", withHeader(5, -11), ErrTruncated, "too short"},
		{"truncated", valid[:len(valid)-4], ErrTruncated, "4 bytes too short"},
		{"oversized", append(bytes.Clone(valid), 0, 0, 0, 0), ErrFormat, "4 bytes too long"},
		{"ak42", append([]byte("24ka"), valid[4:]...), ErrFormat, "ak42"},
		{"nan weight", nan, ErrFormat, "layer 0 rms_att_weight: element 3 is NaN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ck, err := ReadCheckpointFrom(bytes.NewReader(tc.data), int64(len(tc.data)))
			require.Error(t, err)
			assert.Nil(t, ck)
			assert.ErrorIs(t, err, tc.is)
			assert.ErrorContains(t, err, tc.msg)
		})
	}
	_, err := ReadCheckpoint(filepath.Join(t.TempDir(), "missing.bin"))
	assert.ErrorIs(t, err, os.ErrNotExist)
}

// tokenizerBytes encodes pieces in the llama2.c tokenizer format.
func tokenizerBytes(maxLen int32, pieces []string, scores []float32) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, maxLen)
	for i, p := range pieces {
		binary.Write(&b, binary.LittleEndian, scores[i])
		binary.Write(&b, binary.LittleEndian, int32(len(p)))
		b.WriteString(p)
	}
	return b.Bytes()
}

func TestReadTokenizerMalformed(t *testing.T) {
	pieces := []string{"<unk>", "\n<s>\n", "\n</s>\n", "a", "b", "ab"}
	scores := []float32{0, 0, 0, -1, -2, -0.5}
	valid := tokenizerBytes(6, pieces, scores)
	tok, err := ReadTokenizerFrom(bytes.NewReader(valid), int64(len(valid)), len(pieces))
	require.NoError(t, err)
	// " " is neither a piece nor a byte token here, so it becomes <unk>.
	assert.Equal(t, []int32{BOSID, UnknownID, 5}, tok.Encode("ab", true))
	assert.Equal(t, pieces, tok.Pieces)

	nanScore := tokenizerBytes(6, pieces, []float32{0, 0, float32(math.NaN()), 0, 0, 0})
	for _, tc := range []struct {
		name  string
		data  []byte
		vocab int
		is    error
		msg   string
	}{
		{"zero vocab", valid, 0, ErrInvalid, "vocab size 0"},
		{"empty", nil, 6, ErrTruncated, "cannot hold 6 pieces"},
		{"vocab too large", valid, 100, ErrTruncated, "cannot hold 100 pieces"},
		{"vocab too small", valid, 5, ErrFormat, "trailing bytes after 5 pieces"},
		{"zero max length", tokenizerBytes(0, pieces, scores), 6, ErrFormat, "max_token_length 0"},
		{"piece longer than max", tokenizerBytes(4, pieces, scores), 6, ErrFormat, "piece 0 at offset 4: length 5 out of range"},
		{"truncated piece", valid[:len(valid)-1], 6, ErrTruncated, "piece 5"},
		{"nan score", nanScore, 6, ErrFormat, "piece 2: score NaN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadTokenizerFrom(bytes.NewReader(tc.data), int64(len(tc.data)), tc.vocab)
			require.Error(t, err)
			assert.ErrorIs(t, err, tc.is)
			assert.ErrorContains(t, err, tc.msg)
		})
	}
	negLen := bytes.Clone(valid)
	binary.LittleEndian.PutUint32(negLen[8:], uint32(0xffffffff))
	_, err = ReadTokenizerFrom(bytes.NewReader(negLen), int64(len(negLen)), 6)
	assert.ErrorContains(t, err, "length -1 out of range")
}

// naiveEncode is llama2.c's quadratic algorithm: merge the best-scoring
// adjacent pair (leftmost on ties) until none forms a piece. It is the
// oracle for the heap-based Encode.
func naiveEncode(t *Tokenizer, text string, bos bool) []int32 {
	var out []int32
	if bos {
		out = append(out, t.BOS)
	}
	if text == "" {
		return out
	}
	s := " " + text
	var parts []string
	for i := 0; i < len(s); {
		n := min(utf8SeqLen(s[i]), len(s)-i)
		parts = append(parts, s[i:i+n])
		i += n
	}
	for {
		best, bestScore := -1, float32(math.Inf(-1))
		for i := 0; i+1 < len(parts); i++ {
			if id, ok := t.index[parts[i]+parts[i+1]]; ok && t.Scores[id] > bestScore {
				best, bestScore = i, t.Scores[id]
			}
		}
		if best < 0 {
			break
		}
		parts[best] += parts[best+1]
		parts = append(parts[:best+1], parts[best+2:]...)
	}
	for _, p := range parts {
		if id, ok := t.index[p]; ok {
			out = append(out, id)
			continue
		}
		for j := 0; j < len(p); j++ {
			out = append(out, t.bytes[p[j]])
		}
	}
	return out
}

var sampleTexts = []string{
	"Once upon a time, there was a little girl named Lily.",
	"She loved to play outside in the park.",
	"Tom and Sue went to the store. They bought a big red ball!",
	"\"Can I have it?\" asked Ben.",
	"line one\nline two\n\n  indented   spaces  ",
	" leading space",
	"trailing space ",
	"Unicode: café, naïve, 日本語, emoji 🙂, snowman ☃.",
	"tabs\tand\rreturns",
	"x",
	"",
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	_, tok := loadStories(t)
	for _, s := range sampleTexts {
		ids := tok.Encode(s, true)
		require.NotEmpty(t, ids)
		assert.Equal(t, BOSID, ids[0])
		assert.Equal(t, s, tok.Decode(ids), "round trip of %q (ids %v)", s, ids)
		assert.Equal(t, naiveEncode(tok, s, true), ids, "%q", s)
		noBOS := tok.Encode(s, false)
		assert.Equal(t, append([]int32(nil), ids[1:]...), noBOS)
	}
	// The tokenization the model itself produces when it writes this text.
	assert.Equal(t, []int32{1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426},
		tok.Encode("Once upon a time, there was a little girl named Lily.", true))
	// Unknown characters fall back to bytes: "日" is E6 97 A5.
	ids := tok.Encode("日", false)
	assert.Equal(t, []int32{410, 3 + 0xe6, 3 + 0x97, 3 + 0xa5}, ids) // " " then three byte tokens
	assert.Equal(t, []TokenType{TokenNormal, TokenByte, TokenByte, TokenByte},
		[]TokenType{tok.Types[ids[0]], tok.Types[ids[1]], tok.Types[ids[2]], tok.Types[ids[3]]})
	// Invalid UTF-8 survives as bytes.
	assert.Equal(t, "a\xffb\xe2", tok.Decode(tok.Encode("a\xffb\xe2", false)))
	// Control tokens decode to nothing; out-of-range ids are ignored.
	assert.Equal(t, "Once", tok.Decode([]int32{BOSID, 403, EOSID, -1, 9999}))
}

func TestEncodeMatchesNaiveOnRandomText(t *testing.T) {
	_, tok := loadStories(t)
	r := rand.New(rand.NewPCG(5, 6))
	alphabet := []rune("abcdefghijklmnopqrstuvwxyz      ,.!?'\"\nTLSOé日🙂")
	for range 2000 {
		n := r.IntN(60)
		var sb strings.Builder
		for range n {
			sb.WriteRune(alphabet[r.IntN(len(alphabet))])
		}
		s := sb.String()
		ids := tok.Encode(s, false)
		require.Equal(t, naiveEncode(tok, s, false), ids, "%q", s)
		require.Equal(t, s, tok.Decode(ids), "%q", s)
	}
}

func TestToGGUF(t *testing.T) {
	ck, tok := loadStories(t)
	for _, typ := range []gguf.TensorType{gguf.F32, gguf.F16} {
		t.Run(typ.String(), func(t *testing.T) {
			w, err := ToGGUF(ck, tok, typ)
			require.NoError(t, err)
			path := filepath.Join(t.TempDir(), "m.gguf")
			require.NoError(t, w.WriteFile(path))
			f, err := gguf.Open(path)
			require.NoError(t, err)
			defer f.Close()

			for key, want := range map[string]any{
				"general.architecture":                   "llama",
				"general.name":                           "llama2c",
				"general.file_type":                      map[gguf.TensorType]uint32{gguf.F32: 0, gguf.F16: 1}[typ],
				"llama.context_length":                   uint32(512),
				"llama.embedding_length":                 uint32(64),
				"llama.block_count":                      uint32(5),
				"llama.feed_forward_length":              uint32(172),
				"llama.rope.dimension_count":             uint32(8),
				"llama.attention.head_count":             uint32(8),
				"llama.attention.head_count_kv":          uint32(4),
				"llama.attention.layer_norm_rms_epsilon": float32(1e-5),
				"llama.rope.freq_base":                   float32(10000),
				"llama.vocab_size":                       uint32(512),
				"tokenizer.ggml.model":                   "llama",
				"tokenizer.ggml.bos_token_id":            uint32(1),
				"tokenizer.ggml.eos_token_id":            uint32(2),
				"tokenizer.ggml.unknown_token_id":        uint32(0),
				"tokenizer.ggml.add_bos_token":           true,
				"tokenizer.ggml.add_eos_token":           false,
			} {
				got, ok := f.Value(key)
				if assert.True(t, ok, key) {
					assert.Equal(t, want, got, key)
				}
			}
			tokens, err := f.Strings("tokenizer.ggml.tokens")
			require.NoError(t, err)
			assert.Equal(t, []string{"<unk>", "<s>", "</s>", "<0x00>"}, tokens[:4])
			assert.Equal(t, "▁t", tokens[259])
			assert.Equal(t, "▁", tokens[410])
			for _, tk := range tokens {
				assert.NotContains(t, tk, " ")
			}
			types, err := f.Int32s("tokenizer.ggml.token_type")
			require.NoError(t, err)
			assert.Equal(t, []int32{2, 3, 3, 6}, types[:4])
			assert.Equal(t, int32(6), types[258])
			assert.Equal(t, int32(1), types[259])
			scores, err := f.Float32s("tokenizer.ggml.scores")
			require.NoError(t, err)
			assert.Equal(t, tok.Scores, scores)

			_, hasOutput := f.Tensor("output.weight")
			assert.False(t, hasOutput, "the classifier is tied to token_embd")
			assert.Len(t, f.Tensors, 1+5*9+1)
			emb, _ := f.Tensor("token_embd.weight")
			assert.Equal(t, []uint64{64, 512}, emb.Dims)
			assert.Equal(t, typ, emb.Type)
			for _, tc := range []struct {
				name string
				dims []uint64
				typ  gguf.TensorType
				want []float32
			}{
				{"blk.0.attn_norm.weight", []uint64{64}, gguf.F32, ck.Layers[0].AttnNorm},
				{"blk.3.attn_q.weight", []uint64{64, 64}, typ, ck.Layers[3].WQ},
				{"blk.1.attn_k.weight", []uint64{64, 32}, typ, ck.Layers[1].WK},
				{"blk.4.attn_v.weight", []uint64{64, 32}, typ, ck.Layers[4].WV},
				{"blk.2.attn_output.weight", []uint64{64, 64}, typ, ck.Layers[2].WO},
				{"blk.2.ffn_norm.weight", []uint64{64}, gguf.F32, ck.Layers[2].FFNNorm},
				{"blk.0.ffn_gate.weight", []uint64{64, 172}, typ, ck.Layers[0].W1},
				{"blk.0.ffn_down.weight", []uint64{172, 64}, typ, ck.Layers[0].W2},
				{"blk.4.ffn_up.weight", []uint64{64, 172}, typ, ck.Layers[4].W3},
				{"output_norm.weight", []uint64{64}, gguf.F32, ck.FinalNorm},
			} {
				info, ok := f.Tensor(tc.name)
				require.True(t, ok, tc.name)
				assert.Equal(t, tc.dims, info.Dims, tc.name)
				assert.Equal(t, tc.typ, info.Type, tc.name)
				got, err := f.F32(tc.name)
				require.NoError(t, err)
				if tc.typ == gguf.F32 {
					assert.Equal(t, tc.want, got, tc.name)
				} else {
					assert.InDeltaSlice(t, tc.want, got, 2e-3, tc.name)
				}
			}

			// The tokenizer survives the trip through GGUF.
			tok2, err := TokenizerFromGGUF(f)
			require.NoError(t, err)
			for _, s := range sampleTexts {
				assert.Equal(t, tok.Encode(s, true), tok2.Encode(s, true), "%q", s)
				assert.Equal(t, s, tok2.Decode(tok2.Encode(s, true)))
			}
		})
	}
}

func TestToGGUFErrors(t *testing.T) {
	ck, tok := loadStories(t)
	_, err := ToGGUF(ck, tok, gguf.Q4_K)
	assert.ErrorIs(t, err, ErrInvalid)
	// Q8_0 needs rows that are multiples of 32; ffn_down rows have 172.
	_, err = ToGGUF(ck, tok, gguf.Q8_0)
	assert.ErrorContains(t, err, "blk.0.ffn_down.weight")
	small, err := NewTokenizer([]string{"a"}, []float32{0}, []TokenType{TokenNormal})
	require.NoError(t, err)
	_, err = ToGGUF(ck, small, gguf.F32)
	assert.ErrorIs(t, err, ErrInvalid)
}

func TestConvertFile(t *testing.T) {
	ckpt, tokPath := modelPath(t, "stories260K.bin"), modelPath(t, "tok512.bin")
	dir := t.TempDir()
	for _, typ := range []string{"f32", "F16", "bf16"} {
		out := filepath.Join(dir, typ+".gguf")
		require.NoError(t, ConvertFile(ckpt, tokPath, out, typ))
		f, err := gguf.Open(out)
		require.NoError(t, err)
		name, err := f.String("general.name")
		require.NoError(t, err)
		assert.Equal(t, "stories260K", name)
		f.Close()
	}
	assert.ErrorIs(t, ConvertFile(ckpt, tokPath, filepath.Join(dir, "x.gguf"), "q2"), ErrInvalid)
	// A failed conversion leaves no file behind.
	assert.ErrorContains(t, ConvertFile(ckpt, tokPath, filepath.Join(dir, "q8.gguf"), "q8_0"), "multiple of the block size")
	_, err := os.Stat(filepath.Join(dir, "q8.gguf"))
	assert.ErrorIs(t, err, os.ErrNotExist)
	// Quantised conversion works when rows are multiples of 32.
	c := Config{Dim: 64, HiddenDim: 96, NLayers: 1, NHeads: 4, NKVHeads: 2, VocabSize: 8, SeqLen: 16, SharedClassifier: false}
	rck := randomCheckpoint(t, c, 3)
	tk, err := NewTokenizer([]string{"<unk>", "<s>", "</s>", "a", "b", "c", "d", " "}, make([]float32, 8),
		[]TokenType{TokenUnknown, TokenControl, TokenControl, 1, 1, 1, 1, 1})
	require.NoError(t, err)
	w, err := ToGGUF(rck, tk, gguf.Q8_0)
	require.NoError(t, err)
	var buf bytes.Buffer
	_, err = w.WriteTo(&buf)
	require.NoError(t, err)
	f, err := gguf.Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	require.NoError(t, err)
	out, ok := f.Tensor("output.weight")
	require.True(t, ok, "a separate classifier is written as output.weight")
	assert.Equal(t, gguf.Q8_0, out.Type)
	qv, err := f.Uint32("general.quantization_version")
	require.NoError(t, err)
	assert.Equal(t, uint32(2), qv)
}

// FuzzEncode checks Encode against the quadratic oracle and the round trip
// through Decode, for arbitrary (also invalid UTF-8) text.
func FuzzEncode(f *testing.F) {
	_, tok := loadStories(f)
	for _, s := range sampleTexts {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ids := tok.Encode(s, false)
		require.Equal(t, naiveEncode(tok, s, false), ids)
		require.Equal(t, s, tok.Decode(ids))
	})
}

// FuzzReadCheckpoint checks that arbitrary bytes never panic the reader and
// that a header passing validation only succeeds at its exact size.
func FuzzReadCheckpoint(f *testing.F) {
	valid := checkpointBytes(f, randomCheckpoint(f, tinyConfig, 2))
	f.Add(valid)
	f.Add(valid[:40])
	f.Fuzz(func(t *testing.T, data []byte) {
		ck, err := ReadCheckpointFrom(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			require.ErrorIs(t, err, ErrFormat)
			return
		}
		require.Equal(t, ck.Config.FileSize(), int64(len(data)))
	})
}
