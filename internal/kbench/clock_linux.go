//go:build linux

package kbench

import (
	"time"

	"golang.org/x/sys/unix"
)

// threadClock returns the CPU time consumed by the calling OS thread. The
// measuring goroutine is locked to its thread, so time during which other
// processes hold the core is not counted: on a shared machine the figures
// stay those of an undisturbed core. It falls back to the wall clock if the
// thread clock is unavailable.
func threadClock() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return wallClock()
	}
	return time.Duration(ts.Nano())
}
