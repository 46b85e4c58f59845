// C ABI entry points: validate, quantize activations, split rows over OpenMP
// threads, dispatch to the active ISA path, convert the result.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <vector>

#include "common.h"
#include "driver.h"
#include "kernels.h"
#include "lorakern/lorakern.h"

namespace lk {

namespace {
bool valid_format(int bits, int G) {
  return (bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8) &&
         (G == 32 || G == 64 || G == 128);
}
}  // namespace

lk_status check_weight(const lk_qweight* w) {
  if (!w || !w->qweight || !w->scales || !w->zeros) return LK_ERR_INVALID_ARG;
  if (!valid_format(w->bits, w->group_size)) return LK_ERR_INVALID_ARG;
  if (w->N < 0 || w->K <= 0 || w->K % w->group_size != 0) return LK_ERR_INVALID_ARG;
  return LK_OK;
}

int threads_for(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

void store_output(const float* y32, lk_dtype dtype, int64_t n, void* y) {
  if (dtype == LK_F32) return;
  uint16_t* yh = static_cast<uint16_t*>(y);
  for (int64_t i = 0; i < n; ++i) yh[i] = dtype == LK_F16 ? float_to_half(y32[i]) : float_to_bf16(y32[i]);
}

void Activations::load(const void* x, lk_dtype x_dtype, int64_t M_, int64_t K_) {
  M = M_;
  K = K_;
  x32 = static_cast<const float*>(x);
  if (x_dtype != LK_F32) {
    xf.resize((size_t)(M * K));
    const uint16_t* xh = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < M * K; ++i)
      xf[i] = x_dtype == LK_F16 ? half_to_float(xh[i]) : bf16_to_float(xh[i]);
    x32 = xf.data();
  }
}

void Activations::quantize(int G_) {
  G = G_;
  xq.resize((size_t)(M * K));
  xs.resize((size_t)(M * (K / act_block(G))));
  xsum.resize((size_t)(M * (K / G)));
  active_kernels().quantize_activations(x32, M, K, G, xq.data(), xs.data(), xsum.data());
}

}  // namespace lk

namespace {

using lk::check_weight;
using lk::threads_for;

// quant_matmul, plus the sparse outliers when `o` is given (gwq_matmul).
lk_status run_matmul(const void* x, lk_dtype x_dtype, int64_t M, const lk_qweight* w,
                     const lk_outliers* o, const float* bias, void* y, int num_threads) {
  if (lk_status s = check_weight(w)) return s;
  if (M < 0 || (M > 0 && (!x || !y))) return LK_ERR_INVALID_ARG;
  if (x_dtype != LK_F32 && x_dtype != LK_F16 && x_dtype != LK_BF16) return LK_ERR_INVALID_ARG;
  const int64_t N = w->N, K = w->K;
  const int G = w->group_size;
  if (o) {  // O(1) checks here; every row pointer and column is checked where it is used
    if (!o->row_ptr || o->nnz < 0 || (o->nnz > 0 && (!o->col_idx || !o->values)))
      return LK_ERR_INVALID_ARG;
    if (K > 65536) return LK_ERR_INVALID_ARG;  // uint16 column indices
    if (o->row_ptr[0] != 0 || o->row_ptr[N] != o->nnz) return LK_ERR_INVALID_ARG;
  }
  if (M == 0 || N == 0) return LK_OK;
  try {
    lk::Activations act;
    act.load(x, x_dtype, M, K);
    act.quantize(G);
    const float* x32 = act.x32;
    std::vector<float> ybuf;
    float* y32 = static_cast<float*>(y);
    if (x_dtype != LK_F32) {
      ybuf.resize((size_t)(M * N));
      y32 = ybuf.data();
    }
    lk::QmmProblem p{M, N, K, w->bits, G, w->qweight, w->scales, w->zeros,
                     act.xq.data(), act.xs.data(), act.xsum.data(), bias, y32};
    std::vector<float> xt;
    std::atomic<int> bad_csr{0};
    if (o) {  // the outliers multiply the unquantized activations, read by column
      const float* xcols = x32;
      if (M > 1 && o->nnz > 0) {  // blocked transpose: both sides stay in cache lines
        xt.resize((size_t)(M * K));
        constexpr int64_t TB = 32;
        const int64_t nkb = (K + TB - 1) / TB;
#pragma omp parallel for num_threads(threads_for(num_threads)) schedule(static)
        for (int64_t kb = 0; kb < nkb; ++kb)
          for (int64_t m0 = 0, k0 = kb * TB; m0 < M; m0 += TB)
            for (int64_t k = k0; k < std::min(k0 + TB, K); ++k)
              for (int64_t m = m0; m < std::min(m0 + TB, M); ++m) xt[k * M + m] = x32[m * K + k];
        xcols = xt.data();
      }
      p.row_ptr = o->row_ptr;
      p.col = o->col_idx;
      p.val = o->values;
      p.nnz = o->nnz;
      p.xt = xcols;
      p.bad_csr = &bad_csr;
    }
    const auto& kern = lk::active_kernels();
    const auto fn = lk::use_gemm(M, w->bits) ? kern.qmm_gemm : kern.qmm_rows;
    const int nt = (int)std::min<int64_t>(threads_for(num_threads), N);
    // Contiguous row blocks per thread: each thread streams its own slab. With outliers the blocks hold equal
    // work, not equal rows: GWQ's outliers gather in the rows whose gradients are large, and a thread with most
    // of them kept the other waiting (a row's dense pass is counted as K / 16 outliers).
    std::vector<int64_t> cut((size_t)nt + 1);
    for (int t = 0; t <= nt; ++t) cut[t] = N * t / nt;
    if (o && o->nnz > 0 && nt > 1) {
      const double a = std::max(1.0, (double)K / 16.0), total = a * (double)N + (double)o->nnz;
      for (int t = 1; t < nt; ++t) {  // the first row n with a n + row_ptr[n] >= t / nt of the total
        const double target = total * t / nt;
        int64_t lo = cut[t - 1], hi = N;  // (row_ptr is read, not trusted: the cuts stay ordered in [0, N])
        while (lo < hi) {
          const int64_t mid = lo + (hi - lo) / 2;
          if (a * (double)mid + (double)o->row_ptr[mid] >= target) hi = mid; else lo = mid + 1;
        }
        cut[t] = lo;
      }
    }
    std::atomic<int> no_memory{0};
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();  // (fewer than asked: equal rows)
      const int64_t n0 = T == nt ? cut[t] : N * t / T, n1 = T == nt ? cut[t + 1] : N * (t + 1) / T;
      try {  // the kernels' work buffers (the GEMM's panels): an exception must not leave the region
        if (n1 > n0) fn(p, n0, n1);
      } catch (const std::bad_alloc&) {
        no_memory.store(1);
      }
    }
    if (no_memory.load()) return LK_ERR_ALLOC;
    if (bad_csr.load()) return LK_ERR_INVALID_ARG;  // some row pointer or column was out of range
    lk::store_output(y32, x_dtype, M * N, y);
  } catch (const std::bad_alloc&) {
    return LK_ERR_ALLOC;
  }
  return LK_OK;
}

}  // namespace

