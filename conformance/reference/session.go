package reference

import (
	"fmt"
	"math"
	"slices"
)

// Entry is one cached token of one (layer, KV head): its position and its
// post-RoPE key and value, HeadDim values each.
type Entry struct {
	Pos   int32
	Key   []float32
	Value []float32
}

// headCache is the entry list of one (layer, KV head), in insertion order,
// keys and values flattened with stride HeadDim.
type headCache struct {
	pos  []int32
	keys []float32
	vals []float32
}

// Attention is the attention of one query head of one token over the
// entries it saw: their positions and softmax weights, in cache order.
type Attention struct {
	Positions []int32
	Weights   []float32
}

// Session is one sequence: a KV cache and the position bookkeeping. It is
// not safe for concurrent use; use [Session.Clone] to branch.
type Session struct {
	m     *Model
	cache [][]headCache // [layer][kv head]
	// live counts, per position, the (layer, head) lists holding it.
	live    map[int32]int
	nextPos int32

	// RecordAttention makes Decode keep the attention weights of its
	// tokens for [Session.LastAttention].
	RecordAttention bool
	attn            [][][]Attention // [token][layer][head] of the last Decode
}

// NewSession returns a session with an empty cache.
func (m *Model) NewSession() *Session {
	s := &Session{m: m, live: map[int32]int{}, cache: make([][]headCache, m.cfg.Layers)}
	for l := range s.cache {
		s.cache[l] = make([]headCache, m.cfg.KVHeads)
	}
	return s
}

// Clone returns an independent copy of the session and its cache.
func (s *Session) Clone() *Session {
	c := &Session{m: s.m, live: make(map[int32]int, len(s.live)), nextPos: s.nextPos,
		RecordAttention: s.RecordAttention, cache: make([][]headCache, len(s.cache))}
	for p, n := range s.live {
		c.live[p] = n
	}
	for l, heads := range s.cache {
		c.cache[l] = make([]headCache, len(heads))
		for h, hc := range heads {
			c.cache[l][h] = headCache{slices.Clone(hc.pos), slices.Clone(hc.keys), slices.Clone(hc.vals)}
		}
	}
	return c
}

// NextPos returns one past the largest position decoded so far (0 for a new
// session), where the runtimes append the next token. Evictions do not
// change it: kept entries keep their positions and there is no RoPE shift.
func (s *Session) NextPos() int32 { return s.nextPos }

