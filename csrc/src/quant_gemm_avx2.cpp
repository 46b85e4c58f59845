// Blocked low-bit GEMM (AVX2 + FMA + F16C) for many activation rows: prefill, batched decode, training
// forwards. Same math as the row kernels (quant_matmul_avx2.cpp): y = sum_b s_g(b) xs_b (codes . xq)_b
// - sum_g s_g z_g xsum_g, with int8 activations; a different order of the fp32 additions.
//
// The row kernels hold one weight row in registers and take its dot products with up to 4 activation rows,
// one horizontal sum per output: each code group is unpacked again for every 4 activation rows. Here the
// codes of 8 weight rows are unpacked once into a panel of bytes, interleaved 4 codes at a time:
//   panel byte (k / 4) * 32 + 4 j + k % 4 = code k of weight row j (j < 8),
// so that one 32-byte load holds 4 consecutive codes of each of the 8 rows, and vpmaddubsw against the 4
// activation bytes broadcast to every lane gives each lane (= one weight row) its own partial dot product:
// no horizontal sums, one fp32 lane per output column (as ggml's repacked Q4_0 8x8 kernels, written anew
// for lorakern's layouts). A micro-tile is 4 activation rows x 8 weight rows: 4 fp32 accumulators and 4
// int32 block sums in registers; 4 steps of vpmaddubsw are summed in int16 before one vpmaddwd (codes <= 15,
// |xq| <= 127: 4 * 2 * 15 * 127 < 2^15). 8-bit codes would saturate vpmaddubsw: they are centred (q' = q - 128,
// s8; the 128 moves into the zero point as in the row kernels) and the panel holds q' and |q'| side by side:
// vpmaddubsw(|q'|, sign(x, q')) = q' x, pairs <= 2 * 128 * 127 < 2^15, one vpmaddwd per step.
//
// The panels' layout and packing: gemm_panel.h (shared with the AMX GEMM).
// Cache blocking: panels are packed a chunk at a time (kChunkBytes of codes, L2), and activation rows pass
// over a chunk kMBlock at a time (kMBlock x K int8 stays in L2 while the chunk's panels are reused).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"
#include "gemm_panel.h"
#include "outliers.h"
#include "simd_x86.h"

namespace lk {
namespace {

constexpr int NR = 8;                          // weight rows per panel: one fp32 lane each
constexpr int MR = 4;                          // activation rows per micro-tile
constexpr int64_t kMBlock = 64;                // activation rows per pass over a chunk of panels
constexpr int64_t kChunkBytes = 128 * 1024;    // packed codes per chunk of panels

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// out[i] (8 lanes = the panel's 8 weight rows) for activation rows m0 + i, i < R.
template <int G, int R, bool K8>
inline void micro_tile(const QmmProblem& p, const uint8_t* codes, const float* sf, const float* szf, int64_t m0,
                       __m256* out) {
  constexpr int B = G < 64 ? G : 64, BPG = G / B, SPB = B / 4;  // 4-code steps per activation block
  const int64_t K = p.K, ng = K / G, nb = K / B;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m256 sv = _mm256_loadu_ps(sf + 8 * g);
    for (int b = 0; b < BPG; ++b) {
      const int64_t k0 = g * G + b * B;
      __m256i d[R];
      for (int i = 0; i < R; ++i) d[i] = _mm256_setzero_si256();
      if constexpr (K8) {  // centred 8-bit codes: one vpmaddwd per step (see the top of the file)
        for (int s = 0; s < SPB; ++s) {
          const uint8_t* cp = codes + (k0 / 4 + s) * 32;
          const __m256i w = _mm256_loadu_si256((const __m256i*)cp);
          const __m256i a = _mm256_loadu_si256((const __m256i*)(cp + NR * K));
          for (int i = 0; i < R; ++i) {
            const __m256i xb = _mm256_set1_epi32(load_i32(p.xq + (m0 + i) * K + k0 + 4 * s));
            d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(xb, w)), ones));
          }
        }
      } else
      for (int s = 0; s < SPB; s += 4) {
        const uint8_t* cp = codes + (k0 / 4 + s) * 32;
        const __m256i w0 = _mm256_loadu_si256((const __m256i*)cp);
        const __m256i w1 = _mm256_loadu_si256((const __m256i*)(cp + 32));
        const __m256i w2 = _mm256_loadu_si256((const __m256i*)(cp + 64));
        const __m256i w3 = _mm256_loadu_si256((const __m256i*)(cp + 96));
        for (int i = 0; i < R; ++i) {
          const int8_t* xp = p.xq + (m0 + i) * K + k0 + 4 * s;
          __m256i h = _mm256_maddubs_epi16(w0, _mm256_set1_epi32(load_i32(xp)));
          h = _mm256_add_epi16(h, _mm256_maddubs_epi16(w1, _mm256_set1_epi32(load_i32(xp + 4))));
          h = _mm256_add_epi16(h, _mm256_maddubs_epi16(w2, _mm256_set1_epi32(load_i32(xp + 8))));
          h = _mm256_add_epi16(h, _mm256_maddubs_epi16(w3, _mm256_set1_epi32(load_i32(xp + 12))));
          d[i] = _mm256_add_epi32(d[i], _mm256_madd_epi16(h, ones));
        }
      }
      for (int i = 0; i < R; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i]),
                                 _mm256_mul_ps(sv, _mm256_set1_ps(p.xs[(m0 + i) * nb + g * BPG + b])), acc[i]);
    }
    const __m256 zv = _mm256_loadu_ps(szf + 8 * g);
    for (int i = 0; i < R; ++i) acc[i] = _mm256_fnmadd_ps(zv, _mm256_set1_ps(p.xsum[(m0 + i) * ng + g]), acc[i]);
  }
  for (int i = 0; i < R; ++i) out[i] = acc[i];
}

