// AVX2 + FMA + F16C quant_matmul (compiled with those flags only; chosen at run
// time). Per group: unpack the codes into bytes in registers, int8 dot products
// with vpmaddubsw (u8 codes x s8 activations, i16 pairs) and vpmaddwd, one fp32
// FMA with the combined scale per activation block. The zero point is applied once per row:
// y = sum_b s_g(b)*xs_b*dot_b - sum_g s_g*z_g*sum(xhat_g), xhat = xs_b * xq.
#include <cstring>

#include "common.h"
#include "simd_x86.h"
#include "qmm_rows_simd.h"
#include "unpack_avx2.h"
#include "simd_vec.h"
#include "multi_lora_simd.h"

namespace lk {
namespace {

// sum over activation block t (act_block(G) codes) of code * xq, as 8 int32 partial sums.
template <int BITS, int G>
inline __m256i dot_block(const __m256i* c, const int8_t* xp, int t) {
  constexpr int CPB = (G < 64 ? G : 64) / 32;  // 32-code chunks per block
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS <= 4) {
    // |code*x| <= 15*127, two per i16 lane, <= 2 chunks: < 2^15, no saturation.
    __m256i s16 = _mm256_maddubs_epi16(c[t * CPB], _mm256_loadu_si256((const __m256i*)(xp + 32 * t * CPB)));
    for (int j = 1; j < CPB; ++j)
      s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(c[t * CPB + j],
                                                       _mm256_loadu_si256((const __m256i*)(xp + 32 * (t * CPB + j)))));
    return _mm256_madd_epi16(s16, ones);
  } else {  // 8-bit codes would saturate vpmaddubsw: centre them, q' = q - 128 (s8), and use
    // |q'| (u8, <= 128) times x with q''s sign: pairs <= 2 * 128 * 127 < 2^15. The row loop moves the
    // 128 into the zero point (kCentred8).
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    __m256i acc = _mm256_setzero_si256();
    for (int j = t * CPB; j < (t + 1) * CPB; ++j) {
      const __m256i x = _mm256_loadu_si256((const __m256i*)(xp + 32 * j));
      const __m256i q = _mm256_xor_si256(c[j], bias);
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q)),
                                                    ones));
    }
    return acc;
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One weight row against MR activation rows. Per group and row m: the blocks'
// int32 dots are scaled by their activation scales into a fresh vector t (no
// loop-carried dependency), then one FMA applies the weight scale.
template <int BITS, int G, int MR>
inline void row_tile(const QmmProblem& p, const uint8_t* prow, int64_t m0, const float* sf,
                     float* out) {
  constexpr int GB = G * BITS / 8, NC = G / 32, B = G < 64 ? G : 64, BPG = G / B;
  const int64_t ng = p.K / G, nb = p.K / B;
  __m256 facc[MR], facc2[MR];
  for (int i = 0; i < MR; ++i) facc[i] = facc2[i] = _mm256_setzero_ps();
  const auto group = [&](int64_t g, __m256* acc) __attribute__((always_inline)) {
    __m256i c[NC];
    _mm_prefetch((const char*)(prow + g * GB + 1024), _MM_HINT_T0);  // ~1 KiB ahead in the row stream
    unpack_group<BITS, G>(prow + g * GB, c);
    const __m256 sfv = _mm256_set1_ps(sf[g]);
    for (int i = 0; i < MR; ++i) {
      const int64_t m = m0 + i;
      const int8_t* xp = p.xq + m * p.K + g * G;
      const float* xsp = p.xs + m * nb + g * BPG;
      __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_block<BITS, G>(c, xp, 0)), _mm256_broadcast_ss(xsp));
      for (int b = 1; b < BPG; ++b)
        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_block<BITS, G>(c, xp, b)), _mm256_broadcast_ss(xsp + b), t);
      acc[i] = _mm256_fmadd_ps(t, sfv, acc[i]);
    }
  };
  int64_t g = 0;
  if constexpr (MR <= 2) {  // decode: two accumulator chains (even / odd groups), or the FMA latency bounds it
    for (; g + 2 <= ng; g += 2) {
      group(g, facc);
      group(g + 1, facc2);
    }
  }
  for (; g < ng; ++g) group(g, facc);
  for (int i = 0; i < MR; ++i) out[i] = hsum(_mm256_add_ps(facc[i], facc2[i]));
}