// Decode runs tokens at positions (nil positions: consecutive from
// [Session.NextPos]) and returns the logits of every token. All the batch's
// keys and values enter the cache first, layer by layer; then each token
// attends to the live entries of its KV heads whose position is not after
// its own, as the runtimes' causal masks do. A position may not already be
// live in the cache, nor repeat within the batch.
func (s *Session) Decode(tokens, positions []int32) ([][]float32, error) {
	c := s.m.cfg
	if positions == nil {
		positions = make([]int32, len(tokens))
		for i := range positions {
			positions[i] = s.nextPos + int32(i)
		}
	}
	if len(positions) != len(tokens) {
		return nil, fmt.Errorf("%w: %d tokens but %d positions", ErrInput, len(tokens), len(positions))
	}
	seen := map[int32]bool{}
	for i, tok := range tokens {
		p := positions[i]
		switch {
		case tok < 0 || int(tok) >= c.Vocab:
			return nil, fmt.Errorf("%w: token %d at index %d out of range [0, %d)", ErrInput, tok, i, c.Vocab)
		case p < 0 || p == math.MaxInt32:
			return nil, fmt.Errorf("%w: position %d at index %d", ErrInput, p, i)
		case seen[p]:
			return nil, fmt.Errorf("%w: position %d repeated in the batch", ErrInput, p)
		case s.live[p] > 0:
			return nil, fmt.Errorf("%w: position %d is already in the cache", ErrInput, p)
		}
		seen[p] = true
	}
	if len(tokens) == 0 {
		return nil, nil
	}

	n, d, hd, kvDim := len(tokens), c.Dim, c.HeadDim, c.KVHeads*c.HeadDim
	newMat := func(cols int) [][]float32 {
		back := make([]float32, n*cols)
		m := make([][]float32, n)
		for t := range m {
			m[t] = back[t*cols : (t+1)*cols]
		}
		return m
	}
	x, xb, q, k, v, att, tmp := newMat(d), newMat(d), newMat(d), newMat(kvDim), newMat(kvDim), newMat(d), newMat(d)
	h1, h3 := newMat(c.HiddenDim), newMat(c.HiddenDim)
	for t, tok := range tokens {
		copy(x[t], s.m.embd[int(tok)*d:(int(tok)+1)*d])
	}
	if s.RecordAttention {
		s.attn = make([][][]Attention, n)
		for t := range s.attn {
			s.attn[t] = make([][]Attention, c.Layers)
			for l := range s.attn[t] {
				s.attn[t][l] = make([]Attention, c.Heads)
			}
		}
	} else {
		s.attn = nil
	}

	scale := 1 / math.Sqrt(float64(hd))
	var scores []float64
	for li, L := range s.m.layers {
		for t := range n {
			rmsNorm(xb[t], x[t], L.attnNorm, c.Eps)
		}
		matmul(q, L.wq, xb, d, d)
		matmul(k, L.wk, xb, kvDim, d)
		matmul(v, L.wv, xb, kvDim, d)
		for t, p := range positions {
			for h := range c.Heads {
				s.m.rope(q[t][h*hd:(h+1)*hd], p)
			}
			for h := range c.KVHeads {
				s.m.rope(k[t][h*hd:(h+1)*hd], p)
				hc := &s.cache[li][h]
				hc.pos = append(hc.pos, p)
				hc.keys = append(hc.keys, k[t][h*hd:(h+1)*hd]...)
				hc.vals = append(hc.vals, v[t][h*hd:(h+1)*hd]...)
			}
		}
		for t, p := range positions {
			clear(att[t])
			for h := range c.Heads {
				hc := &s.cache[li][h/s.m.kvPerQ]
				qh := q[t][h*hd : (h+1)*hd]
				scores = scores[:0]
				maxScore := math.Inf(-1)
				for e, ep := range hc.pos {
					sc := math.Inf(-1) // masked: after the query
					if ep <= p {
						sc = dot(qh, hc.keys[e*hd:(e+1)*hd]) * scale
						maxScore = max(maxScore, sc)
					}
					scores = append(scores, sc)
				}
				var sum float64
				for e := range scores {
					scores[e] = math.Exp(scores[e] - maxScore) // exp(-Inf) = 0
					sum += scores[e]
				}
				out := att[t][h*hd : (h+1)*hd]
				acc := make([]float64, hd)
				for e, w := range scores {
					if w == 0 {
						continue
					}
					w /= sum
					scores[e] = w
					for j, vv := range hc.vals[e*hd : (e+1)*hd] {
						acc[j] += w * float64(vv)
					}
				}
				for j := range out {
					out[j] = float32(acc[j])
				}
				if s.RecordAttention {
					a := Attention{}
					for e, ep := range hc.pos {
						if ep <= p {
							a.Positions = append(a.Positions, ep)
							a.Weights = append(a.Weights, float32(scores[e]))
						}
					}
					s.attn[t][li][h] = a
				}
			}
		}
		matmul(tmp, L.wo, att, d, d)
		for t := range n {
			for i := range x[t] {
				x[t][i] += tmp[t][i]
			}
			rmsNorm(xb[t], x[t], L.ffnNorm, c.Eps)
		}
		matmul(h1, L.w1, xb, c.HiddenDim, d)
		matmul(h3, L.w3, xb, c.HiddenDim, d)
		for t := range n {
			for i := range h1[t] {
				h1[t][i] = float32(silu(float64(h1[t][i])) * float64(h3[t][i]))
			}
		}
		matmul(tmp, L.w2, h1, d, c.HiddenDim)
		for t := range n {
			for i := range x[t] {
				x[t][i] += tmp[t][i]
			}
		}
	}
	for t := range n {
		rmsNorm(xb[t], x[t], s.m.outNorm, c.Eps)
	}
	logits := newMat(c.Vocab)
	matmul(logits, s.m.output, xb, c.Vocab, d)

	perPos := c.Layers * c.KVHeads
	for _, p := range positions {
		s.live[p] += perPos
		s.nextPos = max(s.nextPos, p+1)
	}
	return logits, nil
}

