//go:build cgo

package ollama

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/ollama/ollama/fs"
	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	_ "github.com/ollama/ollama/ml/backend" // the ggml backend
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"
	_ "github.com/ollama/ollama/model/models" // every architecture
	"github.com/ollama/ollama/tokenizer"

	"github.com/kvnorm/kvnorm/adapter"
)

// Session is a model loaded in Ollama's Go engine with its cache, decoding
// one or more sequences. It is safe for concurrent use; calls are serialised.
type Session struct {
	mu          *sync.Mutex // shared with the session's twins
	share       *modelShare
	cfg         Config // as opened, defaults applied
	dtype       ml.DType
	m           model.Model
	cache       *Cache // nil with Config.Upstream
	kv          kvcache.Cache
	tok         tokenizer.Tokenizer
	spacePrefix bool
	batch       int
	maxBatch    int // Config.Batch, what the cache was sized for
	capacity    int
	protected   int // positions a compression always keeps (sinks, window, the last); 0 without a policy
	next        map[int]int32
	pipelined   bool
	closed      bool
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
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	log := cfg.Logger
	fa := ml.FlashAttentionDisabled
	if cfg.FlashAttention {
		fa = ml.FlashAttentionEnabled
	}
	m, err := model.New(path, ml.BackendParams{AllocMemory: true, NumThreads: cfg.Threads, FlashAttention: fa})
	if err != nil {
		return nil, fmt.Errorf("ollama: load %s: %w", path, err)
	}
	s := &Session{mu: new(sync.Mutex), share: &modelShare{users: 1}, cfg: cfg, dtype: dtype, m: m,
		batch: cfg.Batch, maxBatch: cfg.Batch, capacity: cfg.Context, next: map[int]int32{}, pipelined: cfg.Pipelined}
	fail := func(err error) (*Session, error) {
		m.Backend().Close()
		return nil, err
	}
	if p := cfg.Policy; p != nil {
		// Settings this model cannot use: a policy that can compress
		// nothing is refused, the others are logged.
		for _, mm := range p.CheckModel(int(m.Backend().Config().Uint("block_count")), cfg.Context) {
			if mm.Off {
				return fail(fmt.Errorf("ollama: %w for %s: %w", adapter.ErrPolicy, path, mm))
			}
			log.Warn("kvnorm: policy setting does not fit the model", "model", path, "problem", mm.Error())
		}
		s.protected = p.Sinks + max(p.Window, 1)
	}
	if !cfg.Upstream {
		c, err := InstallWith(m, cacheOptions(cfg))
		if err != nil {
			return fail(err)
		}
		s.cache = c
		// InstallWith found the field; a twin needs it (forwardRows).
		if s.share.field, err = cacheField(m); err != nil {
			return fail(err)
		}
		s.share.cur = c
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
	if (dtype == ml.DTypeQ80 || dtype == ml.DTypeQ40) && headDim(bc)%32 != 0 {
		return fail(fmt.Errorf("ollama: cache type %s needs a head size that is a multiple of 32; %s has %d", cfg.CacheType, path, headDim(bc)))
	}
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

func headDim(c fs.Config) int {
	if d := int(c.Uint("attention.key_length")); d > 0 {
		return d
	}
	if h := int(c.Uint("attention.head_count")); h > 0 {
		return int(c.Uint("embedding_length")) / h
	}
	return 0
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
	if s.share.users--; s.share.users == 0 {
		s.m.Backend().Close()
	}
	return nil
}

// modelShare is what a session and its twins (Session.Twin) share besides
// the model and the lock: how many are open, and the model's Cache field
// with the cache it holds (that of the session that ran the last forward
// pass).
type modelShare struct {
	users int
	field reflect.Value // invalid with Config.Upstream (no twins)
	cur   kvcache.Cache
}

// cacheOptions are the options of a session's kvnorm cache.
func cacheOptions(cfg Config) Options {
	return Options{Policy: cfg.Policy, Strict: true, Logger: cfg.Logger, Pipelined: cfg.Pipelined, Observe: cfg.Observe}
}

// Twin opens a second session on s's loaded model: the weights are not
// loaded again; the twin has a cache of its own, configured as s's (the same
// Config, policy included), and its own sequences. s and its twins share one
// lock, so their calls are serialised; the model and its backend are freed
// when the last of them is closed. Twins make a comparison of two caches
// (compressed and not, say) run on the same weights in memory, which two
// loads of one file do not guarantee. Config.Upstream sessions have no twin.
func (s *Session) Twin() (*Session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("ollama: twin of a closed session")
	}
	if s.cache == nil || !s.share.field.IsValid() {
		return nil, errors.New("ollama: twin: only a session with kvnorm's cache has one (not Config.Upstream)")
	}
	cfg := s.cfg
	// The model keeps the cache it holds until the twin runs a forward pass
	// (forwardRows sets the model's Cache field).
	c, err := newCacheFor(s.m, cacheOptions(cfg))
	if err != nil {
		return nil, err
	}
	c.Init(s.m.Backend(), s.dtype, cfg.Sequences, cfg.Context, cfg.Batch)
	if cfg.Policy != nil && c.CompressionError() != nil {
		c.Close()
		return nil, c.CompressionError()
	}
	t := &Session{mu: s.mu, share: s.share, cfg: cfg, dtype: s.dtype, m: s.m, cache: c, kv: c, tok: s.tok,
		spacePrefix: s.spacePrefix, batch: s.maxBatch, maxBatch: s.maxBatch, capacity: s.capacity,
		protected: s.protected, next: map[int]int32{}, pipelined: s.pipelined}
	s.share.users++
	return t, nil
}

// SetBatch sets the largest forward pass to n tokens, 1 <= n <= Config.Batch
// (the cache was sized for Config.Batch): a smaller prefill chunk for a
// prompt longer than the cache leaves room for compressions under pressure.
func (s *Session) SetBatch(n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n < 1 || n > s.maxBatch {
		return fmt.Errorf("ollama: batch %d must be in [1, %d] (Config.Batch)", n, s.maxBatch)
	}
	s.batch = n
	return nil
}

// Model returns the loaded model.
func (s *Session) Model() model.Model { return s.m }

// Cache returns kvnorm's cache, or nil with Config.Upstream.
func (s *Session) Cache() *Cache { return s.cache }

// Architecture returns the model's architecture name.
func (s *Session) Architecture() string { return s.m.Backend().Config().Architecture() }

// Tokenize encodes text, with BOS when bos is set and the model adds one.
// SentencePiece vocabularies get the leading space llama.cpp adds to any
// non-empty text (also to one that starts with a space), so both runtimes
// give the same ids.
func (s *Session) Tokenize(text string, bos bool) ([]int32, error) {
	if s.spacePrefix && text != "" {
		text = " " + text
	}
	return s.tok.Encode(text, bos)
}

// Encode tokenizes text exactly as Ollama's runner does: no leading space
// is added.
func (s *Session) Encode(text string, bos bool) ([]int32, error) { return s.tok.Encode(text, bos) }

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
// tokens, and returns the logits of the last one. With a policy, tokens that
// do not fit in the cache are fed in smaller passes, each after a compression
// under pressure has made room for it (see chunkSize), so a prompt longer than
// Config.Context completes; without one they fail with Ollama's
// kvcache.ErrKvCacheFull.
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
	for start := 0; start < len(tokens); {
		n := min(s.batch, len(tokens)-start)
		if s.protected > 0 {
			n = chunkSize(n, len(tokens)-start, s.capacity, s.used(seq), s.protected, s.pipelined)
		}
		chunk := tokens[start : start+n]
		last := start+n == len(tokens)
		out, err := s.forward(seq, chunk, last)
		if err != nil {
			return nil, err
		}
		logits = out
		start += n
	}
	return logits, nil
}

