//go:build !linux

package kbench

import "time"

// threadClock is the wall clock where no per-thread CPU clock is used.
func threadClock() time.Duration { return wallClock() }
