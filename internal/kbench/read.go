package kbench

import (
	"encoding/binary"
	"time"
)

// orWordsGo is the portable read loop and the reference for the assembly
// one: the bitwise OR of every 8-byte little-endian word of p, the last
// partial word zero-padded. Eight independent accumulators keep eight loads
// in flight per iteration.
func orWordsGo(p []byte) uint64 {
	var a0, a1, a2, a3, a4, a5, a6, a7 uint64
	for len(p) >= 64 {
		q := p[:64]
		a0 |= binary.LittleEndian.Uint64(q[0:])
		a1 |= binary.LittleEndian.Uint64(q[8:])
		a2 |= binary.LittleEndian.Uint64(q[16:])
		a3 |= binary.LittleEndian.Uint64(q[24:])
		a4 |= binary.LittleEndian.Uint64(q[32:])
		a5 |= binary.LittleEndian.Uint64(q[40:])
		a6 |= binary.LittleEndian.Uint64(q[48:])
		a7 |= binary.LittleEndian.Uint64(q[56:])
		p = p[64:]
	}
	for len(p) >= 8 {
		a0 |= binary.LittleEndian.Uint64(p)
		p = p[8:]
	}
	var last [8]byte
	copy(last[:], p)
	a0 |= binary.LittleEndian.Uint64(last[:])
	return a0 | a1 | a2 | a3 | a4 | a5 | a6 | a7
}

var clockStart = time.Now()

// wallClock returns the monotonic time since the package was loaded.
func wallClock() time.Duration { return time.Since(clockStart) }
