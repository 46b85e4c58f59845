// C ABI entry points of the compressed-LoRA kernels: lk_lora_mixed (base + adapter)
// and lk_quant_matmul_lora (a quantized layer and its adapter in one call).
//
// One parallel region. Each thread first runs its share of the shrink rows
// (t = x A^T over the high codes and the 1-bit signs, the quant_matmul row kernel
// on the int8 activations), then -- fused path -- the base rows of its own block
// of output columns; after one barrier (t complete) it adds the expand into those
// same columns while they are still in its cache.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

#include "common.h"
#include "driver.h"
#include "kernels.h"
#include "lora.h"
#include "multi_lora.h"
#include "lorakern/lorakern.h"

namespace lk {

namespace {
// A part with no rows is valid whatever its pointers; otherwise a full weight of
// `cols` columns, 1-bit for the low parts and 2/3/4/8-bit for the high ones.
bool part_ok(const lk_qweight& w, int64_t cols, bool low) {
  if (w.N < 0) return false;
  if (w.N == 0) return true;
  if (check_weight(&w) != LK_OK || w.K != cols) return false;
  return low ? w.bits == 1 : w.bits != 1;
}
}  // namespace

lk_status check_lora_parts(const lk_lora* l, int64_t N, int64_t K) {
  if (!l) return LK_ERR_INVALID_ARG;
  if (!part_ok(l->a_hi, K, false) || !part_ok(l->b_hi, N, false) || !part_ok(l->a_lo, K, true) ||
      !part_ok(l->b_lo, N, true))
    return LK_ERR_INVALID_ARG;
  if (l->a_hi.N != l->b_hi.N || l->a_lo.N != l->b_lo.N) return LK_ERR_INVALID_ARG;
  if (l->a_hi.N && l->a_lo.N && l->a_hi.group_size != l->a_lo.group_size) return LK_ERR_INVALID_ARG;
  if (l->b_hi.N && l->b_lo.N && l->b_hi.group_size != l->b_lo.group_size) return LK_ERR_INVALID_ARG;
  return LK_OK;
}

}  // namespace lk

