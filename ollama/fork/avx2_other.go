//go:build !amd64

package main

func hostHasAVX2() bool { return false }
