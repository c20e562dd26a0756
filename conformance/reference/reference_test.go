package reference_test

import (
	"bytes"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/conformance/reference"
	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/llama2c"
)

const wantStory = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."

// f16Tolerance bounds |logit(F16 GGUF) - logit(F32)| for stories260K over
// the first 64 greedy positions (observed maximum 0.011; logits span about
// ±15).
const f16Tolerance = 0.05

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

// fixture holds stories260K loaded three ways.
type fixture struct {
	ck               *llama2c.Checkpoint
	tok              *llama2c.Tokenizer
	direct, f32, f16 *reference.Model
	f32Path          string
}

var (
	fixtureOnce sync.Once
	fixtureVal  *fixture
	fixtureErr  error
	fixtureDir  string
)

func stories(t *testing.T) *fixture {
	t.Helper()
	ckPath, tokPath := modelPath(t, "stories260K.bin"), modelPath(t, "tok512.bin")
	fixtureOnce.Do(func() {
		fx := &fixture{}
		defer func() { fixtureVal = fx }()
		if fx.ck, fixtureErr = llama2c.ReadCheckpoint(ckPath); fixtureErr != nil {
			return
		}
		if fx.tok, fixtureErr = llama2c.ReadTokenizer(tokPath, fx.ck.Config.VocabSize); fixtureErr != nil {
			return
		}
		if fx.direct, fixtureErr = reference.FromCheckpoint(fx.ck); fixtureErr != nil {
			return
		}
		if fixtureDir, fixtureErr = os.MkdirTemp("", "reference-test-"); fixtureErr != nil {
			return
		}
		for _, c := range []struct {
			typ string
			dst **reference.Model
		}{{"f32", &fx.f32}, {"f16", &fx.f16}} {
			p := filepath.Join(fixtureDir, "stories260K-"+c.typ+".gguf")
			if fixtureErr = llama2c.ConvertFile(ckPath, tokPath, p, c.typ); fixtureErr != nil {
				return
			}
			if *c.dst, fixtureErr = reference.LoadGGUF(p); fixtureErr != nil {
				return
			}
			if c.typ == "f32" {
				fx.f32Path = p
			}
		}
	})
	require.NoError(t, fixtureErr)
	return fixtureVal
}

func TestMain(m *testing.M) {
	code := m.Run()
	if fixtureDir != "" {
		os.RemoveAll(fixtureDir)
	}
	os.Exit(code)
}

func TestGreedyStory(t *testing.T) {
	fx := stories(t)
	for name, m := range map[string]*reference.Model{"llama2c": fx.direct, "gguf-f32": fx.f32, "gguf-f16": fx.f16} {
		t.Run(name, func(t *testing.T) {
			// 30 tokens end with "park"; the period is the 31st token.
			out, err := m.NewSession().Greedy([]int32{llama2c.BOSID}, 30)
			require.NoError(t, err)
			require.Len(t, out, 30)
			assert.Equal(t, strings.TrimSuffix(wantStory, "."), fx.tok.Decode(out))
			out, err = m.NewSession().Greedy([]int32{llama2c.BOSID}, 40)
			require.NoError(t, err)
			text := fx.tok.Decode(out)
			assert.True(t, strings.HasPrefix(text, wantStory), "greedy text %q", text)
			t.Logf("%s: %q", name, text)
		})
	}
}

func TestGGUFTokenizerDecodesStory(t *testing.T) {
	fx := stories(t)
	f, err := gguf.Open(fx.f32Path)
	require.NoError(t, err)
	defer f.Close()
	tok, err := llama2c.TokenizerFromGGUF(f)
	require.NoError(t, err)
	out, err := fx.f32.NewSession().Greedy([]int32{tok.BOS}, 40)
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(tok.Decode(out), wantStory))
	ids := tok.Encode(wantStory, false)
	require.Greater(t, len(out), len(ids))
	assert.Equal(t, ids, out[:len(ids)], "the model writes the story in the tokens the tokenizer produces")
}

