//go:build cgo

package ollama_test

import (
	"context"
	"fmt"
	"log"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/ollama"
)

// Open a GGUF model with a per-head policy keeping half of every
// compressed head, generate, and look at what the cache holds.
func ExampleOpen() {
	policy := adapter.DefaultPolicy() // knorm, keep 0.5, skip layers 0 and 1
	policy.Granularity = hooks.PerHead
	s, err := ollama.Open("stories260K.gguf", ollama.Config{Policy: &policy, Context: 512})
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()
	prompt, err := s.Tokenize("Once upon a time", true)
	if err != nil {
		log.Fatal(err)
	}
	g, err := s.Generate(context.Background(), 0, prompt, 32, ollama.GenerateOptions{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(g.Text)
	fmt.Println("cells per layer:", s.Cache().Usage(0).Cells)
}
