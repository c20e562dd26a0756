package conformance

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"unicode"
)

// Tokenizer is the part of hooks.Engine the prompt builders need.
type Tokenizer interface {
	Tokenize(text string, addBOS bool) ([]int32, error)
}

// PasskeyFiller are the sentences of the passkey filler (Mohtashami and
// Jaggi 2023, as used by Devoto et al. 2024), repeated in this order.
var PasskeyFiller = []string{"The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."}

// PasskeyInstruction opens every passkey prompt: the task's instruction line
// of Mohtashami and Jaggi (2023), which Devoto et al. (2024) reuse.
const PasskeyInstruction = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there."

// PasskeyQuestion ends every passkey prompt.
const PasskeyQuestion = "What is the pass key? The pass key is"

// PasskeySentence is the sentence that hides key.
func PasskeySentence(key string) string {
	return fmt.Sprintf("The pass key is %s. Remember it. %s is the pass key.", key, key)
}

// PasskeyKey returns the seeded five-digit key of instance i.
func PasskeyKey(seed uint64, i int) string {
	return fmt.Sprintf("%05d", 10000+mix(seed, 0x9a55, uint64(i))%90000)
}

// Needle is a fact hidden in a haystack, the question that asks for it, and
// the words the answer must contain.
type Needle struct {
	Sentence, Question, Fact string
}

// Needles are the facts of the needle task, chosen by seed. They are worded
// for small story models: simple sentences whose answer a model must copy.
var Needles = []Needle{
	{"The magic word is banana.", "What is the magic word? The magic word is", "banana"},
	{"Tom's favorite color is purple.", "What is Tom's favorite color? Tom's favorite color is", "purple"},
	{"The little dog's name is Max.", "What is the little dog's name? The little dog's name is", "Max"},
	{"Lily hid the key under the red box.", "Where did Lily hide the key? Lily hid the key under the", "red box"},
}

// Prompt is a retrieval prompt: filler sentences with one inserted sentence
// at a depth, then a question.
type Prompt struct {
	Text   string
	Tokens []int32 // with BOS
	// Fillers is the number of filler sentences; Before of them precede the
	// inserted sentence.
	Fillers, Before int
	// InsertToken is the index in Tokens where the inserted sentence starts
	// (as the prefix tokenizes alone).
	InsertToken int
	// HeaderTokens is the number of tokens of the instruction line that
	// opens the prompt (0 without one).
	HeaderTokens int
	// FillerTokens is the number of tokens the fillers take (the prompt
	// minus BOS, the inserted sentence and the question, as they tokenize
	// alone).
	FillerTokens int
}

// BuildPasskey builds a passkey prompt of about length tokens (BOS
// included; within one filler sentence) whose key sentence sits at depth in
// [0, 1] of the filler (0: first, 1: just before the question).
func BuildPasskey(tok Tokenizer, length int, depth float64, key string) (*Prompt, error) {
	return buildRetrieval(tok, PasskeyInstruction, func(i int) string { return PasskeyFiller[i%len(PasskeyFiller)] }, PasskeySentence(key), PasskeyQuestion, length, depth)
}

// BuildNeedle builds a needle prompt: the haystack's sentences (cycled when
// it is short) to about length tokens, the needle sentence at depth, then
// its question. Haystack sentences that contain the needle's fact are left
// out.
func BuildNeedle(tok Tokenizer, haystack []string, n Needle, length int, depth float64) (*Prompt, error) {
	var hay []string
	for _, s := range haystack {
		if !strings.Contains(strings.ToLower(s), strings.ToLower(n.Fact)) {
			hay = append(hay, s)
		}
	}
	if len(hay) == 0 {
		return nil, errors.New("conformance: needle: the haystack has no sentence")
	}
	return buildRetrieval(tok, "", func(i int) string { return hay[i%len(hay)] }, n.Sentence, n.Question, length, depth)
}

// retrievalText is header (when not empty), n filler sentences with insert
// after the first k, then question; prefix is the text before insert.
func retrievalText(header string, filler func(int) string, insert, question string, n, k int) (text, prefix string) {
	parts := make([]string, 0, n+3)
	if header != "" {
		parts = append(parts, header)
	}
	for i := range k {
		parts = append(parts, filler(i))
	}
	prefix = strings.Join(parts, " ")
	parts = append(parts, insert)
	for i := k; i < n; i++ {
		parts = append(parts, filler(i))
	}
	parts = append(parts, question)
	return strings.Join(parts, " "), prefix
}

