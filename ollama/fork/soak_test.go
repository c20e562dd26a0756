//go:build cgo && linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/llama2c"
)

// A soak of kvnorm's Ollama: bin/ollama serve with compression on and four
// parallel slots, eight clients sending a fixed, seeded mix of requests
// through /api/generate, /api/chat, /v1/chat/completions and the official
// CLI, for a fixed number of rounds: 3 in CI, 3N with KVNORM_SOAK=N (the
// long runs quoted in docs/results.md).

// forkSoakRounds is 3 in CI; KVNORM_SOAK=N runs 3N rounds of the soak's mix.
func forkSoakRounds(t *testing.T) int {
	s := os.Getenv("KVNORM_SOAK")
	if s == "" {
		return 3
	}
	n, err := strconv.Atoi(s)
	require.NoError(t, err, "KVNORM_SOAK=%q: want a positive integer", s)
	require.Positive(t, n, "KVNORM_SOAK")
	return 3 * n
}

const (
	soakCtx     = 128 // num_ctx of every request to the main model (OLLAMA_CONTEXT_LENGTH, so that the OpenAI endpoint and the CLI get it too)
	soakClients = 8
)

// soakEnv: compression on, four slots, num_ctx 256 by default, models kept
// loaded (a runner that unloads and loads again would hide a restart).
var soakEnv = []string{"OLLAMA_KV_NORM_KEEP=0.5", "OLLAMA_NUM_PARALLEL=4", "OLLAMA_CONTEXT_LENGTH=" + strconv.Itoa(soakCtx), "OLLAMA_KEEP_ALIVE=-1"}

var soakSentences = []string{
	"Once upon a time there was a little girl named Lily.",
	"She loved to play with her toys and her friends.",
	"One day she went to the park with her mom.",
	"Tom had a big red ball and a small blue car.",
	"The sun was shining and the birds were singing.",
	"A little dog ran to the tall tree.",
	"Ben and his sister wanted to bake a cake.",
	"The cat was sad because it lost its hat.",
}

// soakStory is n sentences of the pool starting at sentence v.
func soakStory(v, n int) string {
	parts := make([]string, n)
	for i := range parts {
		parts[i] = soakSentences[(v+i)%len(soakSentences)]
	}
	return strings.Join(parts, " ")
}

// soakReq is one item of the mix. Its body is fixed when the mix is drawn,
// except for the later turns of a chat, which carry the answers before them.
type soakReq struct {
	id   int
	kind string
	path string
	body []byte
	// chat: the user turns after the first.
	turns []string
	// cancel: after this many streamed chunks (mid-answer), or after delay
	// when chunks is 0 (mid-prompt).
	chunks int
	delay  time.Duration
	bad    *badInput
}

// badInput is a deliberate bad input and what Ollama v0.24.0 does with it:
// either a 4xx with a message, or it accepts the value (check says what a
// sane answer is).
type badInput struct {
	name   string
	path   string
	body   string
	status int
	check  func(r reply) error
}

