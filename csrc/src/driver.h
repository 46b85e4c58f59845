// Internal: what the C ABI entry points share (argument checks, thread counts, activation conversion and quantization). Defined in quant_matmul.cpp.
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"
#include "lorakern/lorakern.h"

namespace lk {

lk_status check_weight(const lk_qweight* w);  // pointers, bits, group size, N >= 0, K % G == 0
int threads_for(int requested);
// A compressed adapter's parts against a layer [N, K] (lora_mixed.cpp; the scale is not checked).
lk_status check_lora_parts(const lk_lora* l, int64_t N, int64_t K);                // 0 -> the OpenMP default


// x [M, K] as fp32 (converted from fp16/bf16 if needed) and its int8 quantization
// for group size G (quantize_activations).
struct Activations {
  int64_t M = 0, K = 0;
  int G = 0;
  const float* x32 = nullptr;
  std::vector<float> xf;
  std::vector<int8_t> xq;
  std::vector<float> xs, xsum;
  void load(const void* x, lk_dtype x_dtype, int64_t M, int64_t K);
  void quantize(int G);
};

// y (fp16 / bf16 bit patterns, n values) = y32 rounded to nearest even; no-op for LK_F32.
void store_output(const float* y32, lk_dtype dtype, int64_t n, void* y);

}  // namespace lk
