package llama2c

import (
	"container/heap"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"strings"

	"github.com/kvnorm/kvnorm/gguf"
)

// TokenType is the llama.cpp token type stored in tokenizer.ggml.token_type.
type TokenType int32

// Token types, numbered as llama.cpp numbers them.
const (
	TokenUndefined   TokenType = 0
	TokenNormal      TokenType = 1
	TokenUnknown     TokenType = 2
	TokenControl     TokenType = 3
	TokenUserDefined TokenType = 4
	TokenUnused      TokenType = 5
	TokenByte        TokenType = 6
)

// Special token ids of llama2.c (and SentencePiece) vocabularies.
const (
	UnknownID int32 = 0
	BOSID     int32 = 1
	EOSID     int32 = 2
)

// maxPieceLen bounds max_token_length in a tokenizer file.
const maxPieceLen = 1 << 16

// spaceMarker is SentencePiece's visible space, U+2581.
const spaceMarker = "\u2581"

// Tokenizer is a SentencePiece BPE vocabulary with the llama2.c / llama.cpp
// "llama" tokenization rules. Pieces use plain spaces (the llama2.c
// convention); [Tokenizer.GGUFTokens] gives them with U+2581. A Tokenizer
// is safe for concurrent use.
type Tokenizer struct {
	// Pieces are the vocabulary entries, as in the llama2.c file.
	Pieces []string
	// Scores are the merge scores: the higher, the earlier a pair merges.
	Scores []float32
	// Types are the llama.cpp token types.
	Types []TokenType
	// MaxTokenLength is the longest piece in bytes.
	MaxTokenLength int
	// BOS, EOS and Unknown are the special token ids.
	BOS, EOS, Unknown int32

	index map[string]int32
	bytes [256]int32 // byte value to its <0xNN> token, or -1
}

// ReadTokenizer reads a llama2.c tokenizer file with vocabSize pieces (the
// model's vocab_size; the file does not record it). The file must hold
// exactly that many pieces.
func ReadTokenizer(path string, vocabSize int) (*Tokenizer, error) {
	fd, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fd.Close()
	st, err := fd.Stat()
	if err != nil {
		return nil, err
	}
	t, err := ReadTokenizerFrom(fd, st.Size(), vocabSize)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// ReadTokenizerFrom reads a llama2.c tokenizer of size bytes from r; see
// [ReadTokenizer]. Every piece must be at most max_token_length bytes (as
// llama2.c assumes) and every score finite.
func ReadTokenizerFrom(r io.ReaderAt, size int64, vocabSize int) (*Tokenizer, error) {
	if vocabSize <= 0 || vocabSize > maxVocab {
		return nil, fmt.Errorf("%w: vocab size %d out of range [1, %d]", ErrInvalid, vocabSize, maxVocab)
	}
	if min := 4 + 8*int64(vocabSize); size < min {
		return nil, fmt.Errorf("%w: %d bytes cannot hold %d pieces (at least %d bytes)", ErrTruncated, size, vocabSize, min)
	}
	sr := io.NewSectionReader(r, 0, size)
	var b [8]byte
	if _, err := io.ReadFull(sr, b[:4]); err != nil {
		return nil, fmt.Errorf("llama2c: tokenizer: %w", err)
	}
	maxLen := int32(binary.LittleEndian.Uint32(b[:]))
	if maxLen <= 0 || maxLen > maxPieceLen {
		return nil, fmt.Errorf("%w: tokenizer: max_token_length %d out of range [1, %d]", ErrFormat, maxLen, maxPieceLen)
	}
	pieces := make([]string, vocabSize)
	scores := make([]float32, vocabSize)
	buf := make([]byte, maxLen)
	pos := int64(4)
	for i := range vocabSize {
		if _, err := io.ReadFull(sr, b[:8]); err != nil {
			return nil, fmt.Errorf("%w: tokenizer: piece %d at offset %d: file ends", ErrTruncated, i, pos)
		}
		scores[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[:]))
		n := int32(binary.LittleEndian.Uint32(b[4:]))
		if math.IsNaN(float64(scores[i])) || math.IsInf(float64(scores[i]), 0) {
			return nil, fmt.Errorf("%w: tokenizer: piece %d: score %v is not finite", ErrFormat, i, scores[i])
		}
		if n < 0 || n > maxLen {
			return nil, fmt.Errorf("%w: tokenizer: piece %d at offset %d: length %d out of range [0, max_token_length %d]",
				ErrFormat, i, pos, n, maxLen)
		}
		if _, err := io.ReadFull(sr, buf[:n]); err != nil {
			return nil, fmt.Errorf("%w: tokenizer: piece %d at offset %d: %d bytes declared, file ends", ErrTruncated, i, pos, n)
		}
		pieces[i] = string(buf[:n])
		pos += 8 + int64(n)
	}
	if pos != size {
		return nil, fmt.Errorf("%w: tokenizer: %d trailing bytes after %d pieces (is the vocab size right?)", ErrFormat, size-pos, vocabSize)
	}
	types := make([]TokenType, vocabSize)
	for i, p := range pieces {
		types[i] = llama2cTokenType(int32(i), p)
	}
	t, err := NewTokenizer(pieces, scores, types)
	if err != nil {
		return nil, err
	}
	t.MaxTokenLength = int(maxLen)
	return t, nil
}

