package e2ebench

import (
	"bytes"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseStatus(t *testing.T) {
	m, err := parseStatus([]byte("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 512 kB\nRssFile:\t 256 kB\n"))
	require.NoError(t, err)
	assert.Equal(t, Mem{RSS: 1 << 20, HWM: 2 << 20, Anon: 512 << 10, File: 256 << 10}, m)
	_, err = parseStatus([]byte("Name: x\n"))
	assert.Error(t, err)
	m, err = ReadMem()
	if err == nil {
		assert.Positive(t, m.HWM)
	}
}

func TestAutoCtx(t *testing.T) {
	assert.Equal(t, 2048, AutoCtx(512, 32))
	assert.Equal(t, 2304, AutoCtx(2048, 32))
	assert.Equal(t, 8448, AutoCtx(8192, 32))
}

func testRows() []*Row {
	mk := func(p int, k float64, cells int, tps float64) *Row {
		return &Row{Runtime: "x", PromptTokens: p, Keep: k, KVCellsBefore: p, KVCells: cells, KVEntriesBefore: int64(p) * 4,
			KVEntries: int64(cells) * 4, EntryBytes: 64, KVBytesBefore: int64(p) * 256, KVBytes: int64(cells) * 256,
			PrefillMs: 100, PrefillCaptureMs: 103, CaptureOverhead: 0.03, CompressMs: 1, CompressFrac: 0.01,
			DecodeTokensPerS: tps, PeakRSSBytes: 1000, RSSAnonBytes: 100}
	}
	return []*Row{mk(64, 1, 64, 10), mk(64, 0.5, 32, 9), mk(128, 0.5, 64, 12), mk(128, 1, 128, 10)}
}

func TestSetRatiosAndTargets(t *testing.T) {
	rows := testRows()
	SetRatios(rows)
	assert.Equal(t, 1.0, rows[0].RatioKVBytes)
	assert.Equal(t, 0.5, rows[1].RatioKVBytes)
	assert.Equal(t, 0.9, rows[1].RatioDecodeTPS)
	assert.Equal(t, 1.2, rows[2].RatioDecodeTPS, "the base row may come after")
	holds := map[string]bool{}
	for _, tg := range Targets(rows) {
		holds[tg.Name] = tg.Holds
	}
	assert.False(t, holds["decode at keep 0.5 ≥ uncompressed: x 64 tokens keep 0.5"])
	assert.True(t, holds["decode at keep 0.5 ≥ uncompressed: x 128 tokens keep 0.5"])
	assert.True(t, holds["KV bytes ∝ kept: x 64 tokens keep 0.5"])
	assert.True(t, holds["capture ≤ 5% of prefill: x 64 tokens keep 0.5"])
	assert.True(t, holds["compress ≤ 2% of prefill: x 64 tokens keep 0.5"])

	// A paired measurement decides the decode target when there is one.
	rows[1].PairedTokens, rows[1].PairedRatio, rows[1].PairedTokensPerS, rows[1].PairedBaseTokensPerS = 64, 1.01, 10.1, 10
	rows[2].PairedTokens, rows[2].PairedRatio, rows[2].PairedTokensPerS, rows[2].PairedBaseTokensPerS = 64, 0.99, 9.9, 10
	for _, tg := range Targets(rows) {
		holds[tg.Name] = tg.Holds
		if tg.Name == "decode at keep 0.5 ≥ uncompressed: x 64 tokens keep 0.5" {
			assert.Contains(t, tg.Detail, "paired")
			assert.Contains(t, tg.Detail, "separate rows: ×0.900")
		}
	}
	assert.True(t, holds["decode at keep 0.5 ≥ uncompressed: x 64 tokens keep 0.5"])
	assert.False(t, holds["decode at keep 0.5 ≥ uncompressed: x 128 tokens keep 0.5"])

	// With a third side (the same engine without its observer), the
	// observer's cost is judged on its own: within 2% of that side.
	rows[1].PairedNoObserverRatio, rows[2].PairedNoObserverRatio = 1.02, 1.02
	for _, tg := range Targets(rows) {
		holds[tg.Name] = tg.Holds
	}
	assert.True(t, holds["decode with the observer ≥ without it − 2%: x 64 tokens keep 0.5"], "1.01 vs 1.02")
	assert.False(t, holds["decode with the observer ≥ without it − 2%: x 128 tokens keep 0.5"], "0.99 vs 1.02")

	var b bytes.Buffer
	require.NoError(t, WriteTable(&b, rows, true))
	assert.Contains(t, b.String(), "| x | 64 | 0.5 | 32 |")
	assert.Contains(t, b.String(), "| 0.900 | 1.010 |")
	require.NoError(t, PlotRows(filepath.Join(t.TempDir(), "p.png"), "t", rows))

	// A paired-only row measured no prefill without its compressor: its
	// prefill columns are empty and no prefill target is judged on it.
	// Run alone (no keep-1 row), its ratios to that row are not measured.
	rows[1].PairedOnly, rows[1].PrefillMs, rows[1].CaptureOverhead, rows[1].CompressFrac = true, 0, 0, 0
	rows[1].RatioKVBytes, rows[1].RatioDecodeTPS = 0, 0
	b.Reset()
	require.NoError(t, WriteTable(&b, rows[1:2], true))
	assert.Contains(t, b.String(), "| x | 64 | 0.5 | 32 | 0.0 | - | - | - | 1.00 | - | 9.00 | - | 1.010 |")
	for _, tg := range Targets(rows[1:2]) {
		assert.NotContains(t, tg.Name, "prefill", "a paired-only row")
	}
}

func TestChunkedReport(t *testing.T) {
	c := &Chunked{Runtime: "x", Ctx: 256, PromptTokens: 1024, Keep: 0.25, FullAt: 0,
		Samples:  []Sample{{Chunk: 0, TokensFed: 256, LiveCells: 256, Mem: Mem{RSS: 10 << 20, HWM: 11 << 20}}, {Chunk: 1, TokensFed: 1024, LiveCells: 200, Mem: Mem{RSS: 10 << 20, HWM: 11 << 20}}},
		Baseline: &Chunked{PromptTokens: 1024, Ctx: 1280, PeakRSSBytes: 20 << 20}, PeakRSSBytes: 11 << 20}
	var b bytes.Buffer
	require.NoError(t, WriteChunked(&b, c, true))
	assert.Contains(t, b.String(), "| 1 | 1024 | 200 |")
	assert.Contains(t, b.String(), "×0.550")
	require.NoError(t, PlotChunked(filepath.Join(t.TempDir(), "c.png"), c))
}

func TestObserverCI(t *testing.T) {
	ms := func(v ...float64) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x * float64(time.Millisecond))
		}
		return out
	}
	assert.Nil(t, observerCI(nil, nil))
	// The same latencies both ways: no cost, and no width.
	same := ms(100, 90, 110, 95, 105, 100)
	assert.Equal(t, []float64{0, 0}, observerCI(same, same))

	// With the observer 10% slower per token, whatever each pair's speed:
	// tokens/s with ÷ without − 1 = 1/1.1 − 1, at both ends.
	without := ms(80, 120, 100, 90, 130, 70, 110, 100)
	with := make([]time.Duration, len(without))
	for i, d := range without {
		with[i] = d * 11 / 10
	}
	ci := observerCI(with, without)
	require.Len(t, ci, 2)
	assert.InDelta(t, 1/1.1-1, ci[0], 1e-9)
	assert.InDelta(t, 1/1.1-1, ci[1], 1e-9)

	// Pairs that disagree give an interval around their ratio of sums.
	with = ms(100, 100, 100, 100, 100, 100, 100, 100)
	without = ms(90, 110, 95, 105, 80, 120, 100, 100)
	ci = observerCI(with, without)
	assert.Less(t, ci[0], 0.0)
	assert.Greater(t, ci[1], 0.0)
	assert.Less(t, ci[0], ci[1])
}

