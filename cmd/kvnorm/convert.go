package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/kvnorm/kvnorm/llama2c"
)

func init() {
	register(command{name: "convert", summary: "convert a llama2.c checkpoint to GGUF", run: runConvert})
}

const convertUsage = "usage: kvnorm convert llama2c CHECKPOINT --tokenizer TOK -o OUT.gguf [--type f32|f16]"

// runConvert is `kvnorm convert llama2c CHECKPOINT --tokenizer TOK -o OUT.gguf
// [--type f32|f16]`. Flags may come before or after the checkpoint.
func runConvert(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintln(stderr, convertUsage)
		if len(args) == 0 {
			return errUsage
		}
		return flag.ErrHelp
	}
	if args[0] != "llama2c" {
		fmt.Fprintf(stderr, "kvnorm convert: unknown format %q (want llama2c)\n%s\n", args[0], convertUsage)
		return errUsage
	}
	fs := newFlagSet("convert llama2c", stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, convertUsage)
		fs.PrintDefaults()
	}
	tok := fs.String("tokenizer", "", "llama2.c tokenizer file (tokenizer.bin, tok512.bin...)")
	out := fs.String("o", "", "output GGUF file")
	typ := fs.String("type", "f32", "tensor type of the matrices: f32|f16")
	pos, err := parseInterspersed(fs, args[1:])
	if err != nil {
		return err
	}
	switch {
	case len(pos) != 1:
		fmt.Fprintln(stderr, convertUsage)
		return fmt.Errorf("want one CHECKPOINT, got %d arguments", len(pos))
	case *tok == "":
		return errors.New("--tokenizer is required")
	case *out == "":
		return errors.New("-o OUT.gguf is required")
	case *typ != "f32" && *typ != "f16":
		return fmt.Errorf("--type %q: want f32 or f16", *typ)
	}
	_, statErr := os.Stat(*out)
	if err := llama2c.ConvertFile(pos[0], *tok, *out, *typ); err != nil {
		if os.IsNotExist(statErr) {
			os.Remove(*out) // a partial file of ours, not one the user had
		}
		return err
	}
	fmt.Fprintf(stdout, "wrote %s (%s)\n", *out, *typ)
	return nil
}

// parseInterspersed parses flags that may come before, between or after
// positional arguments ("--" ends the flags).
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, errUsage
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if len(args) > len(rest) && args[len(args)-len(rest)-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}
