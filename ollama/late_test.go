//go:build cgo

package ollama

import (
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model"
	"github.com/ollama/ollama/model/input"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// lateDevice stands for a backend whose compute returns before the device
// is done (CUDA, Metal): a submitted batch runs only when something waits
// for the device (the runner reading a batch's outputs, or the cache
// computing a graph of its own, which orders after everything submitted).
// Reading a tensor back (BackendGet) does not wait, as ggml-cuda's copy on
// another stream does not. With eager set every batch runs when submitted:
// the same cache decisions on a device that is never late.
type lateDevice struct {
	eager bool
	queue []lateGraph
	ran   int
}

type lateGraph struct {
	id  int
	ctx ml.Context
	out ml.Tensor
}

func (d *lateDevice) submit(g lateGraph) {
	d.queue = append(d.queue, g)
	if d.eager {
		d.runThrough(g.id)
	}
}

// runThrough runs the submitted batches up to id, in order.
func (d *lateDevice) runThrough(id int) {
	for len(d.queue) > 0 && d.queue[0].id <= id {
		g := d.queue[0]
		d.queue = d.queue[1:]
		g.ctx.Compute(g.out)
		g.out.Floats()
		g.ctx.Close()
		d.ran++
	}
}

func (d *lateDevice) runAll() { d.runThrough(int(^uint(0) >> 1)) }

type lateBatch struct {
	n   int
	out bool // the batch has an output (the runner reads it)
}

// runLate feeds batches of one sequence as Ollama's runner does, on dev:
// batch i is built (StartForward) while batch i-1 may not have run, after
// the runner read the outputs of batch i-2 if it had any.
func runLate(t *testing.T, dev *lateDevice, cfg Config, batches []lateBatch) *Session {
	t.Helper()
	s := open(t, cfg)
	s.Cache().awaitDevice = dev.runAll
	total := 0
	for _, b := range batches {
		total += b.n
	}
	ids := longPrompt(t, s, total)
	pos := 0
	for i, b := range batches {
		if i >= 2 && batches[i-2].out {
			dev.runThrough(i - 2)
		}
		ctx := s.m.Backend().NewContext()
		batch := input.Batch{Inputs: ctx.Input().FromInts(ids[pos:pos+b.n], b.n), Positions: make([]int32, b.n), Sequences: make([]int, b.n)}
		for j := range b.n {
			batch.Positions[j] = int32(pos + j)
		}
		outs := []int32{}
		if b.out {
			outs = []int32{int32(b.n - 1)}
		}
		batch.Outputs = ctx.Input().FromInts(outs, len(outs))
		ctx.SetBatchSize(b.n)
		out, err := model.Forward(ctx, s.m, batch)
		require.NoError(t, err, "batch %d", i)
		ctx.Forward(out)
		dev.submit(lateGraph{id: i, ctx: ctx, out: out})
		pos += b.n
	}
	dev.runAll()
	require.NoError(t, s.Flush())
	return s
}

// Norms are read only once the batch that wrote them has run, even on a
// device whose computes complete late, and a compaction in the graph of the
// last batch does not move norms the next batch reads: the cache keeps the
// same cells and records the same norms as on a device that is never late.
//
//   - "prompt chunks without outputs": no chunk has an output the runner
//     reads, so nothing waits for the device; the chunks that do not fit
//     the compressed layers (40 cells) compress under pressure (issue 13,
//     item 1).
//   - "every batch with an output": the runner reads the outputs of every
//     batch, but batch i is built before batch i-1 has run; compressions
//     under pressure at consecutive batches (the known gap of norms kept
//     per cell: the compaction in the graph of batch i-1 moved the cells of
//     batch i-2 that batch i reads).
func TestNormsOfLateBatches(t *testing.T) {
	chunks := func(n, size int, out func(i int) bool) []lateBatch {
		var b []lateBatch
		for i := range n {
			b = append(b, lateBatch{n: size, out: out(i)})
		}
		return b
	}
	tests := []struct {
		name     string
		batches  []lateBatch
		pressure int // compressions under pressure at least
	}{
		{"prompt chunks without outputs", append(chunks(8, 8, func(int) bool { return false }), lateBatch{n: 1, out: true}, lateBatch{n: 1, out: true}, lateBatch{n: 1, out: true}), 2},
		{"every batch with an output", chunks(9, 8, func(int) bool { return true }), 2},
		// 24 tokens do not fit the ring of 16 rows: a spill holds them
		// until they have been read, after their batch ran.
		{"a batch larger than the norm ring", []lateBatch{{8, false}, {24, false}, {8, false}, {8, false}, {8, true}, {1, true}, {1, true}}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{Policy: perHead(0.5), Context: 64, Batch: 8, Pipelined: true}
			eager := runLate(t, &lateDevice{eager: true}, cfg, tt.batches)
			late := runLate(t, &lateDevice{}, cfg, tt.batches)
			pressure := pressureCompressions(late)
			require.GreaterOrEqual(t, pressure, tt.pressure, "compressions under pressure")
			assert.Empty(t, late.Cache().spills, "spills freed once read")
			assert.Equal(t, len(eager.Cache().Stats()), len(late.Cache().Stats()))
			ce, cl := eager.Cache().Compressor(), late.Cache().Compressor()
			for l := range 5 {
				for h := range 4 {
					assert.Equal(t, eager.Cache().HeadPositions(0, l, h), late.Cache().HeadPositions(0, l, h), "cells of layer %d head %d", l, h)
					pe, ne, err := ce.Norms(0, l, h)
					require.NoError(t, err)
					pl, nl, err := cl.Norms(0, l, h)
					require.NoError(t, err)
					assert.Equal(t, pe, pl, "recorded positions of layer %d head %d", l, h)
					assert.Equal(t, ne, nl, "recorded norms of layer %d head %d", l, h)
					for i, n := range nl {
						assert.NotZero(t, n, "norm of position %d, layer %d head %d", pl[i], l, h)
					}
				}
			}
		})
	}
}
