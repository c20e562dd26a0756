//go:build amd64 && !noasm && !purego

package kernels

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestAVX2Selection(t *testing.T) {
	if hasAVX2 {
		assert.Equal(t, "avx2", Impls()[0])
	} else {
		assert.Equal(t, []string{"generic"}, Impls())
		_, err := UseImpl("avx2")
		require.ErrorIs(t, err, ErrImpl)
	}
}

// TestGODEBUGFallback re-runs this test binary with GODEBUG=cpu.avx2=off
// and checks that the child picks the generic implementation.
func TestGODEBUGFallback(t *testing.T) {
	if os.Getenv("KVNORM_CHILD") == "1" {
		if Impl() != "generic" {
			t.Fatalf("with GODEBUG=%s Impl() = %q, want generic", os.Getenv("GODEBUG"), Impl())
		}
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestGODEBUGFallback$", "-test.v")
	cmd.Env = append(os.Environ(), "KVNORM_CHILD=1", "GODEBUG=cpu.avx2=off")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.True(t, strings.Contains(string(out), "PASS"), "%s", out)
}
