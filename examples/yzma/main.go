// Command yzma is an app that drives llama.cpp through
// github.com/hybridgroup/yzma (no cgo: yzma loads libllama, libggml and
// libggml-base at run time) and compresses its context's KV cache with
// kvnorm's libllama provider, which resolves state mode's functions in the
// same library yzma loaded. It is a module of its own so that kvnorm's go.mod
// does not depend on yzma.
//
//	go run . -lib /path/to/llama.cpp/lib -model model.gguf -prompt "Once upon a time"
//
// yzma v1.32.0 binds a newer llama.cpp than the one kvnorm pins (Ollama
// v0.24.0's): its llama.Load refuses that library, naming the first function
// it lacks (see the README's "Add kvnorm to your Go app" for the list), so
// this example runs against a libllama of the llama.cpp release yzma targets.
// kvnorm's state parser accepts it as long as llama_state_seq_get_data keeps
// the layout statemode.SeqState documents; otherwise Compress refuses with an
// error naming what it found.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/hybridgroup/yzma/pkg/llama"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/llamacpp/libllama"
)

func main() {
	lib := flag.String("lib", os.Getenv("YZMA_LIB"), "directory of libllama.so, libggml.so and libggml-base.so")
	model := flag.String("model", "", "GGUF model")
	prompt := flag.String("prompt", "Once upon a time", "prompt")
	keep := flag.Float64("keep", 0.5, "fraction of the prompt's positions kept")
	flag.Parse()
	if err := run(*lib, *model, *prompt, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "yzma example:", err)
		os.Exit(1)
	}
}

func run(lib, model, prompt string, keep float64) error {
	if err := llama.Load(lib); err != nil {
		return fmt.Errorf("yzma could not load llama.cpp from %s: %w", lib, err)
	}
	if err := llama.Init(); err != nil {
		return err
	}
	defer llama.Close()

	m, err := llama.ModelLoadFromFile(model, llama.ModelDefaultParams())
	if err != nil {
		return err
	}
	defer llama.ModelFree(m)
	cp := llama.ContextDefaultParams()
	cp.NCtx, cp.NBatch, cp.NUbatch = 2048, 512, 512
	ctx, err := llama.InitFromModel(m, cp)
	if err != nil {
		return err
	}
	defer llama.Free(ctx)

	vocab := llama.ModelGetVocab(m)
	toks := llama.Tokenize(vocab, prompt, true, false)
	if _, err := llama.Decode(ctx, llama.BatchGetOne(toks)); err != nil {
		return err
	}

	// The library yzma loaded: dlopen of the same path gives the same copy.
	k, err := libllama.Open(filepath.Join(lib, "libllama.so"))
	if err != nil {
		return err
	}
	defer k.Close()
	p := adapter.DefaultPolicy()
	p.Keep = keep
	st, err := k.Compress(uintptr(ctx), 0, p)
	if err != nil {
		return err
	}
	fmt.Printf("kvnorm: kept %d of %d positions of the prompt\n", st.PositionsAfter, st.PositionsBefore)

	// Generation continues after the last position, as before.
	next := toks[len(toks)-1]
	if _, err := llama.Decode(ctx, llama.BatchGetOne([]llama.Token{next})); err != nil {
		return err
	}
	logits, err := llama.GetLogitsIth(ctx, -1, int(llama.VocabNTokens(vocab)))
	if err != nil {
		return err
	}
	fmt.Printf("next-token logits after compression: %d values\n", len(logits))
	return nil
}
