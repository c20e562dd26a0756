// Package llama2c reads the model and tokenizer files of Andrej Karpathy's
// llama2.c, tokenizes text the way llama2.c and llama.cpp's "llama"
// (SentencePiece BPE) tokenizer do, and converts a checkpoint and its
// tokenizer to a GGUF file that llama.cpp and Ollama load as a llama model.
//
// Data flow: [ReadCheckpoint] validates the 7-int32 header against the real
// file size before reading anything else, then reads the float32 weights into
// a [Checkpoint] (row-major [out][in] matrices, y = W x). [ReadTokenizer]
// reads the pieces and merge scores into a [Tokenizer], whose
// [Tokenizer.Encode] and [Tokenizer.Decode] map text to token ids and back.
// [ToGGUF] lays both out as GGUF metadata and tensors in a [gguf.Writer];
// [ConvertFile] does all of it from file paths.
//
// The checkpoint format (version 0, "legacy"): int32 dim, hidden_dim,
// n_layers, n_heads, n_kv_heads, vocab_size (negative when the classifier is
// stored separately instead of being shared with the token embedding),
// seq_len; then float32 token embedding [vocab][dim], attention RMSNorm
// weights [layers][dim], wq [layers][dim][dim], wk and wv
// [layers][kv_dim][dim], wo [layers][dim][dim], FFN RMSNorm [layers][dim],
// w1 [layers][hidden][dim], w2 [layers][dim][hidden], w3
// [layers][hidden][dim], final RMSNorm [dim], two RoPE tables
// [seq_len][head_size/2] (ignored: RoPE is recomputed), and the classifier
// [vocab][dim] only when vocab_size is negative.
//
// The tokenizer format: int32 max_token_length, then per piece a float32
// merge score, an int32 byte length and the bytes. Pieces use a plain space
// where SentencePiece uses U+2581 (▁), and BOS/EOS are stored as "\n<s>\n"
// and "\n</s>\n".
package llama2c
