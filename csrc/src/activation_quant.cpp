// Per-group int8 quantization of the activations, shared by every ISA path so
// that all paths see identical integer inputs.
#include <algorithm>
#include <cmath>

#include "common.h"

namespace lk {

void quantize_activations(const float* x, int64_t M, int64_t K, int G, int8_t* xq, float* xs,
                          float* xsum) {
  const int B = act_block(G);
  const int64_t nb = K / B, ng = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) xsum[m * ng + g] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const float* xp = x + m * K + b * B;
      int8_t* qp = xq + m * K + b * B;
      float amax = 0.f;
      bool finite = true;
      for (int i = 0; i < B; ++i) {
        finite &= std::isfinite(xp[i]);
        amax = std::max(amax, std::fabs(xp[i]));
      }
      const int64_t o = m * nb + b;
      float* gsum = &xsum[m * ng + b * B / G];
      const float inv = 127.f / amax;
      if (act_block_special(finite, inv, qp, B, &xs[o], gsum)) continue;
      xs[o] = amax / 127.f;
      int32_t qsum = 0;
      // Round half to even by the magic-number trick: adding 1.5 * 2^23 leaves no fraction bits, so the
      // FPU's default rounding (to nearest even) does the rounding; subtracting it back is exact. The same
      // result as nearbyint for |v| < 2^22 (here |v| <= 127), without a libm call per element (a baseline
      // x86-64 build has no roundss): this loop vectorizes.
      constexpr float kMagic = 12582912.f;
      for (int i = 0; i < B; ++i) {
        const float v = std::min(127.f, std::max(-127.f, xp[i] * inv));
        const float r = (v + kMagic) - kMagic;
        qp[i] = (int8_t)r;
        qsum += qp[i];
      }
      // The zero-point term uses the quantized activations too, so the kernel
      // computes exactly xhat @ W^T: the activation error is weighted by the
      // centred (q - z), not by q (3x smaller on SmolLM2's layers).
      *gsum += xs[o] * (float)qsum;
    }
  }
}

}  // namespace lk
