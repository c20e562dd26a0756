package llama2c_test

import (
	"fmt"
	"log"

	"github.com/kvnorm/kvnorm/llama2c"
)

// ExampleTokenizer_Encode tokenizes with a toy vocabulary: a space is
// prepended, the best-scoring pairs merge, and "!" (not a piece) falls back
// to its byte token.
func ExampleTokenizer_Encode() {
	pieces := []string{"<unk>", "\n<s>\n", "\n</s>\n", "<0x21>", " ", "h", "i", "hi", " hi"}
	scores := []float32{0, 0, 0, 0, -10, -11, -12, -1, -2}
	types := []llama2c.TokenType{llama2c.TokenUnknown, llama2c.TokenControl, llama2c.TokenControl,
		llama2c.TokenByte, llama2c.TokenNormal, llama2c.TokenNormal, llama2c.TokenNormal,
		llama2c.TokenNormal, llama2c.TokenNormal}
	tok, err := llama2c.NewTokenizer(pieces, scores, types)
	if err != nil {
		log.Fatal(err)
	}
	ids := tok.Encode("hi hi!", true)
	fmt.Println(ids)
	fmt.Printf("%q\n", tok.Decode(ids))
	// Output:
	// [1 8 8 3]
	// "hi hi!"
}

// ExampleConvertFile converts a llama2.c model and tokenizer to an F16 GGUF
// file that llama.cpp and Ollama can load.
func ExampleConvertFile() {
	err := llama2c.ConvertFile("stories260K.bin", "tok512.bin", "stories260K-f16.gguf", "f16")
	if err != nil {
		log.Fatal(err)
	}
}
