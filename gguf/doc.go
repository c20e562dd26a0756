// Package gguf reads and writes GGUF version 3 files, the container format of
// llama.cpp and Ollama models.
//
// A GGUF file is a little-endian header (magic "GGUF", version, tensor count,
// metadata count), then typed metadata key/value pairs, then tensor
// descriptors (name, dimensions in ggml order with the innermost dimension
// first, element type, offset), then padding up to the alignment
// (general.alignment, 32 by default), then the tensor data, each tensor
// starting at an aligned offset relative to the start of that data section.
//
// Writing: build a [Writer] with [NewWriter], add metadata with the Set
// methods and tensors with [Writer.AddTensor] (use [Quantize] to turn float32
// values into F32, F16, BF16, Q8_0 or Q4_0 bytes), then call
// [Writer.WriteTo] or [Writer.WriteFile]. The output is deterministic:
// metadata keys and tensors appear in the order they were first added.
//
// Reading: [Open] or [Read] parse and validate the header, metadata and tensor
// descriptors, bounding every count and length by what remains of the file
// before allocating, so a corrupt or hostile file yields an error wrapping
// [ErrFormat], [ErrTruncated] or [ErrUnsupported] rather than a panic or a
// huge allocation. Tensor bytes are read lazily with [File.TensorData], or
// converted to float32 with [File.F32].
package gguf
