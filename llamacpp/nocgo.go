//go:build !cgo

package llamacpp

import (
	"context"
	"unsafe"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp/statemode"
)

// This file keeps the package's API compiling without cgo (CGO_ENABLED=0,
// cross builds, GOARCH=arm64 go vet): Open and every other entry point return
// an error wrapping ErrNoCgo. The pure-Go parts (ParseSeqState, Sampler,
// options) work as usual.

// LinkedFuncs has no functions without cgo: state mode through it returns
// an error wrapping statemode.ErrMissingFunc (use kvnorm/llamacpp/libllama
// for a llama.cpp loaded at run time).
var LinkedFuncs = &statemode.Funcs{Provider: "kvnorm/llamacpp built without cgo"}

// Model is a llama.cpp model; without cgo it cannot be opened.
type Model struct{}

// Context is a llama.cpp context; without cgo it cannot be created.
type Context struct{}

var _ hooks.PositionEvictor = (*Context)(nil)

// SetLogLevel does nothing without cgo.
func SetLogLevel(LogLevel) {}

// Open returns an error wrapping ErrNoCgo.
func Open(path string) (*Model, error) { return nil, ErrNoCgo }

func (m *Model) Info() ModelInfo                                 { return ModelInfo{} }
func (m *Model) Close() error                                    { return nil }
func (m *Model) Tokenize(string, bool) ([]Token, error)          { return nil, ErrNoCgo }
func (m *Model) Detokenize([]Token) (string, error)              { return "", ErrNoCgo }
func (m *Model) Piece(Token) (string, error)                     { return "", ErrNoCgo }
func (m *Model) IsEOG(Token) bool                                { return false }
func (m *Model) NewContext(ContextOptions) (*Context, error)     { return nil, ErrNoCgo }
func (c *Context) Close() error                                  { return nil }
func (c *Context) Model() *Model                                 { return nil }
func (c *Context) Raw() unsafe.Pointer                           { return nil }
func (c *Context) Capacity() int                                 { return 0 }
func (c *Context) Seqs() int                                     { return 0 }
func (c *Context) FlashAttn() FlashAttn                          { return FlashAttnOn }
func (c *Context) BatchSize() int                                { return 0 }
func (c *Context) CellBytes() int64                              { return 0 }
func (c *Context) CacheShape() hooks.CacheShape                  { return hooks.CacheShape{} }
func (c *Context) SetObserver(hooks.Observer)                    {}
func (c *Context) RecordAttention(func(*Attention) error) error  { return ErrNoCgo }
func (c *Context) Cells(hooks.SeqID) int                         { return 0 }
func (c *Context) Positions(hooks.SeqID) []hooks.Pos             { return nil }
func (c *Context) Clear(hooks.SeqID) error                       { return ErrNoCgo }
func (c *Context) EvictPositions(hooks.SeqID, []hooks.Pos) error { return ErrNoCgo }
func (c *Context) Resync(hooks.SeqID) error                      { return ErrNoCgo }
func (c *Context) SeqState(hooks.SeqID) ([]byte, error)          { return nil, ErrNoCgo }
func (c *Context) ReportDeferredKeys(hooks.SeqID, hooks.Observer) error {
	return ErrNoCgo
}
func (c *Context) SeqEpoch(hooks.SeqID) uint64 { return 0 }
func (c *Context) EvictPositionsInEpoch(hooks.SeqID, uint64, []hooks.Pos) error {
	return ErrNoCgo
}
func (c *Context) Decode(hooks.SeqID, []Token) ([]float32, error) {
	return nil, ErrNoCgo
}
func (c *Context) DecodeOutputs(hooks.SeqID, []Token, []int) ([][]float32, error) {
	return nil, ErrNoCgo
}
func (c *Context) PosRange(hooks.SeqID) (lo, hi hooks.Pos, err error) { return -1, -1, ErrNoCgo }
func (c *Context) EnableCompression(adapter.Policy) (*adapter.Compressor, error) {
	return nil, ErrNoCgo
}
func (c *Context) Prompt(hooks.SeqID, []Token) ([]float32, hooks.Stats, error) {
	return nil, hooks.Stats{}, ErrNoCgo
}
func (c *Context) PrefillDone(hooks.SeqID) (hooks.Stats, error) { return hooks.Stats{}, ErrNoCgo }
func (c *Context) Generate(context.Context, hooks.SeqID, []Token, GenerateOptions) (*Generation, error) {
	return nil, ErrNoCgo
}

// ReadState returns an error wrapping ErrNoCgo.
func ReadState(unsafe.Pointer, int32) (*SeqState, error) { return nil, ErrNoCgo }

// NewStateCompressor returns an error wrapping ErrNoCgo.
func NewStateCompressor(unsafe.Pointer, int32, adapter.Policy) (*adapter.Compressor, error) {
	return nil, ErrNoCgo
}

// Compress returns an error wrapping ErrNoCgo.
func Compress(unsafe.Pointer, int32, adapter.Policy) (hooks.Stats, error) {
	return hooks.Stats{}, ErrNoCgo
}
