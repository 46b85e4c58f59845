// AVX-512 (F, BW, VL, VNNI) quant_matmul, chosen at run time. Same math as the
// generic path: 64 codes per zmm, vpdpbusd (u8 codes x s8 activations -> i32),
// one fp32 FMA per group with the combined scale. 3-bit's high bit plane is
// added straight from a mask register (one masked byte add).
// With G = 32 a zmm holds two groups; its lanes 0-7 belong to the first.
#include <cstring>

#include "common.h"
#include "simd_x86.h"
#include "qmm_rows_simd.h"
#include "simd_vec.h"
#include "multi_lora_simd.h"

#ifdef LORAKERN_SIMDE
#define qmm_rows_avx512 qmm_rows_avx512_simde  // emulated build for the C++ tests
#define lora_expand_avx512 lora_expand_avx512_simde
#define dense_shrink_avx512 dense_shrink_avx512_simde
#define multi_expand_avx512 multi_expand_avx512_simde
#endif

namespace lk {
namespace {

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint64_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Codes of one 64-code chunk. G >= 64: chunk t of the group at gp.
// G == 32: groups at gp and gp + GB.
template <int BITS, int G>
inline __m512i unpack_chunk(const uint8_t* gp, int t) {
  constexpr int GB = G * BITS / 8;
  const __m512i F = _mm512_set1_epi8(0x0F);
  if constexpr (BITS == 1) {  // one bit plane, straight from a mask register
    const uint64_t m = G >= 64 ? load_u64(gp + 8 * t) : (load_u32(gp) | (load_u32(gp + GB) << 32));
    return _mm512_maskz_mov_epi8((__mmask64)m, _mm512_set1_epi8(1));
  } else if constexpr (BITS == 8) {
    return _mm512_loadu_si512((const void*)(gp + 64 * t));
  } else if constexpr (BITS == 4) {
    if constexpr (G == 128) {
      const __m512i v = _mm512_loadu_si512((const void*)gp);
      return t == 0 ? _mm512_and_si512(v, F) : _mm512_and_si512(_mm512_srli_epi16(v, 4), F);
    } else if constexpr (G == 64) {
      const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)gp));
      const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
      return _mm512_and_si512(_mm512_srlv_epi32(v, sh), F);
    } else {  // two groups of 16 bytes: [A, A, B, B] shifted [0, 4, 0, 4]
      const __m512i v0 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)gp));
      const __m512i v = _mm512_shuffle_i64x2(v0, v0, _MM_SHUFFLE(1, 1, 0, 0));
      const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4);
      return _mm512_and_si512(_mm512_srlv_epi32(v, sh), F);
    }
  } else {  // 2-bit strided part (both 2 and 3 bits), then 3-bit's high plane
    const __m512i M3 = _mm512_set1_epi8(0x03);
    __m512i c;
    if constexpr (G == 128) {  // W = 32: chunk t holds shifts 2t and 2t+1
      const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)gp));
      const __m512i sh = t == 0 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2)
                                : _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6);
      c = _mm512_and_si512(_mm512_srlv_epi32(v, sh), M3);
    } else if constexpr (G == 64) {  // W = 16: four 128-bit lanes, shifts 0, 2, 4, 6
      const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)gp));
      const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
      c = _mm512_and_si512(_mm512_srlv_epi32(v, sh), M3);
    } else {  // two groups, W = 8 bytes each: qwords [A x4, B x4], shifts 0, 2, 4, 6
      long long a, b;
      std::memcpy(&a, gp, 8);
      std::memcpy(&b, gp + GB, 8);
      const __m512i v = _mm512_mask_blend_epi64((__mmask8)0xF0, _mm512_set1_epi64(a), _mm512_set1_epi64(b));
      const __m512i sh = _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6);
      c = _mm512_and_si512(_mm512_srlv_epi64(v, sh), M3);
    }
    if constexpr (BITS == 3) {
      const uint8_t* hp = gp + G / 4;
      const uint64_t hm = G >= 64 ? load_u64(hp + 8 * t) : (load_u32(hp) | (load_u32(hp + GB) << 32));
      c = _mm512_mask_add_epi8(c, (__mmask64)hm, c, _mm512_set1_epi8(4));
    }
    return c;
  }
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <int BITS, int G, int MR>
inline void row_tile(const QmmProblem& p, const uint8_t* prow, int64_t m0, const float* sf,
                     float* out) {
  constexpr int GB = G * BITS / 8;
  const int64_t ng = p.K / G, nb = p.K / (G < 64 ? G : 64);
  __m512 facc[MR];
  for (int i = 0; i < MR; ++i) facc[i] = _mm512_setzero_ps();
  if constexpr (G >= 64) {
    constexpr int CPG = G / 64;
    for (int64_t g = 0; g < ng; ++g) {
      __m512i c[CPG];
      for (int t = 0; t < CPG; ++t) c[t] = unpack_chunk<BITS, G>(prow + g * GB, t);
      const __m512 sfv = _mm512_set1_ps(sf[g]);
      for (int i = 0; i < MR; ++i) {
        const int64_t m = m0 + i;
        const int8_t* xp = p.xq + m * p.K + g * G;
        const float* xsp = p.xs + m * nb + g * CPG;
        // one 64-code chunk = one activation block; blocks summed into a fresh t
        __m512 t = _mm512_setzero_ps();
        for (int k = 0; k < CPG; ++k) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[k],
                                                _mm512_loadu_si512((const void*)(xp + 64 * k)));
          t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(xsp[k]), t);
        }
        facc[i] = _mm512_fmadd_ps(t, sfv, facc[i]);
      }
    }
  } else {  // G == 32: pairs of groups per zmm, then an odd last group
    int64_t g = 0;
    for (; g + 2 <= ng; g += 2) {
      const __m512i c = unpack_chunk<BITS, G>(prow + g * GB, 0);
      for (int i = 0; i < MR; ++i) {
        const int64_t m = m0 + i;
        const __m512i d = _mm512_dpbusd_epi32(
            _mm512_setzero_si512(), c, _mm512_loadu_si512((const void*)(p.xq + m * p.K + g * G)));
        const __m512 s = _mm512_mask_blend_ps((__mmask16)0xFF00,
                                              _mm512_set1_ps(sf[g] * p.xs[m * ng + g]),
                                              _mm512_set1_ps(sf[g + 1] * p.xs[m * ng + g + 1]));
        facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, facc[i]);
      }
    }
    if (g < ng) {  // last group alone: only its 32 bytes of activations may be read
      // Unpack as a pair with itself, keep the first half.
      const uint8_t* gp = prow + g * GB;
      __m512i c;
      if constexpr (BITS == 1) {
        c = _mm512_maskz_mov_epi8((__mmask64)load_u32(gp), _mm512_set1_epi8(1));
      } else if constexpr (BITS == 8) {
        c = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)gp));
      } else if constexpr (BITS == 4) {
        const __m512i v0 = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)gp));
        const __m512i v = _mm512_shuffle_i64x2(v0, v0, _MM_SHUFFLE(0, 0, 0, 0));
        const __m512i sh = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4);
        c = _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi8(0x0F));
      } else {  // 2-bit part: one 8-byte word shifted 0, 2, 4, 6; upper half unused
        long long w;
        std::memcpy(&w, gp, 8);
        const __m512i sh = _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6);
        c = _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64(w), sh), _mm512_set1_epi8(3));
        if constexpr (BITS == 3)
          c = _mm512_mask_add_epi8(c, (__mmask64)load_u32(gp + G / 4), c, _mm512_set1_epi8(4));
      }
      for (int i = 0; i < MR; ++i) {
        const int64_t m = m0 + i;
        const __m512i x = _mm512_maskz_loadu_epi8((__mmask64)0xFFFFFFFFull, p.xq + m * p.K + g * G);
        const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, x);
        facc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(sf[g] * p.xs[m * ng + g]),
                                  facc[i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = _mm512_reduce_add_ps(facc[i]);
}

