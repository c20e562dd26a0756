package hooks

// EngineInfo describes a loaded model in a runtime.
type EngineInfo struct {
	Runtime   string `json:"runtime"`    // "llamacpp", "ollama", "reference"
	Model     string `json:"model"`      // path or name
	Arch      string `json:"arch"`       // e.g. "llama"
	Vocab     int    `json:"vocab"`      // logits per token
	Context   int    `json:"context"`    // cells per sequence
	FlashAttn bool   `json:"flash_attn"` // flash attention in use
}

// Engine is a runtime driven end to end. The conformance suite, the demo and
// the benchmarks reach runtimes only through it (and, to apply a fixed plan,
// through the PositionEvictor or HeadCompactor the engine also implements).
//
// An engine reports to its Observer (normally an adapter.Compressor): the
// keys of every layer of every batch it decodes, PrefillDone at the end of
// every Prefill, and CachePressure before a batch that would not fit. The
// keys of a Prefill reach the observer before it returns; those of a Decode
// may be held back until a compression needs them (an engine that holds
// keys back implements DeferredKeys, and reports them before its own
// PrefillDone and CachePressure calls).
type Engine interface {
	Runtime
	Info() EngineInfo
	Tokenize(text string, addBOS bool) ([]int32, error)
	Detokenize(tokens []int32) (string, error)
	// SetObserver attaches o (nil detaches) for the calls that follow.
	SetObserver(o Observer)
	// Prefill decodes a prompt into seq after its highest position, in
	// chunks when it is longer than the cache, then reports PrefillDone. It
	// returns the logits of the last prompt token, or of every prompt token
	// when all is set.
	Prefill(seq SeqID, tokens []int32, all bool) ([][]float32, error)
	// Decode appends tokens to seq after its highest position and returns
	// the logits of each.
	Decode(seq SeqID, tokens []int32) ([][]float32, error)
	// Live returns the distinct live positions of seq and its live
	// (layer, head, position) entries.
	Live(seq SeqID) (positions int, entries int64, err error)
	// RemoveSequence frees every cell of seq.
	RemoveSequence(seq SeqID) error
	Close() error
}
