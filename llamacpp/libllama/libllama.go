//go:build darwin || freebsd || linux || netbsd

// Package libllama compresses the KV cache of a llama.cpp that an app loads
// at run time as a shared library (yzma, gollama.cpp, or its own dlopen):
// state mode (package statemode) through functions resolved in that library
// with github.com/ebitengine/purego. It needs no cgo (it builds with
// CGO_ENABLED=0) and never links a llama.cpp of its own, so the context is
// read and evicted by the very copy that created it.
//
//	lib, err := libllama.Open("/path/to/libllama.so") // the library the app loaded: same handle
//	stats, err := lib.Compress(lctx, 0, adapter.DefaultPolicy()) // lctx: the app's llama_context *, as uintptr
//
// Open refuses a library that lacks one of the functions state mode calls
// (statemode.FuncSymbols), naming it; Compress refuses a recurrent, hybrid or
// sliding-window memory and a state layout it does not recognise with an
// error naming what it found, never a crash. The state layout is the one
// llama.cpp writes with llama_state_seq_get_data (see statemode.SeqState);
// tested with the llama.cpp vendored by Ollama v0.24.0.
package libllama

import (
	"errors"
	"fmt"
	"reflect"
	"sync"

	"github.com/ebitengine/purego"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/llamacpp/statemode"
)

// ErrOpen reports a library that could not be loaded.
var ErrOpen = errors.New("libllama: cannot open the library")

// Library is a libllama shared library and state mode's function table
// resolved in it.
type Library struct {
	mu     sync.Mutex
	path   string
	handle uintptr
	funcs  *statemode.Funcs
}

// Open loads (or, when the app already loaded it, references again) the
// libllama at path with dlopen and resolves the functions state mode calls.
// A path the process already loaded gives the same library, so the app's
// contexts and kvnorm use one llama.cpp.
func Open(path string) (*Library, error) {
	h, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrOpen, path, err)
	}
	f, err := Resolve(h, path)
	if err != nil {
		purego.Dlclose(h)
		return nil, err
	}
	return &Library{path: path, handle: h, funcs: f}, nil
}

// Resolve fills state mode's function table with the symbols of the library
// handle h (from dlopen; name is for messages). A missing symbol is an error
// wrapping statemode.ErrMissingFunc that names it.
func Resolve(h uintptr, name string) (*statemode.Funcs, error) {
	f := &statemode.Funcs{Provider: "libllama " + name}
	v := reflect.ValueOf(f).Elem()
	for _, s := range statemode.FuncSymbols {
		sym, err := purego.Dlsym(h, s.Symbol)
		if err != nil || sym == 0 {
			return nil, fmt.Errorf("%w: %s not found in %s: this llama.cpp is older or built without it", statemode.ErrMissingFunc, s.Symbol, name)
		}
		purego.RegisterFunc(v.FieldByName(s.Field).Addr().Interface(), sym)
	}
	if err := f.Check(); err != nil {
		return nil, err
	}
	return f, nil
}

// Funcs returns the function table (nil once closed).
func (l *Library) Funcs() *statemode.Funcs {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.funcs
}

// Path returns the path the library was opened with.
func (l *Library) Path() string { return l.path }

// Close drops this Library's reference to the shared library (dlclose); the
// app's own reference keeps it loaded. Safe to call twice.
func (l *Library) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.handle == 0 {
		return nil
	}
	err := purego.Dlclose(l.handle)
	l.handle, l.funcs = 0, nil
	return err
}

func (l *Library) table() (*statemode.Funcs, error) {
	f := l.Funcs()
	if f == nil {
		return nil, fmt.Errorf("%w: %s is closed", ErrOpen, l.path)
	}
	return f, nil
}

// ReadState returns the parsed state of seq of ctx (a llama_context * of
// this library).
func (l *Library) ReadState(ctx uintptr, seq int32) (*statemode.SeqState, error) {
	f, err := l.table()
	if err != nil {
		return nil, err
	}
	return statemode.Read(f, ctx, seq)
}

// NewCompressor reads the keys of seq of ctx and returns a compressor that
// has recorded their norms and evicts from ctx (see statemode.NewCompressor).
func (l *Library) NewCompressor(ctx uintptr, seq int32, policy adapter.Policy) (*adapter.Compressor, error) {
	f, err := l.table()
	if err != nil {
		return nil, err
	}
	return statemode.NewCompressor(f, ctx, seq, policy)
}

// Compress compresses sequence seq of ctx in place (see statemode.Compress):
// call it after llama_decode of the prompt returned and before the next one.
func (l *Library) Compress(ctx uintptr, seq int32, policy adapter.Policy) (hooks.Stats, error) {
	f, err := l.table()
	if err != nil {
		return hooks.Stats{}, err
	}
	return statemode.Compress(f, ctx, seq, policy)
}