// LastAttention returns, when RecordAttention was set during the last
// Decode, the attention of query head head in layer layer for the token at
// index token of that Decode.
func (s *Session) LastAttention(token, layer, head int) (Attention, bool) {
	if token < 0 || token >= len(s.attn) || layer < 0 || layer >= s.m.cfg.Layers || head < 0 || head >= s.m.cfg.Heads {
		return Attention{}, false
	}
	return s.attn[token][layer][head], true
}

func (s *Session) checkHead(layer, head int) error {
	if layer < 0 || layer >= s.m.cfg.Layers || head < 0 || head >= s.m.cfg.KVHeads {
		return fmt.Errorf("%w: layer %d, KV head %d out of range (%d layers, %d KV heads)",
			ErrInput, layer, head, s.m.cfg.Layers, s.m.cfg.KVHeads)
	}
	return nil
}

// keep filters the entries of one list, keeping entry e when keepEntry(e).
func (s *Session) keep(hc *headCache, keepEntry func(e int) bool) int {
	hd := s.m.cfg.HeadDim
	w := 0
	for e, p := range hc.pos {
		if !keepEntry(e) {
			if s.live[p]--; s.live[p] == 0 {
				delete(s.live, p)
			}
			continue
		}
		hc.pos[w] = p
		copy(hc.keys[w*hd:(w+1)*hd], hc.keys[e*hd:(e+1)*hd])
		copy(hc.vals[w*hd:(w+1)*hd], hc.vals[e*hd:(e+1)*hd])
		w++
	}
	removed := len(hc.pos) - w
	hc.pos, hc.keys, hc.vals = hc.pos[:w], hc.keys[:w*hd], hc.vals[:w*hd]
	return removed
}

// EvictHead removes the entries at the given positions from one (layer, KV
// head) list, as per-head compression does, and returns how many it
// removed. Positions not live there are ignored.
func (s *Session) EvictHead(layer, head int, positions []int32) (int, error) {
	if err := s.checkHead(layer, head); err != nil {
		return 0, err
	}
	drop := make(map[int32]bool, len(positions))
	for _, p := range positions {
		drop[p] = true
	}
	hc := &s.cache[layer][head]
	return s.keep(hc, func(e int) bool { return !drop[hc.pos[e]] }), nil
}

// KeepHead applies a keep mask to one (layer, KV head) list: entry i (in
// [Session.LivePositions] order) stays when keep[i]. len(keep) must equal
// the number of live entries. It returns how many entries it removed.
func (s *Session) KeepHead(layer, head int, keep []bool) (int, error) {
	if err := s.checkHead(layer, head); err != nil {
		return 0, err
	}
	hc := &s.cache[layer][head]
	if len(keep) != len(hc.pos) {
		return 0, fmt.Errorf("%w: keep mask of %d for %d live entries (layer %d, KV head %d)",
			ErrInput, len(keep), len(hc.pos), layer, head)
	}
	return s.keep(hc, func(e int) bool { return keep[e] }), nil
}

// EvictPositions removes the given positions from every layer and KV head,
// as per-token eviction (llama.cpp's sequence position removal) does, and
// returns how many entries it removed.
func (s *Session) EvictPositions(positions []int32) int {
	drop := make(map[int32]bool, len(positions))
	for _, p := range positions {
		drop[p] = true
	}
	removed := 0
	for l := range s.cache {
		for h := range s.cache[l] {
			hc := &s.cache[l][h]
			removed += s.keep(hc, func(e int) bool { return !drop[hc.pos[e]] })
		}
	}
	return removed
}