// llama2cTokenType classifies a llama2.c piece: ids 0, 1, 2 are <unk>, <s>,
// </s>; "<0xNN>" pieces are bytes; the rest are normal.
func llama2cTokenType(id int32, piece string) TokenType {
	switch {
	case id == UnknownID:
		return TokenUnknown
	case id == BOSID || id == EOSID:
		return TokenControl
	case isBytePiece(piece):
		return TokenByte
	}
	return TokenNormal
}

// isBytePiece reports whether p is "<0xNN>" with two upper-case hex digits.
func isBytePiece(p string) bool {
	_, ok := bytePieceValue(p)
	return ok
}

func bytePieceValue(p string) (byte, bool) {
	if len(p) != 6 || p[:3] != "<0x" || p[5] != '>' {
		return 0, false
	}
	hex := func(c byte) (byte, bool) {
		switch {
		case '0' <= c && c <= '9':
			return c - '0', true
		case 'A' <= c && c <= 'F':
			return c - 'A' + 10, true
		}
		return 0, false
	}
	hi, ok1 := hex(p[3])
	lo, ok2 := hex(p[4])
	return hi<<4 | lo, ok1 && ok2
}

// NewTokenizer builds a Tokenizer from pieces (plain spaces, not U+2581),
// scores and token types, all of the same length. BOS, EOS and Unknown are
// set to 1, 2 and 0; change them for other vocabularies. Byte fallback uses
// the pieces of type TokenByte named "<0xNN>".
func NewTokenizer(pieces []string, scores []float32, types []TokenType) (*Tokenizer, error) {
	if len(pieces) == 0 || len(scores) != len(pieces) || len(types) != len(pieces) {
		return nil, fmt.Errorf("%w: %d pieces, %d scores, %d types", ErrInvalid, len(pieces), len(scores), len(types))
	}
	if len(pieces) > maxVocab {
		return nil, fmt.Errorf("%w: %d pieces, at most %d", ErrInvalid, len(pieces), maxVocab)
	}
	t := &Tokenizer{Pieces: pieces, Scores: scores, Types: types, BOS: BOSID, EOS: EOSID, Unknown: UnknownID,
		index: make(map[string]int32, len(pieces))}
	for i := range t.bytes {
		t.bytes[i] = -1
	}
	for i, p := range pieces {
		t.MaxTokenLength = max(t.MaxTokenLength, len(p))
		if _, dup := t.index[p]; !dup {
			t.index[p] = int32(i)
		}
		if types[i] == TokenByte {
			if b, ok := bytePieceValue(p); ok && t.bytes[b] < 0 {
				t.bytes[b] = int32(i)
			}
		}
	}
	return t, nil
}