func jsonBody(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// greedy is the options of every temperature-0 request to the main model.
func greedy(numPredict int) map[string]any {
	return map[string]any{"temperature": 0, "seed": 1, "num_predict": numPredict}
}

// atMost accepts a complete answer of at most n tokens, or one that
// upstream's loop guard ended (llm/server.go Completion: after more than 30
// equal tokens in a row the prediction stops without a final response, so
// the answer is not done and has no counts; seen with num_ctx 4).
func atMost(n int) func(r reply) error {
	return func(r reply) error {
		if !r.done {
			if endsInRepeat(r.text, 31) {
				return nil
			}
			return fmt.Errorf("the answer is not done and does not end in a repeated token: %q", tail(r.text, 80))
		}
		if r.evalTokens < 1 || r.evalTokens > n {
			return fmt.Errorf("%d tokens generated, want 1..%d", r.evalTokens, n)
		}
		return nil
	}
}

// endsInRepeat says whether s ends with n copies of a string of 1 to 16
// bytes.
func endsInRepeat(s string, n int) bool {
	for l := 1; l <= 16 && l*n <= len(s); l++ {
		if strings.HasSuffix(s, strings.Repeat(s[len(s)-l:], n)) {
			return true
		}
	}
	return false
}

// soakBadInputs are sent once a round, each followed by a probe that must
// be served.
//
// What upstream does with them (Ollama v0.24.0, read in its source):
//   - num_ctx 0, 1 or 2: accepted; the scheduler raises num_ctx below 4 to 4
//     (server/sched.go GetRunner). They go to a second model, stories-b (the
//     same weights in f16, another blob, created with num_ctx 4), because a
//     num_ctx different from the loaded runner's makes Ollama load a new
//     runner, which would hide a restart of the main one; 0, 1, 2 and 4 all
//     give num_ctx 4 and share one runner.
//   - num_predict < 0: accepted; the server caps it at 10 × num_ctx
//     (llm/server.go Completion). Sent to stories-b: 40 tokens at most (at the
//     main model's num_ctx, 1280 tokens take minutes on a loaded 2-core
//     machine).
//   - invalid UTF-8 in a prompt or message: accepted; Go's JSON decoder
//     replaces each invalid byte with U+FFFD.
//
// The rest get a 4xx from upstream's handlers.
func soakBadInputs() []*badInput {
	invalid := "Once upon a time \xff\xfe there was a \xc3 girl."
	raw := func(path, model, extra string) string {
		switch path {
		case "/api/generate":
			return `{"model":"` + model + `","prompt":"` + invalid + `","stream":false,"options":{"temperature":0,"seed":1,"num_predict":12` + extra + `}}`
		case "/api/chat":
			return `{"model":"` + model + `","messages":[{"role":"user","content":"` + invalid + `"}],"stream":false,"options":{"temperature":0,"seed":1,"num_predict":12` + extra + `}}`
		default:
			return `{"model":"` + model + `","messages":[{"role":"user","content":"` + invalid + `"}],"temperature":0,"seed":1,"max_tokens":12}`
		}
	}
	gen := func(model, prompt string, opts map[string]any) string {
		return string(jsonBody(map[string]any{"model": model, "prompt": prompt, "raw": true, "stream": false, "options": opts}))
	}
	chat := func(model, content string, opts map[string]any) string {
		return string(jsonBody(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": content}}, "stream": false, "options": opts}))
	}
	small := func(numCtx int) map[string]any {
		return map[string]any{"temperature": 0, "seed": 1, "num_predict": 8, "num_ctx": numCtx}
	}
	unbounded := func(n int) map[string]any { return map[string]any{"temperature": 0, "seed": 1, "num_predict": n} }
	story := soakStory(0, 3)
	return []*badInput{
		{name: "generate num_ctx 0", path: "/api/generate", body: gen("stories-b", story, small(0)), status: 200, check: atMost(8)},
		{name: "generate num_ctx 1", path: "/api/generate", body: gen("stories-b", story, small(1)), status: 200, check: atMost(8)},
		{name: "chat num_ctx 2", path: "/api/chat", body: chat("stories-b", story, small(2)), status: 200, check: atMost(8)},
		{name: "generate num_predict -1", path: "/api/generate", body: gen("stories-b", soakStory(2, 2), unbounded(-1)), status: 200, check: atMost(40)},
		{name: "chat num_predict -2", path: "/api/chat", body: chat("stories-b", soakStory(3, 2), unbounded(-2)), status: 200, check: atMost(40)},
		{name: "openai max_tokens -1", path: "/v1/chat/completions", status: 200, check: atMost(40),
			body: string(jsonBody(map[string]any{"model": "stories-b", "messages": []map[string]string{{"role": "user", "content": soakStory(4, 2)}}, "temperature": 0, "seed": 1, "max_tokens": -1}))},
		{name: "generate invalid UTF-8", path: "/api/generate", body: raw("/api/generate", "stories", ""), status: 200, check: atMost(12)},
		{name: "chat invalid UTF-8", path: "/api/chat", body: raw("/api/chat", "stories", ""), status: 200, check: atMost(12)},
		{name: "openai invalid UTF-8", path: "/v1/chat/completions", body: raw("/v1/chat/completions", "stories", ""), status: 200, check: atMost(12)},
		{name: "generate truncated JSON", path: "/api/generate", body: `{"model":"stories","prompt":`, status: 400},
		{name: "generate no model", path: "/api/generate", body: gen("", story, greedy(4)), status: 404}, // upstream: "model '' not found"
		{name: "chat unknown model", path: "/api/chat", body: chat("no-such-model", story, greedy(4)), status: 404},
		{name: "openai no messages", path: "/v1/chat/completions", body: `{"model":"stories","messages":[]}`, status: 400},
		{name: "openai truncated JSON", path: "/v1/chat/completions", body: `{"model":"stories","messages":[{"role":`, status: 400},
	}
}

// soakProbe follows every bad input: the server keeps serving.
func soakProbe() []byte {
	return jsonBody(map[string]any{"model": "stories", "prompt": soakSentences[5], "raw": true, "stream": false, "options": greedy(4)})
}

// soakMix draws round r of the mix: the same requests every run.
func soakMix(r int) []*soakReq {
	rng := rand.New(rand.NewPCG(13, uint64(r)))
	var out []*soakReq
	add := func(n int, f func(v int) *soakReq) {
		for range n {
			out = append(out, f(rng.IntN(8)))
		}
	}
	gen := func(kind, prompt string, opts map[string]any) *soakReq {
		return &soakReq{kind: kind, path: "/api/generate", body: jsonBody(map[string]any{"model": "stories", "prompt": prompt, "raw": true, "stream": false, "options": opts})}
	}
	// Short prompts.
	add(8, func(v int) *soakReq { return gen("short", soakStory(v, 1+v%3), greedy(12+4*(v%4))) })
	// Long prompts: about 120, 230, 340 and 450 tokens at num_ctx 128
	// (upstream truncates a prompt longer than num_ctx; kvnorm does not
	// change that).
	add(3, func(v int) *soakReq { return gen("long", soakStory(v, 10*(1+v%4)), greedy(8)) })
	// Answers past the cache: num_predict > num_ctx.
	add(2, func(v int) *soakReq { return gen("past-cache", soakStory(v, 2), greedy(soakCtx+20+10*(v%4))) })
	// Chats of two or three turns, each turn carrying the history.
	add(4, func(v int) *soakReq {
		turns := []string{"Then what happened?", "What did her mom say?"}[:1+v%2]
		return &soakReq{kind: "chat", path: "/api/chat", turns: turns,
			body: jsonBody(map[string]any{"model": "stories", "messages": []map[string]string{{"role": "user", "content": soakStory(v, 2)}}, "stream": false, "options": greedy(24)})}
	})
	// The OpenAI-compatible endpoint, with and without a history.
	add(4, func(v int) *soakReq {
		msgs := []map[string]string{{"role": "user", "content": soakStory(v, 2)}}
		if v%2 == 1 {
			msgs = []map[string]string{{"role": "system", "content": "You tell stories."}, {"role": "user", "content": soakSentences[v]},
				{"role": "assistant", "content": soakSentences[(v+1)%8]}, {"role": "user", "content": "And then?"}}
		}
		return &soakReq{kind: "openai", path: "/v1/chat/completions", body: jsonBody(map[string]any{"model": "stories", "messages": msgs, "temperature": 0, "seed": 1, "max_tokens": 24})}
	})
	// Cancelled mid-prompt: a prompt of about 1800 tokens, the client gone
	// after a few milliseconds.
	add(3, func(v int) *soakReq {
		r := gen("cancel-prompt", soakStory(v, 160), greedy(64))
		r.body = bytes.Replace(r.body, []byte(`"stream":false`), []byte(`"stream":true`), 1)
		r.delay = time.Duration(5+10*v) * time.Millisecond
		return r
	})
	// Cancelled mid-answer, after a few streamed tokens.
	add(3, func(v int) *soakReq {
		r := gen("cancel-answer", soakStory(v, 2), greedy(200))
		if v%2 == 1 {
			r = &soakReq{kind: "cancel-answer", path: "/api/chat",
				body: jsonBody(map[string]any{"model": "stories", "messages": []map[string]string{{"role": "user", "content": soakStory(v, 2)}}, "options": greedy(200)})}
		}
		r.body = bytes.Replace(r.body, []byte(`"stream":false`), []byte(`"stream":true`), 1)
		r.chunks = 2 + 5*v
		return r
	})
	for _, b := range soakBadInputs() {
		out = append(out, &soakReq{kind: "bad", path: b.path, body: []byte(b.body), bad: b})
	}
	if r == 0 {
		out = append(out, &soakReq{kind: "cli"})
	}
	rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

// reply is what a non-streamed request to one of the three endpoints
// returned.
type reply struct {
	status                   int
	raw                      []byte
	text                     string
	done                     bool
	promptTokens, evalTokens int
	errMsg                   string
}

// soakPost sends body to path and parses the answer of /api/generate,
// /api/chat or /v1/chat/completions (or an error of either API).
func soakPost(ctx context.Context, c *http.Client, base, path string, body []byte) (reply, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(body))
	if err != nil {
		return reply{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return reply{}, err
	}
	defer resp.Body.Close()
	r := reply{status: resp.StatusCode}
	if r.raw, err = io.ReadAll(resp.Body); err != nil {
		return r, err
	}
	var m struct {
		Response string `json:"response"`
		Message  *struct {
			Content string `json:"content"`
		} `json:"message"`
		Done            bool `json:"done"`
		PromptEvalCount int  `json:"prompt_eval_count"`
		EvalCount       int  `json:"eval_count"`
		Choices         []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
			FinishReason *string `json:"finish_reason"`
		} `json:"choices"`
		Usage *struct {
			PromptTokens     int `json:"prompt_tokens"`
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
		Error json.RawMessage `json:"error"`
	}
	if err := json.Unmarshal(r.raw, &m); err != nil {
		return r, fmt.Errorf("status %d, body not JSON (%v): %q", r.status, err, tail(string(r.raw), 200))
	}
	if len(m.Error) > 0 {
		var s string
		var o struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(m.Error, &s) == nil {
			r.errMsg = s
		} else if json.Unmarshal(m.Error, &o) == nil {
			r.errMsg = o.Message
		}
	}
	switch {
	case len(m.Choices) > 0:
		r.text = m.Choices[0].Message.Content
		r.done = m.Choices[0].FinishReason != nil && *m.Choices[0].FinishReason != ""
		if m.Usage != nil {
			r.promptTokens, r.evalTokens = m.Usage.PromptTokens, m.Usage.CompletionTokens
		}
	case m.Message != nil:
		r.text, r.done, r.promptTokens, r.evalTokens = m.Message.Content, m.Done, m.PromptEvalCount, m.EvalCount
	default:
		r.text, r.done, r.promptTokens, r.evalTokens = m.Response, m.Done, m.PromptEvalCount, m.EvalCount
	}
	return r, nil
}

// soakStream sends a streamed request and reads its chunks until the end,
// until chunks have arrived (then cancels), or until ctx ends. It returns
// the chunks read.
func soakStream(ctx context.Context, c *http.Client, base, path string, body []byte, chunks int) (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return 0, fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	sc := bufio.NewScanner(resp.Body)
	n := 0
	for sc.Scan() {
		var m struct {
			Done  bool   `json:"done"`
			Error string `json:"error"`
		}
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			return n, fmt.Errorf("chunk %d not JSON: %q", n, sc.Text())
		}
		if m.Error != "" {
			return n, fmt.Errorf("chunk %d: error %q", n, m.Error)
		}
		n++
		if m.Done {
			return n, nil
		}
		if chunks > 0 && n >= chunks {
			cancel()
			return n, context.Canceled
		}
	}
	if err := sc.Err(); err != nil {
		return n, err
	}
	return n, io.ErrUnexpectedEOF
}

// procStatus reads fields of /proc/<pid>/status (VmRSS in kB, Threads).
func procStatus(pid int, fields ...string) (map[string]int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		for _, f := range fields {
			if k == f {
				n, err := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
				if err != nil {
					return nil, fmt.Errorf("/proc/%d/status %s: %w", pid, k, err)
				}
				out[k] = n
			}
		}
	}
	for _, f := range fields {
		if _, ok := out[f]; !ok {
			return nil, fmt.Errorf("/proc/%d/status has no %s", pid, f)
		}
	}
	return out, nil
}

// runnerOf returns the pid of the server's runner child whose command line
// holds the given string (a model blob's digest), or 0.
func runnerOf(serverPid int, holds string) int {
	for _, p := range liveProcesses() {
		if p.stat[1] == strconv.Itoa(serverPid) && strings.Contains(p.cmdline, "runner") && strings.Contains(p.cmdline, holds) {
			return p.pid
		}
	}
	return 0
}

// soakSample is one look at the processes.
type soakSample struct {
	done          int64 // requests finished when taken
	runner        int   // pid of the main model's runner
	rssKiB        int64 // runner VmRSS
	runnerThreads int64
	serverThreads int64
	serverFDs     int
}

func takeSample(serverPid int, digest string, done int64) (soakSample, error) {
	s := soakSample{done: done, runner: runnerOf(serverPid, digest)}
	if s.runner == 0 {
		return s, errors.New("no runner for the main model")
	}
	r, err := procStatus(s.runner, "VmRSS", "Threads")
	if err != nil {
		return s, err
	}
	sv, err := procStatus(serverPid, "Threads")
	if err != nil {
		return s, err
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", serverPid))
	if err != nil {
		return s, err
	}
	s.rssKiB, s.runnerThreads, s.serverThreads, s.serverFDs = r["VmRSS"], r["Threads"], sv["Threads"], len(fds)
	return s, nil
}

// describeFDs counts a process's open files by kind, its TCP sockets by
// local port -> remote port and state (from /proc/<pid>/net/tcp).
func describeFDs(pid int) string {
	sockets := map[string]bool{}
	kinds := map[string]int{}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err != nil {
			continue
		}
		if inode, ok := strings.CutPrefix(target, "socket:["); ok {
			sockets[strings.TrimSuffix(inode, "]")] = true
			continue
		}
		kind, _, _ := strings.Cut(target, ":")
		kinds[kind]++
	}
	conns := map[string]int{}
	for _, f := range []string{"tcp", "tcp6"} {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, f))
		for _, l := range strings.Split(string(b), "\n")[1:] {
			x := strings.Fields(l)
			if len(x) < 10 || !sockets[x[9]] {
				continue
			}
			port := func(a string) string {
				_, p, _ := strings.Cut(a, ":")
				n, _ := strconv.ParseInt(p, 16, 32)
				return strconv.Itoa(int(n))
			}
			conns[port(x[1])+"->"+port(x[2])+" state "+x[3]]++
			delete(sockets, x[9])
		}
	}
	kinds["other sockets"] = len(sockets)
	return fmt.Sprintf("%v; tcp (local->remote port, state in hex: 01 established, 06 time-wait, 08 close-wait, 0A listen): %v", kinds, conns)
}

