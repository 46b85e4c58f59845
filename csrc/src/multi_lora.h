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

// Prefetch hints for a compressed part's rows [r0, r1) over columns [c0, c1) (their codes, scales and zeros,
// whole groups). The multi-adapter kernels read many small adapters, each from its own place in the bank and
// each as a dozen short row streams (plus their scales and zeros): more streams than the hardware prefetchers
// follow, so without hints every row starts with a miss to memory, one after another.
inline void prefetch_part(const lk_qweight& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  if (!p.N || r1 <= r0 || c1 <= c0) return;
  const int G = p.group_size;
  const int64_t rb = row_bytes(p.K, p.bits), ng = p.K / G, gb = group_bytes(G, p.bits);
  const int64_t g0 = c0 / G, g1 = (c1 + G - 1) / G;
  const auto lines = [](const void* base, int64_t b0, int64_t b1) {
    const char* c = static_cast<const char*>(base);
    for (int64_t o = b0 & ~int64_t(63); o < b1; o += 64) __builtin_prefetch(c + o, 0, 3);
  };
  if (g0 == 0 && g1 == ng) {  // whole rows: one contiguous run each
    lines(p.qweight, r0 * rb, r1 * rb);
    lines(p.scales, r0 * ng * 2, r1 * ng * 2);
    lines(p.zeros, r0 * ng * 2, r1 * ng * 2);
    return;
  }
  for (int64_t i = r0; i < r1; ++i) {
    lines(p.qweight, i * rb + g0 * gb, i * rb + g1 * gb);
    lines(p.scales, (i * ng + g0) * 2, (i * ng + g1) * 2);
    lines(p.zeros, (i * ng + g0) * 2, (i * ng + g1) * 2);
  }
}

constexpr int64_t kExpandTile = 128;  // output columns per expand tile (a multiple of every group size)

// The expand of one compressed part into one output row's columns [c0, c1), from the codes in registers
// (AVX2; the AVX-512 path uses it for 3-bit parts, 2-bit parts in groups of 32 and partial groups), for the
// layouts qpart_layout_avx2 accepts.
bool qpart_layout_avx2(int bits, int G, int64_t c0, int64_t c1, int64_t rows);
void axpy_qpart_avx2(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1);

void dense_shrink_generic(const DenseShrink& p, int64_t i0, int64_t i1);
void dense_shrink_avx2(const DenseShrink& p, int64_t i0, int64_t i1);
void dense_shrink_avx512(const DenseShrink& p, int64_t i0, int64_t i1);
void multi_expand_generic(const MultiExpand& e, int64_t c0, int64_t c1);
void multi_expand_avx2(const MultiExpand& e, int64_t c0, int64_t c1);
void multi_expand_avx512(const MultiExpand& e, int64_t c0, int64_t c1);

}  // namespace lk