// LivePositions returns the positions of the live entries of one (layer, KV
// head), in cache order (the order of insertion). It returns nil for an
// out-of-range layer or head.
func (s *Session) LivePositions(layer, head int) []int32 {
	if s.checkHead(layer, head) != nil {
		return nil
	}
	return slices.Clone(s.cache[layer][head].pos)
}

// Entries returns copies of the live entries of one (layer, KV head), in
// cache order, or nil for an out-of-range layer or head.
func (s *Session) Entries(layer, head int) []Entry {
	if s.checkHead(layer, head) != nil {
		return nil
	}
	hc := &s.cache[layer][head]
	hd := s.m.cfg.HeadDim
	out := make([]Entry, len(hc.pos))
	for e, p := range hc.pos {
		out[e] = Entry{Pos: p, Key: slices.Clone(hc.keys[e*hd : (e+1)*hd]), Value: slices.Clone(hc.vals[e*hd : (e+1)*hd])}
	}
	return out
}

// Keys returns the live entries of every KV head of a layer, indexed
// [head][entry]: the post-RoPE keys (and values) by position, as the
// runtimes cache them. It returns nil for an out-of-range layer.
func (s *Session) Keys(layer int) [][]Entry {
	if layer < 0 || layer >= s.m.cfg.Layers {
		return nil
	}
	out := make([][]Entry, s.m.cfg.KVHeads)
	for h := range out {
		out[h] = s.Entries(layer, h)
	}
	return out
}

// Argmax returns the index of the largest logit (the first on ties).
func Argmax(logits []float32) int32 {
	best := 0
	for i, v := range logits {
		if v > logits[best] {
			best = i
		}
	}
	return int32(best)
}

// Greedy decodes prompt at the next positions, then appends n tokens, each
// the argmax of the previous logits, and returns those n tokens.
func (s *Session) Greedy(prompt []int32, n int) ([]int32, error) {
	if len(prompt) == 0 {
		return nil, fmt.Errorf("%w: empty prompt", ErrInput)
	}
	logits, err := s.Decode(prompt, nil)
	if err != nil {
		return nil, err
	}
	last := logits[len(logits)-1]
	out := make([]int32, 0, n)
	for range n {
		next := Argmax(last)
		out = append(out, next)
		if len(out) == n {
			break
		}
		l, err := s.Decode([]int32{next}, nil)
		if err != nil {
			return out, err
		}
		last = l[0]
	}
	return out, nil
}

// TailKeys returns copies of the positions and post-RoPE keys (HeadDim
// values each, back to back) of the last n entries of one (layer, KV head).
// Entries keep their insertion order, so after a Decode of n tokens these
// are that batch's tokens in batch order: what a runtime reports to the
// compressor for the batch, without copying the whole cache as [Session.Keys]
// does.
func (s *Session) TailKeys(layer, head, n int) ([]int32, []float32, error) {
	if err := s.checkHead(layer, head); err != nil {
		return nil, nil, err
	}
	hc := &s.cache[layer][head]
	if n < 0 || n > len(hc.pos) {
		return nil, nil, fmt.Errorf("%w: %d tail entries of %d live (layer %d, KV head %d)", ErrInput, n, len(hc.pos), layer, head)
	}
	hd := s.m.cfg.HeadDim
	from := len(hc.pos) - n
	return slices.Clone(hc.pos[from:]), slices.Clone(hc.keys[from*hd:]), nil
}

// LaneLen returns the number of live entries of one (layer, KV head), or
// -1 for an out-of-range layer or head.
func (s *Session) LaneLen(layer, head int) int {
	if s.checkHead(layer, head) != nil {
		return -1
	}
	return len(s.cache[layer][head].pos)
}

// LiveCount returns the number of distinct live positions and of live
// (layer, KV head, position) entries.
func (s *Session) LiveCount() (positions int, entries int64) {
	for _, n := range s.live {
		entries += int64(n)
	}
	return len(s.live), entries
}
