package conformance_test

import (
	"math"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/conformance"
	"github.com/kvnorm/kvnorm/conformance/internal/testmodel"
	"github.com/kvnorm/kvnorm/llama2c"
)

// wordTokenizer is one token per whitespace-separated word, plus BOS.
type wordTokenizer struct{}

func (wordTokenizer) Tokenize(text string, addBOS bool) ([]int32, error) {
	var out []int32
	if addBOS {
		out = append(out, 1)
	}
	for range strings.Fields(text) {
		out = append(out, 7)
	}
	return out, nil
}

// spTokenizer is stories260K's SentencePiece tokenizer.
type spTokenizer struct{ t *llama2c.Tokenizer }

func (s spTokenizer) Tokenize(text string, addBOS bool) ([]int32, error) {
	return s.t.Encode(text, addBOS), nil
}

func tokenizers(t *testing.T) map[string]conformance.Tokenizer {
	toks := map[string]conformance.Tokenizer{"words": wordTokenizer{}}
	if !testing.Short() {
		_, path := testmodel.Paths(t)
		tok, err := llama2c.ReadTokenizer(path, 512)
		require.NoError(t, err)
		toks["tok512"] = spTokenizer{tok}
	}
	return toks
}

func count(t *testing.T, tok conformance.Tokenizer, s string) int {
	ids, err := tok.Tokenize(s, false)
	require.NoError(t, err)
	return len(ids)
}

func TestBuildPasskey(t *testing.T) {
	for name, tok := range tokenizers(t) {
		longest := 0
		for _, s := range conformance.PasskeyFiller {
			longest = max(longest, count(t, tok, s))
		}
		for _, length := range []int{200, 256, 320, 448} {
			for _, depth := range []float64{0, 0.1, 0.25, 0.5, 0.8, 1} {
				key := conformance.PasskeyKey(7, length)
				p, err := conformance.BuildPasskey(tok, length, depth, key)
				require.NoError(t, err, "%s length %d depth %g", name, length, depth)
				// The key sentence once; the key only in it (twice).
				assert.Equal(t, 1, strings.Count(p.Text, conformance.PasskeySentence(key)))
				assert.Equal(t, 2, strings.Count(p.Text, key))
				assert.True(t, strings.HasSuffix(p.Text, conformance.PasskeyQuestion))
				// The published instruction line opens the prompt.
				require.True(t, strings.HasPrefix(p.Text, conformance.PasskeyInstruction+" "), "%s: %q", name, p.Text[:40])
				assert.Positive(t, p.HeaderTokens)
				// The asked length, within one filler sentence.
				assert.InDelta(t, length, len(p.Tokens), float64(longest), "%s length %d depth %g", name, length, depth)
				// The asked depth, within one filler sentence of the filler.
				assert.Equal(t, int(math.Round(depth*float64(p.Fillers))), p.Before)
				got := float64(p.InsertToken-1-p.HeaderTokens) / float64(p.FillerTokens)
				assert.InDelta(t, depth, got, float64(longest)/float64(p.FillerTokens)+1e-9, "%s length %d depth %g", name, length, depth)
				// Before the key: exactly Before filler sentences.
				head := p.Text[len(conformance.PasskeyInstruction):strings.Index(p.Text, "The pass key is")]
				assert.Equal(t, p.Before, strings.Count(head, "."), "%s: sentences before the key", name)
			}
		}
		_, err := conformance.BuildPasskey(tok, 10, 0.5, "12345")
		assert.Error(t, err, "too short for the key and the question")
		_, err = conformance.BuildPasskey(tok, 100, 1.5, "12345")
		assert.Error(t, err, "depth out of range")
	}
}

func TestPasskeyKeysAreSeeded(t *testing.T) {
	a, b := conformance.PasskeyKey(1, 0), conformance.PasskeyKey(1, 1)
	assert.Len(t, a, 5)
	assert.NotEqual(t, a, b)
	assert.Equal(t, a, conformance.PasskeyKey(1, 0))
	assert.NotEqual(t, a, conformance.PasskeyKey(2, 0))
}

