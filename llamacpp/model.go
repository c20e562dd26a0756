//go:build cgo

package llamacpp

/*
#include <stdlib.h>
#include "kvn_llama.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"unsafe"

	"github.com/kvnorm/kvnorm/gguf"
)

// Model is a llama.cpp model loaded from a GGUF file. It owns the C model;
// Close frees it (closing its contexts first) and is safe to call twice.
// Its methods are safe for concurrent use.
type Model struct {
	mu    sync.Mutex
	m     *C.struct_llama_model
	vocab *C.struct_llama_vocab
	info  ModelInfo
	ctxs  map[*Context]struct{}
	// closing is set once Close starts: no new context from then on.
	closing bool
}

// Open loads a GGUF model for the CPU. The file is validated by kvnorm's GGUF
// reader first, so a missing, truncated or malformed file gives an error
// (wrapping ErrNotGGUF or the os error) instead of reaching llama.cpp.
func Open(path string) (*Model, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("llamacpp: open model: %w", err)
	}
	f, err := gguf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrNotGGUF, path, err)
	}
	f.Close()
	initBackend()
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	params := C.llama_model_default_params()
	params.n_gpu_layers = 0
	cm := C.llama_model_load_from_file(cpath, params)
	if cm == nil {
		return nil, fmt.Errorf("%w: model %s (run with SetLogLevel(LogWarn) to see why)", ErrLoad, path)
	}
	m := &Model{m: cm, vocab: C.llama_model_get_vocab(cm), ctxs: map[*Context]struct{}{}}
	m.info = m.readInfo(path)
	if m.info.Layers <= 0 || m.info.KVHeads <= 0 || m.info.HeadDim <= 0 || m.info.Vocab <= 0 {
		m.Close()
		return nil, fmt.Errorf("%w: model %s: layers=%d kv heads=%d head dim=%d vocab=%d", ErrLoad, path, m.info.Layers, m.info.KVHeads, m.info.HeadDim, m.info.Vocab)
	}
	return m, nil
}

func (m *Model) readInfo(path string) ModelInfo {
	in := ModelInfo{
		Path:      path,
		Layers:    int(C.llama_model_n_layer(m.m)),
		Heads:     int(C.llama_model_n_head(m.m)),
		KVHeads:   int(C.llama_model_n_head_kv(m.m)),
		Embd:      int(C.llama_model_n_embd(m.m)),
		Vocab:     int(C.llama_vocab_n_tokens(m.vocab)),
		TrainCtx:  int(C.llama_model_n_ctx_train(m.m)),
		BOS:       Token(C.llama_vocab_bos(m.vocab)),
		EOS:       Token(C.llama_vocab_eos(m.vocab)),
		AddBOS:    bool(C.llama_vocab_get_add_bos(m.vocab)),
		Recurrent: bool(C.llama_model_is_recurrent(m.m)),
		NoRoPE:    C.llama_model_rope_type(m.m) == C.LLAMA_ROPE_TYPE_NONE,
	}
	switch C.llama_model_rope_type(m.m) {
	case C.LLAMA_ROPE_TYPE_MROPE, C.LLAMA_ROPE_TYPE_IMROPE:
		in.MRoPE = true
	}
	buf := make([]byte, 256)
	if n := C.llama_model_desc(m.m, (*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf))); n > 0 {
		in.Desc = string(buf[:min(int(n), len(buf)-1)])
	}
	// n_embd_k_gqa / n_head_kv: the key length when the model states it,
	// else n_embd / n_head.
	if in.Heads > 0 {
		in.HeadDim = in.Embd / in.Heads
	}
	in.Arch = m.meta("general.architecture")
	if arch := in.Arch; arch != "" {
		if v, err := strconv.Atoi(m.meta(arch + ".attention.key_length")); err == nil && v > 0 {
			in.HeadDim = v
		}
		in.MLA = m.meta(arch+".attention.kv_lora_rank") != ""
	}
	return in
}

// meta returns a metadata value of the model as a string ("" if absent).
func (m *Model) meta(key string) string {
	ck := C.CString(key)
	defer C.free(unsafe.Pointer(ck))
	buf := make([]byte, 256)
	n := C.llama_model_meta_val_str(m.m, ck, (*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)))
	if n < 0 {
		return ""
	}
	return string(buf[:min(int(n), len(buf)-1)])
}

// Info describes the model.
func (m *Model) Info() ModelInfo { return m.info }

// Close frees the model after closing every context still open on it. It is
// safe to call more than once.
func (m *Model) Close() error {
	m.mu.Lock()
	m.closing = true
	ctxs := make([]*Context, 0, len(m.ctxs))
	for c := range m.ctxs {
		ctxs = append(ctxs, c)
	}
	m.mu.Unlock()
	var errs []error
	for _, c := range ctxs {
		errs = append(errs, c.Close())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m != nil {
		C.llama_model_free(m.m)
		m.m, m.vocab = nil, nil
	}
	return errors.Join(errs...)
}

// live returns the C model, or ErrClosed. The caller holds m.mu.
func (m *Model) live() error {
	if m.m == nil || m.closing {
		return fmt.Errorf("%w: model %s", ErrClosed, m.info.Path)
	}
	return nil
}

// Tokenize turns text into tokens. addSpecial adds BOS (and EOS) when the
// vocabulary asks for them; special-token text such as "<s>" in text is kept
// as plain text.
func (m *Model) Tokenize(text string, addSpecial bool) ([]Token, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.live(); err != nil {
		return nil, err
	}
	if len(text) > 1<<30 {
		return nil, fmt.Errorf("%w: text of %d bytes is too long to tokenize", ErrBadInput, len(text))
	}
	ctext := C.CString(text)
	defer C.free(unsafe.Pointer(ctext))
	toks := make([]Token, len(text)+2)
	for range 2 {
		n := C.llama_tokenize(m.vocab, ctext, C.int32_t(len(text)), (*C.llama_token)(unsafe.Pointer(unsafe.SliceData(toks))), C.int32_t(len(toks)), C.bool(addSpecial), false)
		switch {
		case n >= 0:
			return toks[:n], nil
		case n == C.INT32_MIN:
			return nil, &CError{Func: "llama_tokenize", Code: int(n), Msg: "token count overflows", Err: ErrBadInput}
		}
		toks = make([]Token, -n)
	}
	return nil, &CError{Func: "llama_tokenize", Code: -len(toks), Msg: "buffer still too small", Err: ErrBadInput}
}

// Detokenize returns the text of tokens, without BOS/EOS and without the
// space the tokenizer put in front of the first word: the inverse of
// Tokenize(text, true).
func (m *Model) Detokenize(tokens []Token) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.live(); err != nil {
		return "", err
	}
	if err := m.checkTokens(tokens); err != nil {
		return "", err
	}
	// llama_detokenize keeps the tokenizer's leading space when it drops a
	// BOS; dropping the BOS here lets it remove that space too.
	if len(tokens) > 0 && tokens[0] == m.info.BOS && m.info.AddBOS {
		tokens = tokens[1:]
	}
	if len(tokens) == 0 {
		return "", nil
	}
	buf := make([]byte, 8*len(tokens)+16)
	for range 2 {
		n := C.llama_detokenize(m.vocab, (*C.llama_token)(unsafe.Pointer(&tokens[0])), C.int32_t(len(tokens)),
			(*C.char)(unsafe.Pointer(&buf[0])), C.int32_t(len(buf)), true, false)
		if n >= 0 {
			return string(buf[:n]), nil
		}
		buf = make([]byte, -n)
	}
	return "", &CError{Func: "llama_detokenize", Code: -len(buf), Msg: "buffer still too small", Err: ErrBadInput}
}

// Piece returns the text of one token as it appears in generated text
// (special tokens render as nothing).
func (m *Model) Piece(tok Token) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.live(); err != nil {
		return "", err
	}
	return m.pieceLocked(tok)
}

func (m *Model) pieceLocked(tok Token) (string, error) {
	if err := m.checkTokens([]Token{tok}); err != nil {
		return "", err
	}
	buf := make([]byte, 64)
	for range 2 {
		n := C.llama_token_to_piece(m.vocab, C.llama_token(tok), (*C.char)(unsafe.Pointer(&buf[0])), C.int32_t(len(buf)), 0, false)
		if n >= 0 {
			return string(buf[:n]), nil
		}
		buf = make([]byte, -n)
	}
	return "", &CError{Func: "llama_token_to_piece", Code: -len(buf), Msg: fmt.Sprintf("token %d", tok), Err: ErrBadInput}
}

// IsEOG reports whether tok ends a generation (EOS, EOT...).
func (m *Model) IsEOG(tok Token) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.m == nil || tok < 0 || int(tok) >= m.info.Vocab {
		return false
	}
	return bool(C.llama_vocab_is_eog(m.vocab, C.llama_token(tok)))
}

func (m *Model) checkTokens(tokens []Token) error {
	for i, t := range tokens {
		if t < 0 || int(t) >= m.info.Vocab {
			return fmt.Errorf("%w: token %d at index %d outside the vocabulary of %d", ErrBadInput, t, i, m.info.Vocab)
		}
	}
	return nil
}
