// Sparse fp16 outliers of a weight row (gwq_matmul), added into that row's
// results right after its dense pass. Included by every ISA's kernel file and
// compiled with its flags (anonymous namespace: one copy per translation unit).
#pragma once
#include <cstdint>

#include "common.h"

namespace lk {
namespace {

// acc[m] = sum over row n's outliers j of val_j * x[m, col_j], for m < M, with
// x read column-wise from p.xt ([K, M]). A row whose pointers or columns are out
// of range contributes nothing and sets *p.bad_csr (the caller reports it).
template <class H2F>
inline void row_outliers(const QmmProblem& p, int64_t n, H2F h2f, float* acc) {
  const int64_t M = p.M;
  for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
  const int64_t j0 = p.row_ptr[n], j1 = p.row_ptr[n + 1];
  if (j0 < 0 || j1 < j0 || j1 > p.nnz) {
    p.bad_csr->store(1, std::memory_order_relaxed);
    return;
  }
  const uint16_t* col = p.col;
  const uint16_t* val = p.val;
  if (M == 1) {  // decode: two independent chains over the row's outliers
    float a0 = 0.f, a1 = 0.f;
    int64_t j = j0;
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
  for (int64_t j = j0; j < j1; ++j) {  // one contiguous column of x per outlier
    const int64_t c = col[j];
    if (c >= p.K) {
      p.bad_csr->store(1, std::memory_order_relaxed);
      return;
    }
    const float v = h2f(val[j]);
    const float* xc = p.xt + c * M;
    for (int64_t m = 0; m < M; ++m) acc[m] += v * xc[m];
  }
}

}  // namespace
}  // namespace lk
