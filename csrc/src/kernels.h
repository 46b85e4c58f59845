// Internal: the table of CPU kernels of each ISA (as ggml's type_traits_cpu), filled once. Every entry
// point picks its kernels from active_kernels(); the generic table always exists and every slot of
// every table is filled (an ISA that has no version of a kernel points at the best one it can run).
#pragma once
#include <cstdint>

#include "common.h"
#include "lora.h"
#include "lorakern/lorakern.h"
#include "multi_lora.h"

namespace lk {

struct CpuKernels {
  lk_isa isa;
  // rows [n0, n1) of y = xhat @ W^T for every m (quant_matmul, gwq_matmul, the shrink of lora_mixed)
  void (*qmm_rows)(const QmmProblem& p, int64_t n0, int64_t n1);
  // the same for many activation rows (M >= kGemmMinRows): panels of unpacked codes reused over the rows
  void (*qmm_gemm)(const QmmProblem& p, int64_t n0, int64_t n1);
  // x (fp32) [M, K] -> int8 codes, per-block scales, per-group sums
  void (*quantize_activations)(const float* x, int64_t M, int64_t K, int G, int8_t* xq, float* xs, float* xsum);
  // lora_mixed's expand into the columns of groups [g0, g1)
  void (*lora_expand)(const LoraExpand& e, int64_t g0, int64_t g1);
  // multi-adapter dense shrink of rows [i0, i1) of A, and the expand into columns [c0, c1)
  void (*dense_shrink)(const DenseShrink& p, int64_t i0, int64_t i1);
  void (*multi_expand)(const MultiExpand& e, int64_t c0, int64_t c1);
  // the native decode step's SiLU gating and one query head's attention over the KV cache (decode_math.h)
  void (*silu_mul)(float* g, const float* u, int64_t n);
  void (*attend)(const float* q, const float* kc, const float* vc, const uint8_t* mk, int64_t npos, int64_t D,
                 float scale, float* p, float* o);
};

const CpuKernels& cpu_kernels(lk_isa isa);  // the table of an ISA (generic for an unknown one)
const CpuKernels& active_kernels();         // cpu_kernels(lk_active_isa())

}  // namespace lk