func TestConfig(t *testing.T) {
	fx := stories(t)
	want := reference.Config{Layers: 5, Heads: 8, KVHeads: 4, HeadDim: 8, Dim: 64, HiddenDim: 172, Vocab: 512,
		Ctx: 512, RopeDims: 8, RopeBase: 10000, Eps: 1e-5, TiedClassifier: true}
	assert.Equal(t, want, fx.direct.Config())
	assert.Equal(t, want, fx.f32.Config())
	assert.Equal(t, want, fx.f16.Config())
}

// greedyLogits runs greedy decoding of n tokens after BOS one token at a
// time and returns the tokens fed and the logits of every step.
func greedyLogits(t *testing.T, m *reference.Model, n int) ([]int32, [][]float32) {
	s := m.NewSession()
	tokens := []int32{llama2c.BOSID}
	var all [][]float32
	for i := range n {
		l, err := s.Decode(tokens[i:i+1], nil)
		require.NoError(t, err)
		all = append(all, l[0])
		tokens = append(tokens, reference.Argmax(l[0]))
	}
	return tokens[:n], all
}

func TestGGUFMatchesCheckpoint(t *testing.T) {
	fx := stories(t)
	tokens, direct := greedyLogits(t, fx.direct, 64)

	// F32 GGUF: the same float32 weights and metadata, so the same bits.
	s := fx.f32.NewSession()
	viaGGUF, err := s.Decode(tokens, nil)
	require.NoError(t, err)
	s2 := fx.direct.NewSession()
	batch, err := s2.Decode(tokens, nil)
	require.NoError(t, err)
	for i := range direct {
		require.Equal(t, direct[i], viaGGUF[i], "F32 GGUF logits at step %d", i)
		require.Equal(t, direct[i], batch[i], "batched logits at step %d", i)
	}
	for l := range 5 {
		assert.Equal(t, s2.Keys(l), s.Keys(l), "layer %d keys", l)
	}

	// F16 GGUF: weights rounded to half precision.
	f16, err := fx.f16.NewSession().Decode(tokens, nil)
	require.NoError(t, err)
	var worst float64
	for i := range direct {
		for j := range direct[i] {
			worst = max(worst, math.Abs(float64(direct[i][j]-f16[i][j])))
		}
		assert.Equal(t, reference.Argmax(direct[i]), reference.Argmax(f16[i]), "argmax at step %d", i)
	}
	t.Logf("max |logit F16 - F32| over %d steps: %.4g", len(direct), worst)
	assert.Less(t, worst, f16Tolerance)
}

func TestKeysArePostRoPE(t *testing.T) {
	fx := stories(t)
	const tok, pos = int32(403), int32(37)
	a := fx.direct.NewSession()
	_, err := a.Decode([]int32{tok}, []int32{0})
	require.NoError(t, err)
	b := fx.direct.NewSession()
	_, err = b.Decode([]int32{tok}, []int32{pos})
	require.NoError(t, err)
	assert.Equal(t, pos+1, b.NextPos())
	cfg := fx.direct.Config()
	// In layer 0 the pre-RoPE key depends only on the token: at position 0
	// RoPE is the identity, at 37 it rotates each pair by 37 * 10000^(-2i/8).
	for h := range cfg.KVHeads {
		k0 := a.Keys(0)[h][0].Key
		kp := b.Keys(0)[h][0].Key
		assert.Equal(t, pos, b.Keys(0)[h][0].Pos)
		for i := 0; i < cfg.HeadDim; i += 2 {
			ang := float64(pos) * math.Pow(10000, -float64(i)/float64(cfg.HeadDim))
			x, y := float64(k0[i]), float64(k0[i+1])
			assert.InDelta(t, x*math.Cos(ang)-y*math.Sin(ang), kp[i], 1e-5)
			assert.InDelta(t, x*math.Sin(ang)+y*math.Cos(ang), kp[i+1], 1e-5)
		}
		assert.InDelta(t, norm(k0), norm(kp), 1e-5, "RoPE preserves the L2 norm")
		assert.Equal(t, a.Keys(0)[h][0].Value, b.Keys(0)[h][0].Value, "values are not rotated")
	}
}

