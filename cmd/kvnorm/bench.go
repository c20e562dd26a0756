package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kvnorm/kvnorm/internal/kbench"
	"github.com/kvnorm/kvnorm/kernels"
)

// benchCommands maps `kvnorm bench <what>` to its implementation.
var benchCommands = map[string]func(args []string, stdout, stderr io.Writer) error{
	"kernels": runBenchKernels,
}

func init() {
	register(command{name: "bench", summary: "benchmarks: kernels (norm kernels and selection vs a memory-read loop), e2e (prefill, compression, KV bytes, decode, RSS per keep ratio)", run: func(args []string, stdout, stderr io.Writer) error {
		if len(args) == 0 {
			return fmt.Errorf("bench what? want one of: %s", strings.Join(sortedKeys(benchCommands), ", "))
		}
		f, ok := benchCommands[args[0]]
		if !ok {
			return fmt.Errorf("bench %q: want one of: %s", args[0], strings.Join(sortedKeys(benchCommands), ", "))
		}
		return f(args[1:], stdout, stderr)
	}})
}

func runBenchKernels(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench kernels", stderr)
	asJSON := fs.Bool("json", false, "print JSON: {kernels: [...], select: [...]}")
	mib := fs.Int("buffer-mib", 64, "size of the key buffer in MiB (at least 64: beyond the last-level cache)")
	dims := fs.String("dims", "64,128", "head dims")
	sel := fs.String("select-n", "10000,1000000,10000000", "selection sizes")
	minTime := fs.Duration("time", 300*time.Millisecond, "minimum time per measurement")
	quick := fs.Bool("quick", false, "a smoke run (1 MiB buffer, short times, n up to 1e5): for CI, not for figures")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	opts := kbench.Options{BufferBytes: *mib << 20, MinTime: *minTime}
	if *quick {
		opts.BufferBytes, opts.AllowSmall, opts.MinTime = 1<<20, true, 5*time.Millisecond
		*sel = "10000,100000"
	}
	var err error
	if opts.Dims, err = parseInts("--dims", *dims); err != nil {
		return err
	}
	if opts.SelectNs, err = parseInts("--select-n", *sel); err != nil {
		return err
	}
	kr, err := kbench.RunKernels(opts)
	if err != nil {
		return err
	}
	sr, err := kbench.RunSelect(opts)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Impl    string                `json:"active_impl"`
			Kernels []kbench.KernelResult `json:"kernels"`
			Select  []kbench.SelectResult `json:"select"`
		}{kernels.Impl(), kr, sr})
	}
	fmt.Fprintf(stdout, "active implementation: %s (available: %s); buffer %d MiB\n\n", kernels.Impl(), strings.Join(kernels.Impls(), ", "), *mib)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "dtype\tdim\timpl\tGB/s\tread GB/s\tratio\t")
	for _, r := range kr {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%.2f\t%.2f\t%.2f\t\n", r.DType, r.Dim, r.Impl, r.GBps, r.ReadGBps, r.Ratio)
	}
	tw.Flush()
	fmt.Fprintln(stdout)
	tw = tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "selection n\tM scores/s\tms\t")
	for _, r := range sr {
		fmt.Fprintf(tw, "%d\t%.1f\t%.3f\t\n", r.N, r.ScoresPerSec/1e6, r.Seconds*1e3)
	}
	return tw.Flush()
}

func parseInts(flagName, s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%s %q: %q is not a positive integer", flagName, s, f)
		}
		out = append(out, n)
	}
	return out, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