// The hooks of the shared row loop (qmm_rows_simd.h).
struct Avx512 {
  static constexpr bool kCentred8 = false;  // dpbusd takes u8 codes whole
  template <int BITS, int G, int MR>
  static void tile(const QmmProblem& p, const uint8_t* prow, int64_t m0, const float* sf, float* out) {
    row_tile<BITS, G, MR>(p, prow, m0, sf, out);
  }
  static float dot(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
  static void scales(const uint16_t* sp, const uint16_t* zp, int64_t ng, float* sf, float* szf) {
    int64_t g = 0;
    for (; g + 16 <= ng; g += 16) {
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sp + g)));
      const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(zp + g)));
      _mm512_storeu_ps(sf + g, s);
      _mm512_storeu_ps(szf + g, _mm512_mul_ps(s, z));
    }
    for (; g < ng; ++g) {  // (the row loop converts 16 rows at a time: a tail only at its end)
      sf[g] = _cvtsh_ss(sp[g]);
      szf[g] = sf[g] * _cvtsh_ss(zp[g]);
    }
  }
};

// One group of codes as fp32 weights s * (q - z); G >= 64 (64 codes per zmm chunk).
template <int BITS, int G>
inline void dequant_group_t(const uint8_t* gp, float s, float z, float* out) {
  const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
  for (int t = 0; t < G / 64; ++t) {
    const __m512i c = unpack_chunk<BITS, G>(gp, t);
    for (int k = 0; k < 4; ++k) {
      const __m128i piece = _mm512_extracti32x4_epi32(c, k);
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(piece));
      _mm512_storeu_ps(out + 64 * t + 16 * k, _mm512_mul_ps(sv, _mm512_sub_ps(q, zv)));
    }
  }
}

