//go:build cgo

package kvnormhook

import (
	"errors"
	"log/slog"

	"github.com/ollama/ollama/model"

	"github.com/kvnorm/kvnorm/ollama"
)

// Install is called by the Go-engine runner right after model.New: with
// compression on, it puts kvnorm's cache in place of the model's. A model
// kvnorm cannot compress runs with Ollama's own cache and a warning. numCtx
// is the context of one sequence (the runner's kvSize / parallel): settings
// that turn compression off at that context (SINKS+WINDOW covering it) leave
// Ollama's own cache in place, as the server's check (CheckServer) said.
func Install(m model.Model, numCtx int) error {
	p, err := PolicyFromEnv(nil)
	if err != nil || p == nil {
		return err
	}
	// The server has logged why (CheckServer); the runner only follows.
	layers := int(m.Backend().Config().Uint("block_count"))
	for _, mm := range p.CheckModel(layers, max(numCtx, 0)) {
		if mm.Off {
			slog.Info("kvnorm: cache not installed: compression would be off", "num_ctx", numCtx, "problem", mm.Problem)
			return nil
		}
	}
	c, err := ollama.InstallWith(m, ollama.Options{Policy: p, Logger: slog.Default(), Pipelined: true})
	if errors.Is(err, ollama.ErrUnsupportedModel) {
		slog.Warn("kvnorm: KV cache compression is off for this model", "error", err)
		return nil
	}
	if err != nil {
		return err
	}
	sh := c.CacheShape()
	slog.Info("kvnorm: cache installed", "arch", m.Backend().Config().Architecture(), "policy", p.String(),
		"layers", sh.Layers, "kv_heads", sh.KVHeads, "head_dim", sh.HeadDim)
	return nil
}
