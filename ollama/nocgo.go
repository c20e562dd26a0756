//go:build !cgo

package ollama

import (
	"context"
	"errors"

	"github.com/kvnorm/kvnorm/hooks"
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

// SetBatch returns ErrNoCgo.
func (s *Session) SetBatch(n int) error { return ErrNoCgo }

// Twin returns ErrNoCgo.
func (s *Session) Twin() (*Session, error) { return nil, ErrNoCgo }

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

// Engine is unavailable without cgo; see ErrNoCgo.
type Engine struct{}

var _ hooks.Engine = (*Engine)(nil)

// OpenEngine returns ErrNoCgo.
func OpenEngine(path string, cfg Config) (*Engine, error) { return nil, ErrNoCgo }

// Twin returns ErrNoCgo.
func (e *Engine) Twin() (*Engine, error) { return nil, ErrNoCgo }

// SetModelName does nothing.
func (e *Engine) SetModelName(name string) {}

// Info returns the runtime's name.
func (e *Engine) Info() hooks.EngineInfo { return hooks.EngineInfo{Runtime: "ollama"} }

// CacheShape returns the zero shape.
func (e *Engine) CacheShape() hooks.CacheShape { return hooks.CacheShape{} }

// Tokenize returns ErrNoCgo.
func (e *Engine) Tokenize(text string, addBOS bool) ([]int32, error) { return nil, ErrNoCgo }

// Detokenize returns ErrNoCgo.
func (e *Engine) Detokenize(tokens []int32) (string, error) { return "", ErrNoCgo }

// SetObserver does nothing.
func (e *Engine) SetObserver(o hooks.Observer) {}

// Prefill returns ErrNoCgo.
func (e *Engine) Prefill(seq hooks.SeqID, tokens []int32, all bool) ([][]float32, error) {
	return nil, ErrNoCgo
}

// Decode returns ErrNoCgo.
func (e *Engine) Decode(seq hooks.SeqID, tokens []int32) ([][]float32, error) { return nil, ErrNoCgo }

// CompactHeads returns ErrNoCgo.
func (e *Engine) CompactHeads(plan *hooks.HeadPlan) error { return ErrNoCgo }

// EvictPositions returns ErrNoCgo.
func (e *Engine) EvictPositions(seq hooks.SeqID, positions []hooks.Pos) error { return ErrNoCgo }

// Live returns ErrNoCgo.
func (e *Engine) Live(seq hooks.SeqID) (int, int64, error) { return 0, 0, ErrNoCgo }

// RemoveSequence returns ErrNoCgo.
func (e *Engine) RemoveSequence(seq hooks.SeqID) error { return ErrNoCgo }

// RecordAttention returns ErrNoCgo (nil for nil).
func (e *Engine) RecordAttention(f func(*Attention) error) error {
	if f == nil {
		return nil
	}
	return ErrNoCgo
}

// Close does nothing.
func (e *Engine) Close() error { return nil }
