// The CPU kernel tables (kernels.h). One row per ISA; the activation quantizers of every ISA give bitwise the
// generic results; the AVX-512 path runs the AVX2 blocked GEMM (no AVX-512 version yet); the AMX path is the AVX-512
// table with the blocked GEMM on AMX-INT8 tiles (quant_gemm_amx.cpp); the generic table's GEMM slot is its row kernel.
#include "kernels.h"

#include <vector>

#include "decode_math.h"

namespace lk {
namespace {

const CpuKernels kGeneric{LK_ISA_GENERIC, qmm_rows_generic, qmm_rows_generic, quantize_activations, lora_expand_generic,
                          dense_shrink_generic, multi_expand_generic, silu_mul_generic, attend_generic};
const CpuKernels kAvx2{LK_ISA_AVX2, qmm_rows_avx2, qmm_gemm_avx2, quantize_activations_avx2, lora_expand_avx2, dense_shrink_avx2,
                       multi_expand_avx2, silu_mul_avx2, attend_avx2};
const CpuKernels kAvx512{LK_ISA_AVX512, qmm_rows_avx512, qmm_gemm_avx2, quantize_activations_avx512, lora_expand_avx512,
                         dense_shrink_avx512, multi_expand_avx512, silu_mul_avx512, attend_avx512};
#ifdef LORAKERN_HAVE_AMX
const CpuKernels kAmx{LK_ISA_AMX, qmm_rows_avx512, qmm_gemm_amx, quantize_activations_avx512, lora_expand_avx512,
                      dense_shrink_avx512, multi_expand_avx512, silu_mul_avx512, attend_avx512};
#endif

}  // namespace

const CpuKernels& cpu_kernels(lk_isa isa) {
  switch (isa) {
#ifdef LORAKERN_HAVE_AMX
    case LK_ISA_AMX: return kAmx;
#else
    case LK_ISA_AMX: return kAvx512;  // never active: detection needs the AMX kernels built
#endif
    case LK_ISA_AVX512: return kAvx512;
    case LK_ISA_AVX2: return kAvx2;
    default: return kGeneric;
  }
}

const CpuKernels& active_kernels() { return cpu_kernels(lk_active_isa()); }

uint8_t* thread_scratch(int slot, size_t bytes) {
  thread_local std::vector<uint8_t> blocks[kScratchSlots];
  std::vector<uint8_t>& b = blocks[slot];
  if (b.size() < bytes) {
    b.clear();
    b.shrink_to_fit();
    b.resize(bytes);
  }
  return b.data();
}

}  // namespace lk