func buildRetrieval(tok Tokenizer, header string, filler func(int) string, insert, question string, length int, depth float64) (*Prompt, error) {
	if !(depth >= 0 && depth <= 1) {
		return nil, fmt.Errorf("conformance: depth %v must be in [0, 1]", depth)
	}
	count := func(n int) (int, error) {
		text, _ := retrievalText(header, filler, insert, question, n, before(n, depth))
		t, err := tok.Tokenize(text, true)
		return len(t), err
	}
	c0, err := count(0)
	if err != nil {
		return nil, err
	}
	if c0 > length {
		return nil, fmt.Errorf("conformance: a prompt of %d tokens is too short for the inserted sentence and the question (%d tokens)", length, c0)
	}
	// Largest n whose prompt fits, by doubling then bisection.
	lo, hi := 0, 1
	for {
		c, err := count(hi)
		if err != nil {
			return nil, err
		}
		if c > length {
			break
		}
		lo, hi = hi, hi*2
		if hi > 1<<20 {
			return nil, errors.New("conformance: filler sentences add no tokens")
		}
	}
	for hi-lo > 1 {
		mid := (lo + hi) / 2
		c, err := count(mid)
		if err != nil {
			return nil, err
		}
		if c <= length {
			lo = mid
		} else {
			hi = mid
		}
	}
	// Take one sentence more when that lands closer to the length.
	n := lo
	cl, err := count(lo)
	if err != nil {
		return nil, err
	}
	ch, err := count(lo + 1)
	if err != nil {
		return nil, err
	}
	if ch-length < length-cl {
		n = lo + 1
	}
	k := before(n, depth)
	text, prefix := retrievalText(header, filler, insert, question, n, k)
	p := &Prompt{Text: text, Fillers: n, Before: k}
	if p.Tokens, err = tok.Tokenize(text, true); err != nil {
		return nil, err
	}
	pre, err := tok.Tokenize(prefix, true)
	if err != nil {
		return nil, err
	}
	p.InsertToken = len(pre)
	bos, err := tok.Tokenize("", true)
	if err != nil {
		return nil, err
	}
	ins, err := tok.Tokenize(insert, false)
	if err != nil {
		return nil, err
	}
	q, err := tok.Tokenize(question, false)
	if err != nil {
		return nil, err
	}
	var hd []int32
	if header != "" {
		if hd, err = tok.Tokenize(header, false); err != nil {
			return nil, err
		}
	}
	p.HeaderTokens = len(hd)
	p.FillerTokens = len(p.Tokens) - len(bos) - len(hd) - len(ins) - len(q)
	return p, nil
}

// before is the number of filler sentences before the inserted one.
func before(n int, depth float64) int {
	return int(math.Round(depth * float64(n)))
}

// ScorePasskey scores a generated answer against the key: exact is true when
// the first run of digits in the answer is the key; digits is the fraction
// of the key's digits that run matches position by position.
func ScorePasskey(answer, key string) (exact bool, digits float64) {
	run := firstDigits(answer)
	same := 0
	for i := 0; i < len(key) && i < len(run); i++ {
		if run[i] == key[i] {
			same++
		}
	}
	if len(key) == 0 {
		return run == "", 0
	}
	return run == key, float64(same) / float64(len(key))
}

func firstDigits(s string) string {
	start := strings.IndexFunc(s, unicode.IsDigit)
	if start < 0 {
		return ""
	}
	end := strings.IndexFunc(s[start:], func(r rune) bool { return !unicode.IsDigit(r) })
	if end < 0 {
		return s[start:]
	}
	return s[start : start+end]
}

// ScoreNeedle reports whether the answer contains the needle's fact
// (case-insensitive, spaces collapsed).
func ScoreNeedle(answer, fact string) bool {
	norm := func(s string) string { return strings.Join(strings.Fields(strings.ToLower(s)), " ") }
	return strings.Contains(norm(answer), norm(fact))
}

// SplitSentences cuts text into sentences ending in '.', '!' or '?', with
// whitespace collapsed; a trailing fragment without an end mark is dropped.
func SplitSentences(text string) []string {
	var out []string
	var cur strings.Builder
	fields := strings.Fields(text)
	for _, f := range fields {
		if cur.Len() > 0 {
			cur.WriteByte(' ')
		}
		cur.WriteString(f)
		if strings.ContainsAny(f[len(f)-1:], ".!?") || strings.HasSuffix(f, ".\"") || strings.HasSuffix(f, "!\"") || strings.HasSuffix(f, "?\"") {
			out = append(out, cur.String())
			cur.Reset()
		}
	}
	return out
}

// mix hashes seeds and indices into one well-spread value (splitmix64).
func mix(vals ...uint64) uint64 {
	x := uint64(0x243f6a8885a308d3)
	for _, v := range vals {
		x ^= v
		x += 0x9e3779b97f4a7c15
		x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
		x = (x ^ x>>27) * 0x94d049bb133111eb
		x ^= x >> 31
	}
	return x
}
