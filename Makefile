# kvnorm build and test entry points. `make demo` and `make test` are what a
# new user runs; see README.md.

GO        ?= go
BIN       := bin
OLLAMA_MOD := github.com/ollama/ollama
# llamacpp/ needs no headers: it declares the llama.cpp functions it calls in
# llamacpp/kvn_llama.h and cgo compiles llama.cpp from the pinned Ollama
# module in the Go module cache. `headers` only downloads that module.

# ggml's CPU code gets no SIMD from a plain cgo build (only -O2): its dot
# products compile to scalar loops and its fast matmul kernels drop out. On an
# x86-64 CPU with AVX2+FMA+F16C we build every cgo package (llama.cpp, ggml and
# the Ollama fork) for x86-64-v3; the binaries then need such a CPU. -O3, not
# Go's default -O2: ggml's C++ (ops, llamafile's tinyBLAS matmuls) gets no -O
# of its own, and at -O2 a 512-token prefill of the Llama-3.2-1B shape took
# 28.2 s against 7.7 s at -O3 (same machine, same binary otherwise). Override
# with `make CGO_CFLAGS=-O2 CGO_CXXFLAGS=-O2` for a portable build.
ifeq ($(shell uname -m),x86_64)
ifneq ($(shell grep -m1 -o -w avx2 /proc/cpuinfo 2>/dev/null),)
CGO_CFLAGS   ?= -O3 -march=x86-64-v3
CGO_CXXFLAGS ?= -O3 -march=x86-64-v3
export CGO_CFLAGS CGO_CXXFLAGS
endif
endif

.PHONY: all build headers libllama fresh-module examples test test-race test-short test-kernels vet fmt-check demo bench clean ollama ollama-or-skip

all: build

headers:
	$(GO) mod download $(OLLAMA_MOD)

# A libllama.so (llama.cpp + ggml's CPU backend) built from the same pinned
# sources, for the tests of llamacpp/libllama (an app that loads llama.cpp at
# run time). Objects are cached under $(LIBLLAMA)/obj.
LIBLLAMA ?= build/libllama

libllama: headers
	./llamacpp/libllama/build-so.sh "$$($(GO) list -m -f '{{.Dir}}' $(OLLAMA_MOD))" $(LIBLLAMA)

# A new module that requires kvnorm (a read-only clone of HEAD, as go get
# gives) and imports llamacpp builds with plain `go build`.
fresh-module:
	./llamacpp/internal/freshmodule.sh

# The yzma example, a module of its own (kvnorm's go.mod does not need yzma).
# It builds; it cannot run against the pinned llama.cpp (README: "Add kvnorm
# to your Go app" lists the functions yzma v1.32.0 needs that it lacks).
examples:
	cd examples/yzma && $(GO) vet . && CGO_ENABLED=0 $(GO) build -o /dev/null .

build: headers
	$(GO) build -o $(BIN)/kvnorm ./cmd/kvnorm

# The README's test command: everything CI checks.
test: headers vet fmt-check test-kernels ollama-or-skip libllama
	KVNORM_REQUIRE_LIBLLAMA=1 $(GO) test -count=1 ./...
	CGO_ENABLED=0 $(GO) test -count=1 ./llamacpp/libllama/ ./llamacpp/statemode/
	$(GO) test -count=1 -race ./adapter/... ./hooks/...

# The race detector over the runtimes (not in CI: a -race build recompiles
# llama.cpp and ggml with ThreadSanitizer). Measured on 2 cores, 2026-12-02:
# with the race build of llama.cpp/ggml already in Go's build cache, 214 s
# (llamacpp 60 s, ollama 75 s, ollama/fork 66 s); the cold build of those
# packages alone ran over 35 minutes beside other builds (load 8-12) and was
# not timed to its end. KVNORM_SOAK=N lengthens the soak tests.
test-race: headers
	$(GO) test -count=1 -race -timeout 60m ./llamacpp/... ./ollama/...

# kvnorm's Ollama: Ollama v0.24.0 copied to $(OLLAMA_FORK)/src with kvnorm's
# four hook calls inserted (see ollama/fork), built into $(BIN)/ollama.
OLLAMA_FORK ?= build/ollama-fork

ollama:
	$(GO) build -o $(BIN)/ollama-fork ./ollama/fork
	./$(BIN)/ollama-fork -out $(OLLAMA_FORK) -bin $(BIN)/ollama

# For `make test`: a missing prerequisite (exit status 2, reason in
# $(OLLAMA_FORK)/unavailable.txt) lets the fork's integration test skip;
# any other build failure fails.
ollama-or-skip:
	$(GO) build -o $(BIN)/ollama-fork ./ollama/fork
	@./$(BIN)/ollama-fork -out $(OLLAMA_FORK) -bin $(BIN)/ollama; rc=$$?; \
	if [ $$rc -eq 2 ]; then echo "bin/ollama cannot be built here: its integration test will skip"; \
	elif [ $$rc -ne 0 ]; then exit $$rc; fi

test-kernels:
	$(GO) test -count=1 -tags noasm ./kernels/...
	$(GO) test -count=1 -tags purego ./kernels/...
	GODEBUG=cpu.avx2=off $(GO) test -count=1 ./kernels/...
	GOARCH=arm64 $(GO) vet ./kernels/... ./hooks/... ./adapter/... ./llamacpp/...

vet: headers
	$(GO) vet ./...
	CGO_ENABLED=0 $(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go') 2>/dev/null); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

demo: build
	./$(BIN)/kvnorm demo

bench: build
	./$(BIN)/kvnorm bench kernels

clean:
	rm -rf $(BIN) $(LIBLLAMA)
