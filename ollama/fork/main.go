// Command fork builds kvnorm's Ollama: Ollama v0.24.0 (the module pinned in
// kvnorm's go.mod) with kvnorm's KV cache compiled in.
//
//	go build -o bin/ollama-fork ./ollama/fork && bin/ollama-fork -out build/ollama-fork -bin bin/ollama
//
// It copies the module source from the Go module cache to <out>/src, inserts
// four calls and one select case into it (see package kvnormhook; nothing of Ollama is committed
// to kvnorm), writes <out>/go.work joining that copy with the kvnorm
// repository, and runs `go build` in the copy. ggml's miniaudio header comes
// from the Go module github.com/gen2brain/malgo; nlohmann-json and stb come
// from the system (Debian: apt-get install nlohmann-json3-dev libstb-dev).
//
// Exit status 2 means a prerequisite is missing (no C/C++ compiler, missing
// headers, module download impossible); the reason is printed and written to
// <out>/unavailable.txt, which the fork's integration test reports when it
// skips. Any other failure exits 1.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"golang.org/x/sys/cpu"
)

const (
	ollamaModule = "github.com/ollama/ollama"
	malgoModule  = "github.com/gen2brain/malgo@v0.11.24"
	hookImport   = `kvnormhook "github.com/kvnorm/kvnorm/ollama/fork/kvnormhook"`
	stampFile    = ".kvnorm-fork-source"
	reasonFile   = "unavailable.txt"
)

// errUnavailable marks a missing prerequisite (exit status 2).
var errUnavailable = errors.New("prerequisite missing")

// patch inserts code into one file of the Ollama source after an anchor that
// must occur exactly once.
type patch struct {
	file   string
	anchor string
	insert string
}

// patches are the whole of kvnorm's change to Ollama.
var patches = []patch{
	{
		file: "runner/ollamarunner/runner.go",
		anchor: `	s.model, err = model.New(mpath, params)
	if err != nil {
		return err
	}
`,
		insert: `	// kvnorm: replace the KV cache; a no-op unless OLLAMA_KV_NORM_KEEP or OLLAMA_KV_NORM_BUDGET is set.
	if err := kvnormhook.Install(s.model, kvSize/max(parallel, 1)); err != nil {
		return err
	}
`,
	},
	{
		// After Ollama's own choice of the Go engine (tok != nil), before
		// it loads the llama.cpp runner's vocabulary when tok is nil.
		file: "llm/server.go",
		anchor: `			slog.Debug("model not yet supported by Ollama engine, switching to compatibility mode", "model", modelPath, "error", err)
		}
	}
`,
		insert: `	// kvnorm: refuse invalid OLLAMA_KV_NORM_* values; with compression on, run a model kvnorm can compress on the Go engine.
	if tok, err = kvnormhook.CheckServer(tok, modelPath, f, len(projectors), opts.NumCtx); err != nil {
		return nil, err
	}
`,
	},
	{
		// forwardBatch, at the top of its loop over the sequences, before
		// a sequence's inputs are added to the batch.
		file: "runner/ollamarunner/runner.go",
		anchor: `		if !s.cache.enabled {
			seq.inputs = append(seq.cache.Inputs, seq.inputs...)
			seq.cache.Inputs = []*input.Input{}
		}
`,
		insert: `		// kvnorm: with compression on, one sequence per forward pass, so that an answer does not depend on what is batched beside it.
		if len(batchInputs) > 0 && kvnormhook.OneSequencePerBatch() {
			if resumeSeq == -1 {
				resumeSeq = seqIdx
			}
			break
		}
`,
	},
	{
		// A client gone mid-stream must not leave the producer blocked
		// on the unbuffered channel, holding a parallel slot (see
		// kvnormhook.DrainStream).
		file: "server/routes.go",
		anchor: `func streamResponse(c *gin.Context, ch chan any) {
`,
		insert: `	// kvnorm: once the stream stops (client gone), drop what the producer still sends so that it can release its slot.
	defer kvnormhook.DrainStream(ch)
`,
	},
	{
		// A request cancelled while it waits for a runner: the scheduler
		// drops it from its queue without answering (processPending skips
		// a request whose context is done), so the handler would wait on
		// the two channels for ever, holding the client's connection.
		// Returning on the context is safe: a runner handed over later is
		// released when the request's context is done (useLoadedRunner).
		file: "server/routes.go",
		anchor: `	runnerCh, errCh := s.sched.GetRunner(ctx, model, opts, keepAlive)
	var runner *runnerRef
	select {
`,
		insert: `	// kvnorm: a request whose client left while it waited for a runner gets an answer (499) instead of waiting for ever.
	case <-ctx.Done():
		return nil, nil, nil, ctx.Err()
`,
	},
}

