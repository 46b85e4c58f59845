// Sparse fp16 outliers of the weight rows (gwq_matmul): for 1 < M <= kOutlierRowBlock added into a row's results
// right after its dense pass (row_outliers); at M = 1 and above kOutlierRowBlock added after the thread's dense rows
// (outliers_after_rows). Included by every ISA's kernel file and compiled with its flags (anonymous namespace: one
// copy per translation unit).
#pragma once
#include <algorithm>
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

#ifdef LK_OUTLIERS_AVX2
// x[c[0..8)] as one vector, from eight scalar loads. AVX2's vgatherdps took ~4 cycles an element on the AVX2 AMD
// EPYC (Zen) cores of an earlier machine, twice these loads and inserts (on the AVX-512 ones, 0.40 against 0.20 ns
// an element). decode_outlier_sums' row step uses one gather per 8 rows, not per outlier.
inline __m256 gather8(const float* x, const uint16_t* c) {
  __m128 lo = _mm_load_ss(x + c[0]), hi = _mm_load_ss(x + c[4]);
  lo = _mm_insert_ps(lo, _mm_load_ss(x + c[1]), 0x10);
  hi = _mm_insert_ps(hi, _mm_load_ss(x + c[5]), 0x10);
  lo = _mm_insert_ps(lo, _mm_load_ss(x + c[2]), 0x20);
  hi = _mm_insert_ps(hi, _mm_load_ss(x + c[6]), 0x20);
  lo = _mm_insert_ps(lo, _mm_load_ss(x + c[3]), 0x30);
  hi = _mm_insert_ps(hi, _mm_load_ss(x + c[7]), 0x30);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// Inclusive prefix sum of the eight lanes.
inline __m256 scan8(__m256 v) {
  v = _mm256_add_ps(v, _mm256_castsi256_ps(_mm256_slli_si256(_mm256_castps_si256(v), 4)));
  v = _mm256_add_ps(v, _mm256_castsi256_ps(_mm256_slli_si256(_mm256_castps_si256(v), 8)));
  return _mm256_add_ps(v, _mm256_permute_ps(_mm256_permute2f128_ps(v, v, 0x08), 0xFF));
}
#endif

// Decode (M = 1): acc[n - n0] = sum over row n's outliers j of val_j * x[col_j] for the rows [n0, n1), from
// their contiguous run of the CSR in one branch-free pass: the running sum of the products (8 a step on
// AVX2), each row's sum the difference of the running sum at its two ends. Per row (a masked gather step
// and a horizontal sum, its length feeding the loop's branches) the outliers cost ~2 ns each on SmolLM2's
// GWQ layers (1%, K = 576) beside the dense pass; this pass about half. Alone, on the AMD EPYC (AVX-512):
// 0.57 ns an outlier on one core, CSR in cache or not (~1.7 cycles: the x[col] loads and lane inserts and the
// scan's shuffles); 16 a step with AVX-512 ran at the same speed with these inserts and at 1.08 ns with
// vgatherdps. The differences cancel the rows
// before, so each sum has an absolute error of a few ulp of the running sum: callers keep [n0, n1) short
// (add_decode_outliers: kChunkRows). Pointers or columns out of range: the rows contribute nothing and *p.bad_csr
// is set.
template <class H2F>
inline void decode_outlier_sums(const QmmProblem& p, int64_t n0, int64_t n1, H2F h2f, float* acc) {
  const int32_t* rp = p.row_ptr;
  const int64_t J0 = rp[n0], J1 = rp[n1];
  const auto fail = [&] {
    p.bad_csr->store(1, std::memory_order_relaxed);
    for (int64_t n = n0; n < n1; ++n) acc[n - n0] = 0.f;
  };
  if (J0 < 0 || J1 > p.nnz || J0 > J1) return fail();
  float* const run = reinterpret_cast<float*>(thread_scratch(kScratchOutlierRun, (size_t)(J1 - J0 + 1) * 4));
  float* r = run + 1 - J0;  // r[j] = sum of the products J0..j; r[J0 - 1] = 0
  r[J0 - 1] = 0.f;
  const uint16_t* col = p.col;
  const uint16_t* val = p.val;
  const float* const xt = p.xt;  // (locals: the vector stores below may alias p's fields, which would be re-read)
  const int64_t K = p.K;
  float s = 0.f;
  int64_t j = J0;
#ifdef LK_OUTLIERS_AVX2
  const __m256i kmax = _mm256_set1_epi32((int)(K - 1));
  __m256 carry = _mm256_setzero_ps();
  for (; j + 8 <= J1; j += 8) {
    const __m256i c = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(col + j)));
    const __m256i bad = _mm256_cmpgt_epi32(c, kmax);
    if (!_mm256_testz_si256(bad, bad)) return fail();
    const __m256 v = scan8(_mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(val + j))),
                                         gather8(xt, col + j)));
    _mm256_storeu_ps(r + j, _mm256_add_ps(v, carry));
    carry = _mm256_add_ps(carry, _mm256_permute_ps(_mm256_permute2f128_ps(v, v, 0x11), 0xFF));
  }
  s = _mm256_cvtss_f32(carry);
