package llamacpp

import (
	"math/bits"

	"github.com/kvnorm/kvnorm/hooks"
)

// posSet is the set of live positions of one sequence, as a bitset: the
// context's own account of its cells, used to count free cells and to check
// evictions before they reach llama.cpp.
type posSet struct {
	w   []uint64
	n   int
	top hooks.Pos // highest live position + 1
}

func (s *posSet) has(p hooks.Pos) bool {
	i := int(p) >> 6
	return p >= 0 && i < len(s.w) && s.w[i]&(1<<(uint(p)&63)) != 0
}

func (s *posSet) add(p hooks.Pos) {
	if p < 0 || s.has(p) {
		return
	}
	i := int(p) >> 6
	for len(s.w) <= i {
		s.w = append(s.w, 0)
	}
	s.w[i] |= 1 << (uint(p) & 63)
	s.n++
	s.top = max(s.top, p+1)
}

func (s *posSet) del(p hooks.Pos) {
	if !s.has(p) {
		return
	}
	s.w[int(p)>>6] &^= 1 << (uint(p) & 63)
	s.n--
	for s.top > 0 && !s.has(s.top-1) {
		if w := s.w[int(s.top-1)>>6]; w == 0 {
			s.top = hooks.Pos(int(s.top-1) &^ 63)
			continue
		}
		s.top--
	}
}

// max is the highest live position, -1 when empty.
func (s *posSet) max() hooks.Pos { return s.top - 1 }

// list returns the live positions, ascending.
func (s *posSet) list() []hooks.Pos {
	out := make([]hooks.Pos, 0, s.n)
	for i, w := range s.w {
		for w != 0 {
			b := bits.TrailingZeros64(w)
			out = append(out, hooks.Pos(i<<6+b))
			w &= w - 1
		}
	}
	return out
}