template <int BITS>
inline void dequant_group_bits(const uint8_t* gp, int G, float s, float z, float* out) {
  if (G == 64) {
    dequant_group_t<BITS, 64>(gp, s, z, out);
  } else if (G == 128) {
    dequant_group_t<BITS, 128>(gp, s, z, out);
  } else {  // G == 32: unpack_chunk would read the next group too; decode in scalar code
    for (int i = 0; i < G; ++i) out[i] = s * ((float)decode_code(gp, G, BITS, i) - z);
  }
}

// A 1-bit compressed part straight from its codes (SimdVec::axpy_qpart): y[0:c1-c0] += sum_i coef[i] s_i (q_i -
// z_i) over columns [c0, c1) (rows <= 256, qpart_layout_avx2; c0 and c1 multiples of G, lowbit_layout). Each
// row's two terms, d_i (1 - z_i) and d_i (0 - z_i) with d_i = coef[i] s_i, are formed 16 groups at a time
// (form_terms) and broadcast once per row and group; per 16 columns the 16 code bits are a mask choosing each lane's
// term (a blend), added to the accumulator: one add per row on its dependency chain (the earlier form, a plain
// add then a masked add of the other term, gave the same sums with two adds on the chain: latency-bound at G = 64,
// whose 4 vectors are only 4 chains). A whole group (G / 16 <= 8 vectors) stays in registers across the rows.
// Measured (Intel, M = 1, N = 4096, 12 rows, G = 128): ~1.6 us against ~2.4 us for 32 columns a pass with both
// terms broadcast per row and 16 columns. (Factoring the zero terms out as one constant per group saves the blend but loses up to ~4x of
// the fp32 error bound per term where |z| is large beside |1 - z|.)
template <int NV>
inline void axpy_1bit_group(float* yc, const uint8_t* gp, int64_t rb, int64_t R, const float* one,
                            const float* zero) {
  __m512 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm512_loadu_ps(yc + 16 * v);
  for (int64_t i = 0; i < R; ++i, gp += rb) {
    const __m512 o = _mm512_set1_ps(one[i * 16]), z = _mm512_set1_ps(zero[i * 16]);
    for (int v = 0; v < NV; ++v) {
      uint16_t w;
      std::memcpy(&w, gp + 2 * v, 2);  // column c + 16 v + k is bit k of these two bytes
      // one term per lane, chosen off the accumulator's chain (one add on it per row, not two)
      acc[v] = _mm512_add_ps(acc[v], _mm512_mask_blend_ps((__mmask16)w, z, o));
    }
  }
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(yc + 16 * v, acc[v]);
}