extern "C" {

const char* lk_version(void) { return "0.1.0"; }

const char* lk_status_string(lk_status s) {
  switch (s) {
    case LK_OK: return "ok";
    case LK_ERR_INVALID_ARG: return "invalid argument";
    case LK_ERR_UNSUPPORTED: return "unsupported by this CPU";
    case LK_ERR_ALLOC: return "out of memory";
    case LK_ERR_SLOT_RANGE: return "adapter slot out of range";
    case LK_ERR_SLOT_EMPTY: return "adapter slot is empty (the adapter was removed)";
    case LK_ERR_BAD_SLOT: return "bad bank table entry (fields invalid or rows / codes out of the slab)";
    case LK_ERR_RANK: return "an adapter's rank exceeds max_rank";
    case LK_ERR_INDEX: return "an index (token id) outside its table";
  }
  return "unknown status";
}

lk_status lk_quant_matmul(const void* x, lk_dtype x_dtype, int64_t M, const lk_qweight* w,
                          const float* bias, void* y, int num_threads) {
  return run_matmul(x, x_dtype, M, w, nullptr, bias, y, num_threads);
}

lk_status lk_gwq_matmul(const void* x, lk_dtype x_dtype, int64_t M, const lk_qweight* w,
                        const lk_outliers* outliers, const float* bias, void* y, int num_threads) {
  if (!outliers) return LK_ERR_INVALID_ARG;
  return run_matmul(x, x_dtype, M, w, outliers, bias, y, num_threads);
}

lk_status lk_dequantize(const lk_qweight* w, float* out, int num_threads) {
  if (lk_status s = check_weight(w)) return s;
  if (!out && w->N > 0) return LK_ERR_INVALID_ARG;
  const int64_t N = w->N, K = w->K;
  const int G = w->group_size, bits = w->bits;
  const int64_t ng = K / G, rb = lk::row_bytes(K, bits);
  const int gb = lk::group_bytes(G, bits);
#pragma omp parallel for num_threads(threads_for(num_threads)) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < ng; ++g) {
      const float s = lk::half_to_float(w->scales[n * ng + g]);
      const float z = lk::half_to_float(w->zeros[n * ng + g]);
      const uint8_t* gp = w->qweight + n * rb + g * gb;
      float* o = out + n * K + g * G;
      for (int i = 0; i < G; ++i) o[i] = s * ((float)lk::decode_code(gp, G, bits, i) - z);
    }
  }
  return LK_OK;
}

}  // extern "C"
