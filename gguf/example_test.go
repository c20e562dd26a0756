package gguf_test

import (
	"bytes"
	"fmt"
	"log"

	"github.com/kvnorm/kvnorm/gguf"
)

// Example writes a small GGUF file to memory and reads it back.
func Example() {
	w := gguf.NewWriter()
	w.SetString("general.architecture", "llama")
	w.SetUint32("llama.block_count", 5)
	w.SetStrings("tokenizer.ggml.tokens", []string{"<unk>", "<s>", "</s>"})
	// A 2x3 row-major matrix has ggml dims {3, 2}: innermost first.
	if err := w.AddFloat32s("w", gguf.F16, []uint64{3, 2}, []float32{1, 2, 3, 4, 5, 6}); err != nil {
		log.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := w.WriteTo(&buf); err != nil {
		log.Fatal(err)
	}

	f, err := gguf.Read(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		log.Fatal(err)
	}
	arch, _ := f.String("general.architecture")
	blocks, _ := f.Uint32("llama.block_count")
	tokens, _ := f.Strings("tokenizer.ggml.tokens")
	t, _ := f.Tensor("w")
	values, _ := f.F32("w")
	fmt.Println(arch, blocks, tokens)
	fmt.Println(t.Name, t.Type, t.Dims, t.Size, "bytes at data offset", t.Offset)
	fmt.Println(values)

	// A corrupt file is an error, not a panic.
	_, err = gguf.Read(bytes.NewReader(buf.Bytes()[:100]), 100)
	fmt.Println(err)
	// Output:
	// llama 5 [<unk> <s> </s>]
	// w F16 [3 2] 12 bytes at data offset 0
	// [1 2 3 4 5 6]
	// gguf: truncated file: key "llama.block_count": need 4 bytes at offset 98, file size is 100
}
