// The element-wise and attention loops of the native decode step (decoder_layer.cpp) that run per token beside
// the projections: SiLU gating and one query head's attention over the KV cache. Written as plain loops that the
// compiler vectorizes: each ISA's file (decode_math*.cpp) includes this header and compiles it with its flags
// (anonymous namespace: one copy per translation unit), and the kernel table (kernels.h) picks one at run time.
// Compiled for the baseline x86-64 only (inside decoder_layer.cpp), these loops ran 4 lanes wide and called the C
// library's expf per element: ~23% of a batch-64 SmolLM2 decode step on 64 compressed adapters (perf, AVX-512
// machine). Here (AVX-512) that step decodes 5-8% faster (477 -> 516 and 495 -> 519 tokens/s in alternating runs);
// the attention left is bound by reading the fp32 KV cache. The AVX2 and AVX-512 files build with
// -fno-trapping-math, without which GCC does not if-convert the selects of exp_approx for AVX2 (nothing here reads
// the floating-point exception flags).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace lk {
namespace {

// exp(x) in fp32 within a few ulp of the exact value over the normal range (Cephes' expf: x = n ln2 + r with
// |r| <= ln2 / 2 by magic-number rounding, a degree-7 polynomial in r, then 2^n as two powers built in the
// exponent bits, so that n = 128 near ln(FLT_MAX) stays representable), branch-free so that a loop of it
// vectorizes: +Inf above ln(FLT_MAX), 0 below the float nearest ln(FLT_MIN), NaN for NaN; within ~1 ulp of
// double precision over every float tried (a review's sweep of |x| in [0.5, 104], generic, AVX2 and AVX-512). Checked
// in csrc/tests/test_kernels.cpp (check_decode_math) and through the native decode tests on every ISA.
inline float exp_approx(float x) {
  const float hi = 88.7228391f, lo = -87.3365448f;  // ln(FLT_MAX), ln(FLT_MIN)
  float xc = x > lo ? x : lo;  // (NaN -> lo: the arithmetic below stays finite)
  xc = xc < hi ? xc : hi;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer (round half to even)
  const float n = (xc * 1.44269504088896341f + magic) - magic;  // in [-126, 128]
  float r = xc - n * 0.693359375f;  // ln 2 in two parts: the first exact in 9 bits
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t n1 = (int32_t)n / 2, n2 = (int32_t)n - n1;  // each in [-63, 64]
  const int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
  float s1, s2;  // (memcpy: GCC and clang vectorize it as a bit cast)
  std::memcpy(&s1, &b1, sizeof s1);
  std::memcpy(&s2, &b2, sizeof s2);
  float y = p * s1 * s2;
  y = x > hi ? INFINITY : y;
  y = x < lo ? 0.f : y;  // below FLT_MIN: flushed to zero
  return x != x ? x : y;
}

// g[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i] (transformers' LlamaMLP act_fn(gate) * up).
inline void silu_mul_loop(float* __restrict g, const float* __restrict u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + exp_approx(-g[i])) * u[i];
}

// sum of a[i] b[i] in 16 interleaved partial sums (one vector register at 16 lanes)
inline float dot16(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

// One query head over cached positions 0..npos-1 (transformers' eager attention: softmax(scale q.k) . v):
// o[D] = sum_j softmax_j v_j, keys and values rows of D floats (row j at kc + j D), mk[j] == 0 masks position j
// (mk null: none masked), p a scratch of npos floats. Any NaN score gives a NaN output (as softmax would);
// every position masked gives zeros.
inline void attend_loop(const float* q, const float* kc, const float* vc, const uint8_t* mk, int64_t npos,
                        int64_t D, float scale, float* p, float* o) {
  float mx = -INFINITY;
  bool nan = false;
  for (int64_t j = 0; j < npos; ++j) {
    if (mk && !mk[j]) {
      p[j] = -INFINITY;
      continue;
    }
    p[j] = dot16(q, kc + j * D, D) * scale;
    nan |= std::isnan(p[j]);
    mx = std::max(mx, p[j]);
  }
  for (int64_t d = 0; d < D; ++d) o[d] = nan ? NAN : 0.f;
  if (nan || mx == -INFINITY) return;
  for (int64_t j = 0; j < npos; ++j) p[j] = exp_approx(p[j] - mx);  // masked: exp(-inf) = 0
  float part[16] = {};
  int64_t j = 0;
  for (; j + 16 <= npos; j += 16)
    for (int k = 0; k < 16; ++k) part[k] += p[j + k];
  float sum = 0.f;
  for (; j < npos; ++j) sum += p[j];
  for (int k = 0; k < 16; ++k) sum += part[k];
  const float inv = 1.f / sum;
  for (j = 0; j < npos; ++j) {
    if (p[j] == 0.f) continue;
    const float w = p[j] * inv;
    const float* vr = vc + j * D;
    for (int64_t d = 0; d < D; ++d) o[d] += w * vr[d];
  }
}

}  // namespace

// The per-ISA entry points (decode_math.cpp, decode_math_avx2.cpp, decode_math_avx512.cpp).
void silu_mul_generic(float* g, const float* u, int64_t n);
void silu_mul_avx2(float* g, const float* u, int64_t n);
void silu_mul_avx512(float* g, const float* u, int64_t n);
void attend_generic(const float* q, const float* kc, const float* vc, const uint8_t* mk, int64_t npos, int64_t D,
                    float scale, float* p, float* o);
void attend_avx2(const float* q, const float* kc, const float* vc, const uint8_t* mk, int64_t npos, int64_t D,
                 float scale, float* p, float* o);
void attend_avx512(const float* q, const float* kc, const float* vc, const uint8_t* mk, int64_t npos, int64_t D,
                   float scale, float* p, float* o);

}  // namespace lk
