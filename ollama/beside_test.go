//go:build cgo

package ollama

import (
	"slices"
	"testing"

	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// part is one sequence's share of a forward pass: its tokens, and whether
// the last one has an output (the runner's rule: the last input it holds).
type part struct {
	seq    int
	tokens []int32
	output bool
}

// forwardMixed decodes one forward pass holding several sequences, as
// Ollama's runner batches them, and returns the logits of each part with an
// output, by sequence.
func forwardMixed(t *testing.T, s *Session, parts ...part) map[int][]float32 {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	ctx := s.m.Backend().NewContext()
	defer ctx.Close()
	var b input.Batch
	var ids []int32
	var outs []int32
	var outSeqs []int
	for _, p := range parts {
		for i, tok := range p.tokens {
			ids = append(ids, tok)
			b.Positions = append(b.Positions, s.next[p.seq]+int32(i))
			b.Sequences = append(b.Sequences, p.seq)
		}
		s.next[p.seq] += int32(len(p.tokens))
		if p.output {
			outs = append(outs, int32(len(ids)-1))
			outSeqs = append(outSeqs, p.seq)
		}
	}
	b.Inputs = ctx.Input().FromInts(ids, len(ids))
	if outs == nil {
		outs = []int32{}
	}
	b.Outputs = ctx.Input().FromInts(outs, len(outs))
	ctx.SetBatchSize(len(ids))
	out, err := model.Forward(ctx, s.m, b)
	require.NoError(t, err)
	ctx.Forward(out).Compute(out)
	got := map[int][]float32{}
	if len(outs) == 0 {
		return got
	}
	flat := out.Floats()
	vocab := len(flat) / len(outs)
	for i, seq := range outSeqs {
		got[seq] = slices.Clone(flat[i*vocab : (i+1)*vocab])
	}
	return got
}

// A sequence's compression and logits do not depend on the sequences
// batched beside it. In the runner's pipelined mode a sequence may miss a
// forward pass when others fill it (a full batch): seq 0 decodes its prompt,
// then, in one schedule, a pass holding only seq 1 runs before seq 0's
// first generated token. Every pass that holds seq 0 holds one token of
// seq 1 too, so both schedules compute seq 0's rows with the same ggml
// kernels; its kept positions and logits must be bitwise equal.
func TestBesideIndependent(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"keep=0.5/per-head", Config{Policy: perHead(0.5)}},
		{"keep=0.5/per-token", Config{Policy: perToken(0.5)}},
		{"keep=1", Config{Policy: perHead(1)}},
		{"off", Config{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			run := func(skip bool) ([][]float32, [][]int32) {
				cfg := tc.cfg
				cfg.Pipelined, cfg.Sequences, cfg.Batch, cfg.CacheType = true, 2, 64, "f32"
				s := open(t, cfg)
				ids, err := s.Tokenize(storyPrompt, true)
				require.NoError(t, err)
				other, err := s.Tokenize("The cat sat on the mat and looked at the big red ball and the dog", true)
				require.NoError(t, err)
				b := 0
				next := func() []int32 {
					b++
					return other[b-1 : b]
				}
				var logits [][]float32
				got := forwardMixed(t, s, part{0, ids, true}, part{1, next(), false})
				logits = append(logits, got[0])
				if skip {
					forwardMixed(t, s, part{1, next(), false})
				}
				for step := range 6 {
					got := forwardMixed(t, s, part{0, []int32{int32(300 + step)}, true}, part{1, next(), false})
					logits = append(logits, got[0])
				}
				var kept [][]int32
				for l := range 5 {
					for h := range 4 {
						kept = append(kept, s.Cache().HeadPositions(0, l, h))
					}
				}
				if tc.cfg.Policy != nil && tc.cfg.Policy.Keep < 1 {
					require.NotEmpty(t, s.Cache().Stats(), "seq 0 is compressed")
				}
				return logits, kept
			}
			logitsA, keptA := run(false)
			logitsB, keptB := run(true)
			assert.Equal(t, keptA, keptB, "kept positions of seq 0")
			for i := range logitsA {
				assert.True(t, slices.Equal(logitsA[i], logitsB[i]), "step %d: logits of seq 0 differ by %g", i, maxDiff(logitsA[i], logitsB[i]))
			}
		})
	}
}
