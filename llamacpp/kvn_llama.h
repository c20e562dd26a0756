// kvn_llama.h: kvnorm's own declarations of the part of the llama.cpp and
// ggml C ABI that package llamacpp calls, so the package builds with a plain
// `go build` (no llama.h on the include path, nothing generated in kvnorm's
// tree). They describe the llama.cpp that the package links: the one vendored
// by the pinned Ollama module (github.com/ollama/ollama v0.24.0), compiled by
// cgo through the blank imports in cgo.go.
//
// abi_test.go compiles this file against that module's llama.h, ggml.h and
// ggml-backend.h with KVN_ABI_CHECK defined: every prototype below must then
// agree with the real one (the compiler rejects a conflicting redeclaration),
// and every struct field offset, struct size and enum value is compared with
// _Static_assert. A llama.cpp update that changes any of them fails that test.
#ifndef KVN_LLAMA_H
#define KVN_LLAMA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// KVN_TAG names kvnorm's copy of a struct: the struct itself in a build, a
// twin (kvn_abi_<name>) compared with the real one in the ABI check.
#ifdef KVN_ABI_CHECK
#define KVN_TAG(name) kvn_abi_##name
#else
#define KVN_TAG(name) name
#endif

// The enum members the package uses, as X(name, value).
#define KVN_GGML_TYPES(X)                                                                    \
	X(GGML_TYPE_F32, 0) X(GGML_TYPE_F16, 1) X(GGML_TYPE_Q4_0, 2) X(GGML_TYPE_Q8_0, 8)         \
	X(GGML_TYPE_I32, 26) X(GGML_TYPE_I64, 27) X(GGML_TYPE_BF16, 30)
#define KVN_GGML_OPS(X) X(GGML_OP_SET_ROWS, 42) X(GGML_OP_SOFT_MAX, 46) X(GGML_OP_ROPE, 48)
#define KVN_GGML_LOG_LEVELS(X)                                                               \
	X(GGML_LOG_LEVEL_NONE, 0) X(GGML_LOG_LEVEL_DEBUG, 1) X(GGML_LOG_LEVEL_INFO, 2)            \
	X(GGML_LOG_LEVEL_WARN, 3) X(GGML_LOG_LEVEL_ERROR, 4) X(GGML_LOG_LEVEL_CONT, 5)
#define KVN_ROPE_TYPES(X)                                                                    \
	X(LLAMA_ROPE_TYPE_NONE, -1) X(LLAMA_ROPE_TYPE_NORM, 0) X(LLAMA_ROPE_TYPE_MROPE, 8)         \
	X(LLAMA_ROPE_TYPE_IMROPE, 40)
#define KVN_FLASH_ATTN_TYPES(X)                                                              \
	X(LLAMA_FLASH_ATTN_TYPE_AUTO, -1) X(LLAMA_FLASH_ATTN_TYPE_DISABLED, 0)                    \
	X(LLAMA_FLASH_ATTN_TYPE_ENABLED, 1)

#ifndef KVN_ABI_CHECK
#define KVN_ENUM_MEMBER(name, value) name = value,

// The members listed above; every other member keeps its value in llama.cpp.
// An enum with no negative member is an unsigned int to gcc and clang, as the
// real ggml_type, ggml_op and ggml_log_level are.
enum ggml_type { KVN_GGML_TYPES(KVN_ENUM_MEMBER) };
enum ggml_op { KVN_GGML_OPS(KVN_ENUM_MEMBER) };
enum ggml_log_level { KVN_GGML_LOG_LEVELS(KVN_ENUM_MEMBER) };
enum llama_flash_attn_type { KVN_FLASH_ATTN_TYPES(KVN_ENUM_MEMBER) };
enum llama_rope_type { KVN_ROPE_TYPES(KVN_ENUM_MEMBER) };

typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;

struct ggml_tensor;
struct llama_model;
struct llama_context;
struct llama_vocab;
struct llama_memory_i;
struct ggml_backend_device;
struct ggml_backend_buffer;
struct llama_model_tensor_buft_override;
struct llama_model_kv_override;

typedef struct llama_memory_i *llama_memory_t;
typedef struct ggml_backend_device *ggml_backend_dev_t;
typedef bool (*llama_progress_callback)(float progress, void *user_data);
typedef bool (*ggml_abort_callback)(void *data);
typedef void (*ggml_log_callback)(enum ggml_log_level level, const char *text, void *user_data);
typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor *t, bool ask, void *user_data);
#endif

// struct ggml_tensor (ggml.h): the callback reads type, ne, op, src and name.
struct KVN_TAG(ggml_tensor) {
	enum ggml_type type;
	struct ggml_backend_buffer *buffer;
	int64_t ne[4];
	size_t nb[4];
	enum ggml_op op;
	int32_t op_params[16];
	int32_t flags;
	struct ggml_tensor *src[10];
	struct ggml_tensor *view_src;
	size_t view_offs;
	void *data;
	char name[64];
	void *extra;
	char padding[8];
};

