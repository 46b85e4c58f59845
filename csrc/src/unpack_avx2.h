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

// unpack_group's codes i0 .. i0 + 31 alone (i0 % 32 == 0; 2, 3, 4 and 8 bits), for loops that hold one 32-column
// block at a time (the multi-adapter expand). The (low) codes are stored strided: byte j of the group's W bytes
// holds codes j, j + W, j + 2W, ... at bit offsets 0, BB, 2 BB; 3-bit codes take bit 2 from the plane after them.
template <int BITS, int G>
inline __m256i unpack_block32(const uint8_t* gp, int i0) {
  static_assert(BITS != 1, "1-bit codes are a bit plane: expand_bits32");
  constexpr int W = BITS == 3 ? G / 4 : G * BITS / 8, BB = BITS == 3 ? 2 : BITS;
  const __m256i mask8 = _mm256_set1_epi8((char)((1 << BB) - 1));
  __m256i q8;
  if constexpr (W >= 32) {  // one run of 32 bytes, one shift
    const __m256i raw = _mm256_loadu_si256((const __m256i*)(gp + i0 % W));
    q8 = _mm256_and_si256(_mm256_srl_epi16(raw, _mm_cvtsi32_si128((i0 / W) * BB)), mask8);
  } else if constexpr (W == 16) {  // 16 bytes, two shifts
    const __m128i raw = _mm_loadu_si128((const __m128i*)gp), m = _mm256_castsi256_si128(mask8);
    const int sh = (i0 / 16) * BB;
    q8 = _mm256_setr_m128i(_mm_and_si128(_mm_srl_epi16(raw, _mm_cvtsi32_si128(sh)), m),
                           _mm_and_si128(_mm_srl_epi16(raw, _mm_cvtsi32_si128(sh + BB)), m));
  } else {  // W == 8 (G = 32, 2- and 3-bit): the whole group, four shifts
    static_assert(W == 8, "unpack_block32: unexpected layout");
    const __m128i raw = _mm_loadl_epi64((const __m128i*)gp), m = _mm256_castsi256_si128(mask8);
    const __m128i p0 = _mm_and_si128(raw, m), p1 = _mm_and_si128(_mm_srli_epi16(raw, BB), m);
    const __m128i p2 = _mm_and_si128(_mm_srli_epi16(raw, 2 * BB), m), p3 = _mm_and_si128(_mm_srli_epi16(raw, 3 * BB), m);
    q8 = _mm256_setr_m128i(_mm_unpacklo_epi64(p0, p1), _mm_unpacklo_epi64(p2, p3));
  }
  if constexpr (BITS == 3)  // bit 2 from the plane
    q8 = _mm256_or_si256(q8, _mm256_and_si256(expand_bits32(load_u32(gp + W + i0 / 8)), _mm256_set1_epi8(4)));
  return q8;
}

}  // namespace
}  // namespace lk
