package adapter_test

import (
	"fmt"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/hooks/hookstest"
	"github.com/kvnorm/kvnorm/kernels"
)

// A runtime with cells shared by all heads (here a fake one) reports the key
// norms of a 10-token prompt, then asks the compressor to compress it.
func ExampleCompressor() {
	shape := hooks.CacheShape{Layers: 3, KVHeads: 1, HeadDim: 64, KType: kernels.F16, VType: kernels.F16, Capacity: 256}
	rt := hookstest.NewShared(shape)

	policy := adapter.DefaultPolicy() // knorm, keep 0.5, skip layers 0 and 1, per-token
	c, err := adapter.New(rt, policy)
	if err != nil {
		panic(err)
	}
	pos := []hooks.Pos{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
	seqs := make([]hooks.SeqID, len(pos))
	_ = rt.Append(0, pos...)
	for layer := range shape.Layers {
		// Layer 2, the only one that votes, finds even positions important.
		norms := []float32{1, 9, 1, 9, 1, 9, 1, 9, 1, 9}
		_ = c.ObserveKeys(&hooks.KeyBatch{Layer: layer, Seqs: seqs, Positions: pos, Norms: norms})
	}
	st, err := c.PrefillDone(0)
	if err != nil {
		panic(err)
	}
	fmt.Println(st.Policy)
	fmt.Printf("positions %d -> %d, %d bytes freed\n", st.PositionsBefore, st.PositionsAfter, st.BytesFreed)
	fmt.Println("kept:", rt.Lane(0, 0, 0))
	// Output:
	// knorm keep=0.5 per-token/mean-rank skip=0,1 sinks=0 window=0
	// positions 10 -> 5, 3840 bytes freed
	// kept: [0 2 4 6 9]
}

// Planning is a pure function of recorded norms and policy: the conformance
// suite and tests use it without a runtime.
func ExamplePolicy_Plan() {
	shape := hooks.CacheShape{Layers: 3, KVHeads: 2, HeadDim: 8, KType: kernels.F16, VType: kernels.F16}
	rec, _ := adapter.NewRecord(shape)
	for l := range 3 {
		_ = rec.PutNorms(l, []hooks.Pos{0, 1, 2, 3}, []float32{
			// head 0, head 1 for positions 0..3
			1, 4,
			2, 3,
			3, 2,
			4, 1,
		})
	}
	p := adapter.DefaultPolicy()
	p.Granularity = hooks.PerHead
	plan, _ := p.Plan(rec, 0, 2, false)
	fmt.Println("layer 0:", plan.Head.Layers[0])
	fmt.Println("layer 2:", plan.Head.Layers[2])
	// Output:
	// layer 0: []
	// layer 2: [[0 3] [2 3]]
}