typedef struct KVN_TAG(llama_batch) {
	int32_t n_tokens;
	llama_token *token;
	float *embd;
	llama_pos *pos;
	int32_t *n_seq_id;
	llama_seq_id **seq_id;
	int8_t *logits;
} KVN_TAG(llama_batch);

struct KVN_TAG(llama_model_params) {
	ggml_backend_dev_t *devices;
	const struct llama_model_tensor_buft_override *tensor_buft_overrides;
	int32_t n_gpu_layers;
	int32_t split_mode; // enum llama_split_mode
	int32_t main_gpu;
	const float *tensor_split;
	llama_progress_callback progress_callback;
	void *progress_callback_user_data;
	const struct llama_model_kv_override *kv_overrides;
	bool vocab_only;
	bool use_mmap;
	bool use_mlock;
	bool check_tensors;
	bool use_extra_bufts;
	bool no_host;
	bool no_alloc;
};

struct KVN_TAG(llama_context_params) {
	uint32_t n_ctx;
	uint32_t n_batch;
	uint32_t n_ubatch;
	uint32_t n_seq_max;
	int32_t n_threads;
	int32_t n_threads_batch;
	int32_t rope_scaling_type; // enum llama_rope_scaling_type
	int32_t pooling_type;      // enum llama_pooling_type
	int32_t attention_type;    // enum llama_attention_type
	enum llama_flash_attn_type flash_attn_type;
	float rope_freq_base;
	float rope_freq_scale;
	float yarn_ext_factor;
	float yarn_attn_factor;
	float yarn_beta_fast;
	float yarn_beta_slow;
	uint32_t yarn_orig_ctx;
	float defrag_thold;
	ggml_backend_sched_eval_callback cb_eval;
	void *cb_eval_user_data;
	enum ggml_type type_k;
	enum ggml_type type_v;
	ggml_abort_callback abort_callback;
	void *abort_callback_data;
	bool embeddings;
	bool offload_kqv;
	bool no_perf;
	bool op_offload;
	bool swa_full;
	bool kv_unified;
};

// ggml.h, ggml-backend.h
int64_t ggml_nelements(const struct ggml_tensor *tensor);
size_t ggml_nbytes(const struct ggml_tensor *tensor);
size_t ggml_row_size(enum ggml_type type, int64_t ne);
bool ggml_is_contiguous(const struct ggml_tensor *tensor);
void ggml_backend_tensor_get(const struct ggml_tensor *tensor, void *data, size_t offset, size_t size);

// llama.h: initialisation and models
void llama_backend_init(void);
void llama_log_set(ggml_log_callback log_callback, void *user_data);
struct llama_model_params llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_model *llama_model_load_from_file(const char *path_model, struct llama_model_params params);
void llama_model_free(struct llama_model *model);
struct llama_context *llama_init_from_model(struct llama_model *model, struct llama_context_params params);
void llama_free(struct llama_context *ctx);
int32_t llama_model_desc(const struct llama_model *model, char *buf, size_t buf_size);
int32_t llama_model_meta_val_str(const struct llama_model *model, const char *key, char *buf, size_t buf_size);
int32_t llama_model_n_ctx_train(const struct llama_model *model);
int32_t llama_model_n_embd(const struct llama_model *model);
int32_t llama_model_n_layer(const struct llama_model *model);
int32_t llama_model_n_head(const struct llama_model *model);
int32_t llama_model_n_head_kv(const struct llama_model *model);
int32_t llama_model_n_swa(const struct llama_model *model);
bool llama_model_is_recurrent(const struct llama_model *model);
enum llama_rope_type llama_model_rope_type(const struct llama_model *model);
bool llama_model_is_hybrid(const struct llama_model *model);
const struct llama_vocab *llama_model_get_vocab(const struct llama_model *model);

// llama.h: contexts, batches, decoding
uint32_t llama_n_ctx(const struct llama_context *ctx);
uint32_t llama_n_ctx_seq(const struct llama_context *ctx);
uint32_t llama_n_batch(const struct llama_context *ctx);
uint32_t llama_n_ubatch(const struct llama_context *ctx);
const struct llama_model *llama_get_model(const struct llama_context *ctx);
llama_memory_t llama_get_memory(const struct llama_context *ctx);
struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
void llama_batch_free(struct llama_batch batch);
int32_t llama_decode(struct llama_context *ctx, struct llama_batch batch);
float *llama_get_logits_ith(struct llama_context *ctx, int32_t i);

// llama.h: memory and sequence state
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
size_t llama_state_seq_get_size(struct llama_context *ctx, llama_seq_id seq_id);
size_t llama_state_seq_get_data(struct llama_context *ctx, uint8_t *dst, size_t size, llama_seq_id seq_id);
size_t llama_state_seq_set_data(struct llama_context *ctx, const uint8_t *src, size_t size, llama_seq_id dest_seq_id);

