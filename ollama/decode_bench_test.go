//go:build cgo

package ollama

import (
	"fmt"
	"math"
	"os"
	"strconv"
	"sync"
	"testing"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
)

// BenchmarkDecode times one decoded token on an engine whose prompt was
// compacted per head (keep=0.5, layers 0 and 1 kept whole) and on one holding
// the same prompt uncompressed (keep=1), flash attention on, f16 cache: what
// issue 14 compares. keep=0.5,observer is the keep=0.5 engine with its
// compressor attached while it decodes (the others decode without one): the
// issue's "with against without the observer", on the same engine and
// cells. Attention over the cells each layer holds is the only
// part of a step that compression shrinks; profile a run of this benchmark
// to see its share.
//
// The model is KVNORM_BENCH_MODEL (a GGUF; default: stories260K with a
// 400-token prompt), the prompt KVNORM_BENCH_PROMPT tokens (default 2048 with
// a model set), the threads KVNORM_BENCH_THREADS (default 1). Each engine is
// opened (the first loads the model, the others are its twins) and
// prefilled once per test binary, so `-count N` interleaves the two
// sub-benchmarks without decoding the prompt again; every 64 tokens the
// decoded tail is removed (untimed) so the context stays at the prompt's
// length. For example:
//
//	KVNORM_BENCH_MODEL=/work/tmp-models/llama-1b-f16.gguf KVNORM_BENCH_THREADS=2 \
//	  go test -run '^$' -bench Decode -benchtime 64x -count 6 ./ollama/
func BenchmarkDecode(b *testing.B) {
	for _, side := range []struct {
		keep     float64
		observer bool
	}{{1, false}, {0.5, false}, {0.5, true}} {
		name := fmt.Sprintf("keep=%g", side.keep)
		if side.observer {
			name += ",observer"
		}
		b.Run(name, func(b *testing.B) {
			e := benchEngine(b, side.keep)
			if side.observer {
				e.SetObserver(e.comp)
				defer e.SetObserver(nil)
			}
			for b.Loop() {
				if e.Session().Len(0) >= e.end+decodeBenchTail {
					b.StopTimer()
					if err := e.Session().Remove(0, e.end, math.MaxInt32); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				if _, err := e.Decode(0, []int32{e.next}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// decodeBenchTail is how many tokens BenchmarkDecode decodes past the prompt
// before removing them.
const decodeBenchTail = 64

type benchDecoder struct {
	*Engine
	end  int32 // the prompt's length
	next int32 // the token decoded at every step
	comp hooks.Observer
}

var (
	benchMu      sync.Mutex
	benchEngines = map[float64]*benchDecoder{}
)

func benchEngine(b *testing.B, keep float64) *benchDecoder {
	b.Helper()
	benchMu.Lock()
	defer benchMu.Unlock()
	if e := benchEngines[keep]; e != nil {
		return e
	}
	model, prompt := os.Getenv("KVNORM_BENCH_MODEL"), 2048
	if model == "" {
		model, prompt = storiesGGUF(b), 400
	}
	if v := os.Getenv("KVNORM_BENCH_PROMPT"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 2 {
			b.Fatalf("KVNORM_BENCH_PROMPT=%q: want a token count >= 2", v)
		}
		prompt = n
	}
	threads := 1
	if v := os.Getenv("KVNORM_BENCH_THREADS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("KVNORM_BENCH_THREADS=%q: want a thread count >= 1", v)
		}
		threads = n
	}
	// The first engine loads the model; the others are its twins (the same
	// weights in memory, a cache of their own), so that where the weights
	// landed does not differ between the sides.
	var e *Engine
	var err error
	for _, other := range benchEngines {
		e, err = other.Twin()
		break
	}
	if e == nil && err == nil {
		e, err = OpenEngine(model, Config{Context: prompt + decodeBenchTail + 1, Threads: threads, FlashAttention: true})
	}
	if err != nil {
		b.Fatal(err)
	}
	// Any tokens do: the time of a step does not depend on them.
	ids := make([]int32, prompt)
	vocab := int32(e.Session().VocabSize())
	for i := range ids {
		ids[i] = int32(1 + (i*7)%int(vocab-1))
	}
	var comp hooks.Observer
	if keep < 1 {
		p := adapter.DefaultPolicy()
		p.Granularity, p.Keep = hooks.PerHead, keep
		c, err := adapter.New(e, p)
		if err != nil {
			e.Close()
			b.Fatal(err)
		}
		e.SetObserver(c)
		comp = c
	}
	if _, err := e.Prefill(0, ids, false); err != nil {
		e.Close()
		b.Fatal(err)
	}
	// Decoding runs without the observer unless the sub-benchmark attaches
	// it: nothing is due while the tail stays below the cache's size.
	e.SetObserver(nil)
	d := &benchDecoder{Engine: e, end: int32(prompt), next: ids[1], comp: comp}
	benchEngines[keep] = d
	return d
}