// closeWaitSockets counts the TCP sockets of process pid in state
// CLOSE_WAIT (the peer closed, the process has not).
func closeWaitSockets(pid int) int {
	sockets := map[string]bool{}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if inode, ok := strings.CutPrefix(target, "socket:["); err == nil && ok {
			sockets[strings.TrimSuffix(inode, "]")] = true
		}
	}
	n := 0
	for _, f := range []string{"tcp", "tcp6"} {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, f))
		for _, l := range strings.Split(string(b), "\n")[1:] {
			x := strings.Fields(l)
			if len(x) >= 10 && sockets[x[9]] && x[3] == "08" {
				n++
			}
		}
	}
	return n
}

// soakAnswer is one completed temperature-0 request and its text.
type soakAnswer struct {
	id   string
	path string
	body []byte
	text string
}

// TestForkSoak: eight clients send a fixed, seeded mix (short prompts,
// prompts past num_ctx, answers past the cache, chats carrying their history,
// the OpenAI-compatible endpoint, requests cancelled mid-prompt and
// mid-answer, bad inputs each followed by a probe, the CLI once) to
// bin/ollama serve with compression on and OLLAMA_NUM_PARALLEL=4. Then: no
// runner restart, panic or fatal error in the log; no 5xx; every bad input
// answered as upstream answers it; the runner's RSS and threads and the
// server's threads and open files flat after warm-up; and every
// temperature-0 answer equal to the same request sent alone to a fresh
// server.
func TestForkSoak(t *testing.T) {
	bin, stories := forkSetup(t)
	rounds := forkSoakRounds(t)
	storiesB := filepath.Join(filepath.Dir(stories), "stories260K-f16.gguf")
	root, err := findRepo()
	require.NoError(t, err)
	models := filepath.Join(root, "..", "shared", "models")
	require.NoError(t, llama2c.ConvertFile(filepath.Join(models, "stories260K.bin"), filepath.Join(models, "tok512.bin"), storiesB, "f16"))
	b, err := os.ReadFile(stories)
	require.NoError(t, err)
	sum := sha256.Sum256(b)
	digest := hex.EncodeToString(sum[:])

	store := t.TempDir()
	s := startServer(t, bin, store, soakEnv...)
	// One thread per runner (a model parameter, so that the OpenAI endpoint
	// and the CLI use it too): two runners of two threads each on a loaded
	// 2-core machine spend their time in ggml's thread barriers.
	s.createModelWith(t, "stories", stories, map[string]any{"num_thread": 1})
	s.createModelWith(t, "stories-b", storiesB, map[string]any{"num_ctx": 4, "num_thread": 1})
	// The CLI's model: the main model's blob and options (so its runner)
	// with a short answer (`ollama run` sends no num_predict: -1 would mean
	// 1280 tokens).
	s.createModelWith(t, "stories-cli", stories, map[string]any{"num_predict": 24, "num_thread": 1})
	base := s.base.String()
	httpc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: soakClients}}
	// Load both runners, then the idle state the end is compared with.
	for _, m := range []string{"stories", "stories-b"} {
		r, err := soakPost(context.Background(), httpc, base, "/api/generate", jsonBody(map[string]any{"model": m, "prompt": "Once", "raw": true, "stream": false, "options": greedy(2)}))
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, r.status, "%s: %s", m, r.raw)
	}
	httpc.CloseIdleConnections()
	time.Sleep(2 * time.Second)
	idle, err := takeSample(s.pid, digest, 0)
	require.NoError(t, err)

	var mix []*soakReq
	for r := range rounds {
		mix = append(mix, soakMix(r)...)
	}
	for i, q := range mix {
		q.id = i
	}
	// Warm-up: the first quarter of the requests (slots, graphs and the Go
	// heap of the runner reach their working size).
	warm := int64(len(mix) / 4)

	var (
		mu       sync.Mutex
		answers  []soakAnswer
		counts   = map[string]int{}
		samples  []soakSample
		finished atomic.Int64
	)
	record := func(id, path string, body []byte, text string) {
		mu.Lock()
		defer mu.Unlock()
		answers = append(answers, soakAnswer{id: id, path: path, body: body, text: text})
	}
	count := func(k string) {
		mu.Lock()
		defer mu.Unlock()
		counts[k]++
	}
	// send is a temperature-0 request that must be answered.
	send := func(ctx context.Context, id, path string, body []byte) (reply, bool) {
		r, err := soakPost(ctx, httpc, base, path, body)
		if err != nil || r.status != http.StatusOK || !r.done {
			t.Errorf("%s %s: status %d, err %v, error %q, body %s", id, path, r.status, err, r.errMsg, tail(string(r.raw), 300))
			return r, false
		}
		record(id, path, body, r.text)
		return r, true
	}
	// A request unanswered after 2 minutes (the longest takes seconds) means
	// the server stopped answering: the soak stops there instead of waiting
	// 2 minutes for each request left.
	soakRun, stopSoak := context.WithCancel(context.Background())
	defer stopSoak()
	var skipped atomic.Int64
	run := func(q *soakReq) {
		if soakRun.Err() != nil {
			skipped.Add(1)
			return
		}
		ctx, cancel := context.WithTimeout(soakRun, 2*time.Minute)
		defer cancel()
		defer func() {
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				t.Errorf("#%d %s: no answer within 2 minutes: the server stopped answering; the soak stops after %d requests", q.id, q.kind, finished.Load())
				stopSoak()
			}
		}()
		id := fmt.Sprintf("#%d %s", q.id, q.kind)
		switch q.kind {
		case "short", "long", "past-cache", "openai":
			r, ok := send(ctx, id, q.path, q.body)
			if ok && q.kind != "openai" && r.promptTokens+r.evalTokens > soakCtx {
				count(q.kind + " past num_ctx")
			}
		case "chat":
			var req struct {
				Model    string              `json:"model"`
				Messages []map[string]string `json:"messages"`
				Stream   bool                `json:"stream"`
				Options  map[string]any      `json:"options"`
			}
			if err := json.Unmarshal(q.body, &req); err != nil {
				t.Errorf("%s: %v", id, err)
				break
			}
			body := q.body
			for turn := 0; ; turn++ {
				r, ok := send(ctx, fmt.Sprintf("%s turn %d", id, turn+1), q.path, body)
				if !ok || turn == len(q.turns) {
					break
				}
				req.Messages = append(req.Messages, map[string]string{"role": "assistant", "content": r.text}, map[string]string{"role": "user", "content": q.turns[turn]})
				body = jsonBody(req)
			}
		case "cancel-prompt":
			sctx, scancel := context.WithTimeout(ctx, q.delay)
			n, err := soakStream(sctx, httpc, base, q.path, q.body, 0)
			scancel()
			switch {
			case err == nil:
				count("cancel-prompt: finished before the cancel")
			case errors.Is(err, context.DeadlineExceeded) && n == 0:
				count("cancel-prompt: cancelled before the first token")
			case errors.Is(err, context.DeadlineExceeded):
				count("cancel-prompt: cancelled mid-answer")
			default:
				t.Errorf("%s: %v", id, err)
			}
		case "cancel-answer":
			n, err := soakStream(ctx, httpc, base, q.path, q.body, q.chunks)
			switch {
			case errors.Is(err, context.Canceled):
				count("cancel-answer: cancelled mid-answer")
			case err == nil:
				count("cancel-answer: finished before the cancel")
			default:
				t.Errorf("%s: after %d chunks: %v", id, n, err)
			}
		case "bad":
			b := q.bad
			r, err := soakPost(ctx, httpc, base, q.path, q.body)
			id = fmt.Sprintf("#%d bad input %q", q.id, b.name)
			switch {
			case err != nil:
				t.Errorf("%s: %v", id, err)
			case r.status != b.status:
				t.Errorf("%s: status %d, want %d: %s", id, r.status, b.status, tail(string(r.raw), 300))
			case r.status >= 400 && strings.TrimSpace(r.errMsg) == "":
				t.Errorf("%s: status %d without an error message: %s", id, r.status, r.raw)
			case r.status >= 400:
				count(fmt.Sprintf("bad input answered %d", r.status))
			case !utf8.Valid(r.raw):
				t.Errorf("%s: the answer is not valid UTF-8", id)
			default:
				if err := b.check(r); err != nil {
					t.Errorf("%s: accepted, but %v: %s", id, err, tail(string(r.raw), 300))
				} else {
					record(id, q.path, q.body, r.text)
					count("bad input accepted, sane answer")
				}
			}
			if _, ok := send(ctx, id+" probe", "/api/generate", soakProbe()); ok {
				count("probe after a bad input served")
			}
		case "cli":
			cmd := exec.CommandContext(ctx, bin, "run", "stories-cli", soakStory(1, 2))
			var env []string
			for _, kv := range os.Environ() {
				if !strings.HasPrefix(kv, "OLLAMA_") && !strings.HasPrefix(kv, "HOME=") {
					env = append(env, kv)
				}
			}
			cmd.Env = append(env, "HOME="+t.TempDir(), "OLLAMA_HOST="+s.base.Host, "OLLAMA_NO_CLOUD=1")
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Errorf("%s: %v\nstdout: %s\nstderr: %s", id, err, stdout.String(), tail(stderr.String(), 500))
			} else if strings.TrimSpace(stdout.String()) == "" {
				t.Errorf("%s: no answer on stdout; stderr: %s", id, tail(stderr.String(), 500))
			} else {
				count("cli answered")
			}
		default:
			t.Errorf("%s: unknown kind", id)
		}
		count(q.kind)
		finished.Add(1)
	}

	// Sampler: every 250 ms while the clients run.
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if sm, err := takeSample(s.pid, digest, finished.Load()); err == nil {
				mu.Lock()
				samples = append(samples, sm)
				mu.Unlock()
			}
		}
	}()

	start := time.Now()
	queue := make(chan *soakReq)
	var clients sync.WaitGroup
	for range soakClients {
		clients.Add(1)
		go func() {
			defer clients.Done()
			for q := range queue {
				run(q)
			}
		}()
	}
	for _, q := range mix {
		queue <- q
	}
	close(queue)
	clients.Wait()
	elapsed := time.Since(start)
	close(stop)
	sampler.Wait()
	// The clients are gone: their connections close, the server's handler
	// goroutines end.
	httpc.CloseIdleConnections()
	time.Sleep(2 * time.Second)
	end, err := takeSample(s.pid, digest, finished.Load())
	require.NoError(t, err, "the main model's runner is still there")

	kinds := make([]string, 0, len(counts))
	for k := range counts {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	var summary []string
	for _, k := range kinds {
		summary = append(summary, fmt.Sprintf("%s=%d", k, counts[k]))
	}
	t.Logf("soak: %d requests (%d rounds) from %d clients in %v; %d answers recorded; %s", len(mix), rounds, soakClients, elapsed.Round(time.Second), len(answers), strings.Join(summary, " "))
	require.Zero(t, skipped.Load(), "requests not sent after the server stopped answering")

	// The log: no restart, no panic, no fatal error.
	log := s.log.String()
	for _, bad := range []string{"panic", "fatal error", "SIGSEGV", "llama runner terminated", "runner process has terminated", "level=ERROR"} {
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, bad) {
				t.Errorf("server log has %q: %s", bad, tail(l, 400))
				break
			}
		}
	}
	starts := map[string]int{}
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, `msg="starting runner"`) && strings.Contains(l, "--model") {
			switch {
			case strings.Contains(l, digest):
				starts["stories"]++
			default:
				starts["other"]++
			}
		}
	}
	assert.Equal(t, 1, starts["stories"], "the main model's runner started once")
	assert.LessOrEqual(t, starts["other"], 1, "stories-b's runner started at most once")
	assert.Positive(t, counts["past-cache past num_ctx"], "an answer ran past num_ctx")
	assert.Positive(t, counts["long past num_ctx"], "a prompt ran past num_ctx")

	// Flat after warm-up.
	var base0 *soakSample
	var peak soakSample
	runners := map[int]bool{}
	for i := range samples {
		sm := samples[i]
		runners[sm.runner] = true
		if sm.done < warm {
			continue
		}
		if base0 == nil {
			base0 = &samples[i]
		}
		peak.rssKiB = max(peak.rssKiB, sm.rssKiB)
		peak.runnerThreads = max(peak.runnerThreads, sm.runnerThreads)
		peak.serverThreads = max(peak.serverThreads, sm.serverThreads)
		peak.serverFDs = max(peak.serverFDs, sm.serverFDs)
	}
	runners[idle.runner], runners[end.runner] = true, true
	assert.Len(t, runners, 1, "one runner pid for the main model throughout: %v", runners)
	require.NotNil(t, base0, "no sample after warm-up (%d samples)", len(samples))
	t.Logf("idle before: runner RSS %.1f MiB, runner threads %d, server threads %d, server fds %d", float64(idle.rssKiB)/1024, idle.runnerThreads, idle.serverThreads, idle.serverFDs)
	t.Logf("after warm-up (%d requests done) -> end, idle (%d): runner RSS %.1f -> %.1f MiB (peak %.1f), runner threads %d -> %d (peak %d), server threads %d -> %d (peak %d), server fds %d -> %d (peak %d); %d samples",
		base0.done, end.done, float64(base0.rssKiB)/1024, float64(end.rssKiB)/1024, float64(peak.rssKiB)/1024,
		base0.runnerThreads, end.runnerThreads, peak.runnerThreads, base0.serverThreads, end.serverThreads, peak.serverThreads,
		base0.serverFDs, end.serverFDs, peak.serverFDs, len(samples))
	// The bounds. RSS: 16 MiB over the RSS after warm-up, twice what the
	// runner allocates besides the weights (compute graph 8.2 MiB, KV cache
	// under 1 MiB at num_ctx 128 × 4 slots): a per-request leak of a
	// sequence's state or a cache buffer crosses it within a long run, Go's
	// heap growing to its GC goal (GOGC=100) does not. Threads: Go keeps
	// the threads it made (cgo calls and syscalls in flight), it does not
	// make one per request: at most twice the count after warm-up. Open
	// files of the server: the same as before the soak once the clients'
	// connections are closed (a handler goroutine stuck on a connection keeps
	// its file), with 2 of slack for a log or a pipe the server may open.
	// The server has no /debug/pprof (net/http/pprof is not linked in), so its
	// goroutines are not counted directly.
	assert.LessOrEqual(t, end.rssKiB-base0.rssKiB, int64(16<<10), "runner RSS growth after warm-up (KiB)")
	assert.LessOrEqual(t, end.runnerThreads, 2*base0.runnerThreads, "runner threads")
	assert.LessOrEqual(t, end.serverThreads, 2*base0.serverThreads, "server threads")
	// Client connections the client has closed and the server has not
	// (CLOSE_WAIT) were a leak of Ollama v0.24.0's (a handler waited in
	// scheduleRunner's select, which had no case for its request's context,
	// after the scheduler dropped the cancelled request); the fork adds the
	// case (TestForkCancelledWaits).
	stuck := closeWaitSockets(s.pid)
	assert.Zero(t, stuck, "server connections left in CLOSE_WAIT")
	if !assert.LessOrEqual(t, end.serverFDs, idle.serverFDs+2, "server open files, idle before and after") {
		t.Logf("the server's open files: %s", describeFDs(s.pid))
	}

	// Every temperature-0 answer equals the same request sent alone to a
	// fresh server. Each distinct request is also sent alone to the soak's
	// server, now idle: when that answer equals the fresh server's and the
	// soak's does not, the difference came from the requests it was
	// batched with, not from what the server served before.
	type key struct{ path, body string }
	aloneOn := func(srv string) map[key]string {
		out := map[key]string{}
		for _, a := range answers {
			k := key{a.path, string(a.body)}
			if _, ok := out[k]; ok {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			r, err := soakPost(ctx, httpc, srv, a.path, a.body)
			cancel()
			require.NoError(t, err, "%s alone on %s", a.id, srv)
			require.Equal(t, http.StatusOK, r.status, "%s alone on %s: %s", a.id, srv, r.raw)
			out[k] = r.text
		}
		return out
	}
	warmAlone := aloneOn(base)
	syscall.Kill(-s.pid, syscall.SIGKILL)
	fresh := startServer(t, bin, store, soakEnv...)
	alone := aloneOn(fresh.base.String())
	// Until the cache stopped computing graphs of its own between batches
	// (ollama/deferred.go), a shift overwrote the logits of the batch before
	// it before the runner read them: 1-2 of 148 answers differed from a
	// fresh server's, and an answer past the cache differed between fresh
	// servers.
	differ := map[string]int{}
	var differIDs []string
	for _, a := range answers {
		k := key{a.path, string(a.body)}
		want := alone[k]
		if a.text != want {
			differ[a.path]++
			differIDs = append(differIDs, a.id)
			t.Errorf("%s: the soak's answer differs from the same request alone on a fresh server (alone on the soak's server, idle: %s):\n request: %s %s\n soak:  %q\n alone: %q",
				a.id, map[bool]string{true: "same as fresh", false: "differs too"}[warmAlone[k] == want], a.path, tail(string(a.body), 200), tail(a.text, 160), tail(want, 160))
		}
	}
	warmDiffer := 0
	for k, v := range warmAlone {
		if alone[k] != v {
			warmDiffer++
		}
	}
	t.Logf("fresh server: %d distinct requests sent alone; %d of %d soak answers differ %v; alone on the idle soak server, %d of %d differ from fresh", len(alone), len(differIDs), len(answers), differ, warmDiffer, len(alone))
	assert.Zero(t, warmDiffer, "answers of the idle soak server that differ from a fresh server's")
}