// llama.h: vocabulary
int32_t llama_vocab_n_tokens(const struct llama_vocab *vocab);
llama_token llama_vocab_bos(const struct llama_vocab *vocab);
llama_token llama_vocab_eos(const struct llama_vocab *vocab);
bool llama_vocab_get_add_bos(const struct llama_vocab *vocab);
bool llama_vocab_is_eog(const struct llama_vocab *vocab, llama_token token);
int32_t llama_tokenize(const struct llama_vocab *vocab, const char *text, int32_t text_len, llama_token *tokens,
                       int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab *vocab, llama_token token, char *buf, int32_t length,
                             int32_t lstrip, bool special);
int32_t llama_detokenize(const struct llama_vocab *vocab, const llama_token *tokens, int32_t n_tokens, char *text,
                         int32_t text_len_max, bool remove_special, bool unparse_special);

#ifdef KVN_ABI_CHECK
#define KVN_ENUM_CHECK(name, value) _Static_assert(name == value, "kvn_llama.h: " #name " is not " #value);
KVN_GGML_TYPES(KVN_ENUM_CHECK)
KVN_GGML_OPS(KVN_ENUM_CHECK)
KVN_GGML_LOG_LEVELS(KVN_ENUM_CHECK)
KVN_FLASH_ATTN_TYPES(KVN_ENUM_CHECK)
KVN_ROPE_TYPES(KVN_ENUM_CHECK)

#define KVN_SAME_SIZE(s) _Static_assert(sizeof(struct s) == sizeof(struct kvn_abi_##s), "kvn_llama.h: size of struct " #s);
#define KVN_SAME_FIELD(s, f)                                                                             \
	_Static_assert(offsetof(struct s, f) == offsetof(struct kvn_abi_##s, f) &&                       \
	                   sizeof(((struct s *)0)->f) == sizeof(((struct kvn_abi_##s *)0)->f),           \
	               "kvn_llama.h: struct " #s " field " #f);
KVN_SAME_SIZE(ggml_tensor)
KVN_SAME_FIELD(ggml_tensor, type)
KVN_SAME_FIELD(ggml_tensor, ne)
KVN_SAME_FIELD(ggml_tensor, nb)
KVN_SAME_FIELD(ggml_tensor, op)
KVN_SAME_FIELD(ggml_tensor, src)
KVN_SAME_FIELD(ggml_tensor, name)
KVN_SAME_SIZE(llama_batch)
KVN_SAME_FIELD(llama_batch, n_tokens)
KVN_SAME_FIELD(llama_batch, token)
KVN_SAME_FIELD(llama_batch, embd)
KVN_SAME_FIELD(llama_batch, pos)
KVN_SAME_FIELD(llama_batch, n_seq_id)
KVN_SAME_FIELD(llama_batch, seq_id)
KVN_SAME_FIELD(llama_batch, logits)
KVN_SAME_SIZE(llama_model_params)
KVN_SAME_FIELD(llama_model_params, devices)
KVN_SAME_FIELD(llama_model_params, n_gpu_layers)
KVN_SAME_FIELD(llama_model_params, split_mode)
KVN_SAME_FIELD(llama_model_params, main_gpu)
KVN_SAME_FIELD(llama_model_params, tensor_split)
KVN_SAME_FIELD(llama_model_params, progress_callback)
KVN_SAME_FIELD(llama_model_params, kv_overrides)
KVN_SAME_FIELD(llama_model_params, vocab_only)
KVN_SAME_FIELD(llama_model_params, use_mmap)
KVN_SAME_FIELD(llama_model_params, use_mlock)
KVN_SAME_FIELD(llama_model_params, check_tensors)
KVN_SAME_FIELD(llama_model_params, no_alloc)
KVN_SAME_SIZE(llama_context_params)
KVN_SAME_FIELD(llama_context_params, n_ctx)
KVN_SAME_FIELD(llama_context_params, n_batch)
KVN_SAME_FIELD(llama_context_params, n_ubatch)
KVN_SAME_FIELD(llama_context_params, n_seq_max)
KVN_SAME_FIELD(llama_context_params, n_threads)
KVN_SAME_FIELD(llama_context_params, n_threads_batch)
KVN_SAME_FIELD(llama_context_params, flash_attn_type)
KVN_SAME_FIELD(llama_context_params, rope_freq_base)
KVN_SAME_FIELD(llama_context_params, yarn_orig_ctx)
KVN_SAME_FIELD(llama_context_params, defrag_thold)
KVN_SAME_FIELD(llama_context_params, cb_eval)
KVN_SAME_FIELD(llama_context_params, cb_eval_user_data)
KVN_SAME_FIELD(llama_context_params, type_k)
KVN_SAME_FIELD(llama_context_params, type_v)
KVN_SAME_FIELD(llama_context_params, abort_callback)
KVN_SAME_FIELD(llama_context_params, embeddings)
KVN_SAME_FIELD(llama_context_params, offload_kqv)
KVN_SAME_FIELD(llama_context_params, no_perf)
KVN_SAME_FIELD(llama_context_params, op_offload)
KVN_SAME_FIELD(llama_context_params, swa_full)
KVN_SAME_FIELD(llama_context_params, kv_unified)
#endif

#endif
