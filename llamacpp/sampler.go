package llamacpp

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
)

// Sampler picks the next token from logits: greedy (the zero value and
// Greedy()) or seeded sampling with temperature, top-k and top-p. A seeded
// Sampler gives the same tokens for the same logits, run after run. It is not
// safe for concurrent use.
type Sampler struct {
	temp float64
	topK int
	topP float64
	rng  *rand.Rand
	cand []cand
}

type cand struct {
	tok   Token
	logit float64
	p     float64
}

// Greedy returns a sampler that always picks the highest logit (the lowest
// token id among equals).
func Greedy() *Sampler { return &Sampler{} }

// NewSampler returns a seeded sampler. temp <= 0 is greedy; topK <= 0 keeps
// every token; topP outside (0, 1) keeps every token.
func NewSampler(temp float64, topK int, topP float64, seed uint64) *Sampler {
	return &Sampler{temp: temp, topK: topK, topP: topP, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// Sample returns the token to emit after logits; NaN logits are never picked
// unless every logit is NaN (then 0). An empty slice gives -1.
func (s *Sampler) Sample(logits []float32) Token {
	if len(logits) == 0 {
		return -1
	}
	if s == nil || s.temp <= 0 || s.rng == nil {
		return argmax(logits)
	}
	c := s.cand[:0]
	for i, l := range logits {
		if l == l {
			c = append(c, cand{tok: Token(i), logit: float64(l)})
		}
	}
	s.cand = c
	if len(c) == 0 {
		return 0
	}
	slices.SortFunc(c, func(a, b cand) int {
		if r := cmp.Compare(b.logit, a.logit); r != 0 {
			return r
		}
		return cmp.Compare(a.tok, b.tok)
	})
	if s.topK > 0 && s.topK < len(c) {
		c = c[:s.topK]
	}
	top := c[0].logit
	var sum float64
	for i := range c {
		c[i].p = math.Exp((c[i].logit - top) / s.temp)
		sum += c[i].p
	}
	if s.topP > 0 && s.topP < 1 {
		var acc float64
		for i := range c {
			acc += c[i].p / sum
			if acc >= s.topP {
				c = c[:i+1]
				break
			}
		}
		sum = 0
		for i := range c {
			sum += c[i].p
		}
	}
	r := s.rng.Float64() * sum
	for _, x := range c {
		r -= x.p
		if r < 0 {
			return x.tok
		}
	}
	return c[len(c)-1].tok
}

func argmax(logits []float32) Token {
	best := -1
	for i, l := range logits {
		if l != l {
			continue
		}
		if best < 0 || l > logits[best] {
			best = i
		}
	}
	if best < 0 {
		return 0
	}
	return Token(best)
}