// cancelRig starts bin/ollama serve with env and stories260K, and returns
// it, a client for eight clients and a probe request that must be answered
// (answered once already).
func cancelRig(t *testing.T, env ...string) (*server, *http.Client, func() (reply, error)) {
	bin, stories := forkSetup(t)
	s := startServer(t, bin, t.TempDir(), env...)
	s.createModelWith(t, "stories", stories, map[string]any{"num_thread": 1})
	httpc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: soakClients}}
	probe := func() (reply, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		return soakPost(ctx, httpc, s.base.String(), "/api/generate", soakProbe())
	}
	r, err := probe()
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, r.status)
	return s, httpc, probe
}

// TestForkCancelledStreams: clients that leave a streamed answer after its
// first chunk must not take the model's parallel slots with them. With one
// slot (OLLAMA_NUM_PARALLEL=1), eight clients cancel 160 streamed answers
// (generate and chat), then a request must be answered. Before the fork
// drained the stream's channel (kvnormhook.DrainStream), a cancel could
// leave Ollama's handler goroutine blocked sending a chunk while it held the
// slot, and the model then answered nothing more.
func TestForkCancelledStreams(t *testing.T) {
	s, httpc, probe := cancelRig(t, "OLLAMA_NUM_PARALLEL=1", "OLLAMA_KEEP_ALIVE=-1", "OLLAMA_CONTEXT_LENGTH=128")
	base := s.base.String()

	const cancels = 160
	var next atomic.Int64
	var cancelled, finished atomic.Int64
	var wg sync.WaitGroup
	// The first request unanswered for 30 s (each takes milliseconds) stops
	// the clients.
	var hung atomic.Bool
	for range soakClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= cancels || hung.Load() {
					return
				}
				body := jsonBody(map[string]any{"model": "stories", "prompt": soakStory(i%8, 2), "raw": true, "options": greedy(200)})
				path := "/api/generate"
				if i%2 == 1 {
					path = "/api/chat"
					body = jsonBody(map[string]any{"model": "stories", "messages": []map[string]string{{"role": "user", "content": soakStory(i%8, 2)}}, "options": greedy(200)})
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				n, err := soakStream(ctx, httpc, base, path, body, 1)
				cancel()
				switch {
				case errors.Is(err, context.Canceled):
					cancelled.Add(1)
				case err == nil:
					finished.Add(1)
				case errors.Is(err, context.DeadlineExceeded):
					if !hung.Swap(true) {
						t.Errorf("request %d (%s): no chunk within 30 s after %d streams cancelled: the model stopped answering", i, path, cancelled.Load())
					}
				default:
					t.Errorf("request %d (%s): after %d chunks: %v", i, path, n, err)
				}
			}
		}()
	}
	wg.Wait()
	require.False(t, hung.Load(), "the model stopped answering")
	r, err := probe()
	require.NoError(t, err, "after %d streams cancelled after their first chunk, the model still answers", cancelled.Load())
	assert.Equal(t, http.StatusOK, r.status)
	t.Logf("%d streams cancelled after their first chunk, %d finished first; the model still answers", cancelled.Load(), finished.Load())
}

