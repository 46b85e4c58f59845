// decode_math.h's loops compiled for the avx2 path (this file's flags: CMakeLists.txt).
#include "decode_math.h"

namespace lk {

void silu_mul_avx2(float* g, const float* u, int64_t n) { silu_mul_loop(g, u, n); }

void attend_avx2(const float* q, const float* kc, const float* vc, const uint8_t* mk, int64_t npos, int64_t D,
                 float scale, float* p, float* o) {
  attend_loop(q, kc, vc, mk, npos, D, scale, p, o);
}

}  // namespace lk
