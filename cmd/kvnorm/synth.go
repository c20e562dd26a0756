package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/synth"
)

func init() {
	register(command{name: "synth", summary: "write a GGUF with random weights and a real model's shape (speed/memory only)", run: runSynth})
}

func runSynth(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("synth", stderr)
	shape := fs.String("shape", "llama-3.2-1b", "shape: "+strings.Join(synth.ShapeNames(), "|")+"|custom")
	out := fs.String("o", "", "output GGUF path (required)")
	typ := fs.String("type", "f16", "matrix type: f32|f16|q8_0")
	seed := fs.Uint64("seed", 1, "weights seed")
	var c synth.Shape
	fs.StringVar(&c.Arch, "arch", "llama", "custom: llama|qwen3")
	fs.IntVar(&c.Layers, "layers", 0, "custom: layers")
	fs.IntVar(&c.Heads, "heads", 0, "custom: query heads")
	fs.IntVar(&c.KVHeads, "kv-heads", 0, "custom: KV heads")
	fs.IntVar(&c.HeadDim, "head-dim", 0, "custom: head dim")
	fs.IntVar(&c.Embd, "embd", 0, "custom: hidden size")
	fs.IntVar(&c.FFN, "ffn", 0, "custom: feed-forward size")
	fs.IntVar(&c.Vocab, "vocab", 32000, "custom: vocabulary")
	fs.IntVar(&c.Ctx, "ctx", 8192, "custom: trained context")
	rope := fs.Float64("rope-base", 10000, "custom: RoPE base")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *out == "" {
		return errors.New("-o OUT.gguf is required")
	}
	s, ok := synth.Shapes[*shape]
	if *shape == "custom" {
		// Set the fields before copying c: in one tuple assignment the copy
		// would be taken first and lose them.
		c.Name, c.RopeBase = "custom", float32(*rope)
		s, ok = c, true
	}
	if !ok {
		return fmt.Errorf("--shape %q: want one of %s or custom", *shape, strings.Join(synth.ShapeNames(), ", "))
	}
	var tt gguf.TensorType
	switch *typ {
	case "f32":
		tt = gguf.F32
	case "f16":
		tt = gguf.F16
	case "q8_0":
		tt = gguf.Q8_0
	default:
		return fmt.Errorf("--type %q: want f32, f16 or q8_0", *typ)
	}
	fmt.Fprintf(stderr, "synth: %s (%s, %d layers, %d/%d heads of %d, %.2fB params, %s): RANDOM WEIGHTS, for speed and memory only\n",
		s.Name, s.Arch, s.Layers, s.Heads, s.KVHeads, s.HeadDim, float64(s.Params())/1e9, *typ)
	start := time.Now()
	if err := synth.Write(*out, s, tt, *seed); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s in %.1fs\n", *out, time.Since(start).Seconds())
	return nil
}
