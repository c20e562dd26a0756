package kbench

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kvnorm/kvnorm/kernels"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func tinyOptions() Options {
	return Options{
		BufferBytes: 1 << 20,
		AllowSmall:  true,
		Dims:        []int{64, 100},
		MinTime:     time.Millisecond,
		SelectNs:    []int{1000, 5000},
	}
}

func TestRunKernels(t *testing.T) {
	before := kernels.Impl()
	res, err := RunKernels(tinyOptions())
	require.NoError(t, err)
	assert.Equal(t, before, kernels.Impl(), "active implementation restored")

	impls := 1
	if before != "generic" {
		impls = 2
	}
	// f32, f16, bf16 at dims 64 and 100; q8_0 only at 64.
	require.Len(t, res, 7*impls)
	for _, r := range res {
		assert.Positive(t, r.GBps, "%+v", r)
		assert.Positive(t, r.ReadGBps, "%+v", r)
		assert.InDelta(t, r.GBps/r.ReadGBps, r.Ratio, 1e-12)
		assert.False(t, r.DType == "q8_0" && r.Dim == 100, "q8_0 cannot take dim 100")
	}
	assert.Equal(t, before, res[0].Impl, "active implementation first")
	_, err = json.Marshal(res)
	require.NoError(t, err)
}

func TestRunSelect(t *testing.T) {
	res, err := RunSelect(tinyOptions())
	require.NoError(t, err)
	require.Len(t, res, 2)
	for i, n := range []int{1000, 5000} {
		assert.Equal(t, n, res[i].N)
		assert.Positive(t, res[i].Seconds)
		assert.InDelta(t, float64(n)/res[i].Seconds, res[i].ScoresPerSec, 1e-6*res[i].ScoresPerSec)
	}
}

func TestOptions(t *testing.T) {
	o, err := Options{}.withDefaults()
	require.NoError(t, err)
	assert.Equal(t, 64<<20, o.BufferBytes)
	assert.Equal(t, []int{64, 128}, o.Dims)
	assert.Equal(t, []int{10_000, 1_000_000, 10_000_000}, o.SelectNs)
	assert.Positive(t, o.MinTime)

	bad := []Options{
		{BufferBytes: 1 << 20},
		{BufferBytes: -1, AllowSmall: true},
		{Dims: []int{0}},
		{SelectNs: []int{-5}},
	}
	for _, b := range bad {
		_, err := RunKernels(b)
		require.ErrorIs(t, err, ErrOptions, "%+v", b)
	}
	_, err = RunSelect(Options{BufferBytes: 1024})
	require.ErrorIs(t, err, ErrOptions)
	_, err = RunKernels(Options{BufferBytes: 100, AllowSmall: true, Dims: []int{64}})
	require.ErrorIs(t, err, ErrOptions, "no whole row fits")
}

// TestReadAll checks the read loop (assembly where built) against the Go
// reference for every length up to 1 KiB and at odd offsets.
func TestReadAll(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	buf := make([]byte, 1100)
	for off := range 4 {
		for n := 0; n+off <= len(buf) && n <= 1024; n++ {
			for i := range buf {
				buf[i] = 0
			}
			// One random bit somewhere in p: both loops must find it.
			p := buf[off : off+n]
			var want uint64
			if n > 0 {
				i := rng.IntN(n)
				p[i] = 1 << rng.IntN(8)
				want = orWordsGo(p)
				require.NotZero(t, want)
			}
			require.Equal(t, want, readAll(p), "off=%d n=%d", off, n)
		}
	}
}

// TestPrintReport prints the full measurement (64 MiB buffer, defaults) when
// KBENCH_REPORT=1: KBENCH_REPORT=1 go test -run PrintReport -v ./internal/kbench
// KBENCH_MINTIME (a duration) overrides Options.MinTime.
func TestPrintReport(t *testing.T) {
	if os.Getenv("KBENCH_REPORT") != "1" {
		t.Skip("set KBENCH_REPORT=1 to run the full measurement")
	}
	var opts Options
	if v := os.Getenv("KBENCH_MINTIME"); v != "" {
		d, err := time.ParseDuration(v)
		require.NoError(t, err)
		opts.MinTime = d
	}
	ks, err := RunKernels(opts)
	require.NoError(t, err)
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-5s %4s %-8s %8s %10s %6s\n", "dtype", "dim", "impl", "GB/s", "read GB/s", "ratio")
	for _, r := range ks {
		fmt.Fprintf(&sb, "%-5s %4d %-8s %8.2f %10.2f %6.2f\n", r.DType, r.Dim, r.Impl, r.GBps, r.ReadGBps, r.Ratio)
	}
	ss, err := RunSelect(opts)
	require.NoError(t, err)
	fmt.Fprintf(&sb, "\n%10s %14s %10s\n", "n", "Mscores/s", "ms")
	for _, r := range ss {
		fmt.Fprintf(&sb, "%10d %14.1f %10.3f\n", r.N, r.ScoresPerSec/1e6, r.Seconds*1e3)
	}
	t.Log(sb.String())
}
