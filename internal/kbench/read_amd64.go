//go:build amd64 && !noasm && !purego

package kbench

import "golang.org/x/sys/cpu"

var hasAVX2 = cpu.X86.HasAVX2

// readAll reads every byte of p as fast as this machine can and returns the
// OR of its 8-byte words (see orWordsGo).
func readAll(p []byte) uint64 {
	if !hasAVX2 {
		return orWordsGo(p)
	}
	whole := len(p) &^ 255
	return orWordsAVX2(p[:whole]) | orWordsGo(p[whole:])
}

// orWordsAVX2 is orWordsGo for len(p) a multiple of 256, with eight 32-byte
// VPOR loads per iteration into four accumulators:
//
//	var acc uint64
//	for i := 0; i < len(p); i += 8 {
//		acc |= binary.LittleEndian.Uint64(p[i:])
//	}
//	return acc
//
//go:noescape
func orWordsAVX2(p []byte) uint64
