//go:build cgo

package llamacpp_test

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/llamacpp"
)

// BenchmarkPrefill decodes a 256-token prompt with and without the key
// stream (cb_eval + norms), so the callback's cost reads as a ratio.
func BenchmarkPrefill(b *testing.B) {
	m := openStories(b, "f32")
	prompt := storyTokens(b, m, 256)
	for _, observe := range []bool{false, true} {
		b.Run(fmt.Sprintf("tokens=256/observe=%v", observe), func(b *testing.B) {
			c := newCtx(b, m, llamacpp.ContextOptions{NCtx: 512, NBatch: 256})
			if observe {
				_, err := c.EnableCompression(policy(1))
				require.NoError(b, err)
			}
			for b.Loop() {
				require.NoError(b, c.Clear(0))
				_, err := c.Decode(0, prompt)
				require.NoError(b, err)
			}
		})
	}
}

// BenchmarkEvict compresses a 256-token prefill to half (plan + 128
// llama_memory_seq_rm runs at most).
func BenchmarkEvict(b *testing.B) {
	m := openStories(b, "f32")
	prompt := storyTokens(b, m, 256)
	c := newCtx(b, m, llamacpp.ContextOptions{NCtx: 512, NBatch: 256})
	comp, err := c.EnableCompression(policy(0.5))
	require.NoError(b, err)
	for b.Loop() {
		b.StopTimer()
		require.NoError(b, c.Clear(0))
		_, err := c.Decode(0, prompt)
		require.NoError(b, err)
		b.StartTimer()
		_, err = comp.PrefillDone(0)
		require.NoError(b, err)
	}
}