func norm(v []float32) float64 {
	var s float64
	for _, x := range v {
		s += float64(x) * float64(x)
	}
	return math.Sqrt(s)
}

// prefill decodes BOS plus the first n-1 greedy tokens.
func prefill(t *testing.T, m *reference.Model, n int) (*reference.Session, int32) {
	s := m.NewSession()
	tokens, err := s.Greedy([]int32{llama2c.BOSID}, n-1)
	require.NoError(t, err)
	// Greedy decoded all but the last generated token; decode it too.
	last := tokens[len(tokens)-1]
	logits, err := s.Decode([]int32{last}, nil)
	require.NoError(t, err)
	require.Equal(t, int32(n), s.NextPos())
	return s, reference.Argmax(logits[0])
}

func TestEvictNothingIsIdentity(t *testing.T) {
	fx := stories(t)
	s, next := prefill(t, fx.direct, 20)
	c := s.Clone()
	n, err := c.EvictHead(2, 1, nil)
	require.NoError(t, err)
	assert.Zero(t, n)
	n, err = c.EvictHead(2, 1, []int32{100, -3}) // not live: ignored
	require.NoError(t, err)
	assert.Zero(t, n)
	assert.Zero(t, c.EvictPositions(nil))
	keep := make([]bool, 20)
	for i := range keep {
		keep[i] = true
	}
	n, err = c.KeepHead(0, 0, keep)
	require.NoError(t, err)
	assert.Zero(t, n)

	want, err := s.Decode([]int32{next}, nil)
	require.NoError(t, err)
	got, err := c.Decode([]int32{next}, nil)
	require.NoError(t, err)
	assert.Equal(t, want, got)
}

func TestEvictionChangesLogitsAndAttention(t *testing.T) {
	fx := stories(t)
	base, next := prefill(t, fx.direct, 24)
	cfg := fx.direct.Config()

	// Per head: drop positions 3..9 from layer 1, KV head 2 only.
	s := base.Clone()
	s.RecordAttention = true
	evict := []int32{3, 4, 5, 6, 7, 8, 9}
	n, err := s.EvictHead(1, 2, evict)
	require.NoError(t, err)
	assert.Equal(t, len(evict), n)
	live := s.LivePositions(1, 2)
	assert.Len(t, live, 24-len(evict))
	for _, p := range evict {
		assert.NotContains(t, live, p)
	}
	assert.Len(t, s.LivePositions(1, 1), 24, "other heads keep everything")
	assert.Len(t, s.LivePositions(0, 2), 24, "other layers keep everything")
	assert.Equal(t, int32(24), s.NextPos(), "eviction does not move the next position")

	want, err := base.Decode([]int32{next}, nil)
	require.NoError(t, err)
	got, err := s.Decode([]int32{next}, nil)
	require.NoError(t, err)
	assert.NotEqual(t, want, got, "evicting entries changes the logits")

	// The new token (position 24) attended to none of the evicted entries
	// in the query heads that read KV head 2, and to all 25 elsewhere.
	perKV := cfg.Heads / cfg.KVHeads
	for h := range cfg.Heads {
		a, ok := s.LastAttention(0, 1, h)
		require.True(t, ok)
		if h/perKV == 2 {
			assert.Len(t, a.Positions, 25-len(evict), "head %d", h)
			for _, p := range evict {
				assert.NotContains(t, a.Positions, p)
			}
		} else {
			assert.Len(t, a.Positions, 25, "head %d", h)
		}
		var sum float64
		for _, w := range a.Weights {
			sum += float64(w)
		}
		assert.InDelta(t, 1, sum, 1e-5)
		assert.Equal(t, int32(24), a.Positions[len(a.Positions)-1], "the token sees itself")
	}
	assert.Equal(t, int32(24), s.LivePositions(1, 2)[len(s.LivePositions(1, 2))-1], "new tokens append at NextPos")
}

