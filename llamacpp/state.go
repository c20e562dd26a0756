package llamacpp

import "github.com/kvnorm/kvnorm/llamacpp/statemode"

// The state-mode parser lives in package statemode (no cgo), shared by every
// provider of llama.cpp functions; these names keep this package's API.
type (
	// SeqState is the parsed output of llama_state_seq_get_data for one
	// sequence (statemode.SeqState documents the layout).
	SeqState = statemode.SeqState
	// StateCell is one KV cell of the sequence.
	StateCell = statemode.StateCell
	// StateLayer holds the keys of one layer.
	StateLayer = statemode.StateLayer
)

// ParseSeqState parses the bytes llama_state_seq_get_data wrote for one
// sequence; errors wrap ErrState.
func ParseSeqState(b []byte) (*SeqState, error) { return statemode.ParseSeqState(b) }
