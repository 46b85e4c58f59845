// The expand loop shared by every ISA path (compiled in each ISA's file, with its
// flags). Per group of G output columns: the rows of B'^T (both parts) are
// dequantized into an fp32 tile W[r, G] (dequant_group, in L1), then for
// each token m, 32 columns at a time held in registers: y += sum_i (scale t[m, i]) W[i].
// Isa::accumulate keeps the output block in registers across the r components.
#pragma once
#include <vector>

#include "lora.h"
#include "lorakern/lorakern.h"

namespace lk {
namespace {

// Isa::template dequant_bits<BITS>(gp, G, s, z, out): one group of BITS-bit codes as fp32 s * (q - z).
// Isa::accumulate(y, yin, coef, W, r, G): y[0:G] = yin[0:G] + sum_i coef[i] * W[i * G : i * G + G]
// (yin may be y).
template <class Isa>
inline void dequant_group(const uint8_t* gp, int bits, int G, float s, float z, float* out) {
  switch (bits) {
    case 1: Isa::template dequant_bits<1>(gp, G, s, z, out); break;
    case 2: Isa::template dequant_bits<2>(gp, G, s, z, out); break;
    case 3: Isa::template dequant_bits<3>(gp, G, s, z, out); break;
    case 4: Isa::template dequant_bits<4>(gp, G, s, z, out); break;
    default: Isa::template dequant_bits<8>(gp, G, s, z, out); break;
  }
}

// Decode (M <= kExpandDirectM): no tile; each part's codes are decoded in registers straight into the
// output (Isa::axpy_qpart, as the multi-adapter expand does for a slot with few tokens), when its layout
// allows. Returns false (nothing done) otherwise.
constexpr int64_t kExpandDirectM = 2;

template <class Isa>
bool expand_direct(const LoraExpand& e, int64_t g0, int64_t g1) {
  const int G = e.G;
  const int64_t c0 = g0 * G, c1 = g1 * G, r = e.part[0].rows + e.part[1].rows;
  if (e.M > kExpandDirectM || r > 256) return false;
  for (const ExpandPart& p : e.part)
    if (p.rows && !Isa::qpart_layout(p.bits, G, c0, c1, p.rows)) return false;
  float coef[256];
  for (int64_t m = 0; m < e.M; ++m) {
    float* y = e.y + m * e.N + c0;
    if (e.yin && e.yin != e.y)
      for (int64_t c = 0; c < c1 - c0; ++c) y[c] = e.yin[m * e.N + c0 + c];
    for (const ExpandPart& p : e.part) {
      if (!p.rows) continue;
      for (int64_t i = 0; i < p.rows; ++i) coef[i] = e.scale * p.t[m * p.ld + i];
      const lk_qweight w{p.qw, p.scales, p.zeros, p.rows, e.N, p.bits, G};
      Isa::axpy_qpart(y, coef, w, c0, c1);
    }
  }
  return true;
}

template <class Isa>
void expand_groups(const LoraExpand& e, int64_t g0, int64_t g1) {
  const int G = e.G;
  const int64_t r = e.part[0].rows + e.part[1].rows;
  if (r == 0 || g1 <= g0) return;
  if (expand_direct<Isa>(e, g0, g1)) return;
  const int64_t ng = e.N / G;
  std::vector<float> W((size_t)(r * G)), coef((size_t)r);
  for (int64_t g = g0; g < g1; ++g) {
    int64_t j = 0;
    for (const ExpandPart& p : e.part) {
      const int64_t rb = row_bytes(e.N, p.bits);
      const int gb = group_bytes(G, p.bits);
      for (int64_t i = 0; i < p.rows; ++i, ++j)
        dequant_group<Isa>(p.qw + i * rb + g * gb, p.bits, G, Isa::h2f(p.scales[i * ng + g]),
                           Isa::h2f(p.zeros[i * ng + g]), W.data() + j * G);
    }
    for (int64_t m = 0; m < e.M; ++m) {
      j = 0;
      for (const ExpandPart& p : e.part)
        for (int64_t i = 0; i < p.rows; ++i) coef[j++] = e.scale * p.t[m * p.ld + i];
      const int64_t o = m * e.N + g * G;
      Isa::accumulate(e.y + o, (e.yin ? e.yin : e.y) + o, coef.data(), W.data(), r, G);
    }
  }
}

}  // namespace
}  // namespace lk