#endif
  for (; j < J1; ++j) {
    const int64_t c = col[j];
    if (c >= K) return fail();
    s += h2f(val[j]) * xt[c];
    r[j] = s;
  }
  // Row pointers that decrease are caught here: each is compared with the one before, and read clamped
  // into [J0, J1] (the reads stay in the run).
  float prev = r[J0 - 1];
  int64_t last = J0;
  bool decreasing = false;
  int64_t n = n0;
#ifdef LK_OUTLIERS_AVX2
  // 8 rows a step: run[e - J0] = r[e - 1] (e clamped into [J0, J1]); each sum the difference with the lane before
  {
    const __m256i lo = _mm256_set1_epi32((int)J0), hi = _mm256_set1_epi32((int)J1);
    const __m256i rot = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
    __m256i dec = _mm256_setzero_si256();
    for (; n + 8 <= n1; n += 8) {
      const __m256i e = _mm256_loadu_si256((const __m256i*)(rp + n + 1));
      dec = _mm256_or_si256(dec, _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i*)(rp + n)), e));
      const __m256i idx = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(e, lo), hi), lo);
      const __m256 next = _mm256_i32gather_ps(run, idx, 4);
      const __m256 before = _mm256_blend_ps(_mm256_permutevar8x32_ps(next, rot), _mm256_set1_ps(prev), 0x01);
      _mm256_storeu_ps(acc + (n - n0), _mm256_sub_ps(next, before));
      prev = _mm256_cvtss_f32(_mm256_permutevar8x32_ps(next, _mm256_set1_epi32(7)));
    }
    decreasing = !_mm256_testz_si256(dec, dec);
    last = n > n0 ? rp[n] : J0;
  }
#endif
  for (; n < n1; ++n) {
    const int64_t e = rp[n + 1];
    decreasing |= e < last;
    last = e;
    const float next = r[std::min<int64_t>(std::max<int64_t>(e, J0), J1) - 1];
    acc[n - n0] = next - prev;
    prev = next;
  }
  if (decreasing) fail();
}

// Decode (M = 1): y[n] += the outlier sums of rows [n0, n1), after the rows' dense pass, kChunkRows rows per
// decode_outlier_sums (short running sums). A chunk without outliers costs the check that its row pointers are
// all equal. Measured on SmolLM2's GWQ-4 layers (210 per token, 1% outliers, AVX-512, 2 threads, AMD EPYC):
// gwq over dense 1.19-1.24 against 1.43-1.52 with the chunks' sums computed between the dense rows (each
// chunk's CSR prefetched 48 rows ahead: the CSR's reads interleaved with the weight stream; 1.09-1.11 on
// 4096 x 4096 layers on an Intel Xeon) -- prefetching the slab's CSR before the rows changed nothing here.
constexpr int64_t kChunkRows = 32;

template <class H2F>
inline void add_decode_outliers(const QmmProblem& p, int64_t n0, int64_t n1, H2F h2f) {
  float acc[kChunkRows];
  const int32_t* rp = p.row_ptr;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunkRows) {
    const int64_t c1 = std::min(n1, c0 + kChunkRows);
    if (rp[c0] == rp[c1]) {  // no outliers, if the pointers between are equal too (else the CSR is refused)
      int32_t diff = 0;
      for (int64_t n = c0 + 1; n < c1; ++n) diff |= rp[n] ^ rp[c0];
      if (diff || rp[c0] < 0 || rp[c0] > p.nnz) p.bad_csr->store(1, std::memory_order_relaxed);
      continue;
    }
    decode_outlier_sums(p, c0, c1, h2f, acc);
    for (int64_t n = c0; n < c1; ++n) p.y[n] += acc[n - c0];
  }
}

// Activation rows per outlier block. Up to this M (from 2), each weight row adds its
// outliers right after its dense pass (row_outliers into the same accumulator). Above it, x^T no longer
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

// The outliers of rows [n0, n1) added to y after the rows' dense pass: M = 1 add_decode_outliers, else slab_outliers.
template <class H2F>
inline void outliers_after_rows(const QmmProblem& p, int64_t n0, int64_t n1, H2F h2f) {
  if (p.M == 1) add_decode_outliers(p, n0, n1, h2f);
  else slab_outliers(p, n0, n1, h2f);
}

}  // namespace
}  // namespace lk
