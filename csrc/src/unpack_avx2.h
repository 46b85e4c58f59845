// Unpacking of packed code groups into bytes with AVX2, shared by the AVX2 row kernels
// (quant_matmul_avx2.cpp) and the blocked GEMM (quant_gemm_avx2.cpp). Compiled with the including
// file's flags (anonymous namespace), like qmm_rows_simd.h. Layouts: docs/formats.md.
#pragma once
#include <cstring>

#include "simd_x86.h"

namespace lk {
namespace {

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// byte i of the result = 0xFF if bit i of w is set, else 0.
inline __m256i expand_bits32(uint32_t w) {
  const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                        2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), shuf);
  return _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
}

// Codes of one group as G/32 vectors of 32 unsigned bytes, in code order.
template <int BITS, int G>
inline void unpack_group(const uint8_t* gp, __m256i* c) {
  if constexpr (BITS == 1) {  // one bit plane
    for (int j = 0; j < G / 32; ++j)
      c[j] = _mm256_and_si256(expand_bits32(load_u32(gp + 4 * j)), _mm256_set1_epi8(1));
  } else if constexpr (BITS == 8) {
    for (int j = 0; j < G / 32; ++j) c[j] = _mm256_loadu_si256((const __m256i*)(gp + 32 * j));
  } else if constexpr (BITS == 4) {
    const __m256i F = _mm256_set1_epi8(0x0F);
    if constexpr (G == 128) {
      const __m256i v0 = _mm256_loadu_si256((const __m256i*)gp);
      const __m256i v1 = _mm256_loadu_si256((const __m256i*)(gp + 32));
      c[0] = _mm256_and_si256(v0, F);
      c[1] = _mm256_and_si256(v1, F);
      c[2] = _mm256_and_si256(_mm256_srli_epi16(v0, 4), F);
      c[3] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), F);
    } else if constexpr (G == 64) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)gp);
      c[0] = _mm256_and_si256(v, F);
      c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), F);
    } else {  // G == 32: 16 bytes, low nibbles = codes 0..15, high = 16..31
      const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)gp));
      c[0] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), F);
    }
  } else {  // 2-bit strided part (both 2 and 3 bits), then 3-bit's high plane
    const __m256i M3 = _mm256_set1_epi8(0x03);
    if constexpr (G == 128) {  // W = 32: four shifts of one 32-byte vector
      const __m256i v = _mm256_loadu_si256((const __m256i*)gp);
      for (int s = 0; s < 4; ++s) c[s] = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * s)), M3);
    } else if constexpr (G == 64) {  // W = 16: [s0, s1] and [s2, s3]
      const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)gp));
      c[0] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), M3);
      c[1] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), M3);
    } else {  // W = 8: one 8-byte word, four shifts
      long long w;
      std::memcpy(&w, gp, 8);
      c[0] = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_setr_epi64x(0, 2, 4, 6)), M3);
    }
    if constexpr (BITS == 3) {
      const uint8_t* hp = gp + G / 4;
      for (int j = 0; j < G / 32; ++j)
        c[j] = _mm256_or_si256(c[j], _mm256_and_si256(expand_bits32(load_u32(hp + 4 * j)),
                                                      _mm256_set1_epi8(4)));
    }
  }
}

}  // namespace
}  // namespace lk
