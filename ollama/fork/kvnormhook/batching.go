package kvnormhook

import (
	"fmt"
	"os"
	"strings"
	"sync"
)

// EnvBatching chooses how the runner batches parallel requests when
// compression is on: per-sequence (the default) or shared.
const EnvBatching = "OLLAMA_KV_NORM_BATCHING"

// BatchingFromEnv reads OLLAMA_KV_NORM_BATCHING through getenv (nil:
// os.Getenv): per-sequence (the default) puts one sequence's tokens in each
// forward pass, so that a temperature-0 answer is the same bit for bit
// whatever is batched beside it; shared batches parallel requests together
// as upstream does (more throughput; an answer may then change when ggml
// computes a token in a pass of a different size). It has effect only with
// compression on.
func BatchingFromEnv(getenv func(string) string) (perSequence bool, err error) {
	if getenv == nil {
		getenv = os.Getenv
	}
	switch v := strings.TrimSpace(getenv(EnvBatching)); strings.ToLower(v) {
	case "", "per-sequence":
		return true, nil
	case "shared":
		return false, nil
	default:
		return false, fmt.Errorf("%w: %s=%q: want per-sequence (default) or shared", ErrEnv, EnvBatching, v)
	}
}

var oneSeq = sync.OnceValue(func() bool {
	p, err := PolicyFromEnv(nil)
	if err != nil || p == nil {
		return false
	}
	perSeq, err := BatchingFromEnv(nil)
	return err == nil && perSeq
})

// OneSequencePerBatch is called by the Go-engine runner's forwardBatch before
// it adds a sequence's inputs to a batch that already holds another
// sequence's: true makes it end the batch there (the sequence goes first in
// the next one). It is true with compression on, unless
// OLLAMA_KV_NORM_BATCHING=shared.
//
// Why: ggml computes a pass of one token with other kernels than a pass of
// several (on the CPU, vec_dot for one row, tinyBLAS for more), which round
// differently, so a token decoded beside other requests gets other logits in
// the last bits than decoded alone; the same holds for the keys, and a plan
// is a discrete function of their norms. One sequence per pass computes each
// request exactly as it would be computed alone.
func OneSequencePerBatch() bool { return oneSeq() }
