//go:build !amd64 || noasm || purego

package kernels

// Without assembly only the generic implementation exists.