// TestForkCancelledWaits: a request whose client leaves while it waits for a
// runner must not leave its handler waiting for ever. Ollama v0.24.0's
// scheduler drops a queued request whose context is done without answering
// it, and scheduleRunner's select had no case for the context: the handler
// kept the client's connection open (CLOSE_WAIT once the client closed it),
// one file descriptor and goroutine per such cancel. Here eight clients send
// 400 requests, each cancelled 0-4 ms after it was sent (a request that
// finds its runner busy being checked, or its model not loaded, waits that
// long); then no connection of the server may stay in CLOSE_WAIT.
func TestForkCancelledWaits(t *testing.T) {
	s, httpc, probe := cancelRig(t, soakEnv...)
	base := s.base.String()

	const requests = 400
	var next atomic.Int64
	var wg sync.WaitGroup
	for c := range soakClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(c), 7))
			for {
				i := int(next.Add(1)) - 1
				if i >= requests {
					return
				}
				body := jsonBody(map[string]any{"model": "stories", "prompt": soakStory(i%8, 1), "raw": true, "options": greedy(8)})
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.IntN(4000))*time.Microsecond)
				soakPost(ctx, httpc, base, "/api/generate", body)
				cancel()
			}
		}()
	}
	wg.Wait()
	// Handlers that returned close their connections at once; give the
	// last ones a moment.
	stuck := 0
	for range 20 {
		if stuck = closeWaitSockets(s.pid); stuck == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	assert.Zero(t, stuck, "server connections left in CLOSE_WAIT after %d requests cancelled within 4 ms: handlers still waiting for a runner", requests)
	r, err := probe()
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, r.status)
}
