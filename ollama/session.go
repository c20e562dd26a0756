//go:build cgo

package ollama

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	_ "github.com/ollama/ollama/ml/backend" // the ggml backend
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"
	_ "github.com/ollama/ollama/model/models" // every architecture
	"github.com/ollama/ollama/tokenizer"

	"github.com/kvnorm/kvnorm/adapter"
)

// Config configures a Session.
type Config struct {
	// Policy compresses the cache; nil runs kvnorm's cache without
	// compression.
	Policy *adapter.Policy
	// Upstream keeps the model's own Ollama cache (no kvnorm at all), for
	// comparisons; Policy must be nil then.
	Upstream bool
	// Context is the number of cells per sequence (default 512).
	Context int
	// Sequences is the number of sequences decoded side by side (default 1).
	Sequences int
	// Batch is the largest number of tokens per forward pass (default 512).
	Batch int
	// Threads is the number of CPU threads (default 1).
	Threads int
	// FlashAttention selects ggml's fused attention kernel.
	FlashAttention bool
	// CacheType is the KV cache type: f16 (default), f32, q8_0 or q4_0.
	CacheType string
	// Logger receives compression lines; nil discards them.
	Logger *slog.Logger
}

// Session is a model loaded in Ollama's Go engine with its cache, decoding
// one or more sequences. It is safe for concurrent use; calls are serialised.
type Session struct {
	mu          sync.Mutex
	m           model.Model
	cache       *Cache // nil with Config.Upstream
	kv          kvcache.Cache
	tok         tokenizer.Tokenizer
	spacePrefix bool
	batch       int
	capacity    int
	next        map[int]int32
	closed      bool
}

// ParseCacheType maps a KV cache type name to Ollama's dtype.
func ParseCacheType(s string) (ml.DType, error) {
	switch strings.ToLower(s) {
	case "", "f16":
		return ml.DTypeF16, nil
	case "f32":
		return ml.DTypeF32, nil
	case "q8_0":
		return ml.DTypeQ80, nil
	case "q4_0":
		return ml.DTypeQ40, nil
	}
	return 0, fmt.Errorf("ollama: cache type %q: want f16, f32, q8_0 or q4_0", s)
}

// Open loads a GGUF model into Ollama's Go engine on the CPU and installs
// kvnorm's cache.
func Open(path string, cfg Config) (*Session, error) {
	if cfg.Upstream && cfg.Policy != nil {
		return nil, errors.New("ollama: Config.Upstream runs Ollama's own cache, which cannot compress: drop the policy")
	}
	cfg.Context = cmpOr(cfg.Context, 512)
	cfg.Sequences = cmpOr(cfg.Sequences, 1)
	cfg.Batch = cmpOr(cfg.Batch, 512)
	cfg.Threads = cmpOr(cfg.Threads, 1)
	if cfg.Context < 1 || cfg.Sequences < 1 || cfg.Batch < 1 || cfg.Threads < 1 {
		return nil, fmt.Errorf("ollama: context=%d, sequences=%d, batch=%d, threads=%d must be > 0", cfg.Context, cfg.Sequences, cfg.Batch, cfg.Threads)
	}
	dtype, err := ParseCacheType(cfg.CacheType)
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	fa := ml.FlashAttentionDisabled
	if cfg.FlashAttention {
		fa = ml.FlashAttentionEnabled
	}
	m, err := model.New(path, ml.BackendParams{AllocMemory: true, NumThreads: cfg.Threads, FlashAttention: fa})
	if err != nil {
		return nil, fmt.Errorf("ollama: load %s: %w", path, err)
	}
	s := &Session{m: m, batch: cfg.Batch, capacity: cfg.Context, next: map[int]int32{}}
	fail := func(err error) (*Session, error) {
		m.Backend().Close()
		return nil, err
	}
	if !cfg.Upstream {
		c, err := InstallWith(m, Options{Policy: cfg.Policy, Strict: true, Logger: log})
		if err != nil {
			return fail(err)
		}
		s.cache = c
	}
	s.kv = m.Config().Cache
	if s.kv == nil {
		return fail(fmt.Errorf("%w: architecture %q has no KV cache", ErrUnsupportedModel, m.Backend().Config().Architecture()))
	}
	tok, ok := m.(tokenizer.Tokenizer)
	if !ok {
		return fail(fmt.Errorf("ollama: architecture %q has no tokenizer", m.Backend().Config().Architecture()))
	}
	s.tok = tok
	bc := m.Backend().Config()
	s.spacePrefix = bc.String("tokenizer.ggml.model") == "llama" && bc.Bool("tokenizer.ggml.add_space_prefix", true)
	s.kv.Init(m.Backend(), dtype, cfg.Sequences, cfg.Context, cfg.Batch)
	if err := m.Backend().Load(context.Background(), func(float32) {}); err != nil {
		s.kv.Close()
		return fail(fmt.Errorf("ollama: load weights of %s: %w", path, err))
	}
	if s.cache != nil && cfg.Policy != nil && s.cache.CompressionError() != nil {
		s.kv.Close()
		return fail(s.cache.CompressionError())
	}
	return s, nil
}

