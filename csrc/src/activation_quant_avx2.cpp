// Activation quantization with AVX2. Compiled with -mavx2 but without -mfma, so that
// no multiply-add is contracted into an FMA: the results are bitwise those of the
// portable quantize_activations (activation_quant.cpp), which every test model uses.
#include <cmath>
#include <cstring>

#include "common.h"
#include "simd_x86.h"

namespace lk {

// quantize_activations (activation_quant.cpp) with AVX2: the same IEEE operations in the same
// order per element (max|x|, 127 / amax, x * inv clamped, round half to even), so the codes, scales
// and sums are bitwise those of the portable version.
void quantize_activations_avx2(const float* x, int64_t M, int64_t K, int G, int8_t* xq, float* xs, float* xsum) {
  const int B = act_block(G);
  const int64_t nb = K / B, ng = K / G;
  const __m256 sign = _mm256_set1_ps(-0.f), inf = _mm256_set1_ps(INFINITY);
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) xsum[m * ng + g] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const float* xp = x + m * K + b * B;
      int8_t* qp = xq + m * K + b * B;
      __m256 vmax = _mm256_setzero_ps();
      __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
      for (int i = 0; i < B; i += 8) {
        const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xp + i));
        finite = _mm256_and_ps(finite, _mm256_cmp_ps(a, inf, _CMP_LT_OQ));  // false for NaN and Inf
        vmax = _mm256_max_ps(vmax, a);
      }
      const int64_t o = m * nb + b;
      float* gsum = &xsum[m * ng + b * B / G];
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);  // (any value when the block is not finite)
      const float inv = 127.f / amax;
      if (act_block_special(_mm256_movemask_ps(finite) == 0xFF, inv, qp, B, &xs[o], gsum)) continue;
      xs[o] = amax / 127.f;
      const __m256 vinv = _mm256_set1_ps(inv);
      __m256i qs = _mm256_setzero_si256();
      for (int i = 0; i < B; i += 32) {
        __m256i q[4];
        for (int j = 0; j < 4; ++j) {
          const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(xp + i + 8 * j), vinv)));
          q[j] = _mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
          qs = _mm256_add_epi32(qs, q[j]);
        }
        // int32 -> int8 with saturating packs (values are in [-127, 127]); packs interleave 128-bit lanes
        const __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        const __m256i fixed = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(qp + i), fixed);  // B is 32 or 64: whole 32-code chunks
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
      *gsum += xs[o] * (float)_mm_cvtsi128_si32(s4);
    }
  }
}

}  // namespace lk