func TestEvictPositions(t *testing.T) {
	fx := stories(t)
	base, next := prefill(t, fx.direct, 16)
	s := base.Clone()
	cfg := fx.direct.Config()
	assert.Equal(t, 2*cfg.Layers*cfg.KVHeads, s.EvictPositions([]int32{5, 11}))
	for l := range cfg.Layers {
		for h := range cfg.KVHeads {
			assert.Equal(t, []int32{0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15}, s.LivePositions(l, h))
		}
	}
	want, err := base.Decode([]int32{next}, nil)
	require.NoError(t, err)
	got, err := s.Decode([]int32{next}, nil)
	require.NoError(t, err)
	assert.NotEqual(t, want, got)
	assert.Equal(t, int32(16), s.LivePositions(0, 0)[len(s.LivePositions(0, 0))-1])

	// A position evicted everywhere may be decoded again (the runtime
	// re-filling a hole); one still live in any head may not.
	_, err = s.Decode([]int32{7}, []int32{5})
	require.NoError(t, err)
	_, err = s.EvictHead(0, 0, []int32{11})
	require.NoError(t, err)
	_, err = s.Decode([]int32{7}, []int32{12})
	assert.ErrorIs(t, err, reference.ErrInput)
}

func TestKeepHead(t *testing.T) {
	fx := stories(t)
	s, _ := prefill(t, fx.direct, 8)
	keep := []bool{true, false, true, false, true, true, false, true}
	n, err := s.KeepHead(3, 1, keep)
	require.NoError(t, err)
	assert.Equal(t, 3, n)
	assert.Equal(t, []int32{0, 2, 4, 5, 7}, s.LivePositions(3, 1))
	entries := s.Entries(3, 1)
	require.Len(t, entries, 5)
	assert.Equal(t, int32(4), entries[2].Pos)
	assert.Len(t, entries[2].Key, 8)
	_, err = s.KeepHead(3, 1, keep) // now only 5 live entries
	assert.ErrorIs(t, err, reference.ErrInput)
}

func TestBatchEqualsIncremental(t *testing.T) {
	fx := stories(t)
	tokens, inc := greedyLogits(t, fx.direct, 12)
	s := fx.direct.NewSession()
	a, err := s.Decode(tokens[:5], nil)
	require.NoError(t, err)
	b, err := s.Decode(tokens[5:], nil)
	require.NoError(t, err)
	assert.Equal(t, inc, append(a, b...))

	// Positions need not be consecutive; a batch is causal by position,
	// not by order in the batch.
	x := fx.direct.NewSession()
	rev, err := x.Decode([]int32{tokens[2], tokens[1], tokens[0]}, []int32{2, 1, 0})
	require.NoError(t, err)
	assert.Equal(t, inc[0], rev[2])
	assert.Equal(t, inc[2], rev[0])
	assert.Equal(t, []int32{2, 1, 0}, x.LivePositions(0, 0))
}

func TestDecodeErrors(t *testing.T) {
	fx := stories(t)
	s := fx.direct.NewSession()
	for _, tc := range []struct {
		name      string
		tokens    []int32
		positions []int32
	}{
		{"token out of range", []int32{512}, nil},
		{"negative token", []int32{-1}, nil},
		{"negative position", []int32{1}, []int32{-1}},
		{"length mismatch", []int32{1, 2}, []int32{0}},
		{"repeated position", []int32{1, 2}, []int32{4, 4}},
	} {
		_, err := s.Decode(tc.tokens, tc.positions)
		assert.ErrorIs(t, err, reference.ErrInput, tc.name)
	}
	_, err := s.Decode([]int32{1}, nil)
	require.NoError(t, err)
	_, err = s.Decode([]int32{1}, []int32{0})
	assert.ErrorIs(t, err, reference.ErrInput, "position already live")
	_, err = s.EvictHead(5, 0, nil)
	assert.ErrorIs(t, err, reference.ErrInput)
	_, err = s.EvictHead(0, 4, nil)
	assert.ErrorIs(t, err, reference.ErrInput)
	assert.Nil(t, s.LivePositions(0, 9))
	assert.Nil(t, s.Keys(-1))
	_, ok := s.LastAttention(0, 0, 0)
	assert.False(t, ok, "attention was not recorded")
	_, err = s.Greedy(nil, 3)
	assert.ErrorIs(t, err, reference.ErrInput)
}