func cmpOr(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// Close frees the model and its cache. It is safe to call twice.
func (s *Session) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.kv.Close()
	s.m.Backend().Close()
	return nil
}

// Model returns the loaded model.
func (s *Session) Model() model.Model { return s.m }

// Cache returns kvnorm's cache, or nil with Config.Upstream.
func (s *Session) Cache() *Cache { return s.cache }

// Architecture returns the model's architecture name.
func (s *Session) Architecture() string { return s.m.Backend().Config().Architecture() }

// Tokenize encodes text, with BOS when bos is set and the model adds one.
// SentencePiece vocabularies get the leading space llama.cpp adds, so both
// runtimes give the same ids.
func (s *Session) Tokenize(text string, bos bool) ([]int32, error) {
	if s.spacePrefix && !strings.HasPrefix(text, " ") {
		text = " " + text
	}
	return s.tok.Encode(text, bos)
}

// Detokenize decodes ids to text.
func (s *Session) Detokenize(ids []int32) (string, error) {
	out, err := s.tok.Decode(ids)
	if err != nil {
		return "", err
	}
	if s.spacePrefix {
		out = strings.TrimPrefix(out, " ")
	}
	return out, nil
}

// IsEOS reports whether id ends generation.
func (s *Session) IsEOS(id int32) bool { return s.tok.Is(id, tokenizer.SpecialEOS) }

// VocabSize is the number of logits per token.
func (s *Session) VocabSize() int { return len(s.tok.Vocabulary().Values) }

// Len returns the next position of seq (the number of tokens decoded).
func (s *Session) Len(seq int) int32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.next[seq]
}

// Decode appends tokens to seq, in forward passes of at most Config.Batch
// tokens, and returns the logits of the last one.
func (s *Session) Decode(seq int, tokens []int32) ([]float32, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.decode(seq, tokens)
}

func (s *Session) decode(seq int, tokens []int32) ([]float32, error) {
	if s.closed {
		return nil, errors.New("ollama: session is closed")
	}
	if len(tokens) == 0 {
		return nil, errors.New("ollama: decode: no tokens")
	}
	vocab := int32(s.VocabSize())
	for i, t := range tokens {
		if t < 0 || t >= vocab {
			return nil, fmt.Errorf("ollama: decode: token %d (index %d) outside the vocabulary of %d", t, i, vocab)
		}
	}
	var logits []float32
	for start := 0; start < len(tokens); start += s.batch {
		chunk := tokens[start:min(start+s.batch, len(tokens))]
		last := start+len(chunk) == len(tokens)
		out, err := s.forward(seq, chunk, last)
		if err != nil {
			return nil, err
		}
		logits = out
	}
	return logits, nil
}

