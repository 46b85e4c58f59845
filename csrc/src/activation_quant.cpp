// Per-group int8 quantization of the activations, shared by every ISA path so
// that all paths see identical integer inputs.
#include <algorithm>
#include <cmath>

#include "common.h"

namespace lk {

void quantize_activations(const float* x, int64_t M, int64_t K, int G, int8_t* xq, float* xs,
                          float* xsum) {
  const int64_t ng = K / G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < ng; ++g) {
      const float* xp = x + m * K + g * G;
      int8_t* qp = xq + m * K + g * G;
      float amax = 0.f, sum = 0.f;
      bool finite = true;
      for (int i = 0; i < G; ++i) {
        const float v = xp[i];
        finite &= std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
        sum += v;
      }
      const int64_t o = m * ng + g;
      if (!finite) {  // NaN/Inf propagate as NaN; never cast a NaN to int
        std::memset(qp, 0, (size_t)G);
        xs[o] = NAN;
        xsum[o] = NAN;
        continue;
      }
      xsum[o] = sum;
      if (amax == 0.f) {
        std::memset(qp, 0, (size_t)G);
        xs[o] = 0.f;
        continue;
      }
      const float scale = amax / 127.f;
      const float inv = 127.f / amax;
      xs[o] = scale;
      for (int i = 0; i < G; ++i) {
        float r = std::nearbyint(xp[i] * inv);
        r = std::min(127.f, std::max(-127.f, r));
        qp[i] = (int8_t)r;
      }
    }
  }
}

}  // namespace lk