func main() {
	out := flag.String("out", "build/ollama-fork", "build directory (the Ollama copy goes to <out>/src)")
	bin := flag.String("bin", "bin/ollama", "the ollama binary to build")
	repo := flag.String("repo", "", "kvnorm repository root (default: found from the working directory)")
	version := flag.String("version", "0.24.0-kvnorm", "version reported by `ollama -v`")
	flag.Parse()
	err := build(*out, *bin, *repo, *version)
	if err == nil {
		os.Remove(filepath.Join(*out, reasonFile))
		return
	}
	fmt.Fprintln(os.Stderr, "ollama fork:", err)
	if errors.Is(err, errUnavailable) {
		if os.MkdirAll(*out, 0o755) == nil {
			os.WriteFile(filepath.Join(*out, reasonFile), []byte(err.Error()+"\n"), 0o644)
		}
		os.Exit(2)
	}
	os.Exit(1)
}

func build(out, bin, repo, version string) error {
	var err error
	if repo == "" {
		if repo, err = findRepo(); err != nil {
			return err
		}
	}
	if out, err = filepath.Abs(out); err != nil {
		return err
	}
	if bin, err = filepath.Abs(bin); err != nil {
		return err
	}
	if err := checkCompilers(); err != nil {
		return err
	}
	modDir, modVersion, err := moduleDir(repo)
	if err != nil {
		return err
	}
	include := filepath.Join(out, "include")
	if err := miniaudio(repo, include); err != nil {
		return err
	}
	if err := checkHeaders(); err != nil {
		return err
	}
	src := filepath.Join(out, "src")
	if err := copySource(modDir, src, modVersion); err != nil {
		return err
	}
	for _, file := range patchedFiles() {
		if err := apply(modDir, src, file); err != nil {
			return err
		}
	}
	work := filepath.Join(out, "go.work")
	goVersion, err := goLine(filepath.Join(repo, "go.mod"))
	if err != nil {
		return err
	}
	if err := os.WriteFile(work, []byte(fmt.Sprintf("go %s\n\nuse (\n\t./src\n\t%s\n)\n", goVersion, repo)), 0o644); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-ldflags", "-X=github.com/ollama/ollama/version.Version="+version, "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "GOWORK="+work, "CGO_ENABLED=1", "GOFLAGS=",
		"CGO_CPPFLAGS="+strings.TrimSpace(os.Getenv("CGO_CPPFLAGS")+" -I"+include))
	cmd.Env = append(cmd.Env, optFlags()...) // after os.Environ: the later value wins
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	fmt.Fprintf(os.Stderr, "ollama fork: building %s from %s (Ollama %s + kvnorm)\n", bin, src, modVersion)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build in %s: %w", src, err)
	}
	return nil
}

// optFlags gives the compiler flags the Makefile sets (CGO_CFLAGS and
// CGO_CXXFLAGS "-O3 -march=x86-64-v3" on an amd64 host with AVX2) when the
// environment sets neither, so that the tool run outside make (or by the
// fork's tests) builds the same binary as `make ollama`. Go's cgo default
// (-O2, no -march) builds ggml's CPU kernels without AVX: a 1969-token prompt
// took 761 s and decoded 1.73 tokens/s through such a bin/ollama.
func optFlags() []string {
	if os.Getenv("CGO_CFLAGS") != "" || os.Getenv("CGO_CXXFLAGS") != "" || !hostHasAVX2() {
		return nil
	}
	return []string{"CGO_CFLAGS=" + makeFlags, "CGO_CXXFLAGS=" + makeFlags}
}

// hostHasAVX2 is the Makefile's test (x86_64, avx2 in /proc/cpuinfo).
func hostHasAVX2() bool { return runtime.GOARCH == "amd64" && cpu.X86.HasAVX2 }

// makeFlags are the Makefile's CGO_CFLAGS and CGO_CXXFLAGS on an AVX2 host;
// TestOptFlagsMatchMakefile fails when the two differ.
const makeFlags = "-O3 -march=x86-64-v3"

// findRepo walks up from the working directory to kvnorm's go.mod.
func findRepo() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/kvnorm/kvnorm\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the kvnorm repository: pass -repo")
		}
		dir = parent
	}
}

func goLine(gomod string) (string, error) {
	b, err := os.ReadFile(gomod)
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "go "); ok {
			return strings.TrimSpace(v), nil
		}
	}
	return "", fmt.Errorf("%s has no go line", gomod)
}

func checkCompilers() error {
	for _, v := range []string{"CC", "CXX"} {
		out, err := exec.Command("go", "env", v).Output()
		if err != nil {
			return fmt.Errorf("go env %s: %w", v, err)
		}
		cc := strings.Fields(string(out))
		if len(cc) == 0 {
			return fmt.Errorf("%w: go env %s is empty", errUnavailable, v)
		}
		if _, err := exec.LookPath(cc[0]); err != nil {
			return fmt.Errorf("%w: no %s compiler %q: %v (Debian: apt-get install build-essential)", errUnavailable, v, cc[0], err)
		}
	}
	return nil
}

