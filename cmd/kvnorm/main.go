// Command kvnorm compresses the KV cache of LLM runtimes by key norm.
//
//	kvnorm generate   run a prompt through a runtime with and without compression
//	kvnorm convert    convert a llama2.c checkpoint to GGUF
//	kvnorm bench      measure the kernels (and, later, end to end)
//	kvnorm conformance compare compressed outputs with uncompressed baselines
//	kvnorm demo       one prompt with and without compression, side by side
//	kvnorm version    print the version
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// version is set at link time (-ldflags "-X main.version=...").
var version = "0.1.0-dev"

// command is one subcommand of the CLI.
type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

var commands = map[string]command{}

func register(c command) { commands[c.name] = c }

// errUsage marks an error already explained by a usage message.
var errUsage = errors.New("usage")

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "kvnorm: unknown command %q\n\n", args[0])
		usage(stderr)
		return 2
	}
	if err := c.run(args[1:], stdout, stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if !errors.Is(err, errUsage) {
			fmt.Fprintf(stderr, "kvnorm %s: %v\n", c.name, err)
		}
		return 1
	}
	return 0
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "kvnorm: KV-cache compression by key norm for Go LLM runtimes")
	fmt.Fprintln(w, "\nusage: kvnorm <command> [flags]\n\ncommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-12s %s\n", n, commands[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'kvnorm <command> -h' for a command's flags.")
}

// newFlagSet returns a FlagSet that reports errors instead of exiting.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("kvnorm "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parseFlags parses args and rejects stray positional arguments unless
// allowed.
func parseFlags(fs *flag.FlagSet, args []string, positional int) ([]string, error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, errUsage
	}
	rest := fs.Args()
	if len(rest) > positional {
		return nil, fmt.Errorf("unexpected argument(s): %s", strings.Join(rest[positional:], " "))
	}
	return rest, nil
}

func init() {
	register(command{name: "version", summary: "print the version", run: func(args []string, stdout, stderr io.Writer) error {
		fs := newFlagSet("version", stderr)
		if _, err := parseFlags(fs, args, 0); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "kvnorm %s\n", version)
		return nil
	}})
}
