//go:build cgo

package main

import (
	"bytes"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/gguf"
	"github.com/kvnorm/kvnorm/internal/e2ebench"
	"github.com/kvnorm/kvnorm/synth"
)

// TestMain lets `kvnorm bench e2e` re-exec this test binary as its child:
// with benchChildEnv set, the binary runs the CLI instead of the tests.
func TestMain(m *testing.M) {
	if os.Getenv(benchChildEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// tinyModel writes synth.Shapes["tiny"] (4 layers, 2 KV heads of 16) to a
// temporary GGUF file.
func tinyModel(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	require.NoError(t, synth.Write(path, synth.Shapes["tiny"], gguf.F16, 1))
	return path
}

// e2eRuntimes are the runtimes registered in this build that the bench runs on.
func e2eRuntimes(t *testing.T) []string {
	var rts []string
	for _, rt := range []string{"llamacpp", "ollama"} {
		if engines[rt] != nil {
			rts = append(rts, rt)
		}
	}
	if len(rts) == 0 {
		t.Skip("no runtime registered")
	}
	return rts
}

// rowFields are the JSON fields every row must carry.
var rowFields = []string{
	"runtime", "model", "granularity", "ctx_cells", "prompt_tokens", "keep",
	"prefill_ms", "prefill_capture_ms", "capture_overhead", "observe_ms",
	"compress_ms", "plan_ms", "apply_ms", "compress_frac_of_prefill",
	"kv_cells_before", "kv_cells", "kv_entries_before", "kv_entries", "entry_bytes", "kv_bytes_before", "kv_bytes", "kv_bytes_allocated",
	"decode_tokens", "decode_tokens_per_s", "peak_rss_bytes", "rss_anon_bytes", "child_process",
	"ratio_kv_cells", "ratio_kv_bytes", "ratio_prefill", "ratio_decode_tokens_per_s", "ratio_peak_rss",
}

func TestBenchE2ERowsTiny(t *testing.T) {
	model := tinyModel(t)
	shape := synth.Shapes["tiny"]
	for _, rt := range e2eRuntimes(t) {
		t.Run(rt, func(t *testing.T) {
			out := t.TempDir()
			var stdout, stderr bytes.Buffer
			code := run([]string{"bench", "e2e", "--runtime", rt, "--model", model, "--prompt-tokens", "40,96",
				"--keep", "0.5,0.25", "--decode", "4", "--paired", "6", "--control", "--threads", "1", "--granularity", "per-token", "--json", "--out", out}, &stdout, &stderr)
			require.Equal(t, 0, code, stderr.String())

			var raw []map[string]any
			require.NoError(t, json.Unmarshal(stdout.Bytes(), &raw), stdout.String())
			require.Len(t, raw, 6, "2 prompt lengths × keeps 1 (added), 0.5, 0.25")
			for _, r := range raw {
				for _, f := range rowFields {
					assert.Contains(t, r, f)
				}
			}
			var rows []e2ebench.Row
			require.NoError(t, json.Unmarshal(stdout.Bytes(), &rows))
			base := map[int]e2ebench.Row{}
			for _, r := range rows {
				if r.Keep == 1 {
					base[r.PromptTokens] = r
				}
			}
			require.Len(t, base, 2)
			for _, r := range rows {
				assert.True(t, r.ChildProcess, "each row in its own process")
				assert.Equal(t, rt, r.Runtime)
				assert.Positive(t, r.PrefillMs)
				assert.Positive(t, r.PrefillCaptureMs)
				assert.InDelta(t, (r.PrefillCaptureMs-r.PrefillMs)/r.PrefillMs, r.CaptureOverhead, 1e-9)
				assert.Positive(t, r.ObserveMs, "the capture observer saw the keys")
				assert.GreaterOrEqual(t, r.CompressMs, 0.0)
				assert.Positive(t, r.DecodeTokensPerS)
				assert.Equal(t, 4, r.DecodeTokens)
				assert.Positive(t, r.PeakRSSBytes)
				assert.GreaterOrEqual(t, r.PeakRSSBytes, r.RSSAnonBytes)

				// Cells: the whole prompt before, ceil(keep × prompt) after
				// (per-token); bytes are entries × entry bytes and entries
				// are cells × layers × KV heads.
				assert.Equal(t, r.PromptTokens, r.KVCellsBefore)
				assert.Equal(t, int(math.Ceil(r.Keep*float64(r.PromptTokens))), r.KVCells, "keep %g of %d", r.Keep, r.PromptTokens)
				perCell := int64(shape.Layers * shape.KVHeads)
				assert.Equal(t, int64(r.KVCells)*perCell, r.KVEntries)
				assert.Equal(t, r.KVEntries*r.EntryBytes, r.KVBytes)
				assert.Equal(t, r.KVEntriesBefore*r.EntryBytes, r.KVBytesBefore)
				assert.Equal(t, int64(2*2*shape.HeadDim), r.EntryBytes, "f16 K and V rows")
				assert.GreaterOrEqual(t, r.KVBytesAllocated, r.KVBytesBefore)
				if r.Keep < 1 {
					assert.Positive(t, r.CompressMs)
					assert.Positive(t, r.PlanMs+r.ApplyMs)
					// The paired measurement: both sides decoded 6 tokens.
					assert.Equal(t, 6, r.PairedTokens)
					assert.Positive(t, r.PairedTokensPerS)
					assert.Positive(t, r.PairedBaseTokensPerS)
					assert.InDelta(t, r.PairedTokensPerS/r.PairedBaseTokensPerS, r.PairedRatio, 1e-9)
					assert.Positive(t, r.PairedMedianRatio)
					assert.True(t, r.DecodeObserver)
					assert.InDelta(t, r.PairedNoObserverTokensPerS/r.PairedBaseTokensPerS, r.PairedNoObserverRatio, 1e-9, "the third side: without the observer")
					assert.Positive(t, r.PairedNoObserverRatio)
					assert.InDelta(t, r.PairedControlTokensPerS/r.PairedBaseTokensPerS, r.PairedControlRatio, 1e-9, "the control side: a second uncompressed engine")
					assert.Positive(t, r.PairedControlRatio)
					assert.True(t, r.PairedTwins, "the uncompressed engines are twins of the compressed one")
					// Every engine decodes as many tokens: with and without
					// the observer on the compressed one, timed and untimed
					// on the others, so they stay at one context length.
					assert.True(t, r.PairedEvenGrowth)
					assert.Positive(t, r.PairedGrowth["compressed"])
					assert.Equal(t, r.PairedGrowth["compressed"], r.PairedGrowth["base"], "%v", r.PairedGrowth)
					assert.Equal(t, r.PairedGrowth["compressed"], r.PairedGrowth["control"], "%v", r.PairedGrowth)
					assert.Len(t, r.PairedLatencyMs["base"], 6, "6 timed tokens on the uncompressed side")
				} else {
					assert.Zero(t, r.PairedTokens, "the uncompressed row has nothing to pair with")
				}

				// Ratios come from the keep-1 row of the same run.
				b := base[r.PromptTokens]
				assert.InDelta(t, float64(r.KVBytes)/float64(b.KVBytes), r.RatioKVBytes, 1e-9)
				assert.InDelta(t, float64(r.KVCells)/float64(b.KVCells), r.RatioKVCells, 1e-9)
				assert.InDelta(t, r.DecodeTokensPerS/b.DecodeTokensPerS, r.RatioDecodeTPS, 1e-9)
				assert.InDelta(t, r.PrefillMs/b.PrefillMs, r.RatioPrefill, 1e-9)
				assert.InDelta(t, float64(r.PeakRSSBytes)/float64(b.PeakRSSBytes), r.RatioPeakRSS, 1e-9)
				assert.InDelta(t, r.Keep, r.RatioKVBytes, 1.0/float64(r.PromptTokens)+1e-9, "bytes proportional to kept cells")
			}
			for _, f := range []string{"e2e-" + rt + ".json", "e2e-" + rt + ".md", "e2e-" + rt + ".png"} {
				st, err := os.Stat(filepath.Join(out, f))
				require.NoError(t, err)
				assert.Positive(t, st.Size(), f)
			}
		})
	}
}

// TestBenchE2EPairedOnly: --paired-only measures the compressed rows alone,
// each with one prefill (with its compressor), and still pairs them against
// an uncompressed engine; bad uses are refused.
func TestBenchE2EPairedOnly(t *testing.T) {
	model := tinyModel(t)
	for _, rt := range e2eRuntimes(t) {
		t.Run(rt, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run([]string{"bench", "e2e", "--runtime", rt, "--model", model, "--prompt-tokens", "96",
				"--keep", "1,0.5", "--decode", "2", "--paired", "6", "--paired-only", "--threads", "1", "--granularity", "per-token", "--json"}, &stdout, &stderr)
			require.Equal(t, 0, code, stderr.String())
			var rows []e2ebench.Row
			require.NoError(t, json.Unmarshal(stdout.Bytes(), &rows), stdout.String())
			require.Len(t, rows, 1, "no keep-1 row")
			r := rows[0]
			assert.Equal(t, 0.5, r.Keep)
			assert.True(t, r.PairedOnly)
			assert.Zero(t, r.PrefillMs, "no prefill without the compressor")
			assert.Positive(t, r.PrefillCaptureMs)
			assert.Equal(t, 1, strings.Count(stderr.String(), "prefill with capture"), "one prefill in the row: %s", stderr.String())
			assert.NotRegexp(t, `: prefill \d`, stderr.String(), "no plain prefill (logged as \"prefill N ms\")")
			assert.Equal(t, 48, r.KVCells)
			assert.Equal(t, 6, r.PairedTokens)
			assert.Positive(t, r.PairedRatio)
			assert.Positive(t, r.PairedNoObserverRatio)

			for _, bad := range [][]string{{"--keep", "1"}, {"--paired", "0"}, {"--chunked"}} {
				stderr.Reset()
				args := append([]string{"bench", "e2e", "--runtime", rt, "--model", model, "--paired-only"}, bad...)
				assert.NotEqual(t, 0, run(args, &stdout, &stderr), "%v", bad)
				assert.Contains(t, stderr.String(), "--paired-only", "%v", bad)
			}
		})
	}
}

func TestBenchE2EChunkedTiny(t *testing.T) {
	model := tinyModel(t)
	for _, rt := range e2eRuntimes(t) {
		t.Run(rt, func(t *testing.T) {
			out := t.TempDir()
			var stdout, stderr bytes.Buffer
			code := run([]string{"bench", "e2e", "--runtime", rt, "--model", model, "--chunked", "--ctx", "256",
				"--keep", "1,0.25", "--threads", "1", "--granularity", "per-token", "--json", "--out", out}, &stdout, &stderr)
			require.Equal(t, 0, code, stderr.String())
			var raw map[string]any
			require.NoError(t, json.Unmarshal(stdout.Bytes(), &raw), stdout.String())
			for _, f := range []string{"prompt_tokens", "ctx_cells", "keep", "samples", "peak_rss_bytes", "hwm_growth_bytes", "compressions", "baseline"} {
				assert.Contains(t, raw, f)
			}
			var c e2ebench.Chunked
			require.NoError(t, json.Unmarshal(stdout.Bytes(), &c))
			assert.True(t, c.ChildProcess)
			assert.Equal(t, 0.25, c.Keep, "the smallest --keep")
			assert.GreaterOrEqual(t, c.Ctx, 256)
			assert.Equal(t, 4*256, c.PromptTokens)
			assert.Positive(t, c.PrefillMs)
			assert.Positive(t, c.Compressions, "a prompt of 4 × the cache compresses under pressure")
			require.GreaterOrEqual(t, len(c.Samples), 4, "one sample per chunk")
			prev := 0
			for _, s := range c.Samples {
				assert.Greater(t, s.TokensFed, prev, "tokens fed grow chunk by chunk")
				prev = s.TokensFed
				assert.LessOrEqual(t, s.LiveCells, c.Ctx, "the cache never holds more than its cells")
				assert.LessOrEqual(t, s.CellsPerHead, float64(c.Ctx))
				assert.Positive(t, s.GoTotalBytes)
				assert.Positive(t, s.HWM)
				assert.GreaterOrEqual(t, s.HWM, s.RSS)
			}
			assert.Equal(t, c.PromptTokens, prev, "the last chunk ends the prompt")
			assert.GreaterOrEqual(t, c.FullAt, 0)
			assert.LessOrEqual(t, c.KVCells, c.Ctx)
			assert.Equal(t, c.End.HWM-c.Samples[c.FullAt].HWM, c.HWMGrowthBytes)
			assert.Positive(t, c.PeakRSSBytes)
			require.NotNil(t, c.Baseline)
			assert.True(t, c.Baseline.Uncompressed)
			assert.GreaterOrEqual(t, c.Baseline.Ctx, c.PromptTokens)
			assert.Zero(t, c.Baseline.Compressions)
			assert.Equal(t, c.PromptTokens, c.Baseline.KVCells)
			for _, f := range []string{"chunked-" + rt + ".json", "chunked-" + rt + ".md", "chunked-" + rt + ".png"} {
				_, err := os.Stat(filepath.Join(out, f))
				assert.NoError(t, err)
			}
		})
	}
}

func TestBenchE2EFlags(t *testing.T) {
	var stdout, stderr bytes.Buffer
	assert.Equal(t, 1, run([]string{"bench", "e2e"}, &stdout, &stderr))
	assert.Contains(t, stderr.String(), "--model is required")
	stderr.Reset()
	assert.Equal(t, 1, run([]string{"bench", "e2e", "--model", "x", "--keep", "0"}, &stdout, &stderr))
	assert.Contains(t, stderr.String(), "not in (0, 1]")
	ks, err := parseKeeps("0.25,0.5")
	require.NoError(t, err)
	assert.Equal(t, []float64{1, 0.5, 0.25}, ks)

	// --pool-observer reads earlier runs' rows, from a file or a directory.
	dir := t.TempDir()
	rows := `[{"runtime":"r","keep":0.5,"paired_latency_ms":{"with":[110,110],"without":[100,100]}},{"runtime":"r","keep":1}]`
	require.NoError(t, os.WriteFile(filepath.Join(dir, "e2e-r.json"), []byte(rows), 0o644))
	stdout.Reset()
	stderr.Reset()
	assert.Equal(t, 0, run([]string{"bench", "e2e", "--pool-observer", dir}, &stdout, &stderr), stderr.String())
	assert.Contains(t, stdout.String(), "r: decode with the observer vs without it, pooled over 1 rows (2 token pairs): -9.09% (95% CI -9.09% … -9.09%)")
	// --json prints the pools unrounded.
	paired := `[{"runtime":"r","prompt_tokens":8,"keep":0.5,"threads":2,"paired_block":1,"paired_latency_ms":{"with":[100,100,100],"without":[100,100,100],"base":[104.99,104.99,104.99]}}]`
	require.NoError(t, os.WriteFile(filepath.Join(dir, "e2e-r.json"), []byte(paired), 0o644))
	stdout.Reset()
	assert.Equal(t, 0, run([]string{"bench", "e2e", "--pool-observer", dir, "--json"}, &stdout, &stderr), stderr.String())
	var pools struct {
		Observer []e2ebench.ObserverPool `json:"observer"`
		Paired   []e2ebench.PairedPool   `json:"paired"`
	}
	require.NoError(t, json.Unmarshal(stdout.Bytes(), &pools), stdout.String())
	require.Len(t, pools.Observer, 1)
	assert.InDelta(t, 0, pools.Observer[0].Cost, 1e-12)
	require.Len(t, pools.Paired, 1)
	assert.Equal(t, 3, pools.Paired[0].Blocks)
	assert.InDelta(t, 1.0499, pools.Paired[0].Ratio, 1e-12, "not rounded to 1.050")
	assert.Contains(t, stdout.String(), `"prompt_tokens": 8`)
	stderr.Reset()
	assert.Equal(t, 1, run([]string{"bench", "e2e", "--pool-observer", t.TempDir()}, &stdout, &stderr))
	assert.Contains(t, stderr.String(), "holds no e2e-*.json")
}
