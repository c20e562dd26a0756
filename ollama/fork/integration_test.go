//go:build cgo && linux

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ollama/ollama/api"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/ollama"
)

// ollamaBinary returns bin/ollama, building it with this tool when it is
// missing. The test skips only when the build reports a missing
// prerequisite (exit status 2), with the reason.
func ollamaBinary(t testing.TB, root string) string {
	t.Helper()
	bin := filepath.Join(root, "bin", "ollama")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	out := filepath.Join(root, "build", "ollama-fork")
	if b, err := os.ReadFile(filepath.Join(out, reasonFile)); err == nil {
		t.Skipf("bin/ollama cannot be built: %s", strings.TrimSpace(string(b)))
	}
	ctx := context.Background()
	if dt, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if d, ok := dt.Deadline(); ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, d.Add(-30*time.Second))
			defer cancel()
		}
	}
	tool := filepath.Join(t.TempDir(), "ollama-fork")
	gobuild := exec.CommandContext(ctx, "go", "build", "-o", tool, ".")
	gobuild.Dir = filepath.Join(root, "ollama", "fork")
	if b, err := gobuild.CombinedOutput(); err != nil {
		t.Fatalf("build the fork tool: %v\n%s", err, b)
	}
	var log bytes.Buffer
	cmd := exec.CommandContext(ctx, tool, "-out", out, "-bin", bin, "-repo", root)
	cmd.Stdout, cmd.Stderr = &log, &log
	err := cmd.Run()
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 2 {
		t.Skipf("bin/ollama cannot be built: %s", strings.TrimSpace(log.String()))
	}
	require.NoError(t, err, "make ollama failed:\n%s", log.String())
	return bin
}

// syncBuffer collects a server's log.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type server struct {
	base   *url.URL
	client *api.Client
	log    *syncBuffer
	pgid   int // the server's process group: it and its runners
	pid    int // the `ollama serve` process
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startServer runs `ollama serve` on a loopback port with the given store
// and extra environment. The server runs in its own process group, which
// also holds the runners it starts; the whole group is killed when the test
// ends, and the test fails if any of its processes survives.
func startServer(t testing.TB, bin, models string, extra ...string) *server {
	t.Helper()
	host := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OLLAMA_") && !strings.HasPrefix(kv, "HOME=") {
			env = append(env, kv)
		}
	}
	env = append(env, "HOME="+t.TempDir(), "OLLAMA_HOST="+host, "OLLAMA_MODELS="+models, "OLLAMA_NO_CLOUD=1",
		"OLLAMA_NEW_ENGINE=1", "OLLAMA_FLASH_ATTENTION=0", "OLLAMA_NUM_PARALLEL=1")
	env = append(env, extra...)
	log := &syncBuffer{}
	cmd := exec.Command(bin, "serve")
	cmd.Env, cmd.Stdout, cmd.Stderr = env, log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	pgid := cmd.Process.Pid
	t.Cleanup(func() {
		// SIGKILL to the group: the server and every runner it started.
		if err := syscall.Kill(-pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			t.Errorf("kill process group %d: %v", pgid, err)
		}
		cmd.Wait()
		if left := waitGroupGone(pgid, 10*time.Second); len(left) > 0 {
			t.Errorf("processes of the server's group %d survive the test: %s", pgid, strings.Join(left, "; "))
		}
		if t.Failed() {
			t.Logf("server %s log:\n%s", host, log.String())
		}
	})
	base := &url.URL{Scheme: "http", Host: host}
	s := &server{base: base, client: api.NewClient(base, &http.Client{Timeout: 2 * time.Minute}), log: log, pgid: pgid, pid: pgid}
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := s.client.Version(ctx)
		cancel()
		if err == nil {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("ollama serve on %s did not answer within 60s: %v\n%s", host, err, log.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// liveProcess is a process read from /proc: its pid, the fields of its
// stat after the command name (state, ppid, pgrp, ...) and its command line.
type liveProcess struct {
	pid     int
	stat    []string
	cmdline string // arguments joined by spaces
}

// liveProcesses lists the processes of /proc that are not zombies.
func liveProcesses() []liveProcess {
	dirs, _ := os.ReadDir("/proc")
	var out []liveProcess
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "stat"))
		if err != nil {
			continue // gone meanwhile
		}
		// pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
		rest := string(b)
		if i := strings.LastIndexByte(rest, ')'); i >= 0 {
			rest = rest[i+1:]
		}
		f := strings.Fields(rest)
		if len(f) < 3 || f[0] == "Z" || f[0] == "X" {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		out = append(out, liveProcess{pid, f, strings.ReplaceAll(strings.TrimRight(string(cmdline), "\x00"), "\x00", " ")})
	}
	return out
}

// groupMembers lists the live (not zombie) processes of process group pgid
// as "pid cmdline", from /proc.
func groupMembers(pgid int) []string {
	var out []string
	for _, p := range liveProcesses() {
		if p.stat[2] == strconv.Itoa(pgid) {
			out = append(out, fmt.Sprintf("%d %s", p.pid, p.cmdline))
		}
	}
	return out
}

// waitGroupGone waits until process group pgid has no live process and
// returns those still alive at the deadline.
func waitGroupGone(pgid int, timeout time.Duration) []string {
	deadline := time.Now().Add(timeout)
	for {
		left := groupMembers(pgid)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// hookLines returns the log lines written by kvnorm's hooks and cache: their
// messages all start with "kvnorm:" (the version string "0.24.0-kvnorm" is
// not one of them).
func hookLines(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, `msg="kvnorm:`) || strings.Contains(l, "kvnorm: ") {
			out = append(out, l)
		}
	}
	return out
}