// The hooks of the shared row loop (qmm_rows_simd.h).
struct Avx2 {
  static constexpr bool kCentred8 = true;  // 8-bit tiles multiply q - 128 (dot_block)
  template <int BITS, int G, int MR>
  static void tile(const QmmProblem& p, const uint8_t* prow, int64_t m0, const float* sf, float* out) {
    row_tile<BITS, G, MR>(p, prow, m0, sf, out);
  }
  static float dot(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
  static void scales(const uint16_t* sp, const uint16_t* zp, int64_t ng, float* sf, float* szf) {
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + g)));
      const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(zp + g)));
      _mm256_storeu_ps(sf + g, s);
      _mm256_storeu_ps(szf + g, _mm256_mul_ps(s, z));
    }
    for (; g < ng; ++g) {  // (the row loop converts 16 rows at a time: a tail only at its end)
      sf[g] = _cvtsh_ss(sp[g]);
      szf[g] = sf[g] * _cvtsh_ss(zp[g]);
    }
  }
};

// One group of codes as fp32 weights s * (q - z) (exact: q - z is exact in fp32).
template <int BITS, int G>
inline void dequant_group_t(const uint8_t* gp, float s, float z, float* out) {
  __m256i c[G / 32];
  unpack_group<BITS, G>(gp, c);
  const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
  for (int j = 0; j < G / 32; ++j) {
    const __m128i half[2] = {_mm256_castsi256_si128(c[j]), _mm256_extracti128_si256(c[j], 1)};
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 2; ++k) {
        const __m128i piece = k ? _mm_srli_si128(half[h], 8) : half[h];
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(piece));
        _mm256_storeu_ps(out + 32 * j + 16 * h + 8 * k, _mm256_mul_ps(sv, _mm256_sub_ps(q, zv)));
      }
  }
}

template <int BITS>
inline void dequant_group_bits(const uint8_t* gp, int G, float s, float z, float* out) {
  switch (G) {
    case 32: dequant_group_t<BITS, 32>(gp, s, z, out); break;
    case 64: dequant_group_t<BITS, 64>(gp, s, z, out); break;
    default: dequant_group_t<BITS, 128>(gp, s, z, out); break;
  }
}

}  // namespace

namespace {

template <int BITS, int G>
void axpy_qpart_t(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
  constexpr int GB = G * BITS / 8;  // bytes per group
  constexpr int64_t kChunk = 8;     // groups whose per-row terms are formed at once (one fp16 vector each)
  const int64_t rb = row_bytes(p.K, BITS), ng = p.K / G, R = p.N;
  // bit k of a 32-bit word moved to the sign bit of lane k % 8 (one variable shift per 8 columns)
  const __m256i to_sign[4] = {_mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
                              _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
                              _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
                              _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
  // per row (<= 256, checked by the caller) and group of the chunk: coef * scale and the zero; 1-bit rows:
  // the term for code 1 and for code 0
  alignas(32) float cs[256 * kChunk], zs[256 * kChunk];
  for (int64_t gc = c0 / G, gend = (c1 + G - 1) / G; gc < gend; gc += kChunk) {
    const int64_t ngc = std::min(kChunk, gend - gc);
    for (int64_t i = 0; i < R; ++i) {
      const uint16_t *sp = p.scales + i * ng + gc, *zp = p.zeros + i * ng + gc;
      float *csr = cs + i * kChunk, *zsr = zs + i * kChunk;
      if (ngc == kChunk) {  // eight groups' scales and zeros in one conversion each
        const __m256 c = _mm256_mul_ps(_mm256_set1_ps(coef[i]), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)sp)));
        const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)zp));
        _mm256_store_ps(csr, BITS == 1 ? _mm256_mul_ps(c, _mm256_sub_ps(_mm256_set1_ps(1.f), z)) : c);
        _mm256_store_ps(zsr, BITS == 1 ? _mm256_mul_ps(c, _mm256_sub_ps(_mm256_setzero_ps(), z)) : z);
      } else {
        for (int64_t k = 0; k < ngc; ++k) {
          const float c = coef[i] * _cvtsh_ss(sp[k]), z = _cvtsh_ss(zp[k]);
          csr[k] = BITS == 1 ? c * (1.f - z) : c;
          zsr[k] = BITS == 1 ? c * (0.f - z) : z;
        }
      }
    }
    for (int64_t c = std::max(c0, gc * G), ce = std::min(c1, (gc + ngc) * G); c < ce; c += 32) {
      const int64_t g = c / G, gi = g - gc;
      const int i0 = (int)(c % G);
      float* yc = y + (c - c0);
      __m256 acc[4] = {_mm256_loadu_ps(yc), _mm256_loadu_ps(yc + 8), _mm256_loadu_ps(yc + 16),
                       _mm256_loadu_ps(yc + 24)};
      const uint8_t* gp = p.qweight + g * GB;
      if constexpr (BITS == 1) {
        for (int64_t i = 0; i < R; ++i, gp += rb) {
          uint32_t w;
          std::memcpy(&w, gp + i0 / 8, 4);
          const __m256i v = _mm256_set1_epi32((int)w);
          const __m256 one = _mm256_broadcast_ss(cs + i * kChunk + gi), zero = _mm256_broadcast_ss(zs + i * kChunk + gi);
          for (int m = 0; m < 4; ++m)  // bit 8m + k -> sign of lane k
            acc[m] = _mm256_add_ps(acc[m], _mm256_blendv_ps(zero, one,
                                                             _mm256_castsi256_ps(_mm256_sllv_epi32(v, to_sign[m]))));
        }
      } else {
        for (int64_t i = 0; i < R; ++i, gp += rb) {
          const __m256 csv = _mm256_broadcast_ss(cs + i * kChunk + gi), zv = _mm256_broadcast_ss(zs + i * kChunk + gi);
          const __m256i q8 = unpack_block32<BITS, G>(gp, i0);
          const __m128i lo = _mm256_castsi256_si128(q8), hi = _mm256_extracti128_si256(q8, 1);
          const auto qz = [&](__m128i b) { return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), zv); };
          acc[0] = _mm256_fmadd_ps(csv, qz(lo), acc[0]);
          acc[1] = _mm256_fmadd_ps(csv, qz(_mm_srli_si128(lo, 8)), acc[1]);
          acc[2] = _mm256_fmadd_ps(csv, qz(hi), acc[2]);
          acc[3] = _mm256_fmadd_ps(csv, qz(_mm_srli_si128(hi, 8)), acc[3]);
        }
      }
      for (int m = 0; m < 4; ++m) _mm256_storeu_ps(yc + 8 * m, acc[m]);
    }
  }
}

