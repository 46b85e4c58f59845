// Activation quantization with AVX-512. Compiled with -ffp-contract=off (like the AVX2 version) so that no
// multiply-add is contracted into an FMA: the results are bitwise those of the portable quantize_activations
// (activation_quant.cpp), which every test model uses (checked in csrc/tests/test_kernels.cpp).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "common.h"

namespace lk {

// quantize_activations with AVX-512: the same IEEE operations per element as the portable and AVX2 versions
// (max|x|, 127 / amax, x * inv clamped to [-127, 127], round half to even), 16 lanes a step; a block of B = 32 or
// 64 values is 2 or 4 vectors. max and integer sums are exact in any order.
void quantize_activations_avx512(const float* x, int64_t M, int64_t K, int G, int8_t* xq, float* xs,
                                 float* xsum) {
  const int B = act_block(G);
  const int64_t nb = K / B, ng = K / G;
  const __m512 inf = _mm512_set1_ps(INFINITY), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) xsum[m * ng + g] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const float* xp = x + m * K + b * B;
      int8_t* qp = xq + m * K + b * B;
      __m512 vmax = _mm512_setzero_ps();
      __mmask16 finite = 0xFFFF;
      for (int i = 0; i < B; i += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(xp + i));
        finite &= _mm512_cmp_ps_mask(a, inf, _CMP_LT_OQ);  // false for NaN and Inf
        vmax = _mm512_max_ps(vmax, a);
      }
      const int64_t o = m * nb + b;
      float* gsum = &xsum[m * ng + b * B / G];
      const float amax = _mm512_reduce_max_ps(vmax);  // (any value when the block is not finite)
      const float inv = 127.f / amax;
      if (act_block_special(finite == 0xFFFF, inv, qp, B, &xs[o], gsum)) continue;
      xs[o] = amax / 127.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      __m512i qs = _mm512_setzero_si512();
      for (int i = 0; i < B; i += 16) {
        const __m512 v = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_loadu_ps(xp + i), vinv)));
        const __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
        qs = _mm512_add_epi32(qs, q);
        _mm_storeu_si128((__m128i*)(qp + i), _mm512_cvtsepi32_epi8(q));  // in [-127, 127] (inv finite): no saturation
      }
      *gsum += xs[o] * (float)_mm512_reduce_add_epi32(qs);
    }
  }
}

}  // namespace lk
