package conformance_test

import (
	"fmt"

	"github.com/kvnorm/kvnorm/conformance"
)

// A passkey prompt of about 60 tokens (here one token per word) with the key
// in the middle of the filler, and the scoring of two answers.
func ExampleBuildPasskey() {
	p, err := conformance.BuildPasskey(wordTokenizer{}, 90, 0.5, "48960")
	if err != nil {
		panic(err)
	}
	fmt.Println(len(p.Tokens), "tokens,", p.Fillers, "filler sentences,", p.Before, "before the key")
	fmt.Println(p.Text[:60] + "...")
	for _, answer := range []string{" 48960. Remember", " 48966 is"} {
		exact, digits := conformance.ScorePasskey(answer, "48960")
		fmt.Printf("%q: exact %v, digits %.1f\n", answer, exact, digits)
	}
	// Output:
	// 90 tokens, 11 filler sentences, 6 before the key
	// There is an important info hidden inside a lot of irrelevant...
	// " 48960. Remember": exact true, digits 1.0
	// " 48966 is": exact false, digits 0.8
}