// Per row, for groups [g, g + n) (n <= 16; row-major with stride 16), from d = coef[i] s_i: ONE_ZERO, the 1-bit
// terms d (1 - z) and d (0 - z) (as the AVX2 decoder forms them) in a and b; else d in a and z in b.
template <bool ONE_ZERO>
inline void form_terms(const float* coef, const lk_qweight& p, int64_t g, int64_t n, float* a, float* b) {
  const int64_t ng = p.K / p.group_size;
  for (int64_t i = 0; i < p.N; ++i) {
    const uint16_t *sp = p.scales + i * ng + g, *zp = p.zeros + i * ng + g;
    __m512 s, z;
    if (n == 16) {
      s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sp));
      z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)zp));
    } else {  // (a partial chunk reads only its own groups: the rows' scales end there)
      alignas(32) uint16_t sb[16] = {}, zb[16] = {};
      std::memcpy(sb, sp, (size_t)n * 2);
      std::memcpy(zb, zp, (size_t)n * 2);
      s = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)sb));
      z = _mm512_cvtph_ps(_mm256_load_si256((const __m256i*)zb));
    }
    const __m512 d = _mm512_mul_ps(_mm512_set1_ps(coef[i]), s);
    if constexpr (ONE_ZERO) {
      _mm512_store_ps(a + i * 16, _mm512_mul_ps(d, _mm512_sub_ps(_mm512_set1_ps(1.f), z)));
      _mm512_store_ps(b + i * 16, _mm512_mul_ps(d, _mm512_sub_ps(_mm512_setzero_ps(), z)));
    } else {
      _mm512_store_ps(a + i * 16, d);
      _mm512_store_ps(b + i * 16, z);
    }
  }
}

template <int G>
void axpy_qpart_1bit(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
  const int64_t rb = row_bytes(p.K, 1);
  alignas(64) float one[256 * 16], zero[256 * 16];
  for (int64_t g = c0 / G, gend = c1 / G; g < gend; ++g) {
    const int64_t gi = (g - c0 / G) % 16;
    if (gi == 0) form_terms<true>(coef, p, g, std::min<int64_t>(16, gend - g), one, zero);
    axpy_1bit_group<G / 16>(y + (g * G - c0), p.qweight + g * G / 8, rb, p.N, one + gi, zero + gi);
  }
}

// 2-, 4- and 8-bit parts (groups of W = G BITS / 8 >= 16 bytes: column o of a group is byte o % W of it, bits
// (o / W) BITS up): y += sum_i d_i (q_i - z_i), per row each 16-byte run of the group widened to 32-bit lanes once,
// then per 16 columns a shift, a mask, a conversion, the zero's subtraction and an FMA (q - z per lane, as the
// other decoders: factoring sum_i d_i z_i out per group lost up to ~2x of the fp32 error bound per term at 4 and
// 8 bits, where q and z are large beside q - z). A whole group (G / 16 <= 8 vectors) stays in registers
// across the rows. c0 and c1: multiples of G (lowbit_layout).
template <int BITS, int G>
void axpy_qpart_lowbit(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
  constexpr int W = G * BITS / 8, NV = G / 16, NZ = W / 16;
  static_assert(W % 16 == 0 && NV <= 8, "axpy_qpart_lowbit: layout");
  const int64_t rb = row_bytes(p.K, BITS), R = p.N;
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  alignas(64) float d[256 * 16], zs[256 * 16];
  for (int64_t g = c0 / G, gend = c1 / G; g < gend; ++g) {
    const int64_t gi = (g - c0 / G) % 16;
    if (gi == 0) form_terms<false>(coef, p, g, std::min<int64_t>(16, gend - g), d, zs);
    const uint8_t* gp = p.qweight + g * W;
    float* yc = y + (g * G - c0);
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_loadu_ps(yc + 16 * v);
    for (int64_t i = 0; i < R; ++i, gp += rb) {
      __m512i q[NZ];
      for (int u = 0; u < NZ; ++u) q[u] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(gp + 16 * u)));
      const __m512 dv = _mm512_set1_ps(d[i * 16 + gi]), zv = _mm512_set1_ps(zs[i * 16 + gi]);
      for (int v = 0; v < NV; ++v) {
        const __m512i c = _mm512_and_si512(_mm512_srli_epi32(q[(16 * v % W) / 16], (16 * v / W) * BITS), mask);
        acc[v] = _mm512_fmadd_ps(dv, _mm512_sub_ps(_mm512_cvtepi32_ps(c), zv), acc[v]);
      }
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(yc + 16 * v, acc[v]);
  }
}