func TestPoolObserver(t *testing.T) {
	row := func(rt string, with, without []float64) *Row {
		return &Row{Runtime: rt, PairedLatencyMs: map[string][]float64{"with": with, "without": without}}
	}
	rows := []*Row{
		row("a", []float64{110, 110, 110, 110}, []float64{100, 100, 100, 100}), // with 10% slower per token
		row("a", []float64{50, 50}, []float64{50, 50}),                         // no cost
		row("b", []float64{100, 120}, []float64{100, 120}),
		{Runtime: "c"}, // no latencies: skipped
	}
	pools := PoolObserver(rows)
	require.Len(t, pools, 2)
	a := pools[0]
	assert.Equal(t, "a", a.Runtime)
	assert.Equal(t, 2, a.Rows)
	assert.Equal(t, 6, a.Pairs)
	assert.InDelta(t, (100.0/110-1)/2, a.Cost, 1e-12, "rows weigh the same")
	assert.InDelta(t, a.Cost, a.CI[0], 1e-12, "constant ratios within each row: no width")
	assert.InDelta(t, a.Cost, a.CI[1], 1e-12)
	assert.Equal(t, ObserverPool{Runtime: "b", Rows: 1, Pairs: 2}, pools[1])

	var b bytes.Buffer
	require.NoError(t, WriteObserverPool(&b, pools))
	assert.Contains(t, b.String(), "a: decode with the observer vs without it, pooled over 2 rows (6 token pairs): -4.55%")
	b.Reset()
	require.NoError(t, WriteObserverPool(&b, nil))
	assert.Contains(t, b.String(), "no rows")
}

