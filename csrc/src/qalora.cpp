// C ABI entry points for training on and adapting a quantized base (QA-LoRA, arXiv 2309.14717):
//
// lk_quant_matmul_grad_input: dx = dy @ (W + outliers), the gradient of lk_quant_matmul / lk_gwq_matmul
//   with respect to x. It is lora_mixed's expand with W in the role of B'^T (rows = N, groups along K):
//   threads own groups of G columns of dx, and walk W in chunks of kRowChunk rows, each dequantized into an
//   fp32 tile [chunk, G] (in L1/L2, never the whole matrix) and accumulated into dx row by row. The sparse
//   outliers follow in a second pass whose threads own rows of dx.
//
// lk_quant_matmul_qalora: y = x @ W^T (+ bias) + scale * (pool_G(x) A^T) B^T in one call. The pooled input
//   is the per-group sum of the int8-quantized activations that the base kernel computes anyway (xsum / G),
//   so the unmerged adapter gives exactly what the merged zeros z' = z - scale * (B A) / (G s) give, up to
//   z''s fp16 rounding.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <new>
#include <vector>

#include "common.h"
#include "driver.h"
#include "kernels.h"
#include "lora.h"
#include "lorakern/lorakern.h"

namespace {

constexpr int64_t kRowChunk = 128;  // rows of W per dequantized tile of the gradient

// Every row pointer and column of a CSR over N rows, K columns (O(N + nnz), once per call).
bool csr_ok(const lk_outliers* o, int64_t N, int64_t K) {
  if (!o->row_ptr || o->nnz < 0 || (o->nnz > 0 && (!o->col_idx || !o->values))) return false;
  if (K > 65536 || o->row_ptr[0] != 0 || o->row_ptr[N] != o->nnz) return false;
  for (int64_t n = 0; n < N; ++n)
    if (o->row_ptr[n + 1] < o->row_ptr[n]) return false;
  for (int64_t j = 0; j < o->nnz; ++j)
    if (o->col_idx[j] >= K) return false;
  return true;
}

}  // namespace

extern "C" {

lk_status lk_quant_matmul_grad_input(const void* dy, lk_dtype dy_dtype, int64_t M, const lk_qweight* w,
                                     const lk_outliers* outliers, void* dx, int num_threads) {
  if (lk_status s = lk::check_weight(w)) return s;
  if (M < 0 || (M > 0 && (!dy || !dx))) return LK_ERR_INVALID_ARG;
  if (dy_dtype != LK_F32 && dy_dtype != LK_F16 && dy_dtype != LK_BF16) return LK_ERR_INVALID_ARG;
  const int64_t N = w->N, K = w->K;
  const int G = w->group_size;
  if (outliers && !csr_ok(outliers, N, K)) return LK_ERR_INVALID_ARG;
  if (M == 0) return LK_OK;
  try {
    lk::Activations g;  // dy as fp32 [M, N]
    g.load(dy, dy_dtype, M, N);
    const float* dy32 = g.x32;
    std::vector<float> dxbuf;
    float* dx32 = static_cast<float*>(dx);
    if (dy_dtype != LK_F32) {
      dxbuf.resize((size_t)(M * K));
      dx32 = dxbuf.data();
    }
    std::fill(dx32, dx32 + M * K, 0.f);
    const int64_t ng = K / G, rb = lk::row_bytes(K, w->bits);
    const auto ex = lk::active_kernels().lora_expand;
    const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(lk::threads_for(num_threads), ng));
    std::atomic<int> no_memory{0};
    if (N > 0) {
#pragma omp parallel num_threads(nt)
      {
        const int tid = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t g0 = ng * tid / T, g1 = ng * (tid + 1) / T;  // this thread's column groups
        try {  // an exception must not leave the parallel region (the expand allocates its tile)
          for (int64_t n0 = 0; n0 < N && g1 > g0; n0 += kRowChunk) {
            const int64_t nb = std::min(kRowChunk, N - n0);
            const lk::LoraExpand e{M, K, G,
                                   {{w->qweight + n0 * rb, w->scales + n0 * ng, w->zeros + n0 * ng, nb, w->bits,
                                     dy32 + n0, N},
                                    {nullptr, nullptr, nullptr, 0, 1, nullptr, 0}},
                                   1.0f, dx32, nullptr};
            ex(e, g0, g1);
          }
        } catch (const std::bad_alloc&) {
          no_memory.store(1);
        }
      }
    }
    if (no_memory.load()) return LK_ERR_ALLOC;
    if (outliers && outliers->nnz > 0) {
      const int32_t* rp = outliers->row_ptr;
      const uint16_t* col = outliers->col_idx;
      const uint16_t* val = outliers->values;
#pragma omp parallel for num_threads(lk::threads_for(num_threads)) schedule(static)
      for (int64_t m = 0; m < M; ++m) {  // threads own rows of dx
        float* d = dx32 + m * K;
        for (int64_t n = 0; n < N; ++n) {
          const float c = dy32[m * N + n];
          if (c == 0.f) continue;
          for (int32_t j = rp[n]; j < rp[n + 1]; ++j) d[col[j]] += c * lk::half_to_float(val[j]);
        }
      }
    }
    lk::store_output(dx32, dy_dtype, M * K, dx);
  } catch (const std::bad_alloc&) {
    return LK_ERR_ALLOC;
  }
  return LK_OK;
}