func (s *Session) forward(seq int, chunk []int32, output bool) ([]float32, error) {
	ctx := s.m.Backend().NewContext()
	defer ctx.Close()
	n := len(chunk)
	b := input.Batch{
		Inputs:    ctx.Input().FromInts(chunk, n),
		Positions: make([]int32, n),
		Sequences: make([]int, n),
	}
	for i := range chunk {
		b.Positions[i] = s.next[seq] + int32(i)
		b.Sequences[i] = seq
	}
	outs := []int32{}
	if output {
		outs = append(outs, int32(n-1))
	}
	b.Outputs = ctx.Input().FromInts(outs, len(outs))
	ctx.SetBatchSize(n)
	t, err := model.Forward(ctx, s.m, b)
	if err != nil {
		return nil, fmt.Errorf("ollama: forward seq %d at position %d: %w", seq, s.next[seq], err)
	}
	ctx.Forward(t).Compute(t)
	s.next[seq] += int32(n)
	if !output {
		return nil, nil
	}
	return t.Floats(), nil
}

// Flush reports the norms of the last forward pass and applies pending
// compressions now (see Cache.Flush); a no-op without kvnorm's cache.
func (s *Session) Flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cache == nil {
		return nil
	}
	return s.cache.Flush()
}

// Reset forgets everything seq holds.
func (s *Session) Reset(seq int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.next, seq)
	return s.kv.Remove(seq, 0, math.MaxInt32)
}

// GenerateOptions control Generate.
type GenerateOptions struct {
	// Temperature 0 is greedy (ties go to the lowest id).
	Temperature float64
	Seed        uint64
	// IgnoreEOS keeps generating past an end-of-sequence token.
	IgnoreEOS bool
	// Logits, when set, receives the logits before every generated token.
	Logits func(step int, logits []float32)
}

// Generation is the result of Generate.
type Generation struct {
	Prompt  []int32
	Tokens  []int32
	Text    string
	Prefill time.Duration // decoding the prompt
	Flush   time.Duration // reading back norms and compressing after the prompt
	Decode  time.Duration // generating Tokens
}

// Generate decodes prompt into seq, compresses it (with a policy) and
// generates up to n tokens.
func (s *Session) Generate(ctx context.Context, seq int, prompt []int32, n int, o GenerateOptions) (*Generation, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := &Generation{Prompt: prompt}
	t0 := time.Now()
	logits, err := s.decode(seq, prompt)
	if err != nil {
		return nil, err
	}
	g.Prefill = time.Since(t0)
	t0 = time.Now()
	if s.cache != nil {
		if err := s.cache.Flush(); err != nil {
			return nil, err
		}
	}
	g.Flush = time.Since(t0)
	rng := rand.New(rand.NewPCG(o.Seed, 0x6b766e6f726d))
	t0 = time.Now()
	for step := range n {
		if err := ctx.Err(); err != nil {
			return g, err
		}
		if o.Logits != nil {
			o.Logits(step, logits)
		}
		next := Sample(logits, o.Temperature, rng)
		if !o.IgnoreEOS && s.IsEOS(next) {
			break
		}
		g.Tokens = append(g.Tokens, next)
		if step == n-1 {
			break
		}
		if logits, err = s.decode(seq, []int32{next}); err != nil {
			return g, err
		}
	}
	g.Decode = time.Since(t0)
	g.Text, err = s.Detokenize(g.Tokens)
	return g, err
}

// Sample picks a token: the argmax (lowest id on ties) at temperature 0,
// else a draw from softmax(logits/temperature).
func Sample(logits []float32, temperature float64, rng *rand.Rand) int32 {
	best := 0
	for i, v := range logits {
		if v > logits[best] {
			best = i
		}
	}
	if temperature <= 0 || rng == nil {
		return int32(best)
	}
	top := float64(logits[best])
	w := make([]float64, len(logits))
	var sum float64
	for i, v := range logits {
		w[i] = math.Exp((float64(v) - top) / temperature)
		sum += w[i]
	}
	r := rng.Float64() * sum
	for i, x := range w {
		r -= x
		if r <= 0 {
			return int32(i)
		}
	}
	return int32(best)
}
