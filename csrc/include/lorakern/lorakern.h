/*
 * lorakern C ABI.
 *
 * Plain C, no torch: another inference stack can call the CPU kernels with raw
 * pointers. All tensors are dense, row-major and contiguous. The packed weight
 * layout is documented in docs/formats.md (the "canonical" layout).
 *
 * Every entry point validates its arguments and returns a status code; it never
 * aborts the process. Thread count 0 means "the OpenMP default".
 */
#ifndef LORAKERN_H_
#define LORAKERN_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define LK_API __declspec(dllexport)
#else
#define LK_API __attribute__((visibility("default")))
#endif

typedef enum {
  LK_OK = 0,
  LK_ERR_INVALID_ARG = 1, /* a null pointer, bad size, unsupported bits/group */
  LK_ERR_UNSUPPORTED = 2, /* the requested ISA is not supported by this CPU */
  LK_ERR_ALLOC = 3,       /* out of memory for a work buffer */
  LK_ERR_SLOT_RANGE = 4,  /* a batch names an adapter slot outside the bank's table */
  LK_ERR_SLOT_EMPTY = 5,  /* a batch names an empty slot (its adapter was removed) */
  LK_ERR_BAD_SLOT = 6,    /* a slot's fields are invalid or its rows / codes lie out of the slabs */
  LK_ERR_RANK = 7,        /* an adapter's rank exceeds the caller's max_rank */
  LK_ERR_INDEX = 8        /* an index (a token id) outside its table */
} lk_status;

typedef enum { LK_F32 = 0, LK_F16 = 1, LK_BF16 = 2 } lk_dtype;

/* CPU kernel paths, each a superset of the one before: AMX = the AVX-512 kernels with the blocked GEMM of many
 * activation rows on AMX-INT8 tiles (Sapphire Rapids and later; the OS must grant the tile state). */
typedef enum { LK_ISA_GENERIC = 0, LK_ISA_AVX2 = 1, LK_ISA_AVX512 = 2, LK_ISA_AMX = 3 } lk_isa;

/* A group-wise quantized weight W[N, K] in the canonical packed layout:
 * w[n, k] = scale[n, g] * (q[n, k] - zero[n, g]), g = k / group_size.
 * scales and zeros are IEEE fp16 bit patterns, shape [N, K / group_size]. */
typedef struct {
  const uint8_t* qweight;  /* [N, K * bits / 8] bytes */
  const uint16_t* scales;  /* fp16 [N, K / group_size] */
  const uint16_t* zeros;   /* fp16 [N, K / group_size] */
  int64_t N;
  int64_t K;
  int32_t bits;       /* 1, 2, 3, 4 or 8 (1: sign weights, see docs/formats.md) */
  int32_t group_size; /* 32, 64 or 128 */
} lk_qweight;

/* Sparse fp16 outliers of a W[N, K] in CSR (gwq_matmul), added to the dense
 * weight: W_eff[n, col[j]] += value[j] for row_ptr[n] <= j < row_ptr[n + 1].
 * row_ptr[0] = 0, non-decreasing, row_ptr[N] = nnz; columns < K <= 65536. */
typedef struct {
  const int32_t* row_ptr;  /* [N + 1] */
  const uint16_t* col_idx; /* [nnz] */
  const uint16_t* values;  /* fp16 [nnz] */
  int64_t nnz;
} lk_outliers;

/* A LoRAQuant-compressed LoRA adapter of a layer W[N, K] (docs/formats.md):
 * delta = scale * (A_hi^T B_hi + A_lo^T B_lo), i.e. y += scale * ((x A_hi^T) B_hi + (x A_lo^T) B_lo),
 * with A_hi [h, K] (2/3/4/8 bits), A_lo [r-h, K] (1 bit), groups along K; B_hi [h, N]
 * and B_lo [r-h, N] are B' transposed, groups along N. A part with 0 rows may have
 * null pointers. A_hi and A_lo share a group size, as do B_hi and B_lo. */
typedef struct {
  lk_qweight a_hi, b_hi, a_lo, b_lo;
  float scale;
} lk_lora;

/* One adapter of a multi-adapter bank for a layer W[N, K] (lk_lora_shrink / lk_lora_expand /
 * lk_multi_lora). Dense: A [rank, K] and B^T [rank, N], row-major, dtype fp32/fp16/bf16.
 * Compressed: the lk_lora parts (its scale field is not used; `scale` is). */