lk_status lk_quant_matmul_qalora(const void* x, lk_dtype x_dtype, int64_t M, const lk_qweight* w,
                                 const float* bias, const lk_qalora* adapter, void* y, int num_threads) {
  if (lk_status s = lk::check_weight(w)) return s;
  if (M < 0 || (M > 0 && (!x || !y))) return LK_ERR_INVALID_ARG;
  if (x_dtype != LK_F32 && x_dtype != LK_F16 && x_dtype != LK_BF16) return LK_ERR_INVALID_ARG;
  if (!adapter || adapter->rank < 0 || !std::isfinite(adapter->scale)) return LK_ERR_INVALID_ARG;
  if (adapter->rank > 0 && (!adapter->a || !adapter->bt)) return LK_ERR_INVALID_ARG;
  const int64_t N = w->N, K = w->K, r = adapter->rank;
  const int G = w->group_size;
  const int64_t ng = K / G;
  if (M == 0 || N == 0) return LK_OK;
  try {
    lk::Activations act;
    act.load(x, x_dtype, M, K);
    act.quantize(G);
    std::vector<float> ybuf;
    float* y32 = static_cast<float*>(y);
    if (x_dtype != LK_F32) {
      ybuf.resize((size_t)(M * N));
      y32 = ybuf.data();
    }
    // t[m, j] = scale / G * sum_g A[j, g] * xsum[m, g]: M * r * K / G products, before the parallel region
    std::vector<float> t((size_t)(M * r));
    const float c = adapter->scale / (float)G;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < r; ++j) {
        const float* a = adapter->a + j * ng;
        const float* xs = act.xsum.data() + m * ng;
        float s = 0.f;
        for (int64_t gi = 0; gi < ng; ++gi) s += a[gi] * xs[gi];
        t[(size_t)(m * r + j)] = c * s;
      }
    const lk::QmmProblem p{M, N, K, w->bits, G, w->qweight, w->scales, w->zeros,
                           act.xq.data(), act.xs.data(), act.xsum.data(), bias, y32};
    const auto fn = lk::active_kernels().qmm_rows;
    const int64_t nblk = (N + 15) / 16;  // column blocks of 16
    const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(lk::threads_for(num_threads), nblk));
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t n0 = std::min(N, 16 * (nblk * tid / T)), n1 = std::min(N, 16 * (nblk * (tid + 1) / T));
      if (n1 > n0) {
        fn(p, n0, n1);  // the base, then the adapter's expand into the same columns while they are in cache
        for (int64_t m = 0; m < M; ++m) {
          float* yr = y32 + m * N;
          for (int64_t j = 0; j < r; ++j) {
            const float tj = t[(size_t)(m * r + j)];
            const float* b = adapter->bt + j * N;
            for (int64_t n = n0; n < n1; ++n) yr[n] += tj * b[n];
          }
        }
      }
    }
    lk::store_output(y32, x_dtype, M * N, y);
  } catch (const std::bad_alloc&) {
    return LK_ERR_ALLOC;
  }
  return LK_OK;
}

}  // extern "C"