func TestScorePasskey(t *testing.T) {
	for _, c := range []struct {
		answer string
		exact  bool
		digits float64
	}{
		{"48960. Remember", true, 1},
		{" 48960 is the pass key", true, 1},
		{"48960", true, 1},
		{"The pass key is 48960.", true, 1},
		{"48961.", false, 0.8},
		{"4896", false, 0.8},
		{"489601", false, 1},
		{"a bandage. I", false, 0},
		{"", false, 0},
		{"12345 and 48960", false, 0},
	} {
		exact, digits := conformance.ScorePasskey(c.answer, "48960")
		assert.Equal(t, c.exact, exact, "%q", c.answer)
		assert.InDelta(t, c.digits, digits, 1e-12, "%q", c.answer)
	}
}

func TestScoreNeedle(t *testing.T) {
	assert.True(t, conformance.ScoreNeedle(" red box and said", "red box"))
	assert.True(t, conformance.ScoreNeedle("Red\n box.", "red box"))
	assert.False(t, conformance.ScoreNeedle("box and said", "red box"))
	assert.False(t, conformance.ScoreNeedle("", "banana"))
}

func TestBuildNeedle(t *testing.T) {
	hay := []string{"Once upon a time, there was a dog.", "The dog liked a banana.", "It ran to the park!", "Was it happy?"}
	n := conformance.Needles[0] // the magic word is banana
	p, err := conformance.BuildNeedle(wordTokenizer{}, hay, n, 60, 0.5)
	require.NoError(t, err)
	assert.Equal(t, 1, strings.Count(p.Text, n.Sentence))
	assert.Equal(t, 1, strings.Count(p.Text, n.Fact), "haystack sentences holding the fact are left out")
	assert.True(t, strings.HasSuffix(p.Text, n.Question))
	assert.InDelta(t, 60, len(p.Tokens), 8)
	_, err = conformance.BuildNeedle(wordTokenizer{}, []string{"A banana."}, n, 60, 0.5)
	assert.Error(t, err)
}

func TestSplitSentences(t *testing.T) {
	got := conformance.SplitSentences("Once upon a time, there was a cat.  It was happy!\nShe said, \"Hi.\" Then she left? And then")
	assert.Equal(t, []string{"Once upon a time, there was a cat.", "It was happy!", "She said, \"Hi.\"", "Then she left?"}, got)
}

func TestSpearman(t *testing.T) {
	assert.InDelta(t, 1, conformance.Spearman([]float64{1, 2, 3, 4}, []float64{10, 20, 25, 100}), 1e-12)
	assert.InDelta(t, -1, conformance.Spearman([]float64{1, 2, 3, 4}, []float64{4, 3, 2, 1}), 1e-12)
	// Ties share their mean rank: x ranks 1.5 1.5 3, y ranks 1 2 3.
	assert.InDelta(t, math.Sqrt(3)/2, conformance.Spearman([]float64{5, 5, 7}, []float64{1, 2, 3}), 1e-12)
	assert.True(t, math.IsNaN(conformance.Spearman([]float64{1, 1, 1}, []float64{1, 2, 3})))
	assert.True(t, math.IsNaN(conformance.Spearman([]float64{1}, []float64{1})))
}

func TestParse(t *testing.T) {
	k, err := conformance.ParseKeeps("1, 0.5,50%,0.1")
	require.NoError(t, err)
	assert.Equal(t, []float64{1, 0.5, 0.1}, k)
	_, err = conformance.ParseKeeps("0")
	assert.Error(t, err)
	_, err = conformance.ParseKeeps("1.5")
	assert.Error(t, err)
	f, err := conformance.ParseFraction("1%")
	require.NoError(t, err)
	assert.InDelta(t, 0.01, f, 1e-15)
	tasks, err := conformance.ParseTasks("attention,lm")
	require.NoError(t, err)
	assert.Equal(t, []string{"lm", "attention"}, tasks)
	_, err = conformance.ParseTasks("lm,bogus")
	assert.Error(t, err)
	ms, err := conformance.ParseMethods("knorm,random")
	require.NoError(t, err)
	assert.Len(t, ms, 2)
	_, err = conformance.ParseGranularities("per-head,diagonal")
	assert.Error(t, err)
}
