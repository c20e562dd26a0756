//go:build cgo && linux

package main

import (
	"context"
	"math"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/synth"
)

// answer is a generation's text and the log-probability of each token.
type answer struct {
	text     string
	tokens   int
	logprobs []api.Logprob
}

func (s *server) generateLogprobs(tb testing.TB, model, prompt string, options map[string]any) (answer, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var a answer
	client := api.NewClient(s.base, &http.Client{})
	err := client.Generate(ctx, &api.GenerateRequest{Model: model, Prompt: prompt, Raw: true, Logprobs: true, Options: options},
		func(r api.GenerateResponse) error {
			a.text += r.Response
			a.logprobs = append(a.logprobs, r.Logprobs...)
			if r.Done {
				a.tokens = r.EvalCount
			}
			return nil
		})
	return a, err
}

// BenchmarkForkBurst measures, through bin/ollama serve with
// OLLAMA_NUM_PARALLEL=4, the 8 requests of TestForkHistoryIndependent sent
// at once: the decode throughput of the burst (tokens/s over its wall
// time), and how far its answers are from the same requests sent one after
// another: answers that differ, and generated tokens whose log-probability
// differs in any bit (counted up to an answer's first differing token), on
// stories260K and on a synthetic llama of about 50M parameters.
//
//	go test -run '^$' -bench ForkBurst -benchtime 3x ./ollama/fork
func BenchmarkForkBurst(b *testing.B) {
	bin, stories := forkSetup(b)
	// A synthetic llama big enough that a decode step reads its weights
	// (about 50M parameters in f16), where batching parallel requests pays.
	mid := filepath.Join(b.TempDir(), "mid.gguf")
	shape := synth.Shape{Name: "mid", Arch: "llama", Layers: 8, Heads: 8, KVHeads: 4, HeadDim: 64, Embd: 512, FFN: 1536,
		Vocab: 32000, Ctx: 4096, RopeBase: 10000}
	require.NoError(b, synth.Write(mid, shape, gguf.F16, 1))
	store := b.TempDir()
	opts := map[string]any{"num_ctx": 256, "num_batch": 32, "temperature": 0, "num_thread": 1, "num_predict": 24}
	created := false
	for _, model := range []string{"stories260K", "synth-mid"} {
		for _, mode := range []struct {
			name string
			env  []string
		}{
			{"off", nil},
			{"keep1-shared", []string{"OLLAMA_KV_NORM_KEEP=1", "OLLAMA_KV_NORM_BATCHING=shared"}},
			{"keep0.5-shared", []string{"OLLAMA_KV_NORM_KEEP=0.5", "OLLAMA_KV_NORM_BATCHING=shared"}},
			{"keep0.5-per-sequence", []string{"OLLAMA_KV_NORM_KEEP=0.5"}},
		} {
			b.Run("model="+model+"/mode="+mode.name, func(b *testing.B) {
				s := startServer(b, bin, store, append([]string{"OLLAMA_NUM_PARALLEL=4"}, mode.env...)...)
				if !created {
					s.createModel(b, "stories260K", stories)
					s.createModel(b, "synth-mid", mid)
					created = true
				}
				seq := make([]answer, len(burstEndings))
				for i, e := range burstEndings {
					a, err := s.generateLogprobs(b, model, burstPrefix+e, opts)
					require.NoError(b, err)
					seq[i] = a
				}
				var answers, logprobs, tokens int
				var wall time.Duration
				for b.Loop() {
					got := make([]answer, len(burstEndings))
					errs := make([]error, len(burstEndings))
					var wg sync.WaitGroup
					t0 := time.Now()
					for i, e := range burstEndings {
						wg.Go(func() { got[i], errs[i] = s.generateLogprobs(b, model, burstPrefix+e, opts) })
					}
					wg.Wait()
					wall += time.Since(t0)
					for i := range got {
						require.NoError(b, errs[i])
						tokens += got[i].tokens
						if got[i].text != seq[i].text {
							answers++
						}
						logprobs += differentLogprobs(got[i].logprobs, seq[i].logprobs)
					}
				}
				b.ReportMetric(float64(tokens)/wall.Seconds(), "tok/s")
				b.ReportMetric(float64(answers)/float64(b.N), "answers-differ/burst")
				b.ReportMetric(float64(logprobs)/float64(b.N), "logprobs-differ/burst")
			})
		}
	}
}

// differentLogprobs counts the tokens whose log-probability differs in any
// bit, up to the first token that differs.
func differentLogprobs(a, b []api.Logprob) int {
	n := 0
	for j := range min(len(a), len(b)) {
		if a[j].Token != b[j].Token {
			break
		}
		if math.Float64bits(a[j].Logprob) != math.Float64bits(b[j].Logprob) {
			n++
		}
	}
	return n
}