// TokenizerFromGGUF builds a Tokenizer from the tokenizer.ggml.* metadata of
// a GGUF file whose tokenizer.ggml.model is "llama": tokens (U+2581 turned
// back into spaces), scores, token_type, and the bos, eos and unknown ids.
func TokenizerFromGGUF(f *gguf.File) (*Tokenizer, error) {
	model, err := f.String("tokenizer.ggml.model")
	if err != nil {
		return nil, err
	}
	if model != "llama" {
		return nil, fmt.Errorf("%w: tokenizer.ggml.model is %q, want \"llama\"", ErrInvalid, model)
	}
	tokens, err := f.Strings("tokenizer.ggml.tokens")
	if err != nil {
		return nil, err
	}
	scores, err := f.Float32s("tokenizer.ggml.scores")
	if err != nil {
		return nil, err
	}
	tt, err := f.Int32s("tokenizer.ggml.token_type")
	if err != nil {
		return nil, err
	}
	if len(scores) != len(tokens) || len(tt) != len(tokens) {
		return nil, fmt.Errorf("%w: %d tokens, %d scores, %d token types", ErrFormat, len(tokens), len(scores), len(tt))
	}
	pieces := make([]string, len(tokens))
	types := make([]TokenType, len(tokens))
	for i := range tokens {
		pieces[i] = strings.ReplaceAll(tokens[i], spaceMarker, " ")
		types[i] = TokenType(tt[i])
	}
	t, err := NewTokenizer(pieces, scores, types)
	if err != nil {
		return nil, err
	}
	for _, id := range []struct {
		key string
		dst *int32
	}{
		{"tokenizer.ggml.bos_token_id", &t.BOS},
		{"tokenizer.ggml.eos_token_id", &t.EOS},
		{"tokenizer.ggml.unknown_token_id", &t.Unknown},
	} {
		if !f.Has(id.key) {
			continue
		}
		v, err := f.Int(id.key)
		if err != nil {
			return nil, err
		}
		if v < 0 || v >= int64(len(pieces)) {
			return nil, fmt.Errorf("%w: %s %d out of range [0, %d)", ErrFormat, id.key, v, len(pieces))
		}
		*id.dst = int32(v)
	}
	return t, nil
}

// VocabSize returns the number of pieces.
func (t *Tokenizer) VocabSize() int { return len(t.Pieces) }

// ID returns the id of a piece (plain spaces, not U+2581).
func (t *Tokenizer) ID(piece string) (int32, bool) {
	id, ok := t.index[piece]
	return id, ok
}

// GGUFTokens returns the pieces as GGUF stores them: spaces become U+2581,
// and control pieces lose the newlines llama2.c wraps them in ("\n<s>\n"
// becomes "<s>").
func (t *Tokenizer) GGUFTokens() []string {
	out := make([]string, len(t.Pieces))
	for i, p := range t.Pieces {
		if t.Types[i] == TokenControl {
			p = strings.Trim(p, "\n")
		}
		out[i] = strings.ReplaceAll(p, " ", spaceMarker)
	}
	return out
}

