package llamacpp

// LogLevel filters what llama.cpp prints on stderr (the values of enum
// ggml_log_level).
type LogLevel int

const (
	LogDebug LogLevel = 1
	LogInfo  LogLevel = 2
	LogWarn  LogLevel = 3
	LogError LogLevel = 4 // the default: errors only
	LogNone  LogLevel = 100
)
