// Portable scalar quant_matmul: the always-available path and the model for
// the SIMD versions (same integer dot per group, same fp32 scaling).
#include <cstring>
#include <vector>

#include "common.h"
#include "lora.h"
#include "multi_lora_simd.h"
#include "outliers.h"

namespace lk {

void qmm_rows_generic(const QmmProblem& p, int64_t n0, int64_t n1) {
  const int G = p.G, bits = p.bits;
  const int B = act_block(G);
  const int64_t ng = p.K / G, nb = p.K / B;
  const int64_t rb = row_bytes(p.K, bits);
  const int gb = group_bytes(G, bits);
  std::vector<uint8_t> codes((size_t)G);
  std::vector<float> sf((size_t)ng), szf((size_t)ng);
  std::vector<float> acc((size_t)p.M), zacc((size_t)p.M);
  // 1 < M <= kOutlierRowBlock: each row's outliers with its dense pass; else after the rows (outliers.h)
  const bool fused = p.row_ptr && p.M > 1 && p.M <= kOutlierRowBlock;
  const auto h2f = [](uint16_t h) { return half_to_float(h); };
  float sparse[kOutlierRowBlock];
  for (int64_t n = n0; n < n1; ++n) {
    if (fused) row_outliers(p, n, 0, p.M, h2f, sparse);
    const uint8_t* prow = p.qw + n * rb;
    for (int64_t g = 0; g < ng; ++g) {
      sf[g] = half_to_float(p.scales[n * ng + g]);
      szf[g] = sf[g] * half_to_float(p.zeros[n * ng + g]);
    }
    for (int64_t m = 0; m < p.M; ++m) acc[m] = zacc[m] = 0.f;
    for (int64_t g = 0; g < ng; ++g) {
      const uint8_t* gp = prow + g * gb;
      for (int i = 0; i < G; ++i) codes[i] = (uint8_t)decode_code(gp, G, bits, i);
      for (int64_t m = 0; m < p.M; ++m) {
        const int8_t* xp = p.xq + m * p.K + g * G;
        float t = 0.f;  // blocks scaled by their activation scales, then the weight scale
        for (int b = 0; b < G / B; ++b) {
          int32_t dot = 0;
          for (int i = b * B; i < (b + 1) * B; ++i) dot += (int32_t)codes[i] * (int32_t)xp[i];
          t += (float)dot * p.xs[m * nb + g * (G / B) + b];
        }
        acc[m] += t * sf[g];
        zacc[m] += szf[g] * p.xsum[m * ng + g];
      }
    }
    const float b = p.bias ? p.bias[n] : 0.f;
    for (int64_t m = 0; m < p.M; ++m)
      p.y[m * p.N + n] = acc[m] - zacc[m] + (fused ? sparse[m] : 0.f) + b;
  }
  if (p.row_ptr && !fused) outliers_after_rows(p, n0, n1, h2f);
}

namespace {
struct GenericExpand {
  static bool qpart_layout(int, int, int64_t, int64_t, int64_t) { return true; }
  static void axpy_qpart(float* y, const float* coef, const lk_qweight& p, int64_t c0, int64_t c1) {
    const int G = p.group_size;
    const int64_t rb = row_bytes(p.K, p.bits), ng = p.K / G;
    const int gb = group_bytes(G, p.bits);
    for (int64_t i = 0; i < p.N; ++i)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t g = c / G;
        const float s = half_to_float(p.scales[i * ng + g]), z = half_to_float(p.zeros[i * ng + g]);
        y[c - c0] += coef[i] * (s * ((float)decode_code(p.qweight + i * rb + g * gb, G, p.bits, (int)(c % G)) - z));
      }
  }
  static float h2f(uint16_t h) { return half_to_float(h); }
  static void to_f32(const void* src, lk_dtype dt, int64_t n, float* out) {
    if (dt == LK_F32) {
      std::memcpy(out, src, (size_t)n * sizeof(float));
      return;
    }
    const uint16_t* h = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) out[i] = dt == LK_F16 ? half_to_float(h[i]) : bf16_to_float(h[i]);
  }
  static void dot_rows(const float* x, const void* src, int64_t ld, lk_dtype dt, int nr, int64_t K, float* out) {
    const size_t eb = dt == LK_F32 ? 4 : 2;
    std::vector<float> row((size_t)K);
    for (int j = 0; j < nr; ++j) {
      to_f32(static_cast<const char*>(src) + (size_t)(j * ld) * eb, dt, K, row.data());
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[k] * row[k];
      out[j] = s;
    }
  }
  static void axpy_rows(float* y, const float* coef, const void* src, int64_t ld, lk_dtype dt, int64_t r, int64_t w) {
    const size_t eb = dt == LK_F32 ? 4 : 2;
    std::vector<float> row((size_t)w);
    for (int64_t i = 0; i < r; ++i) {
      to_f32(static_cast<const char*>(src) + (size_t)(i * ld) * eb, dt, w, row.data());
      for (int64_t c = 0; c < w; ++c) y[c] += coef[i] * row[c];
    }
  }
  static void dot4(const float* x, const float* a, int64_t lda, int64_t K, float* out) {
    for (int j = 0; j < 4; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[k] * a[j * lda + k];
      out[j] = s;
    }
  }
  static void accumulate(float* y, const float* yin, const float* coef, const float* W, int64_t r, int G) {
    for (int c = 0; c < G; ++c) y[c] = yin[c];
    for (int64_t i = 0; i < r; ++i)
      for (int c = 0; c < G; ++c) y[c] += coef[i] * W[i * G + c];
  }
  template <int BITS>
  static void dequant_bits(const uint8_t* gp, int G, float s, float z, float* out) {
    for (int i = 0; i < G; ++i) out[i] = s * ((float)decode_code(gp, G, BITS, i) - z);
  }
};
}  // namespace

void lora_expand_generic(const LoraExpand& e, int64_t g0, int64_t g1) { expand_groups<GenericExpand>(e, g0, g1); }
void dense_shrink_generic(const DenseShrink& p, int64_t i0, int64_t i1) { dense_shrink_rows<GenericExpand>(p, i0, i1); }
void multi_expand_generic(const MultiExpand& e, int64_t c0, int64_t c1) { multi_expand_cols<GenericExpand>(e, c0, c1); }

}  // namespace lk