namespace {

// The base output already in y32 (lora_mixed), or computed here from w (quant_matmul_lora).
lk_status run_lora(const void* x, lk_dtype x_dtype, int64_t M, int64_t N, int64_t K, const lk_qweight* w,
                   const float* bias, const lk_lora* l, const void* base, void* y, int num_threads) {
  if (M < 0 || (M > 0 && (!x || !y))) return LK_ERR_INVALID_ARG;
  if (x_dtype != LK_F32 && x_dtype != LK_F16 && x_dtype != LK_BF16) return LK_ERR_INVALID_ARG;
  if (N < 0 || K <= 0) return LK_ERR_INVALID_ARG;
  if (!l || !std::isfinite(l->scale)) return LK_ERR_INVALID_ARG;
  if (lk_status s = lk::check_lora_parts(l, N, K)) return s;
  if (M == 0 || N == 0) return LK_OK;
  try {
    const int64_t h = l->a_hi.N, rl = l->a_lo.N;
    const int ga = h ? l->a_hi.group_size : (rl ? l->a_lo.group_size : 32);
    // groups of output columns: B'^T's group size (N is a multiple of it); 1 for a rank-0 adapter
    const int gb = h ? l->b_hi.group_size : (rl ? l->b_lo.group_size : 1);
    lk::Activations act;
    act.load(x, x_dtype, M, K);
    if (h + rl) act.quantize(ga);

    std::vector<float> ybuf;
    float* y32 = static_cast<float*>(y);
    if (x_dtype != LK_F32) {
      ybuf.resize((size_t)(M * N));
      y32 = ybuf.data();
    }
    const float* base32 = nullptr;
    lk::QmmProblem pw{};
    lk::Activations actw;
    if (w) {
      const lk::Activations* aw = &act;
      if (!(h + rl) || w->group_size != ga) {  // the base needs its own group sums
        actw.M = M;
        actw.K = K;
        actw.x32 = act.x32;
        actw.quantize(w->group_size);
        aw = &actw;
      }
      pw = lk::QmmProblem{M, N, K, w->bits, w->group_size, w->qweight, w->scales, w->zeros,
                          aw->xq.data(), aw->xs.data(), aw->xsum.data(), bias, y32};
    } else if (!base) {
      std::fill(y32, y32 + M * N, 0.f);
    } else if (x_dtype == LK_F32) {
      base32 = static_cast<const float*>(base);  // read by the expand, never copied
    } else {
      const uint16_t* bh = static_cast<const uint16_t*>(base);
      for (int64_t i = 0; i < M * N; ++i)
        y32[i] = x_dtype == LK_F16 ? lk::half_to_float(bh[i]) : lk::bf16_to_float(bh[i]);
    }

    std::vector<float> t_hi((size_t)(M * h)), t_lo((size_t)(M * rl));
    const lk::QmmProblem ph{M, h, K, l->a_hi.bits, ga, l->a_hi.qweight, l->a_hi.scales, l->a_hi.zeros,
                            act.xq.data(), act.xs.data(), act.xsum.data(), nullptr, t_hi.data()};
    const lk::QmmProblem pl{M, rl, K, 1, ga, l->a_lo.qweight, l->a_lo.scales, l->a_lo.zeros,
                            act.xq.data(), act.xs.data(), act.xsum.data(), nullptr, t_lo.data()};
    const lk::LoraExpand e{M, N, gb,
                           {{l->b_hi.qweight, l->b_hi.scales, l->b_hi.zeros, h, l->b_hi.bits, t_hi.data(), h},
                            {l->b_lo.qweight, l->b_lo.scales, l->b_lo.zeros, rl, 1, t_lo.data(), rl}},
                           l->scale, y32, base32};
    const lk::CpuKernels& kern = lk::active_kernels();
    const auto fn = kern.qmm_rows;
    // the base pass as lk_quant_matmul runs it (the blocked GEMM for many rows): the fused op equals the two
    const auto base_fn = w && lk::use_gemm(M, w->bits) ? kern.qmm_gemm : kern.qmm_rows;
    const auto ex = kern.lora_expand;
    const int64_t r = h + rl, ngb = N / gb;
    const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(lk::threads_for(num_threads), ngb));
    std::atomic<int> no_memory{0};
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), T = omp_get_num_threads();
      const int64_t i0 = r * tid / T, i1 = r * (tid + 1) / T;  // shrink rows: high ones, then low ones
      const int64_t c0 = ngb * tid / T, c1 = ngb * (tid + 1) / T;  // this thread's column groups
      // a small adapter is read as a few dozen short row streams: hint them all before the first is read
      lk::prefetch_part(l->a_hi, i0, std::min(i1, h), 0, K);
      lk::prefetch_part(l->a_lo, std::max(i0, h) - h, i1 - h, 0, K);
      if (!w) {  // (the fused op's base pass streams its weights between: B would be evicted before its use)
        lk::prefetch_part(l->b_hi, 0, h, c0 * gb, c1 * gb);
        lk::prefetch_part(l->b_lo, 0, rl, c0 * gb, c1 * gb);
      }
      if (i0 < h) fn(ph, i0, std::min(i1, h));
      if (i1 > h) fn(pl, std::max(i0, h) - h, i1 - h);
      try {  // the GEMM's panels: an exception must not leave the region
        if (w && c1 > c0) base_fn(pw, c0 * gb, c1 * gb);
      } catch (const std::bad_alloc&) {
        no_memory.store(1);
      }
#pragma omp barrier
      ex(e, c0, c1);
    }
    if (no_memory.load()) return LK_ERR_ALLOC;
    lk::store_output(y32, x_dtype, M * N, y);
  } catch (const std::bad_alloc&) {
    return LK_ERR_ALLOC;
  }
  return LK_OK;
}

int64_t out_features(const lk_lora* l) {
  if (!l) return -1;
  return l->b_hi.N ? l->b_hi.K : (l->b_lo.N ? l->b_lo.K : -1);
}

}  // namespace

extern "C" {

lk_status lk_lora_mixed(const void* x, lk_dtype x_dtype, int64_t M, const lk_lora* lora, const void* base,
                        void* y, int num_threads) {
  if (!lora) return LK_ERR_INVALID_ARG;
  const int64_t N = out_features(lora);
  const int64_t K = lora->a_hi.N ? lora->a_hi.K : lora->a_lo.K;
  if (N < 0) return LK_ERR_INVALID_ARG;  // an adapter of rank 0 has no shape: nothing to add
  return run_lora(x, x_dtype, M, N, K, nullptr, nullptr, lora, base, y, num_threads);
}

lk_status lk_quant_matmul_lora(const void* x, lk_dtype x_dtype, int64_t M, const lk_qweight* w,
                               const float* bias, const lk_lora* lora, void* y, int num_threads) {
  if (lk_status s = lk::check_weight(w)) return s;
  return run_lora(x, x_dtype, M, w->N, w->K, w, bias, lora, nullptr, y, num_threads);
}

}  // extern "C"
