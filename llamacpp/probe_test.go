//go:build cgo

package llamacpp_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/llamacpp"
)

func TestProbe(t *testing.T) {
	m := openStories(t, "f32")
	t.Logf("%+v", m.Info())
	c := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256})
	g, err := c.Generate(context.Background(), 0, []llamacpp.Token{m.Info().BOS}, llamacpp.GenerateOptions{MaxTokens: 40})
	require.NoError(t, err)
	t.Logf("%q", g.Text)
	toks, err := m.Tokenize("Once upon a time, there was a little girl named Lily.", true)
	require.NoError(t, err)
	t.Log(toks)
	s, err := m.Detokenize(toks)
	require.NoError(t, err)
	t.Logf("%q", s)
	c2 := newCtx(t, m, llamacpp.ContextOptions{NCtx: 256})
	comp, err := c2.EnableCompression(adapter.DefaultPolicy())
	require.NoError(t, err)
	g, err = c2.Generate(context.Background(), 0, toks, llamacpp.GenerateOptions{MaxTokens: 40})
	require.NoError(t, err)
	t.Logf("%+v", g)
	t.Logf("%+v", comp.Totals())
	st, err := llamacpp.ReadState(c2.Raw(), 0)
	require.NoError(t, err)
	t.Log(st.Positions(), st.Layers[0].KType, st.Layers[0].RowBytes)
}