// randomModel builds a random llama2.c checkpoint whose rows are multiples
// of 32, so that it converts to Q8_0 too.
func randomCheckpoint(t *testing.T, shared bool) (*llama2c.Checkpoint, *llama2c.Tokenizer) {
	c := llama2c.Config{Dim: 64, HiddenDim: 96, NLayers: 2, NHeads: 4, NKVHeads: 2, VocabSize: 40, SeqLen: 32, SharedClassifier: shared}
	ck, err := llama2c.NewCheckpoint(c)
	require.NoError(t, err)
	r := rand.New(rand.NewPCG(11, 12))
	fill := func(v []float32, scale float64) {
		for i := range v {
			v[i] = float32(r.NormFloat64() * scale)
		}
	}
	fill(ck.TokenEmbedding, 1)
	if !shared {
		fill(ck.Classifier, 0.3)
	}
	fill(ck.FinalNorm, 1)
	for _, l := range ck.Layers {
		for _, v := range [][]float32{l.WQ, l.WK, l.WV, l.WO, l.W1, l.W2, l.W3} {
			fill(v, 0.15)
		}
		fill(l.AttnNorm, 1)
		fill(l.FFNNorm, 1)
	}
	pieces := make([]string, c.VocabSize)
	types := make([]llama2c.TokenType, c.VocabSize)
	for i := range pieces {
		pieces[i] = string(rune('A' + i))
		types[i] = llama2c.TokenNormal
	}
	tok, err := llama2c.NewTokenizer(pieces, make([]float32, c.VocabSize), types)
	require.NoError(t, err)
	return ck, tok
}

func modelVia(t *testing.T, ck *llama2c.Checkpoint, tok *llama2c.Tokenizer, typ gguf.TensorType) *reference.Model {
	w, err := llama2c.ToGGUF(ck, tok, typ)
	require.NoError(t, err)
	var buf bytes.Buffer
	_, err = w.WriteTo(&buf)
	require.NoError(t, err)
	f, err := gguf.Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	require.NoError(t, err)
	m, err := reference.FromGGUF(f)
	require.NoError(t, err)
	return m
}

func TestQuantizedAndUntiedGGUF(t *testing.T) {
	ck, tok := randomCheckpoint(t, false)
	direct, err := reference.FromCheckpoint(ck)
	require.NoError(t, err)
	assert.False(t, direct.Config().TiedClassifier)
	tokens := []int32{1, 5, 9, 33, 2, 17, 17, 0}
	want, err := direct.NewSession().Decode(tokens, nil)
	require.NoError(t, err)
	for _, tc := range []struct {
		typ gguf.TensorType
		tol float64
	}{{gguf.F32, 0}, {gguf.F16, 0.02}, {gguf.BF16, 0.2}, {gguf.Q8_0, 0.2}} {
		m := modelVia(t, ck, tok, tc.typ)
		assert.False(t, m.Config().TiedClassifier, "output.weight is present")
		got, err := m.NewSession().Decode(tokens, nil)
		require.NoError(t, err)
		var worst float64
		for i := range want {
			for j := range want[i] {
				worst = max(worst, math.Abs(float64(want[i][j]-got[i][j])))
			}
		}
		t.Logf("%s: max |logit diff| %.3g", tc.typ, worst)
		assert.LessOrEqual(t, worst, tc.tol, tc.typ.String())
	}
}

