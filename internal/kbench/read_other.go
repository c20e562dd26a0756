//go:build !amd64 || noasm || purego

package kbench

// readAll reads every byte of p and returns the OR of its 8-byte words.
func readAll(p []byte) uint64 { return orWordsGo(p) }
