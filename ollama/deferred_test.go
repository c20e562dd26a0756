//go:build cgo

package ollama

import (
	"testing"

	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A context shift between two batches must not touch the outputs of the
// batch before, which Ollama's runner reads only after it has released the
// scheduler (and built the next batch). The cache fed a prompt in chunks,
// then a batch with an output was computed; the runner shifted the sequence
// before reading that output. On the old code the shift computed a graph of
// its own at once, on the same scheduler, and the logits read afterwards
// were not the ones computed (the soak's answers past the cache differed
// between fresh servers, and a short answer beside one read "$100").
func TestShiftLeavesUnreadOutputs(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy bool // compressed (shifted by renumbering) or uncompressed (cells moved)
	}{{"compressed", true}, {"uncompressed", false}} {
		t.Run(tc.name, func(t *testing.T) {
			run := func(readFirst bool) (logits []float32, next []float32) {
				cfg := Config{Context: 64, Batch: 8, Pipelined: true}
				if tc.policy {
					cfg.Policy = perHead(0.5)
				}
				s := open(t, cfg)
				ids := longPrompt(t, s, 64)
				pos := 0
				forward := func(n int) ([]float32, func() []float32) {
					ctx := s.m.Backend().NewContext()
					batch := input.Batch{Inputs: ctx.Input().FromInts(ids[pos:pos+n], n), Positions: make([]int32, n), Sequences: make([]int, n)}
					for j := range n {
						batch.Positions[j] = int32(pos + j)
					}
					batch.Outputs = ctx.Input().FromInts([]int32{int32(n - 1)}, 1)
					ctx.SetBatchSize(n)
					out, err := model.Forward(ctx, s.m, batch)
					require.NoError(t, err)
					ctx.Forward(out)
					ctx.Compute(out)
					pos += n
					return nil, func() []float32 { defer ctx.Close(); return out.Floats() }
				}
				// The prompt, each chunk's output read at once.
				for range 5 {
					_, read := forward(8)
					read()
				}
				_, read := forward(1)
				read()
				_, read2 := forward(1)
				if readFirst {
					logits = read2()
				}
				lay := s.Cache().lay.seqs[0]
				require.Equal(t, tc.policy, lay.lossy, "the prompt was compressed")
				// The runner shifts: positions [4, 12) go.
				require.NoError(t, s.Cache().Remove(0, 4, 12))
				if !readFirst {
					logits = read2()
				}
				pos -= 8
				_, read = forward(1)
				return logits, read()
			}
			want, wantNext := run(true)
			got, gotNext := run(false)
			require.NotEmpty(t, want)
			assert.Equal(t, want, got, "logits of the batch computed before the shift, read after it")
			assert.Equal(t, wantNext, gotNext, "logits of the batch after the shift")
		})
	}
}
