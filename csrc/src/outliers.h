// Sparse fp16 outliers of a weight row (gwq_matmul), added into that row's
// results right after its dense pass. Included by every ISA's kernel file and
// compiled with its flags (anonymous namespace: one copy per translation unit).
#pragma once
#include <cstdint>
#include <vector>

#include "common.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(LORAKERN_SIMDE)
#include <immintrin.h>
#define LK_OUTLIERS_AVX2 1
#endif

namespace lk {
namespace {

// acc[i] = sum over row n's outliers j of val_j * x[m0 + i, col_j], for i < mb,
// with x read column-wise from p.xt ([K, M]). A row whose pointers or columns are
// out of range contributes nothing and sets *p.bad_csr (the caller reports it).
template <class H2F>
inline void row_outliers(const QmmProblem& p, int64_t n, int64_t m0, int64_t mb, H2F h2f, float* acc) {
  const int64_t M = p.M;
  for (int64_t i = 0; i < mb; ++i) acc[i] = 0.f;
  const int64_t j0 = p.row_ptr[n], j1 = p.row_ptr[n + 1];
  if (j0 < 0 || j1 < j0 || j1 > p.nnz) {
    p.bad_csr->store(1, std::memory_order_relaxed);
    return;
  }
  const uint16_t* col = p.col;
  const uint16_t* val = p.val;
  if (M == 1) {  // decode (m0 = 0, mb = 1): two independent chains over the row's outliers
    float a0 = 0.f, a1 = 0.f;
    int64_t j = j0;
#ifdef LK_OUTLIERS_AVX2
    // 8 outliers a step, the row's last partial step masked (lanes past the row read
    // the next row's entries, which stay inside the arrays, and contribute 0): widen
    // the columns, gather x, convert the fp16 values, FMA. Live columns are range-
    // checked as a vector and dead lanes get column 0, so the gather stays inside x.
    const __m256i kmax = _mm256_set1_epi32((int)(p.K - 1));
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i bad = _mm256_setzero_si256();
    __m256 va = _mm256_setzero_ps();
    for (; j < j1 && j + 8 <= p.nnz; j += 8) {
      const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(j1 - j)), lane);
      const __m256i c = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(col + j))), live);
      bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(c, kmax));
      const __m256 v = _mm256_and_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(val + j))),
                                     _mm256_castsi256_ps(live));
      va = _mm256_fmadd_ps(v, _mm256_i32gather_ps(p.xt, _mm256_min_epu32(c, kmax), 4), va);
    }
    if (!_mm256_testz_si256(bad, bad)) {
      p.bad_csr->store(1, std::memory_order_relaxed);
      return;
    }
    if (j > j1) j = j1;  // the masked step covered the row's end
    {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(va), _mm256_extractf128_ps(va, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      a0 = _mm_cvtss_f32(s);
    }
#endif
    for (; j + 2 <= j1; j += 2) {
      const int64_t c0 = col[j], c1 = col[j + 1];
      if (c0 >= p.K || c1 >= p.K) {
        p.bad_csr->store(1, std::memory_order_relaxed);
        return;
      }
      a0 += h2f(val[j]) * p.xt[c0];
      a1 += h2f(val[j + 1]) * p.xt[c1];
    }
    if (j < j1) {
      const int64_t c = col[j];
      if (c >= p.K) {
        p.bad_csr->store(1, std::memory_order_relaxed);
        return;
      }
      a0 += h2f(val[j]) * p.xt[c];
    }
    acc[0] = a0 + a1;
    return;
  }
#ifdef LK_OUTLIERS_AVX2
  // 8 activation rows at a time in registers (two chains), masked at the end of
  // the block; the row's columns are checked once, before any load.
  for (int64_t j = j0; j < j1; ++j)
    if (col[j] >= p.K) {
      p.bad_csr->store(1, std::memory_order_relaxed);
      return;
    }
  for (int64_t i0 = 0; i0 < mb; i0 += 8) {
    const int64_t mr = mb - i0 < 8 ? mb - i0 : 8;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)mr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const float* xb = p.xt + m0 + i0;
    __m256 a0v = _mm256_setzero_ps(), a1v = _mm256_setzero_ps();
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
      a0v = _mm256_fmadd_ps(_mm256_set1_ps(h2f(val[j])), _mm256_maskload_ps(xb + col[j] * M, mask), a0v);
      a1v = _mm256_fmadd_ps(_mm256_set1_ps(h2f(val[j + 1])), _mm256_maskload_ps(xb + col[j + 1] * M, mask), a1v);
    }
    if (j < j1) a0v = _mm256_fmadd_ps(_mm256_set1_ps(h2f(val[j])), _mm256_maskload_ps(xb + col[j] * M, mask), a0v);
    _mm256_maskstore_ps(acc + i0, mask, _mm256_add_ps(a0v, a1v));
  }
#else
  for (int64_t j = j0; j < j1; ++j) {  // one contiguous piece of a column of x per outlier
    const int64_t c = col[j];
    if (c >= p.K) {
      p.bad_csr->store(1, std::memory_order_relaxed);
      return;
    }
    const float v = h2f(val[j]);
    const float* __restrict xc = p.xt + c * M + m0;
    float* __restrict a = acc;
    for (int64_t i = 0; i < mb; ++i) a[i] += v * xc[i];
  }
#endif
}

// Activation rows per outlier block. Up to this M, each weight row adds its
// outliers right after its dense pass (one accumulator). Above it, x^T no longer
// fits in L2 (4096 x 128 fp32 = 2 MiB) and random outlier columns would each miss
// to L3, so the thread's slab adds its outliers after its dense pass, 16
// activation rows at a time (a 256 KiB slice of x^T for K = 4096).
constexpr int64_t kOutlierRowBlock = 16;

// y[m, n] += the outliers' products for rows [n0, n1) and every m, in blocks of
// kOutlierRowBlock activation rows; each block's sums are buffered per weight row,
// then added to y along its rows (contiguous in n).
template <class H2F>
inline void slab_outliers(const QmmProblem& p, int64_t n0, int64_t n1, H2F h2f) {
  constexpr int64_t B = kOutlierRowBlock;
  std::vector<float> buf((size_t)((n1 - n0) * B));
  for (int64_t m0 = 0; m0 < p.M; m0 += B) {
    const int64_t mb = p.M - m0 < B ? p.M - m0 : B;
    for (int64_t n = n0; n < n1; ++n) row_outliers(p, n, m0, mb, h2f, &buf[(size_t)((n - n0) * B)]);
    for (int64_t i = 0; i < mb; ++i) {
      float* __restrict yr = p.y + (m0 + i) * p.N;
      const float* __restrict br = buf.data() + i;
      for (int64_t n = n0; n < n1; ++n) yr[n] += br[(n - n0) * B];
    }
  }
}

}  // namespace
}  // namespace lk
