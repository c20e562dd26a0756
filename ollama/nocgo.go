//go:build !cgo

package ollama

import (
	"context"
	"errors"
)

// ErrNoCgo is returned by Open in a build without cgo: Ollama's engine is
// ggml, a C library.
var ErrNoCgo = errors.New("ollama: built without cgo: Ollama's Go engine needs CGO_ENABLED=1 and a C compiler")

// Session is unavailable without cgo; see ErrNoCgo.
type Session struct{}

// Open returns ErrNoCgo.
func Open(path string, cfg Config) (*Session, error) { return nil, ErrNoCgo }

// Close does nothing.
func (s *Session) Close() error { return nil }

// Cache returns nil.
func (s *Session) Cache() *Cache { return nil }

// Architecture returns "".
func (s *Session) Architecture() string { return "" }

// Tokenize returns ErrNoCgo.
func (s *Session) Tokenize(text string, bos bool) ([]int32, error) { return nil, ErrNoCgo }

// Detokenize returns ErrNoCgo.
func (s *Session) Detokenize(ids []int32) (string, error) { return "", ErrNoCgo }

// Decode returns ErrNoCgo.
func (s *Session) Decode(seq int, tokens []int32) ([]float32, error) { return nil, ErrNoCgo }

// Flush returns ErrNoCgo.
func (s *Session) Flush() error { return ErrNoCgo }

// Generate returns ErrNoCgo.
func (s *Session) Generate(ctx context.Context, seq int, prompt []int32, n int, o GenerateOptions) (*Generation, error) {
	return nil, ErrNoCgo
}