typedef enum { LK_SLOT_EMPTY = 0, LK_SLOT_DENSE = 1, LK_SLOT_COMPRESSED = 2 } lk_slot_kind;
typedef struct {
  int32_t kind;     /* lk_slot_kind */
  lk_dtype dtype;   /* dense: dtype of a and bt */
  int64_t rank;     /* dense: r (compressed: taken from q) */
  const void* a;    /* dense: A [rank, K] */
  const void* bt;   /* dense: B^T [rank, N] */
  lk_lora q;        /* compressed parts */
  float scale;      /* the adapter's scaling (alpha / r) */
} lk_lora_slot;

/* A layer's adapter bank in slab storage, as lorakern's Python side keeps it (lorakern.formats.bank:
 * BankView has these fields, in this order; the slot table's columns are lk_slot_column, its kinds
 * lk_slot_kind). Dense adapters occupy rows [row, row + rank) of a [dense_rows, K] and bt [dense_rows, N];
 * compressed ones h rows of K * bits_hi / 8 bytes then rank - h 1-bit rows of K / 8 bytes from qa + a_off
 * (B^T: N, from qb + b_off), and rows [row, row + rank) of the fp16 scale / zero slabs ([qrows, K / group_a]
 * and [qrows, N / group_b]). */
typedef enum {
  LK_SLOT_KIND = 0,    /* lk_slot_kind */
  LK_SLOT_RANK = 1,
  LK_SLOT_ROW = 2,     /* first row in the dense or the scale / zero slabs */
  LK_SLOT_H = 3,       /* compressed: high components */
  LK_SLOT_BITS_HI = 4, /* compressed: their bits (2, 3, 4, 8) */
  LK_SLOT_A_OFF = 5,   /* compressed: first byte in qa */
  LK_SLOT_B_OFF = 6,   /* compressed: first byte in qb */
  LK_SLOT_NUM_COLUMNS = 7
} lk_slot_column;
typedef struct {
  const int64_t* table; /* [num_slots, LK_SLOT_NUM_COLUMNS] */
  const float* scales;  /* [num_slots]: each adapter's alpha / r */
  int64_t num_slots;
  lk_dtype dtype;       /* of the dense slabs */
  int32_t group_a;      /* compressed A: group along K */
  int32_t group_b;      /* compressed B^T: group along N */
  const void* a;        /* dense A rows [dense_rows, K] */
  int64_t dense_rows;
  const void* bt;       /* dense B^T rows [dense_rows, N] */
  const uint8_t* qa;    /* compressed A codes */
  int64_t qa_bytes;
  const uint16_t* qa_scales; /* fp16 [qrows, K / group_a] */
  const uint16_t* qa_zeros;
  int64_t qrows;
  const uint8_t* qb;    /* compressed B^T codes */
  int64_t qb_bytes;
  const uint16_t* qb_scales; /* fp16 [qrows, N / group_b] */
  const uint16_t* qb_zeros;
} lk_bank;

/* A batch's mapping onto the bank, computed once per forward pass: entries (token,
 * weight) grouped by adapter into segments that partition [0, num_entries) in order.
 * A token with a k-way mixture has k entries; a token without adapter has none. */
typedef struct {
  const int64_t* segments; /* [num_segments, 3]: slot, first entry, number of entries */
  int64_t num_segments;
  const int64_t* tokens;   /* [num_entries]: row of x / y of each entry */
  const float* weights;    /* [num_entries]: the entry's mixing weight */
  int64_t num_entries;
} lk_lora_batch;

LK_API const char* lk_version(void);
LK_API const char* lk_status_string(lk_status s);
LK_API const char* lk_isa_name(lk_isa isa);

/* Best ISA this CPU (and OS) supports. */
LK_API lk_isa lk_detected_isa(void);
/* ISA the kernels use now: the detected one, or the one forced by the
 * LORAKERN_ISA environment variable (generic|avx2|avx512|amx) or lk_set_isa. */
LK_API lk_isa lk_active_isa(void);
/* Force an ISA path; LK_ERR_UNSUPPORTED if the CPU cannot run it. */
LK_API lk_status lk_set_isa(lk_isa isa);

/* y[M, N] = x[M, K] @ W^T (+ bias[N]).
 * x and y have dtype x_dtype; bias (nullable) is fp32.
 * Activations are quantized per (row, group) to int8 (symmetric, round half to
 * even), the products with the integer codes are exact int32 sums, and the
 * scales and zero points are applied in fp32 (docs/formats.md, "Numerics"). */
LK_API lk_status lk_quant_matmul(const void* x, lk_dtype x_dtype, int64_t M,
                                 const lk_qweight* w, const float* bias,
                                 void* y, int num_threads);

