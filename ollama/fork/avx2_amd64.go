package main

import "golang.org/x/sys/cpu"

// hostHasAVX2: the Makefile's test (grep avx2 /proc/cpuinfo) for optFlags.
func hostHasAVX2() bool { return cpu.X86.HasAVX2 }