// Whether axpy_qpart_1bit / axpy_qpart_lowbit take this width, group size and column range (whole groups; the
// others, 3-bit and 2-bit in groups of 32: the AVX2 decoder).
inline bool lowbit_layout(int bits, int G, int64_t c0, int64_t c1) {
  return (bits == 1 || (bits == 2 && G >= 64) || bits == 4 || bits == 8) && c0 % G == 0 && c1 % G == 0;
}

void axpy_qpart_1bit_g(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
  switch (p.group_size) {
    case 32: axpy_qpart_1bit<32>(y, coef, p, c0, c1); break;
    case 64: axpy_qpart_1bit<64>(y, coef, p, c0, c1); break;
    default: axpy_qpart_1bit<128>(y, coef, p, c0, c1); break;
  }
}

template <int BITS>
void axpy_qpart_lowbit_g(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
  switch (p.group_size) {
    case 32:  // (2-bit groups of 32 are 8 bytes: lowbit_layout sends them to the AVX2 decoder)
      if constexpr (BITS == 2) axpy_qpart_avx2(y, coef, p, c0, c1);
      else axpy_qpart_lowbit<BITS, 32>(y, coef, p, c0, c1);
      break;
    case 64: axpy_qpart_lowbit<BITS, 64>(y, coef, p, c0, c1); break;
    default: axpy_qpart_lowbit<BITS, 128>(y, coef, p, c0, c1); break;
  }
}

struct V16 {  // the AVX-512 register type of simd_vec.h
  using reg = __m512;
  static constexpr int W = 16;
  static void axpy_qpart(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
    if (!lowbit_layout(p.bits, p.group_size, c0, c1)) return axpy_qpart_avx2(y, coef, p, c0, c1);
    switch (p.bits) {
      case 1: return axpy_qpart_1bit_g(y, coef, p, c0, c1);
      case 2: return axpy_qpart_lowbit_g<2>(y, coef, p, c0, c1);
      case 4: return axpy_qpart_lowbit_g<4>(y, coef, p, c0, c1);
      default: return axpy_qpart_lowbit_g<8>(y, coef, p, c0, c1);
    }
  }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(reg v) { return _mm512_reduce_add_ps(v); }
  static reg load_f16(const uint16_t* h) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)h)); }
  static reg load_bf16(const uint16_t* h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)h)), 16));
  }
  template <int BITS>  // one group of codes as fp32 weights s * (q - z)
  static void dequant_bits(const uint8_t* gp, int G, float s, float z, float* out) {
    dequant_group_bits<BITS>(gp, G, s, z, out);
  }
};

using Avx512Expand = SimdVec<V16>;

}  // namespace

void lora_expand_avx512(const LoraExpand& e, int64_t g0, int64_t g1) { expand_groups<Avx512Expand>(e, g0, g1); }
void dense_shrink_avx512(const DenseShrink& p, int64_t i0, int64_t i1) { dense_shrink_rows<Avx512Expand>(p, i0, i1); }
void multi_expand_avx512(const MultiExpand& e, int64_t c0, int64_t c1) { multi_expand_cols<Avx512Expand>(e, c0, c1); }

void qmm_rows_avx512(const QmmProblem& p, int64_t n0, int64_t n1) { simd_rows_dispatch<Avx512>(p, n0, n1); }

}  // namespace lk