/* y[M, N] = x @ (W + outliers)^T (+ bias): lk_quant_matmul's dense pass and
 * each row's outliers in the same accumulator, one pass over the weights. The
 * outliers multiply the unquantized activations (fp32). A row pointer or column
 * out of range gives LK_ERR_INVALID_ARG (never an out-of-bounds read); y is then
 * unspecified. */
LK_API lk_status lk_gwq_matmul(const void* x, lk_dtype x_dtype, int64_t M,
                               const lk_qweight* w, const lk_outliers* outliers,
                               const float* bias, void* y, int num_threads);

/* y[M, N] = base[M, N] + the adapter's contribution (lk_lora): the shrink over
 * A_hi and A_lo in one pass on int8 activations (quantized as in lk_quant_matmul,
 * group size of A), an fp32 intermediate t[M, r], then the expand over B_hi and
 * B_lo dequantized in fp32 tiles. x, base and y have dtype x_dtype; base may be
 * y itself, or null for zero. */
LK_API lk_status lk_lora_mixed(const void* x, lk_dtype x_dtype, int64_t M, const lk_lora* lora,
                               const void* base, void* y, int num_threads);

/* y[M, N] = x @ W^T (+ bias) + the adapter's contribution: lk_quant_matmul and
 * lk_lora_mixed in one call (one parallel region; each thread adds the expand
 * into the output columns it has just computed). */
LK_API lk_status lk_quant_matmul_lora(const void* x, lk_dtype x_dtype, int64_t M,
                                      const lk_qweight* w, const float* bias,
                                      const lk_lora* lora, void* y, int num_threads);

/* Multi-adapter shrink: t[e, 0:r] = weight_e * scale_s * x[token_e] A_s^T for every entry e of every
 * segment (slot s, rank r; compressed: the high components, then the 1-bit ones, on int8 activations
 * as in lk_lora_mixed). t is fp32 [num_entries, ldt], ldt >= every used slot's rank; columns past a
 * segment's rank are left as they are. Every slot, segment and token index is checked first. */
LK_API lk_status lk_lora_shrink(const void* x, lk_dtype x_dtype, int64_t T, int64_t K,
                                const lk_lora_slot* slots, int64_t num_slots, const lk_lora_batch* batch,
                                float* t, int64_t ldt, int num_threads);

/* Multi-adapter expand: y[T, N] = base + sum over entries e of t[e, 0:r] B_s^T added to row token_e
 * (threads own column tiles, so k-way mixtures never race). base and y have dtype y_dtype; base may
 * be y or null (zero). */
LK_API lk_status lk_lora_expand(const float* t, int64_t ldt, const lk_lora_slot* slots, int64_t num_slots,
                                const lk_lora_batch* batch, lk_dtype y_dtype, int64_t T, int64_t N,
                                const void* base, void* y, int num_threads);

/* lk_lora_shrink then lk_lora_expand in one parallel region (the intermediate never leaves the call). */
LK_API lk_status lk_multi_lora(const void* x, lk_dtype x_dtype, int64_t T, int64_t K, int64_t N,
                               const lk_lora_slot* slots, int64_t num_slots, const lk_lora_batch* batch,
                               const void* base, void* y, int num_threads);

/* One output slice of lk_multi_lora_slices: its own bank (slots indexed by the batch's ids), its
 * width N and its first column in y. */
typedef struct {
  const lk_lora_slot* slots;
  int64_t num_slots;
  int64_t N;
  int64_t col;
} lk_lora_slice;

/* lk_multi_lora for several output slices of one input in one call (fused q/k/v of different widths,
 * as grouped-query attention has): y[:, col : col + N] = base[:, col : col + N] + slice's adapters,
 * base and y [T, ldy] of dtype x_dtype (base may be y or null). Every slice is checked first. */
LK_API lk_status lk_multi_lora_slices(const void* x, lk_dtype x_dtype, int64_t T, int64_t K,
                                      const lk_lora_slice* slices, int64_t num_slices,
                                      const lk_lora_batch* batch, int64_t ldy, const void* base, void* y,
                                      int num_threads);

/* The slots a batch's segments name, decoded from a bank of a layer W[N, K]: slots[s] for segment s
 * (num_segments of them), every field and offset checked against the slabs first. max_rank >= 0 also
 * checks every rank against it (LK_ERR_RANK). segments_out (nullable) receives the segments renumbered
 * to index `slots`, as lk_lora_shrink / lk_lora_expand / lk_multi_lora take them. On an error,
 * *failed (nullable) is the segment's slot id. */
