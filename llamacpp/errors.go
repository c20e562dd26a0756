package llamacpp

import (
	"errors"
	"fmt"

	"github.com/kvnorm/kvnorm/llamacpp/statemode"
)

// Sentinel errors. Every error this package returns wraps one of them (or an
// error of hooks, adapter or kernels) with %w and a message naming the value
// that was wrong; test with errors.Is.
var (
	// ErrNoCgo is returned by every entry point of a build without cgo.
	ErrNoCgo = errors.New("llamacpp: built without cgo (CGO_ENABLED=0 or a cross build): the llama.cpp runtime is unavailable")
	// ErrClosed reports a call on a closed Model or Context.
	ErrClosed = errors.New("llamacpp: closed")
	// ErrNotGGUF reports a model file that is not a valid GGUF file.
	ErrNotGGUF = errors.New("llamacpp: not a valid GGUF model")
	// ErrLoad reports a model or context that llama.cpp refused to create.
	ErrLoad = errors.New("llamacpp: llama.cpp could not load")
	// ErrBadInput reports an argument out of range: an empty token list, a
	// token outside the vocabulary, a sequence id outside the context, a
	// batch larger than the cache.
	ErrBadInput = errors.New("llamacpp: bad input")
	// ErrContextFull reports a batch that does not fit in the free cells of
	// a sequence, with no compressor attached to make room.
	ErrContextFull = errors.New("llamacpp: KV cache full")
	// ErrDecode reports a failed llama_decode.
	ErrDecode = errors.New("llamacpp: decode failed")
	// ErrState reports a sequence state (llama_state_seq_get_data) that
	// cannot be parsed, does not match the model or changed while it was
	// read (the same error as statemode.ErrState).
	ErrState = statemode.ErrState
	// ErrNoAttention reports attention probabilities that cannot be
	// recorded: flash attention is (or may be) on, so the graph has no
	// kq_soft_max node, or the positions of a sequence's cells are unknown.
	ErrNoAttention = errors.New("llamacpp: cannot record attention")
)

// CError is a failed llama.cpp call and its return code. It unwraps to the
// sentinel error that classifies it (ErrDecode, ErrContextFull, ErrBadInput,
// ErrState...).
type CError struct {
	Func string // the llama.cpp function, e.g. "llama_decode"
	Code int    // its return code
	Msg  string // what was being done
	Err  error  // the sentinel it wraps
}

func (e *CError) Error() string {
	s := fmt.Sprintf("%s returned %d", e.Func, e.Code)
	if e.Msg != "" {
		s = e.Msg + ": " + s
	}
	if e.Err != nil {
		s = e.Err.Error() + ": " + s
	}
	return s
}

// Unwrap returns the sentinel error.
func (e *CError) Unwrap() error { return e.Err }

// decodeError classifies a llama_decode return code as llama.h documents it.
func decodeError(code int, msg string) error {
	e := &CError{Func: "llama_decode", Code: code, Msg: msg, Err: ErrDecode}
	switch code {
	case 1:
		e.Err = ErrContextFull
	case -1:
		e.Err = ErrBadInput
	}
	return e
}
