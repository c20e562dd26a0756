package conformance

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"

	"github.com/kvnorm/kvnorm/hooks"
)

// corpus hands out the token samples the lm, needle, greedy and attention
// tasks read: text sampled from the model under test (temperature 1, seeded
// per sample, so in-distribution for any model), or windows of a user's text.
type corpus struct {
	eng    hooks.Engine
	seed   uint64
	length int // tokens per sample, BOS included
	bos    []int32
	text   []int32 // the user's text, tokenized without BOS
	cache  map[int][]int32
	// onSample is called after each sampled token (progress).
	onSample func()
}

// samplingSeq is the sequence the corpus samples in.
const samplingSeq hooks.SeqID = 0

func newCorpus(eng hooks.Engine, seed uint64, length int, text string) (*corpus, error) {
	c := &corpus{eng: eng, seed: seed, length: length, cache: map[int][]int32{}}
	var err error
	if c.bos, err = eng.Tokenize("", true); err != nil {
		return nil, err
	}
	if len(c.bos) == 0 {
		return nil, errors.New("conformance: the model has no BOS token to start sampling from; pass --text")
	}
	if text != "" {
		if c.text, err = eng.Tokenize(text, false); err != nil {
			return nil, err
		}
		if len(c.text) == 0 {
			return nil, errors.New("conformance: --text holds no token")
		}
	}
	return c, nil
}

// sampled reports whether samples come from the model.
func (c *corpus) sampled() bool { return c.text == nil }

// sample returns sample i: BOS then up to length-len(BOS) tokens (fewer
// only when a user's text is shorter).
func (c *corpus) sample(i int) ([]int32, error) {
	if s, ok := c.cache[i]; ok {
		return s, nil
	}
	var s []int32
	if c.text != nil {
		w := c.length - len(c.bos)
		s = append(append(s, c.bos...), c.window(i, w)...)
	} else {
		var err error
		if s, err = c.generate(i); err != nil {
			return nil, err
		}
	}
	c.cache[i] = s
	return s, nil
}

// window returns the i-th window of w tokens of the user's text, back to
// back, wrapping around (the whole text when it is shorter).
func (c *corpus) window(i, w int) []int32 {
	n := len(c.text)
	if n <= w {
		return c.text
	}
	starts := n - w + 1
	return c.text[(i*w)%starts:][:w]
}

// generate samples one text from BOS at temperature 1 with sample i's seed.
func (c *corpus) generate(i int) ([]int32, error) {
	c.eng.SetObserver(nil)
	if err := c.eng.RemoveSequence(samplingSeq); err != nil {
		return nil, err
	}
	defer func() { _ = c.eng.RemoveSequence(samplingSeq) }()
	rng := rand.New(rand.NewPCG(c.seed, mix(0x5a3b1e, uint64(i))))
	toks := append([]int32(nil), c.bos...)
	rows, err := c.eng.Prefill(samplingSeq, toks, false)
	if err != nil {
		return nil, fmt.Errorf("conformance: sampling text %d: %w", i, err)
	}
	last := rows[len(rows)-1]
	for len(toks) < c.length {
		next := sampleToken(last, rng.Float64())
		toks = append(toks, next)
		if c.onSample != nil {
			c.onSample()
		}
		if len(toks) == c.length {
			break
		}
		rows, err := c.eng.Decode(samplingSeq, []int32{next})
		if err != nil {
			return nil, fmt.Errorf("conformance: sampling text %d: %w", i, err)
		}
		last = rows[0]
	}
	return toks, nil
}

// sampleToken draws from softmax(logits) by inverting the CDF at u in [0, 1).
func sampleToken(logits []float32, u float64) int32 {
	m := math.Inf(-1)
	for _, v := range logits {
		m = max(m, float64(v))
	}
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v) - m)
	}
	target := u * sum
	var acc float64
	for i, v := range logits {
		acc += math.Exp(float64(v) - m)
		if acc > target {
			return int32(i)
		}
	}
	return int32(len(logits) - 1)
}