LK_API lk_status lk_bank_resolve(const lk_bank* bank, int64_t N, int64_t K, const int64_t* segments,
                                 int64_t num_segments, int64_t max_rank, lk_lora_slot* slots,
                                 int64_t* segments_out, int64_t* failed);

/* Top-k routing of a mixture (MoLA): per token t, softmax over logits[t, 0:E] (fp32 [T, E], row-major),
 * the k largest (ties to the lower expert) with their probabilities renormalised to sum 1. Writes the
 * entries grouped by expert as the multi-adapter kernels take them: segments int64 [E, 3] (expert,
 * first entry, count; empty experts included), tokens int64 [T*k] (ascending within an expert) and
 * weights fp32 [T*k]. Non-finite logits or 1 <= k <= E violated: LK_ERR_INVALID_ARG. */
LK_API lk_status lk_route_top_k(const float* logits, int64_t T, int64_t E, int64_t k, int64_t* segments,
                                int64_t* tokens, float* weights);

/* dx[M, K] = dy[M, N] @ (W + outliers): the gradient of lk_quant_matmul / lk_gwq_matmul with respect to
 * x (training an adapter on a quantized base). W is the exact dequantized weight (the activations'
 * int8 rounding in the forward pass is passed straight through), dequantized in fp32 tiles, never whole.
 * dy and dx have dtype dy_dtype; outliers (nullable) are validated whole first (LK_ERR_INVALID_ARG). */
LK_API lk_status lk_quant_matmul_grad_input(const void* dy, lk_dtype dy_dtype, int64_t M,
                                            const lk_qweight* w, const lk_outliers* outliers, void* dx,
                                            int num_threads);

/* A QA-LoRA adapter (arXiv 2309.14717) of a layer W[N, K] quantized in groups of G along K: its input is
 * x average-pooled over those groups. a: fp32 A [rank, K / G]; bt: fp32 B^T [rank, N]; both row-major. */
typedef struct {
  const float* a;
  const float* bt;
  int64_t rank;
  float scale; /* alpha / rank */
} lk_qalora;

/* y[M, N] = x @ W^T (+ bias) + scale * (pool_G(x) A^T) B^T in one call (unmerged QA-LoRA decode). The
 * pooled input is the per-group mean of the int8-quantized activations the base pass uses, so the result
 * equals the merged layer (zeros z - scale * (B A) / (G s)) before the merged zeros' fp16 rounding. */
LK_API lk_status lk_quant_matmul_qalora(const void* x, lk_dtype x_dtype, int64_t M, const lk_qweight* w,
                                        const float* bias, const lk_qalora* adapter, void* y,
                                        int num_threads);

/* out[N, K] (fp32) = dequantized W. */
LK_API lk_status lk_dequantize(const lk_qweight* w, float* out, int num_threads);

/* One decoder layer of a Llama-family model for decoding (lk_decoder_layer_step): pre-norm RMSNorm, attention with
 * rotary embeddings (transformers' rotate_half convention) and grouped KV heads, residual, RMSNorm, gated SiLU MLP,
 * residual. The projections are quantized weights, q/k/v stacked row-wise in one weight and gate/up in another
 * (lorakern.models.fuse_projections). Outliers with row_ptr NULL and biases NULL mean none. */
typedef enum {
  LK_PROJ_Q = 0, LK_PROJ_K = 1, LK_PROJ_V = 2, LK_PROJ_O = 3, LK_PROJ_GATE = 4, LK_PROJ_UP = 5, LK_PROJ_DOWN = 6,
  LK_NUM_PROJ = 7
} lk_projection; /* the projections of a decoder layer that may carry adapters (lk_decoder_layer.adapters) */
typedef struct {
  int64_t hidden, n_heads, n_kv_heads, head_dim, intermediate;
  float rms_eps;             /* RMSNorm: x / sqrt(mean(x^2) + eps) * weight */
  float attn_scale;          /* softmax scale of q . k (1 / sqrt(head_dim) in Llama) */
  const float* input_norm;   /* [hidden] */
  const float* post_norm;    /* [hidden] */
  lk_qweight qkv;            /* [(n_heads + 2 n_kv_heads) head_dim, hidden]: the q rows, the k rows, the v rows */
  lk_qweight o;              /* [hidden, n_heads head_dim] */
  lk_qweight gate_up;        /* [2 intermediate, hidden]: the gate rows, then the up rows */
  lk_qweight down;           /* [hidden, intermediate] */
  lk_outliers qkv_outliers, o_outliers, gate_up_outliers, down_outliers;
  const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias; /* fp32 [N] */
  lk_bank adapters[7];       /* each projection's adapter bank, indexed by lk_projection (a table NULL with
                                num_slots 0: that projection has none); applied as lk_multi_lora to the tokens
                                of the step's lk_lora_batch */
} lk_decoder_layer;

