// The expand loop shared by every ISA path (compiled in each ISA's file, with its
// flags). Per group of G output columns: the rows of B'^T (both parts) are
// dequantized into an fp32 tile W[r, G] (dequant_group, in L1), then for
// each token m, 32 columns at a time held in registers: y += sum_i (scale t[m, i]) W[i].
// The 32-wide inner loops are plain C++ that the compiler vectorizes with the
// file's ISA flags.
#pragma once
#include <vector>

#include "lora.h"

namespace lk {
namespace {

// Isa::template dequant_bits<BITS>(gp, G, s, z, out): one group of BITS-bit codes as fp32 s * (q - z).
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

template <class Isa>
void expand_groups(const LoraExpand& e, int64_t g0, int64_t g1) {
  const int G = e.G;
  const int64_t r = e.part[0].rows + e.part[1].rows;
  if (r == 0 || g1 <= g0) return;
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
      float* yr = e.y + m * e.N + g * G;
      for (int c0 = 0; c0 < G; c0 += 32) {
        float acc[32];
        for (int c = 0; c < 32; ++c) acc[c] = yr[c0 + c];
        for (int64_t i = 0; i < r; ++i) {
          const float ci = coef[i];
          const float* w = W.data() + i * G + c0;
          for (int c = 0; c < 32; ++c) acc[c] += ci * w[c];
        }
        for (int c = 0; c < 32; ++c) yr[c0 + c] = acc[c];
      }
    }
  }
}

}  // namespace
}  // namespace lk