// chunkSize is the size of the next forward pass of a sequence that holds
// used of its capacity cells, with total tokens still to feed (n of them, at
// most one batch, in this pass), when a compression under pressure makes room
// before a pass that does not fit (the cache's CachePressure path). A pass
// never exceeds the cache; one that needs room is at most half the cache,
// and small enough that room can be made for it: a compression keeps
// protected positions (sinks, window, the last). In pipelined mode the norms
// of the two previous passes are not read yet and their positions stay, so
// once the tokens will not all fit, every pass is at most a third of what
// can be freed.
func chunkSize(n, total, capacity, used, protected int, pipelined bool) int {
	n = min(n, capacity)
	if used+total <= capacity || (!pipelined && used+n <= capacity) {
		return n
	}
	room := capacity - protected
	if pipelined {
		room /= 3
	}
	return max(1, min(n, capacity/2, room))
}

// used is the largest number of cells a layer of seq holds.
func (s *Session) used(seq int) int {
	if s.cache == nil || s.cache.lay == nil {
		return 0
	}
	if sc := s.cache.lay.seqs[seq]; sc != nil {
		return sc.used()
	}
	return 0
}

func (s *Session) forward(seq int, chunk []int32, output bool) ([]float32, error) {
	var outs []int32
	if output {
		outs = []int32{int32(len(chunk) - 1)}
	}
	rows, err := s.forwardRows(seq, chunk, outs)
	if err != nil || !output {
		return nil, err
	}
	return rows[0], nil
}