/* y[B, hidden] = the layer applied to x[B, hidden] (fp32), one new token for each of B sequences, all at cache
 * position pos. Its keys and values are written to k_cache / v_cache [B, n_kv_heads, max_len, head_dim] (fp32) at
 * pos, and each sequence attends to the cached positions j <= pos with key_mask[b * max_len + j] != 0 (key_mask
 * NULL: all of them). cos / sin [B, head_dim]: the rotary embedding of each sequence's position. A sequence with no
 * position to attend to gets a zero attention output. batch (nullable): which adapters of the layer's banks each
 * sequence uses (segments name bank slots, tokens are rows of x), added to each projection's output as
 * lk_multi_lora does; its slots and entries are checked before anything is written (LK_ERR_SLOT_RANGE,
 * LK_ERR_SLOT_EMPTY, LK_ERR_BAD_SLOT, LK_ERR_INVALID_ARG). */
LK_API lk_status lk_decoder_layer_step(const lk_decoder_layer* layer, const float* x, int64_t B, const float* cos,
                                       const float* sin, int64_t pos, float* k_cache, float* v_cache,
                                       int64_t max_len, const uint8_t* key_mask, const lk_lora_batch* batch,
                                       float* y, int num_threads);

/* A Llama-family model's decoder stack for decode steps (lk_decoder_stack_step): its layers in order, and what
 * surrounds them where the step should include it (NULL: the caller does it). */
typedef struct {
  const lk_decoder_layer* const* layers; /* [n_layers]; every layer has the first one's hidden and head_dim */
  int64_t n_layers;
  const lk_qweight* embed;     /* [vocab, hidden] token embedding table: the step looks the tokens up; NULL: x given */
  const float* rope_inv_freq;  /* [head_dim / 2]: cos / sin of each position computed as transformers' default,
                                  linear and llama3 rotary embeddings do (fp32 pos * inv_freq, duplicated halves,
                                  times rope_scaling); NULL: cos / sin given */
  float rope_scaling;          /* transformers' attention_scaling */
  const float* final_norm;     /* [hidden]: the model's final RMSNorm; NULL: none */
  float final_eps;
  const lk_qweight* head;      /* [vocab, hidden]: the output head applied after the final norm; NULL: none */
  const float* head_bias;      /* [vocab] or NULL */
} lk_decoder_stack;

/* One decode step of B sequences through the stack: the input x[B, hidden] (fp32), or, with x NULL, the rows of
 * ids[B] in stack->embed, goes through every layer as lk_decoder_layer_step, then the final norm, then the head,
 * into y: [B, vocab] with a head, else [B, hidden]. cos / sin [B, head_dim] (fp32) are the rotary embedding of
 * each sequence's position, or, with rope_inv_freq, computed from positions[B] (int64; NULL: every sequence at
 * pos). Layer i caches its keys and values in k_caches[i] / v_caches[i] [B, n_kv_heads_i, max_len, head_dim]
 * (fp32); lengths[i] points to layer i's count of cached positions (transformers' StaticLayer.cumulative_length,
 * int64): every count must be the same pos < max_len; the new keys and values go to pos and each count is
 * incremented once after every layer succeeded. key_mask [B, max_len] (1 = attend; NULL: all) as in
 * lk_decoder_layer_step. Arguments are checked before anything is written: LK_ERR_INVALID_ARG (shapes, pointers,
 * counts out of step), LK_ERR_INDEX (a token id outside [0, vocab)). An error inside a layer (a damaged outlier
 * CSR, LK_ERR_ALLOC) can leave earlier layers' keys and values at pos and part of y written; no count advances
 * then. B = 0 writes nothing and advances nothing. y may not overlap x. batch (nullable): the sequences' adapters,
 * as in lk_decoder_layer_step, for every layer (checked against every layer's banks before anything is written). */
LK_API lk_status lk_decoder_stack_step(const lk_decoder_stack* stack, int64_t B, const int64_t* ids, const float* x,
                                       const int64_t* positions, const float* cos, const float* sin,
                                       int64_t* const* lengths, float* const* k_caches, float* const* v_caches,
                                       int64_t max_len, const uint8_t* key_mask, const lk_lora_batch* batch,
                                       float* y, int num_threads);

#ifdef __cplusplus
}
#endif
#endif /* LORAKERN_H_ */