func TestPoolPaired(t *testing.T) {
	row := func(prompt, block int, twins bool, with, base, control []float64) *Row {
		return &Row{Runtime: "a", PromptTokens: prompt, Keep: 0.5, Threads: 2, PairedBlock: block, PairedTwins: twins,
			PairedLatencyMs: map[string][]float64{"with": with, "base": base, "control": control}}
	}
	rows := []*Row{
		// Compressed 20% faster per token in every turn (blocks of 2).
		row(2048, 2, true, []float64{80, 80, 40, 40}, []float64{100, 100, 50, 50}, []float64{100, 100, 50, 50}),
		// A second row of the same group: the same speed, turn by turn,
		// but for noise that cancels within each turn.
		row(2048, 2, true, []float64{90, 110, 50, 50}, []float64{100, 100, 50, 50}, []float64{100, 100, 50, 50}),
		// Another prompt length, no control, an older row (block 0 = 8).
		row(512, 0, false, []float64{10, 10}, []float64{11, 11}, nil),
		{Runtime: "a", PromptTokens: 4096}, // no latencies: skipped
	}
	pools := PoolPaired(rows)
	require.Len(t, pools, 2)
	p := pools[0]
	assert.Equal(t, 2048, p.PromptTokens)
	assert.Equal(t, 2, p.Rows)
	assert.Equal(t, 4, p.Blocks, "two turns per row")
	assert.Equal(t, 2, p.TwinRows)
	assert.InDelta(t, (1.25+1)/2, p.Ratio, 1e-12, "rows weigh the same")
	assert.InDelta(t, p.Ratio, p.CI[0], 1e-12, "each row's turns have one ratio: no width")
	assert.InDelta(t, p.Ratio, p.CI[1], 1e-12)
	assert.InDelta(t, 1, p.Control, 1e-12)
	q := pools[1]
	assert.Equal(t, 512, q.PromptTokens)
	assert.Equal(t, 1, q.Blocks, "two tokens in one default block of 8")
	assert.Zero(t, q.TwinRows)
	assert.InDelta(t, 1.1, q.Ratio, 1e-12)
	assert.Zero(t, q.Control, "no control side")

	var b bytes.Buffer
	require.NoError(t, WritePairedPool(&b, pools))
	assert.Contains(t, b.String(), "a: 2048 tokens keep 0.5, 2 threads: paired decode, pooled over 2 rows (4 turns, twins): ×1.125")
	assert.Contains(t, b.String(), "A/A control ×1.000")
	assert.Contains(t, b.String(), "a: 512 tokens keep 0.5, 2 threads: paired decode, pooled over 1 rows (1 turns, separate loads): ×1.100")
	b.Reset()
	require.NoError(t, WritePairedPool(&b, []PairedPool{{Runtime: "a", Threads: 1, Rows: 3, TwinRows: 1, Ratio: 1}}))
	assert.Contains(t, b.String(), "1 thread: paired decode, pooled over 3 rows (0 turns, twins in 1)", "a mixed group says so")

	// Rows whose engines grew alike say so; a group mixing them with
	// older rows says how many.
	even := row(2048, 2, true, []float64{80, 80}, []float64{100, 100}, nil)
	even.PairedEvenGrowth = true
	pools = PoolPaired([]*Row{even})
	require.Len(t, pools, 1)
	assert.Equal(t, 1, pools[0].EvenRows)
	b.Reset()
	require.NoError(t, WritePairedPool(&b, pools))
	assert.Contains(t, b.String(), "(1 turns, twins, even growth): ×1.250")
	pools = PoolPaired([]*Row{even, rows[0]})
	b.Reset()
	require.NoError(t, WritePairedPool(&b, pools))
	assert.Contains(t, b.String(), "(3 turns, twins, even growth in 1)")
}
