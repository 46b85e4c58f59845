// Internal: the per-ISA pieces of the multi-adapter kernels (multi_lora.cpp drives them).
#pragma once
#include <cstdint>

#include "common.h"
#include "lorakern/lorakern.h"

namespace lk {

// Dense shrink of one segment's rows [i0, i1) of A: t[e * ldt + i] = coef[e] * (x[e] . A[i]),
// x[e]: the segment's fp32 activation rows (K values each).
struct DenseShrink {
  const float* const* x;
  int64_t count, K;
  const void* a;  // [rank, K] of dtype
  lk_dtype dtype;
  const float* coef;  // [count]: weight * scale
  float* t;
  int64_t ldt;
};

// The expand of every segment into output columns [c0, c1) of y32 [T, N] (already holding the base).
struct MultiExpand {
  const lk_lora_slot* slots;
  const lk_lora_batch* batch;
  const float* t;
  int64_t ldt, N;
  float* y32;
  int64_t ldy;  // row stride of y32 (>= N)
};

// A batch's entries partition [0, num_entries) in segment order (segments [slot, first, count]) and name rows
// [0, T) of the activations: LK_OK or LK_ERR_INVALID_ARG (the slots are checked against their bank elsewhere).
lk_status check_batch_entries(const lk_lora_batch* b, int64_t T);

constexpr int64_t kExpandTile = 128;  // output columns per expand tile (a multiple of every group size)

// The expand of one compressed part into one output row's columns [c0, c1), from the codes in registers
// (AVX2; the AVX-512 path uses it too), for the layouts qpart_layout_avx2 accepts.
bool qpart_layout_avx2(int bits, int G, int64_t c0, int64_t c1, int64_t rows);
void axpy_qpart_avx2(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1);

void dense_shrink_generic(const DenseShrink& p, int64_t i0, int64_t i1);
void dense_shrink_avx2(const DenseShrink& p, int64_t i0, int64_t i1);
void dense_shrink_avx512(const DenseShrink& p, int64_t i0, int64_t i1);
void multi_expand_generic(const MultiExpand& e, int64_t c0, int64_t c1);
void multi_expand_avx2(const MultiExpand& e, int64_t c0, int64_t c1);
void multi_expand_avx512(const MultiExpand& e, int64_t c0, int64_t c1);

}  // namespace lk