func TestFromGGUFErrors(t *testing.T) {
	ck, tok := randomCheckpoint(t, true)
	build := func(edit func(w *gguf.Writer)) *gguf.File {
		w, err := llama2c.ToGGUF(ck, tok, gguf.F32)
		require.NoError(t, err)
		edit(w)
		var buf bytes.Buffer
		_, err = w.WriteTo(&buf)
		require.NoError(t, err)
		f, err := gguf.Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
		require.NoError(t, err)
		return f
	}
	// without returns a copy of f lacking a metadata key or a tensor.
	without := func(f *gguf.File, name string) *gguf.File {
		w := gguf.NewWriter()
		for _, kv := range f.KVs {
			if kv.Key != name {
				require.NoError(t, w.Set(kv.Key, kv.Value))
			}
		}
		for _, ti := range f.Tensors {
			if ti.Name == name {
				continue
			}
			data, err := f.TensorData(ti.Name)
			require.NoError(t, err)
			require.NoError(t, w.AddTensor(ti.Name, ti.Type, ti.Dims, data))
		}
		var buf bytes.Buffer
		_, err := w.WriteTo(&buf)
		require.NoError(t, err)
		g, err := gguf.Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
		require.NoError(t, err)
		return g
	}
	ok := build(func(*gguf.Writer) {})
	_, err := reference.FromGGUF(ok)
	require.NoError(t, err)

	for _, tc := range []struct {
		name string
		f    *gguf.File
		is   error
		msg  string
	}{
		{"architecture", build(func(w *gguf.Writer) { w.SetString("general.architecture", "gpt2") }), reference.ErrModel, `"gpt2"`},
		{"missing eps", without(ok, "llama.attention.layer_norm_rms_epsilon"), gguf.ErrNotFound, "layer_norm_rms_epsilon"},
		{"missing tensor", without(ok, "blk.1.ffn_up.weight"), reference.ErrModel, "blk.1.ffn_up.weight"},
		{"wrong heads", build(func(w *gguf.Writer) { w.SetUint32("llama.attention.head_count", 3) }), reference.ErrModel, "head count 3"},
		{"wrong kv heads", build(func(w *gguf.Writer) { w.SetUint32("llama.attention.head_count_kv", 3) }), reference.ErrModel, "kv heads 3"},
		{"wrong ffn", build(func(w *gguf.Writer) { w.SetUint32("llama.feed_forward_length", 95) }), reference.ErrModel, "ffn_gate.weight has dims [64 96], want [64 95]"},
		{"rope scaling", build(func(w *gguf.Writer) { w.SetString("llama.rope.scaling.type", "linear") }), reference.ErrModel, "RoPE scaling"},
		{"key length", build(func(w *gguf.Writer) { w.SetUint32("llama.attention.key_length", 32) }), reference.ErrModel, "key_length"},
		{"eps type", build(func(w *gguf.Writer) { w.SetString("llama.attention.layer_norm_rms_epsilon", "1e-5") }), gguf.ErrType, "layer_norm_rms_epsilon"},
	} {
		_, err := reference.FromGGUF(tc.f)
		assert.ErrorIs(t, err, tc.is, tc.name)
		assert.ErrorContains(t, err, tc.msg, tc.name)
	}
	_, err = reference.LoadGGUF(filepath.Join(t.TempDir(), "missing.gguf"))
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestSessionsAreIndependent(t *testing.T) {
	fx := stories(t)
	var wg sync.WaitGroup
	results := make([][]int32, 4)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := fx.direct.NewSession().Greedy([]int32{llama2c.BOSID}, 20)
			assert.NoError(t, err)
			results[i] = out
		}()
	}
	wg.Wait()
	for _, r := range results[1:] {
		assert.True(t, slices.Equal(results[0], r))
	}
}