// forwardRows decodes chunk into seq in one forward pass and returns the
// logits of the chunk's tokens at the indices outs (ascending).
func (s *Session) forwardRows(seq int, chunk []int32, outs []int32) ([][]float32, error) {
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
	if outs == nil {
		outs = []int32{}
	}
	b.Outputs = ctx.Input().FromInts(outs, len(outs))
	ctx.SetBatchSize(n)
	if s.share.cur != s.kv && s.share.field.IsValid() {
		// The model runs with this session's cache (see Twin).
		s.share.field.Set(reflect.ValueOf(s.kv))
		s.share.cur = s.kv
	}
	t, err := model.Forward(ctx, s.m, b)
	if err != nil {
		return nil, fmt.Errorf("ollama: forward seq %d at position %d: %w", seq, s.next[seq], err)
	}
	ctx.Forward(t).Compute(t)
	s.next[seq] += int32(n)
	if len(outs) == 0 {
		return nil, nil
	}
	flat := t.Floats()
	if len(flat)%len(outs) != 0 {
		return nil, fmt.Errorf("ollama: forward seq %d: %d logits for %d outputs", seq, len(flat), len(outs))
	}
	vocab := len(flat) / len(outs)
	rows := make([][]float32, len(outs))
	for i := range rows {
		rows[i] = flat[i*vocab : (i+1)*vocab : (i+1)*vocab]
	}
	return rows, nil
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

// Remove deletes positions [begin, end) of seq as Ollama's runner does:
// end = math.MaxInt32 truncates, anything else is a context shift that
// renumbers the later positions.
func (s *Session) Remove(seq int, begin, end int32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.kv.Remove(seq, begin, end); err != nil {
		return err
	}
	next := s.next[seq]
	switch {
	case end == math.MaxInt32:
		next = min(next, begin)
	case next >= end:
		next -= end - begin
	case next > begin:
		next = begin
	}
	s.next[seq] = next
	return nil
}

// CopyPrefix makes dst hold positions [0, n) of src, as Ollama's runner does
// when a new request shares a prefix with another slot.
func (s *Session) CopyPrefix(src, dst int, n int32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.kv.CopyPrefix(src, dst, n)
	s.next[dst] = min(n, s.next[src])
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
		g.Before = s.cache.Usage(seq)
		if !s.pipelined {
			if err := s.cache.Flush(); err != nil {
				return nil, err
			}
		}
		g.After = s.cache.Usage(seq)
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