template <int BITS>
void axpy_qpart_bits(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
  switch (p.group_size) {
    case 32: axpy_qpart_t<BITS, 32>(y, coef, p, c0, c1); break;
    case 64: axpy_qpart_t<BITS, 64>(y, coef, p, c0, c1); break;
    default: axpy_qpart_t<BITS, 128>(y, coef, p, c0, c1); break;
  }
}

}  // namespace

// The expand of one compressed part straight from its codes, for one output row: y[c0:c1] +=
// sum_i coef[i] * s_i * (q_i - z_i), 32 columns at a time in registers. Each term is formed as
// (coef[i] s_i) * (q - z_i), q - z_i exact in fp32, so the error is that of the terms (as in the
// dequantized tile), not of coef s q and coef s z apart (which cancel when q is near z: 8-bit codes).
// Every layout (bits 1, 2, 3, 4, 8; G 32, 64, 128) with 32-column aligned ranges and at most 256 rows.
bool qpart_layout_avx2(int, int, int64_t c0, int64_t c1, int64_t rows) {
  return c0 % 32 == 0 && c1 % 32 == 0 && rows <= 256;
}

void axpy_qpart_avx2(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
  switch (p.bits) {
    case 1: axpy_qpart_bits<1>(y, coef, p, c0, c1); break;
    case 2: axpy_qpart_bits<2>(y, coef, p, c0, c1); break;
    case 3: axpy_qpart_bits<3>(y, coef, p, c0, c1); break;
    case 4: axpy_qpart_bits<4>(y, coef, p, c0, c1); break;
    default: axpy_qpart_bits<8>(y, coef, p, c0, c1); break;
  }
}

namespace {

struct V8 {  // the AVX2 register type of simd_vec.h
  using reg = __m256;
  static constexpr int W = 8;
  static void axpy_qpart(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
    axpy_qpart_avx2(y, coef, p, c0, c1);
  }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(reg v) { return hsum(v); }
  static reg load_f16(const uint16_t* h) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)h)); }
  static reg load_bf16(const uint16_t* h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)h)), 16));
  }
  template <int BITS>  // one group of codes as fp32 weights s * (q - z)
  static void dequant_bits(const uint8_t* gp, int G, float s, float z, float* out) {
    dequant_group_bits<BITS>(gp, G, s, z, out);
  }
};

using Avx2Expand = SimdVec<V8>;

}  // namespace

void lora_expand_avx2(const LoraExpand& e, int64_t g0, int64_t g1) { expand_groups<Avx2Expand>(e, g0, g1); }
void dense_shrink_avx2(const DenseShrink& p, int64_t i0, int64_t i1) { dense_shrink_rows<Avx2Expand>(p, i0, i1); }
void multi_expand_avx2(const MultiExpand& e, int64_t c0, int64_t c1) { multi_expand_cols<Avx2Expand>(e, c0, c1); }

void qmm_rows_avx2(const QmmProblem& p, int64_t n0, int64_t n1) { simd_rows_dispatch<Avx2>(p, n0, n1); }

}  // namespace lk