// y[m, n .. n + nr) = out[i] + bias for rows m0 + i, i < R.
inline void store_tile(const QmmProblem& p, int64_t m0, int R, int64_t n, int nr, const __m256* out) {
  alignas(32) float b8[NR] = {};
  if (p.bias)
    for (int j = 0; j < nr; ++j) b8[j] = p.bias[n + j];
  const __m256 bv = _mm256_load_ps(b8);
  for (int i = 0; i < R; ++i) {
    float* yr = p.y + (m0 + i) * p.N + n;
    const __m256 v = _mm256_add_ps(out[i], bv);
    if (nr == NR) {
      _mm256_storeu_ps(yr, v);
    } else {
      alignas(32) float t[NR];
      _mm256_store_ps(t, v);
      for (int j = 0; j < nr; ++j) yr[j] = t[j];
    }
  }
}

template <int BITS, int G>
void gemm_rows(const QmmProblem& p, int64_t n0, int64_t n1) {
  constexpr bool K8 = BITS == 8;
  PanelChunks<BITS, G, NR, K8> pan(p, n0, n1, kChunkBytes);
  while (pan.next()) {
    for (int64_t mb = 0; mb < p.M; mb += kMBlock) {
      const int64_t me = std::min(p.M, mb + kMBlock);
      for (int64_t pi = pan.c0; pi < pan.c1; ++pi) {
        const int64_t n = pan.row(pi);
        const int nr = pan.rows(pi);
        const uint8_t* pc = pan.codes_of(pi);
        const float* ps = pan.scales_of(pi);
        const float* pz = pan.szeros_of(pi);
        for (int64_t m0 = mb; m0 < me; m0 += MR) {
          const int R = (int)std::min<int64_t>(MR, me - m0);
          __m256 out[MR];
          switch (R) {
            case 4: micro_tile<G, 4, K8>(p, pc, ps, pz, m0, out); break;
            case 3: micro_tile<G, 3, K8>(p, pc, ps, pz, m0, out); break;
            case 2: micro_tile<G, 2, K8>(p, pc, ps, pz, m0, out); break;
            default: micro_tile<G, 1, K8>(p, pc, ps, pz, m0, out); break;
          }
          store_tile(p, m0, R, n, nr, out);
        }
      }
    }
  }
  if (p.row_ptr) slab_outliers(p, n0, n1, [](uint16_t h) { return _cvtsh_ss(h); });
}

}  // namespace

// Rows [n0, n1) of y for every m (the contract of qmm_rows).
void qmm_gemm_avx2(const QmmProblem& p, int64_t n0, int64_t n1) {
  with_format(p, [&](auto bits, auto g) { gemm_rows<decltype(bits)::value, decltype(g)::value>(p, n0, n1); });
}

}  // namespace lk
