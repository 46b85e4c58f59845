// The width-neutral layer under the AVX2 and AVX-512 adapter kernels: fp32 row dot products, row
// axpys, dtype conversion and group accumulation written once over a register type V, which each ISA
// file supplies (V8: __m256, V16: __m512) with these members:
//   reg, W (floats per register), zero(), load(p), store(p, v), set1(x), fmadd(a, b, c), sum(v),
//   load_f16(h), load_bf16(h) (W fp16 / bf16 values as fp32), dequant_bits<BITS>(gp, G, s, z, out),
//   axpy_qpart(y, coef, part, c0, c1) (SimdVec::axpy_qpart).
// Compiled with the including file's flags (anonymous namespace), like qmm_rows_simd.h.
#pragma once
#include <cstring>

#include "common.h"
#include "lorakern/lorakern.h"
#include "multi_lora.h"
#include "simd_x86.h"

namespace lk {
namespace {

template <class V, int DT>  // V::W values of row p at element c as fp32 (DT: lk_dtype)
inline typename V::reg load_dt(const void* p, int64_t c) {
  if (DT == LK_F32) return V::load(static_cast<const float*>(p) + c);
  if (DT == LK_F16) return V::load_f16(static_cast<const uint16_t*>(p) + c);
  return V::load_bf16(static_cast<const uint16_t*>(p) + c);
}

template <class V>
struct SimdVec {
  using reg = typename V::reg;
  static constexpr int W = V::W;
  static constexpr int NR = 32 / W;  // 32 columns (NR registers) per step of axpy_rows / accumulate

  // y[0:w] += sum over rows i < r of coef[i] * src[i * ld + 0:w] (w a multiple of 32).
  template <int DT>
  static void axpy_rows_t(float* y, const float* coef, const void* src, int64_t ld, int64_t r, int64_t w) {
    const size_t eb = DT == LK_F32 ? 4 : 2;
    for (int64_t c0 = 0; c0 < w; c0 += 32) {
      reg a[NR];
      for (int j = 0; j < NR; ++j) a[j] = V::load(y + c0 + W * j);
      for (int64_t i = 0; i < r; ++i) {
        const void* row = static_cast<const char*>(src) + (size_t)(i * ld) * eb;
        const reg ci = V::set1(coef[i]);
        for (int j = 0; j < NR; ++j) a[j] = V::fmadd(ci, load_dt<V, DT>(row, c0 + W * j), a[j]);
      }
      for (int j = 0; j < NR; ++j) V::store(y + c0 + W * j, a[j]);
    }
  }

  // out[j] = x . src[j * ld + 0:K] for rows j < nr <= 4.
  template <int DT>
  static void dot_rows_t(const float* x, const void* src, int64_t ld, int nr, int64_t K, float* out) {
    const size_t eb = DT == LK_F32 ? 4 : 2;
    const char* rows[4];
    for (int j = 0; j < 4; ++j)  // rows past nr repeat row 0 (not stored)
      rows[j] = static_cast<const char*>(src) + (size_t)(j * ld * (nr > j)) * eb;
    reg s[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      const reg xv = V::load(x + k);
      for (int j = 0; j < 4; ++j) s[j] = V::fmadd(xv, load_dt<V, DT>(rows[j], k), s[j]);
    }
    float o[4] = {V::sum(s[0]), V::sum(s[1]), V::sum(s[2]), V::sum(s[3])};
    for (; k < K; ++k)
      for (int j = 0; j < 4; ++j) {
        const void* rp = rows[j] + (size_t)k * eb;
        const float v = DT == LK_F32 ? *static_cast<const float*>(rp)
                                     : (DT == LK_F16 ? half_to_float(*static_cast<const uint16_t*>(rp))
                                                     : bf16_to_float(*static_cast<const uint16_t*>(rp)));
        o[j] += x[k] * v;
      }
    for (int j = 0; j < nr; ++j) out[j] = o[j];
  }

  static void dot_rows(const float* x, const void* src, int64_t ld, lk_dtype dt, int nr, int64_t K, float* out) {
    if (dt == LK_F32) dot_rows_t<LK_F32>(x, src, ld, nr, K, out);
    else if (dt == LK_F16) dot_rows_t<LK_F16>(x, src, ld, nr, K, out);
    else dot_rows_t<LK_BF16>(x, src, ld, nr, K, out);
  }
  static void axpy_rows(float* y, const float* coef, const void* src, int64_t ld, lk_dtype dt, int64_t r, int64_t w) {
    if (dt == LK_F32) axpy_rows_t<LK_F32>(y, coef, src, ld, r, w);
    else if (dt == LK_F16) axpy_rows_t<LK_F16>(y, coef, src, ld, r, w);
    else axpy_rows_t<LK_BF16>(y, coef, src, ld, r, w);
  }
  static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  template <int BITS>
  static void dequant_bits(const uint8_t* gp, int G, float s, float z, float* out) {
    V::template dequant_bits<BITS>(gp, G, s, z, out);
  }
  // compressed parts decoded in registers: V::axpy_qpart (the AVX2 decoder; AVX-512 has its own for 1-, 2-, 4-
  // and 8-bit parts over whole groups), for the layouts qpart_layout_avx2 accepts
  static bool qpart_layout(int bits, int G, int64_t c0, int64_t c1, int64_t rows) {
    return qpart_layout_avx2(bits, G, c0, c1, rows);
  }
  static void axpy_qpart(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
    V::axpy_qpart(y, coef, p, c0, c1);
  }

  // out[0:n] = src as fp32.
  static void to_f32(const void* src, lk_dtype dt, int64_t n, float* out) {
    if (dt == LK_F32) {
      std::memcpy(out, src, (size_t)n * sizeof(float));
      return;
    }
    const uint16_t* h = static_cast<const uint16_t*>(src);
    int64_t i = 0;
    if (dt == LK_F16) {
      for (; i + W <= n; i += W) V::store(out + i, V::load_f16(h + i));
      for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
    } else {
      for (; i + W <= n; i += W) V::store(out + i, V::load_bf16(h + i));
      for (; i < n; ++i) out[i] = bf16_to_float(h[i]);
    }
  }

  // out[j] = x . a[j * lda + 0:K] for four fp32 rows.
  static void dot4(const float* x, const float* a, int64_t lda, int64_t K, float* out) {
    reg s[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      const reg xv = V::load(x + k);
      for (int j = 0; j < 4; ++j) s[j] = V::fmadd(xv, V::load(a + j * lda + k), s[j]);
    }
    for (int j = 0; j < 4; ++j) out[j] = V::sum(s[j]);
    for (; k < K; ++k)
      for (int j = 0; j < 4; ++j) out[j] += x[k] * a[j * lda + k];
  }

  // y[0:G] = yin[0:G] + sum over rows i < r of coef[i] * W[i * G + 0:G] (G a multiple of 32).
  static void accumulate(float* y, const float* yin, const float* coef, const float* Wt, int64_t r, int G) {
    for (int c0 = 0; c0 < G; c0 += 32) {
      reg a[NR];
      for (int j = 0; j < NR; ++j) a[j] = V::load(yin + c0 + W * j);
      for (int64_t i = 0; i < r; ++i) {
        const reg ci = V::set1(coef[i]);
        const float* w = Wt + i * G + c0;
        for (int j = 0; j < NR; ++j) a[j] = V::fmadd(ci, V::load(w + W * j), a[j]);
      }
      for (int j = 0; j < NR; ++j) V::store(y + c0 + W * j, a[j]);
    }
  }
};

}  // namespace
}  // namespace lk
