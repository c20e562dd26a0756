//go:build cgo

package llamacpp

/*
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kvn_llama.h"

static int kvn_log_min = GGML_LOG_LEVEL_ERROR;
static int kvn_log_last = GGML_LOG_LEVEL_INFO;

static void kvn_log(enum ggml_log_level level, const char *text, void *user_data) {
	(void)user_data;
	int l = level == GGML_LOG_LEVEL_CONT ? kvn_log_last : (int)level;
	kvn_log_last = l;
	if (l >= kvn_log_min) {
		fputs(text, stderr);
	}
}

static void kvn_init_log(void) { llama_log_set(kvn_log, NULL); }

// LogLevel in log.go mirrors enum ggml_log_level.
_Static_assert(GGML_LOG_LEVEL_DEBUG == 1 && GGML_LOG_LEVEL_INFO == 2 && GGML_LOG_LEVEL_WARN == 3 && GGML_LOG_LEVEL_ERROR == 4, "kvnorm/llamacpp: ggml_log_level changed: update log.go");

*/
import "C"

import (
	"sync"

	// libllama and ggml's CPU backend, compiled by cgo from the pinned
	// Ollama module (see the Makefile's headers target).
	_ "github.com/ollama/ollama/llama/llama.cpp/src"
	_ "github.com/ollama/ollama/ml/backend/ggml/ggml/src"
)

var backendOnce sync.Once

// initBackend initialises llama.cpp once per process and routes its logs
// through SetLogLevel's filter.
func initBackend() {
	backendOnce.Do(func() {
		C.kvn_init_log()
		C.llama_backend_init()
	})
}

// SetLogLevel makes llama.cpp print messages of level l and above on stderr
// (the default prints errors only). Call it before opening a model.
func SetLogLevel(l LogLevel) {
	initBackend()
	C.kvn_log_min = C.int(l)
}
