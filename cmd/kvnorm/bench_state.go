package main

import (
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"text/tabwriter"
	"time"
	"unsafe"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/llamacpp"
	"github.com/kvnorm/kvnorm/llamacpp/statemode"
)

func init() {
	benchCommands["state"] = runBenchState
}

// runBenchState measures what state mode (llamacpp.Compress on an app's
// context) costs: it prefills one sequence with seeded random tokens and, at
// each checkpoint, reads the sequence's state (K and V copied to host
// memory), builds the compressor from it (parse + key norms) and plans; at
// the last checkpoint it also applies the plan (llama_memory_seq_rm). The
// cache is not changed before the last checkpoint, so one prefill serves all.
func runBenchState(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bench state", stderr)
	model := fs.String("model", "", "GGUF model (e.g. from `kvnorm synth --shape llama-3.2-1b --type f16`)")
	toks := fs.String("tokens", "2048,8192", "checkpoints: sequence lengths at which state mode is measured")
	keep := fs.Float64("keep", 0.5, "fraction of positions kept")
	batch := fs.Int("batch", 512, "prefill batch size")
	threads := fs.Int("threads", 0, "threads (0: llama.cpp's default)")
	reps := fs.Int("reps", 3, "repetitions of each measurement (the fastest is printed)")
	if _, err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if *model == "" {
		return fmt.Errorf("bench state: --model is required")
	}
	points, err := parseInts("--tokens", *toks)
	if err != nil {
		return err
	}
	slices.Sort(points)
	if points[0] <= 0 || *reps <= 0 {
		return fmt.Errorf("bench state: --tokens and --reps must be positive")
	}
	m, err := llamacpp.Open(*model)
	if err != nil {
		return err
	}
	defer m.Close()
	last := points[len(points)-1]
	c, err := m.NewContext(llamacpp.ContextOptions{NCtx: last + *batch, NBatch: *batch, Threads: *threads})
	if err != nil {
		return err
	}
	defer c.Close()
	vocab := m.Info().Vocab
	rng := rand.New(rand.NewPCG(1, 2))
	p := adapter.DefaultPolicy()
	p.Keep = *keep
	fmt.Fprintf(stdout, "model %s; keep %.2f; prefill batch %d; fastest of %d\n", *model, *keep, *batch, *reps)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "tokens\tprefill s\tstate MiB\tread ms\tread+parse+norms ms\tplan ms\tevict ms\tCompress ms\t")
	done := 0
	for i, n := range points {
		chunk := make([]llamacpp.Token, n-done)
		for j := range chunk {
			chunk[j] = llamacpp.Token(1 + rng.IntN(vocab-1))
		}
		t0 := time.Now()
		if _, err := c.Decode(0, chunk); err != nil {
			return err
		}
		prefill := time.Since(t0)
		done = n
		ctx := uintptr(c.Raw())
		var size int
		read, build, plan := time.Duration(1<<62), time.Duration(1<<62), time.Duration(1<<62)
		for range *reps {
			t := time.Now()
			b, err := statemode.ReadBytes(llamacpp.LinkedFuncs, ctx, 0)
			if err != nil {
				return err
			}
			read, size = min(read, time.Since(t)), len(b)
			t = time.Now()
			comp, err := llamacpp.NewStateCompressor(unsafe.Pointer(c.Raw()), 0, p)
			if err != nil {
				return err
			}
			build = min(build, time.Since(t))
			t = time.Now()
			if _, err := comp.PlanFor(0, -1); err != nil {
				return err
			}
			plan = min(plan, time.Since(t))
		}
		evict, total := "-", "-"
		if i == len(points)-1 {
			t := time.Now()
			comp, err := llamacpp.NewStateCompressor(unsafe.Pointer(c.Raw()), 0, p)
			if err != nil {
				return err
			}
			t1 := time.Now()
			if _, err := comp.Compress(0, -1); err != nil {
				return err
			}
			t2 := time.Now()
			evict = fmt.Sprintf("%.1f", stateMs(t2.Sub(t1))) // plan + llama_memory_seq_rm
			total = fmt.Sprintf("%.1f", stateMs(t2.Sub(t)))
		}
		fmt.Fprintf(tw, "%d\t%.1f\t%.1f\t%.1f\t%.1f\t%.1f\t%s\t%s\t\n", n, prefill.Seconds(), float64(size)/(1<<20), stateMs(read), stateMs(build), stateMs(plan), evict, total)
		tw.Flush() // each row as soon as it is measured (a long prefill follows)
	}
	fmt.Fprintln(stdout, "read: llama_state_seq_get_data into a Go buffer of that size (the host copy of K and V); read+parse+norms: llamacpp.NewStateCompressor; evict: plan + llama_memory_seq_rm; Compress: llamacpp.Compress at the last checkpoint (read+parse+norms+plan+evict)")
	return nil
}

func stateMs(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