// Encode tokenizes text as llama2.c and llama.cpp's SentencePiece BPE do: a
// space is prepended (unless text is empty), the text is split into UTF-8
// characters, the adjacent pair whose concatenation is the best-scoring
// piece is merged (the leftmost on ties) until no pair forms a piece, and a
// character that is not a piece falls back to its <0xNN> byte tokens (or the
// unknown token when the vocabulary lacks one). With bos, the BOS id comes
// first. Unlike SentencePiece proper, whitespace is not normalised.
func (t *Tokenizer) Encode(text string, bos bool) []int32 {
	var out []int32
	if bos {
		out = append(out, t.BOS)
	}
	if text == "" {
		return out
	}
	s := " " + text

	// Symbols are byte ranges of s, linked in a list; merging extends the
	// left symbol and kills the right one.
	type symbol struct {
		start, end int
		prev, next int
	}
	syms := make([]symbol, 0, len(s))
	for i := 0; i < len(s); {
		n := min(utf8SeqLen(s[i]), len(s)-i)
		syms = append(syms, symbol{start: i, end: i + n, prev: len(syms) - 1, next: len(syms) + 1})
		i += n
	}
	syms[len(syms)-1].next = -1

	q := &bigramQueue{}
	push := func(l, r int) {
		if l < 0 || r < 0 {
			return
		}
		id, ok := t.index[s[syms[l].start:syms[r].end]]
		if !ok {
			return
		}
		heap.Push(q, bigram{left: l, right: r, score: t.Scores[id], size: syms[r].end - syms[l].start})
	}
	for i := 1; i < len(syms); i++ {
		push(i-1, i)
	}
	for q.Len() > 0 {
		b := heap.Pop(q).(bigram)
		l, r := &syms[b.left], &syms[b.right]
		// Skip pairs made stale by an earlier merge: a merge only grows
		// symbols, so the sizes no longer add up.
		if l.end == l.start || r.end == r.start || (l.end-l.start)+(r.end-r.start) != b.size {
			continue
		}
		l.end = r.end
		r.start = r.end // dead
		l.next = r.next
		if r.next >= 0 {
			syms[r.next].prev = b.left
		}
		push(l.prev, b.left)
		push(b.left, l.next)
	}

	for i := 0; i >= 0; i = syms[i].next {
		piece := s[syms[i].start:syms[i].end]
		if id, ok := t.index[piece]; ok {
			out = append(out, id)
			continue
		}
		for j := 0; j < len(piece); j++ {
			if id := t.bytes[piece[j]]; id >= 0 {
				out = append(out, id)
			} else {
				out = append(out, t.Unknown)
			}
		}
	}
	return out
}

// utf8SeqLen returns the length of the UTF-8 sequence a lead byte starts
// (1 for continuation or invalid bytes, which then stand alone).
func utf8SeqLen(b byte) int {
	switch {
	case b < 0xc0:
		return 1
	case b < 0xe0:
		return 2
	case b < 0xf0:
		return 3
	case b < 0xf8:
		return 4
	}
	return 1
}

type bigram struct {
	left, right int
	score       float32
	size        int
}

// bigramQueue is a max-heap on score, then min on left position.
type bigramQueue []bigram

func (q bigramQueue) Len() int { return len(q) }
func (q bigramQueue) Less(i, j int) bool {
	if q[i].score != q[j].score {
		return q[i].score > q[j].score
	}
	return q[i].left < q[j].left
}
func (q bigramQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *bigramQueue) Push(x any)   { *q = append(*q, x.(bigram)) }
func (q *bigramQueue) Pop() any {
	old := *q
	b := old[len(old)-1]
	*q = old[:len(old)-1]
	return b
}

// Piece returns the text token id contributes to decoded output: the piece
// with plain spaces, the raw byte of a byte token, nothing for control
// tokens and out-of-range ids.
func (t *Tokenizer) Piece(id int32) string {
	if id < 0 || int(id) >= len(t.Pieces) {
		return ""
	}
	switch t.Types[id] {
	case TokenControl, TokenUnused:
		return ""
	case TokenByte:
		if b, ok := bytePieceValue(t.Pieces[id]); ok {
			return string([]byte{b})
		}
	}
	return t.Pieces[id]
}

// Decode turns token ids back into text: the concatenation of their
// [Tokenizer.Piece]s (so byte tokens that together form a UTF-8 character
// come out as that character), without the one leading space Encode adds.
func (t *Tokenizer) Decode(ids []int32) string {
	var sb strings.Builder
	for _, id := range ids {
		sb.WriteString(t.Piece(id))
	}
	return strings.TrimPrefix(sb.String(), " ")
}
