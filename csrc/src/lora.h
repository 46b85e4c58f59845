// Internal: the expand half of the LoRA kernels (lora_mixed, quant_matmul_lora).
#pragma once
#include <cstdint>

#include "common.h"

namespace lk {

// One part (high or low) of B' transposed: rows [rows, N] in the canonical layout,
// groups of G along N, and its slice of the intermediate t (t[m * ld + i], row i).
struct ExpandPart {
  const uint8_t* qw;
  const uint16_t* scales;  // fp16 [rows, N / G]
  const uint16_t* zeros;   // fp16 [rows, N / G]
  int64_t rows;
  int bits;
  const float* t;
  int64_t ld;
};

// y[m, n] = yin[m, n] + scale * sum over parts and rows i of t[m, i] * Bt[i, n].
struct LoraExpand {
  int64_t M, N;
  int G;
  ExpandPart part[2];
  float scale;
  float* y;                  // [M, N] fp32
  const float* yin = nullptr;  // [M, N] fp32: the base (may be y itself); null: y already holds it
};

// Each adds the expand into the columns of groups [g0, g1) (groups of G columns).
void lora_expand_generic(const LoraExpand& e, int64_t g0, int64_t g1);
void lora_expand_avx2(const LoraExpand& e, int64_t g0, int64_t g1);
void lora_expand_avx512(const LoraExpand& e, int64_t g0, int64_t g1);

}  // namespace lk
