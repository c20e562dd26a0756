package ollama

import (
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/ollama/ollama/ml"

	"github.com/kvnorm/kvnorm/adapter"
)

// Config configures a Session.
type Config struct {
	// Policy compresses the cache; nil runs kvnorm's cache without
	// compression.
	Policy *adapter.Policy
	// Upstream keeps the model's own Ollama cache (no kvnorm at all), for
	// comparisons; Policy must be nil then.
	Upstream bool
	// Context is the number of cells per sequence (default 512).
	Context int
	// Sequences is the number of sequences decoded side by side (default 1).
	Sequences int
	// Batch is the largest number of tokens per forward pass (default 512).
	Batch int
	// Threads is the number of CPU threads (default 1).
	Threads int
	// FlashAttention selects ggml's fused attention kernel.
	FlashAttention bool
	// CacheType is the KV cache type: f16 (default), f32, q8_0 or q4_0.
	CacheType string
	// Pipelined runs the cache as Ollama's runner does (Options.Pipelined):
	// norms are read once the batch that wrote them is known to have run
	// (norms.go) and the prompt is compressed after the first generated
	// token. Generate then does not flush.
	Pipelined bool
	// Logger receives compression lines; nil discards them.
	Logger *slog.Logger
	// Observe computes key norms for an observer attached later with
	// Cache.SetObserver (Engine does), with or without a policy.
	Observe bool
}

// ParseCacheType maps a KV cache type name to Ollama's dtype.
func ParseCacheType(s string) (ml.DType, error) {
	switch strings.ToLower(s) {
	case "", "f16":
		return ml.DTypeF16, nil
	case "f32":
		return ml.DTypeF32, nil
	case "q8_0":
		return ml.DTypeQ80, nil
	case "q4_0":
		return ml.DTypeQ40, nil
	}
	return 0, fmt.Errorf("ollama: cache type %q: want f16, f32, q8_0 or q4_0", s)
}

// GenerateOptions control Generate.
type GenerateOptions struct {
	// Temperature 0 is greedy (ties go to the lowest id).
	Temperature float64
	Seed        uint64
	// IgnoreEOS keeps generating past an end-of-sequence token.
	IgnoreEOS bool
	// Logits, when set, receives the logits before every generated token.
	Logits func(step int, logits []float32)
}

// Generation is the result of Generate.
type Generation struct {
	Prompt  []int32
	Tokens  []int32
	Text    string
	Prefill time.Duration // decoding the prompt
	Flush   time.Duration // reading back norms and compressing after the prompt
	Decode  time.Duration // generating Tokens
	// Before and After are what the sequence held once the prompt was
	// decoded, before and after the prefill compression (zero with
	// Config.Upstream).
	Before, After Usage
}

func cmpOr(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// Sample picks a token: the argmax (lowest id on ties) at temperature 0,
// else a draw from softmax(logits/temperature).
func Sample(logits []float32, temperature float64, rng *rand.Rand) int32 {
	best := 0
	for i, v := range logits {
		if v > logits[best] {
			best = i
		}
	}
	if temperature <= 0 || rng == nil {
		return int32(best)
	}
	top := float64(logits[best])
	w := make([]float64, len(logits))
	var sum float64
	for i, v := range logits {
		w[i] = math.Exp((float64(v) - top) / temperature)
		sum += w[i]
	}
	r := rng.Float64() * sum
	for i, x := range w {
		r -= x
		if r <= 0 {
			return int32(i)
		}
	}
	return int32(best)
}
