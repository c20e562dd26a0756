package kvnormhook

// DrainStream is called by the server's streamResponse (server/routes.go)
// when it stops streaming: it receives and drops what the producer of ch
// still sends, until the producer closes ch.
//
// Ollama v0.24.0 streams an answer through an unbuffered channel: the
// handler's goroutine sends each chunk (`ch <- res`) from inside
// llmServer.Completion, which holds one of the model's OLLAMA_NUM_PARALLEL
// slots (its semaphore) until it returns, and streamResponse stops receiving
// when the client has gone. A chunk sent after that blocks the goroutine
// for ever; so does the error it sends after Completion returns. Each such
// cancel leaks a goroutine, and when the client left while a chunk was on
// its way, also a slot: once every slot has leaked, the model answers no
// request again (found by TestForkSoak: after about 3,200 requests with 230
// cancelled mid-answer, the server's four slots of the main model were held
// by goroutines blocked on `ch <- res`). Draining ch lets Completion see the
// cancelled context, return and release its slot. It is independent of
// compression: the fork always calls it.
func DrainStream(ch <-chan any) {
	go func() {
		for range ch {
		}
	}()
}
