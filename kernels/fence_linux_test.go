//go:build linux

package kernels

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestNormsNoOverread places src so that it ends exactly at a page that
// cannot be read: a kernel reading one byte past its input crashes the test.
func TestNormsNoOverread(t *testing.T) {
	page := unix.Getpagesize()
	mem, err := unix.Mmap(-1, 0, 4*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	require.NoError(t, err)
	defer unix.Munmap(mem)
	require.NoError(t, unix.Mprotect(mem[3*page:], unix.PROT_NONE))
	usable := mem[:3*page]

	forEachImpl(t, func(t *testing.T, impl string) {
		rng := rand.New(rand.NewPCG(5, 5))
		for _, dt := range allDTypes {
			maxDim, step := 200, 1
			if dt == Q8_0 {
				maxDim, step = 320, 32
			}
			for dim := 0; dim <= maxDim; dim += step {
				for _, n := range []int{1, 2, 3} {
					src := randRows(rng, dt, n, dim, 1)
					if len(src) > len(usable) {
						continue
					}
					s := usable[len(usable)-len(src):]
					copy(s, src)
					want := make([]float32, n)
					genericNorms(want, s, dt, dim, true)
					got := make([]float32, n)
					require.NoError(t, Norms(got, s, dt, dim))
					requireClose(t, want, got, true, dt, dim, n)
				}
			}
		}
	})
}