func (s *server) generate(t *testing.T, model, prompt string, options map[string]any) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stream := false
	var text strings.Builder
	err := s.client.Generate(ctx, &api.GenerateRequest{Model: model, Prompt: prompt, Raw: true, Stream: &stream, Options: options},
		func(r api.GenerateResponse) error {
			text.WriteString(r.Response)
			return nil
		})
	return text.String(), err
}

// createModel uploads the GGUF as a blob and creates model name from it.
func (s *server) createModel(t testing.TB, name, gguf string) {
	t.Helper()
	s.createModelWith(t, name, gguf, nil)
}

// createModelWith is createModel with the model's parameters (a Modelfile's
// PARAMETER lines).
func (s *server) createModelWith(t testing.TB, name, gguf string, params map[string]any) {
	t.Helper()
	b, err := os.ReadFile(gguf)
	require.NoError(t, err)
	sum := sha256.Sum256(b)
	digest := "sha256:" + hex.EncodeToString(sum[:])
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	require.NoError(t, s.client.CreateBlob(ctx, digest, bytes.NewReader(b)))
	stream := false
	require.NoError(t, s.client.Create(ctx, &api.CreateRequest{Model: name, Files: map[string]string{filepath.Base(gguf): digest}, Parameters: params, Stream: &stream},
		func(api.ProgressResponse) error { return nil }))
}

// expected is what kvnorm's Session gives for the same GGUF, prompt and
// policy with greedy decoding, pipelined as the runner is: the server must
// give the same text.
func expected(t *testing.T, gguf, prompt string, policy *adapter.Policy, n int) string {
	t.Helper()
	s, err := ollama.Open(gguf, ollama.Config{Policy: policy, Upstream: policy == nil, Context: 256, Pipelined: true})
	require.NoError(t, err)
	defer s.Close()
	ids, err := s.Encode(prompt, true)
	require.NoError(t, err)
	g, err := s.Generate(context.Background(), 0, ids, n, ollama.GenerateOptions{})
	require.NoError(t, err)
	return g.Text
}

// TestOllamaFork runs kvnorm's Ollama build: a model created from the
// stories260K GGUF, generation through Ollama's own client with compression
// off and on, the stats in the log, and bad requests.
func TestOllamaFork(t *testing.T) {
	bin, gguf := forkSetup(t)
	store := t.TempDir()
	const prompt = "Once upon a time there was a little girl named Lily. She loved to play with her toys and her friends. One day she went to the park"
	opts := map[string]any{"num_ctx": 256, "temperature": 0, "num_predict": 32, "seed": 1}
	pol := adapter.DefaultPolicy()
	pol.Granularity = hooks.PerHead

	t.Run("off", func(t *testing.T) {
		s := startServer(t, bin, store)
		s.createModel(t, "stories", gguf)
		text, err := s.generate(t, "stories", prompt, opts)
		require.NoError(t, err)
		assert.Equal(t, strings.TrimSpace(expected(t, gguf, prompt, nil, 32)), strings.TrimSpace(text))
		assert.Empty(t, hookLines(s.log.String()), "unset means upstream behaviour: no kvnorm hook logs")
		assert.Contains(t, s.log.String(), "starting ollama engine")
		assert.Contains(t, s.log.String(), "0.24.0-kvnorm", "the server is kvnorm's build")
	})

	t.Run("on", func(t *testing.T) {
		s := startServer(t, bin, store, "OLLAMA_KV_NORM_KEEP=0.5", "OLLAMA_KV_NORM_GRANULARITY=per-head")
		text, err := s.generate(t, "stories", prompt, opts)
		require.NoError(t, err)
		assert.Equal(t, strings.TrimSpace(expected(t, gguf, prompt, &pol, 32)), strings.TrimSpace(text))
		log := s.log.String()
		assert.NotEmpty(t, hookLines(log))
		assert.Contains(t, log, "kvnorm: KV cache compression on")
		assert.Contains(t, log, "kvnorm: cache installed")
		assert.Contains(t, log, "kvnorm: compressed")
		assert.Contains(t, log, "trigger=prefill")
		assert.Contains(t, log, `policy="knorm keep=0.5 per-head skip=0,1 sinks=0 window=0"`)
		// Bad requests leave the server running.
		resp, err := http.Post(s.base.String()+"/api/generate", "application/json", strings.NewReader(`{"model": "stories", "prompt": `))
		require.NoError(t, err)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode)

		_, err = s.generate(t, "no-such-model", prompt, opts)
		var se api.StatusError
		require.ErrorAs(t, err, &se)
		assert.Equal(t, http.StatusNotFound, se.StatusCode)

		long := strings.Repeat(prompt+" ", 12) // about 400 tokens
		_, err = s.generate(t, "stories", long, map[string]any{"num_ctx": 64, "temperature": 0, "num_predict": 8})
		t.Logf("prompt longer than num_ctx: err=%v", err)

		again, err := s.generate(t, "stories", prompt, opts)
		require.NoError(t, err, "the server survives bad requests")
		assert.Equal(t, strings.TrimSpace(text), strings.TrimSpace(again))
		assert.NotContains(t, s.log.String(), "panic")
		for _, l := range strings.Split(s.log.String(), "\n") {
			if strings.Contains(l, "kvnorm:") || strings.Contains(l, "level=WARN") || strings.Contains(l, "api/generate") || strings.Contains(l, "shift") || strings.Contains(l, "truncat") {
				t.Log(l)
			}
		}

	})

	t.Run("invalid env", func(t *testing.T) {
		s := startServer(t, bin, store, "OLLAMA_KV_NORM_KEEP=abc")
		_, err := s.generate(t, "stories", prompt, opts)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "OLLAMA_KV_NORM_KEEP")
		t.Logf("invalid value: %v", err)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = s.client.Version(ctx)
		assert.NoError(t, err, "the server keeps running")
	})
}
