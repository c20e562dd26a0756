package reference_test

import (
	"fmt"
	"log"
	"math"

	"github.com/kvnorm/kvnorm/conformance/reference"
	"github.com/kvnorm/kvnorm/llama2c"
)

// Example runs a small synthetic model (real tests use
// reference.LoadGGUF("stories260K.gguf")), evicts some keys of one KV head,
// and decodes on at the next position.
func Example() {
	ck, err := llama2c.NewCheckpoint(llama2c.Config{Dim: 16, HiddenDim: 32, NLayers: 2, NHeads: 4, NKVHeads: 2,
		VocabSize: 10, SeqLen: 64, SharedClassifier: true})
	if err != nil {
		log.Fatal(err)
	}
	for i := range ck.TokenEmbedding {
		ck.TokenEmbedding[i] = float32(math.Sin(float64(i)))
	}
	for _, l := range ck.Layers {
		for _, w := range [][]float32{l.AttnNorm, l.FFNNorm, l.WQ, l.WK, l.WV, l.WO, l.W1, l.W2, l.W3} {
			for i := range w {
				w[i] = float32(math.Cos(float64(i))) / 4
			}
		}
	}
	for i := range ck.FinalNorm {
		ck.FinalNorm[i] = 1
	}
	m, err := reference.FromCheckpoint(ck)
	if err != nil {
		log.Fatal(err)
	}

	s := m.NewSession()
	logits, err := s.Decode([]int32{1, 4, 7, 3, 5}, nil) // positions 0..4
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(logits), "tokens,", len(logits[0]), "logits each")

	// Per-head eviction: layer 1, KV head 0 drops positions 1 and 3.
	if _, err := s.EvictHead(1, 0, []int32{1, 3}); err != nil {
		log.Fatal(err)
	}
	fmt.Println("layer 1 head 0:", s.LivePositions(1, 0))
	fmt.Println("layer 1 head 1:", s.LivePositions(1, 1))

	// The next token goes at max position + 1; kept entries keep theirs.
	if _, err := s.Decode([]int32{2}, nil); err != nil {
		log.Fatal(err)
	}
	fmt.Println("after decode:", s.LivePositions(1, 0), "next position", s.NextPos())
	fmt.Println("key width:", len(s.Keys(1)[0][0].Key))
	// Output:
	// 5 tokens, 10 logits each
	// layer 1 head 0: [0 2 4]
	// layer 1 head 1: [0 1 2 3 4]
	// after decode: [0 2 4 5] next position 6
	// key width: 4
}
