package adapter

import (
	"cmp"
	"fmt"
	"math"
	"slices"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// Plan is what one compression of one sequence keeps. Exactly one of Token
// and Head is set, by the policy's granularity. A plan is a pure function of
// the recorded norms, the policy, the target and the seed.
type Plan struct {
	Target int // positions kept per head (per sequence, for per-token plans)
	Token  *hooks.TokenPlan
	Head   *hooks.HeadPlan
}

// Empty reports whether the plan evicts nothing.
func (p *Plan) Empty() bool {
	if p.Token != nil {
		return len(p.Token.Evict) == 0
	}
	if p.Head != nil {
		for _, l := range p.Head.Layers {
			if l != nil {
				return false
			}
		}
	}
	return true
}

// Plan decides what seq keeps when its record is compressed to target
// positions per head (target < 0: the policy's own budget). With force set
// (cache pressure), skipped layers are compressed too in per-head mode, since
// every layer must fit the cache.
func (p Policy) Plan(r *Record, seq hooks.SeqID, target int, force bool) (*Plan, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	var s planScratch
	if p.Granularity == hooks.PerHead {
		return p.planHeads(r, seq, target, force, &s)
	}
	return p.planTokens(r, seq, target, &s)
}

type planScratch struct {
	scores []float32
	sel    []int32
	idx    []int32
	sum    []float64
	cnt    []int32
}

func (p Policy) planTokens(r *Record, seq hooks.SeqID, target int, s *planScratch) (*Plan, error) {
	pos := r.Positions()
	n := len(pos)
	if target < 0 {
		target = p.Target(n)
	}
	target = min(max(target, p.protectedCount(n)), n)
	plan := &Plan{Target: target, Token: &hooks.TokenPlan{Seq: seq}}
	if target >= n {
		plan.Token.Keep = pos
		return plan, nil
	}
	lo, hi := p.candidates(n)
	cand := pos[lo:hi]
	scores, err := p.tokenScores(r, cand, s)
	if err != nil {
		return nil, err
	}
	sel, err := kernels.LowestK(s.sel[:0], scores, target-(n-len(cand)))
	if err != nil {
		return nil, err
	}
	s.sel = sel
	keep := make([]hooks.Pos, 0, target)
	keep = append(keep, pos[:lo]...)
	evict := make([]hooks.Pos, 0, n-target)
	j := 0
	for i, q := range cand {
		if j < len(sel) && int(sel[j]) == i {
			keep = append(keep, q)
			j++
		} else {
			evict = append(evict, q)
		}
	}
	keep = append(keep, pos[hi:]...)
	plan.Token.Keep, plan.Token.Evict = keep, evict
	return plan, nil
}

// candidates returns the index range [lo, hi) of n live positions that is not
// protected by sinks, the window or the last position.
func (p Policy) candidates(n int) (lo, hi int) {
	lo = min(p.Sinks, n)
	hi = max(lo, n-max(p.Window, 1))
	return lo, hi
}

// tokenScores gives one score per candidate position (lowest kept).
func (p Policy) tokenScores(r *Record, cand []hooks.Pos, s *planScratch) ([]float32, error) {
	scores := grow(s.scores, len(cand))
	s.scores = scores
	switch p.Method {
	case Random:
		for i, q := range cand {
			scores[i] = randomScore(p.Seed, 0, 0, q)
		}
		return scores, nil
	case Streaming:
		for i := range cand {
			scores[i] = float32(len(cand) - i)
		}
		return scores, nil
	}
	sh := r.shape
	sum := growF64(s.sum, len(cand))
	cnt := growI32(s.cnt, len(cand))
	s.sum, s.cnt = sum, cnt
	clear(sum)
	clear(cnt)
	init := p.Aggregate == MinNorm || p.Aggregate == MaxNorm
	voters := 0
	for l := range sh.Layers {
		if p.skips(l) {
			continue
		}
		for h := range sh.KVHeads {
			voters++
			lp, ln := r.Lane(l, h)
			var ranks []int32
			if p.Aggregate == MeanRank {
				ranks = s.rankLane(ln)
			}
			// Walk the lane and the candidates together: lanes normally
			// hold exactly the live positions, but a lane may lack some.
			k := 0
			for i, q := range cand {
				for k < len(lp) && lp[k] < q {
					k++
				}
				if k == len(lp) || lp[k] != q {
					continue
				}
				v := float64(ln[k])
				if math.IsNaN(v) {
					v = math.Inf(1) // NaN ranks highest
				}
				switch p.Aggregate {
				case MeanRank:
					sum[i] += float64(ranks[k])
				case MeanNorm:
					sum[i] += v
				case MinNorm:
					if cnt[i] == 0 || v < sum[i] {
						sum[i] = v
					}
				case MaxNorm:
					if cnt[i] == 0 || v > sum[i] {
						sum[i] = v
					}
				}
				cnt[i]++
			}
		}
	}
	if voters == 0 {
		return nil, fmt.Errorf("%w: skip layers %s cover all %d layers: no layer votes", ErrPolicy, FormatLayers(p.SkipLayers), sh.Layers)
	}
	for i := range cand {
		v := float32(math.NaN()) // no record of this position: evict first
		if cnt[i] > 0 {
			v = float32(sum[i])
			if !init {
				v = float32(sum[i] / float64(cnt[i]))
			}
		}
		if p.Method == Inverse {
			v = -v
		}
		scores[i] = v
	}
	return scores, nil
}

// rankLane returns, for each entry of a lane, its rank by norm (0 = lowest),
// ties broken by lower position, NaN highest.
func (s *planScratch) rankLane(norms []float32) []int32 {
	n := len(norms)
	idx := growI32(s.idx, 2*n)
	s.idx = idx
	order, ranks := idx[:n], idx[n:]
	for i := range order {
		order[i] = int32(i)
	}
	slices.SortFunc(order, func(a, b int32) int {
		if c := cmpNorm(norms[a], norms[b]); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	for r, i := range order {
		ranks[i] = int32(r)
	}
	return ranks
}

func cmpNorm(a, b float32) int {
	an, bn := a != a, b != b
	switch {
	case an && bn:
		return 0
	case an:
		return 1
	case bn:
		return -1
	}
	return cmp.Compare(a, b)
}

func (p Policy) planHeads(r *Record, seq hooks.SeqID, target int, force bool, s *planScratch) (*Plan, error) {
	sh := r.shape
	live := r.MaxLaneLen()
	if target < 0 {
		target = p.Target(live)
	}
	plan := &Plan{Target: target, Head: &hooks.HeadPlan{Seq: seq, Layers: make([][][]hooks.Pos, sh.Layers)}}
	for l := range sh.Layers {
		if p.skips(l) && !force {
			continue
		}
		// Every head of a layer keeps the same count.
		shortest := live
		for h := range sh.KVHeads {
			lp, _ := r.Lane(l, h)
			shortest = min(shortest, len(lp))
		}
		t := min(max(target, p.protectedCount(shortest)), shortest)
		evicts := false
		for h := range sh.KVHeads {
			lp, _ := r.Lane(l, h)
			if len(lp) > t {
				evicts = true
			}
		}
		if !evicts {
			continue
		}
		heads := make([][]hooks.Pos, sh.KVHeads)
		for h := range sh.KVHeads {
			keep, err := p.planLane(r, l, h, t, s)
			if err != nil {
				return nil, err
			}
			heads[h] = keep
		}
		plan.Head.Layers[l] = heads
	}
	return plan, nil
}

// planLane returns the t positions (ascending) that lane (l, h) keeps.
func (p Policy) planLane(r *Record, l, h, t int, s *planScratch) ([]hooks.Pos, error) {
	pos, norms := r.Lane(l, h)
	n := len(pos)
	if t >= n {
		return slices.Clone(pos), nil
	}
	lo, hi := p.candidates(n)
	cn := norms[lo:hi]
	scores := grow(s.scores, len(cn))
	s.scores = scores
	for i := range cn {
		switch p.Method {
		case KNorm:
			scores[i] = cn[i]
		case Inverse:
			scores[i] = -cn[i]
		case Random:
			scores[i] = randomScore(p.Seed, l, h, pos[lo+i])
		case Streaming:
			scores[i] = float32(len(cn) - i)
		}
	}
	sel, err := kernels.LowestK(s.sel[:0], scores, t-(n-len(cn)))
	if err != nil {
		return nil, err
	}
	s.sel = sel
	keep := make([]hooks.Pos, 0, t)
	keep = append(keep, pos[:lo]...)
	for _, i := range sel {
		keep = append(keep, pos[lo+int(i)])
	}
	return append(keep, pos[hi:]...), nil
}

// randomScore is a seeded hash of (layer, head, position) in [0, 1): the
// Random method's plan is reproducible and independent of call order.
func randomScore(seed uint64, layer, head int, pos hooks.Pos) float32 {
	x := seed ^ uint64(layer)<<48 ^ uint64(head)<<32 ^ uint64(uint32(pos))
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	x ^= x >> 31
	return float32(x>>40) / (1 << 24)
}

func grow(b []float32, n int) []float32 {
	if cap(b) < n {
		return make([]float32, n)
	}
	return b[:n]
}

func growF64(b []float64, n int) []float64 {
	if cap(b) < n {
		return make([]float64, n)
	}
	return b[:n]
}

func growI32(b []int32, n int) []int32 {
	if cap(b) < n {
		return make([]int32, n)
	}
	return b[:n]
}
