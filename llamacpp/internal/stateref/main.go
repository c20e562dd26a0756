//go:build cgo

// Command stateref is provider a's side of the libllama tests: it decodes a
// prompt with the llama.cpp that kvnorm/llamacpp links, compresses the
// sequence in state mode (llamacpp.Compress on the raw context), decodes one
// more token and prints, as JSON, the positions kept and that token's logits.
// The libllama test runs it in its own process (that test binary must not
// link llama.cpp) and compares with the same steps through a libllama.so.
//
//	stateref -model m.gguf -tokens 1,2,3 -next 4 -keep 0.5 -nctx 256 -nbatch 64
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/llamacpp"
)

// Result is what stateref prints.
type Result struct {
	Before, After int
	Kept          []int32
	Logits        []float32
}

func main() {
	model := flag.String("model", "", "GGUF model")
	tokens := flag.String("tokens", "", "prompt token ids, comma separated")
	next := flag.Int("next", 0, "token decoded after compression")
	keep := flag.Float64("keep", 0.5, "fraction of positions kept")
	nctx := flag.Int("nctx", 256, "context size")
	nbatch := flag.Int("nbatch", 64, "batch size")
	flag.Parse()
	if err := run(*model, *tokens, llamacpp.Token(*next), *keep, *nctx, *nbatch); err != nil {
		fmt.Fprintln(os.Stderr, "stateref:", err)
		os.Exit(1)
	}
}

func run(path, tokens string, next llamacpp.Token, keep float64, nctx, nbatch int) error {
	var toks []llamacpp.Token
	for _, s := range strings.Split(tokens, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil {
			return fmt.Errorf("-tokens: %w", err)
		}
		toks = append(toks, llamacpp.Token(v))
	}
	m, err := llamacpp.Open(path)
	if err != nil {
		return err
	}
	defer m.Close()
	c, err := m.NewContext(llamacpp.ContextOptions{NCtx: nctx, NBatch: nbatch, Threads: 1})
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Decode(0, toks); err != nil {
		return err
	}
	p := adapter.DefaultPolicy()
	p.Keep = keep
	st, err := llamacpp.Compress(c.Raw(), 0, p)
	if err != nil {
		return err
	}
	state, err := llamacpp.ReadState(c.Raw(), 0)
	if err != nil {
		return err
	}
	res := Result{Before: st.PositionsBefore, After: st.PositionsAfter}
	for _, q := range state.Positions() {
		res.Kept = append(res.Kept, int32(q))
	}
	if err := c.Resync(0); err != nil {
		return err
	}
	if res.Logits, err = c.Decode(0, []llamacpp.Token{next}); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}