// checkHeaders preprocesses the two system headers Ollama's llama.cpp code
// includes.
func checkHeaders() error {
	out, _ := exec.Command("go", "env", "CXX").Output()
	cxx := strings.Fields(string(out))
	args := append(cxx[1:], "-E", "-x", "c++", "-o", os.DevNull, "-")
	cmd := exec.Command(cxx[0], args...)
	cmd.Stdin = strings.NewReader("#include <nlohmann/json.hpp>\n#include <stb/stb_image.h>\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%w: headers nlohmann/json.hpp and stb/stb_image.h (Debian: apt-get install nlohmann-json3-dev libstb-dev): %s",
			errUnavailable, firstLine(stderr.String()))
	}
	return nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

type modInfo struct {
	Dir, Version, Error string
}

func goModDownload(dir, mod string) (modInfo, error) {
	cmd := exec.Command("go", "mod", "download", "-json", mod)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var info modInfo
	if jerr := json.Unmarshal(stdout.Bytes(), &info); jerr != nil && err == nil {
		err = jerr
	}
	if err != nil || info.Error != "" || info.Dir == "" {
		return info, fmt.Errorf("%w: go mod download %s: %s%s", errUnavailable, mod, info.Error, firstLine(stderr.String()))
	}
	return info, nil
}

// moduleDir returns the module cache directory of the Ollama version kvnorm's
// go.mod pins.
func moduleDir(repo string) (string, string, error) {
	info, err := goModDownload(repo, ollamaModule)
	if err != nil {
		return "", "", err
	}
	return info.Dir, info.Version, nil
}

// miniaudio puts malgo's miniaudio.h where llama.cpp's mtmd includes it from
// ("miniaudio/miniaudio.h").
func miniaudio(repo, include string) error {
	info, err := goModDownload(repo, malgoModule)
	if err != nil {
		return err
	}
	dst := filepath.Join(include, "miniaudio", "miniaudio.h")
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return copyFile(filepath.Join(info.Dir, "miniaudio.h"), dst, 0o644)
}

// copySource copies the module to dst unless dst already holds this version.
func copySource(modDir, dst, version string) error {
	stamp := filepath.Join(dst, stampFile)
	want := modDir + "\n" + version + "\n"
	if b, err := os.ReadFile(stamp); err == nil && string(b) == want {
		return nil
	}
	if err := os.RemoveAll(dst); err != nil {
		return err
	}
	err := filepath.WalkDir(modDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(modDir, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type().IsRegular():
			info, err := d.Info()
			if err != nil {
				return err
			}
			return copyFile(path, target, 0o644|info.Mode().Perm()&0o111)
		}
		return nil // the module cache holds no symlinks; skip anything else
	})
	if err != nil {
		return fmt.Errorf("copy %s: %w", modDir, err)
	}
	return os.WriteFile(stamp, []byte(want), 0o644)
}

func copyFile(src, dst string, mode fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// patchedFiles lists the files patches change, once each, in order.
func patchedFiles() []string {
	var files []string
	for _, p := range patches {
		if !slices.Contains(files, p.file) {
			files = append(files, p.file)
		}
	}
	return files
}

// apply patches the pristine file from the module cache into the copy, every
// patch of the file in order, so that running the tool twice gives the same
// source.
func apply(modDir, src, file string) error {
	b, err := os.ReadFile(filepath.Join(modDir, file))
	if err != nil {
		return err
	}
	code := string(b)
	for _, p := range patches {
		if p.file != file {
			continue
		}
		if code, err = insert(code, p); err != nil {
			return err
		}
	}
	return os.WriteFile(filepath.Join(src, file), []byte(code), 0o644)
}

// insert adds p.insert after p.anchor, and the hook import unless the file
// already has it.
func insert(code string, p patch) (string, error) {
	if n := strings.Count(code, p.anchor); n != 1 {
		return "", fmt.Errorf("%s: the code kvnorm hooks after occurs %d times, want 1 (is this Ollama v0.24.0?):\n%s", p.file, n, p.anchor)
	}
	code = strings.Replace(code, p.anchor, p.anchor+p.insert, 1)
	if !strings.Contains(p.insert, "kvnormhook.") {
		// A fix of Ollama's that calls no kvnorm code needs no import.
		return code, nil
	}
	const imp = "import (\n"
	if !strings.Contains(code, imp) {
		return "", fmt.Errorf("%s: no import block", p.file)
	}
	if strings.Contains(code, imp+"\t"+hookImport+"\n") {
		return code, nil
	}
	return strings.Replace(code, imp, imp+"\t"+hookImport+"\n", 1), nil
}
