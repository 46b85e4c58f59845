// The row loop shared by the SIMD quant_matmul kernels (AVX2, AVX-512). Per weight
// row: the row's outliers (gwq_matmul, 1 < M <= kOutlierRowBlock), the group scales and
// scale*zero in fp32 (converted kScaleRows rows at a time), the row against tiles of up to 4 activation rows, then the
// zero-point term, outliers and bias; M = 1 and larger M add the outliers of the thread's rows after them
// (outliers_after_rows). Each ISA file supplies `Isa` with its tile kernel, dot product and scale
// conversion; this header is compiled with that file's flags (anonymous namespace).
#pragma once

#include "common.h"
#include "outliers.h"
#include "simd_x86.h"

namespace lk {
namespace {

// Isa::tile<BITS, G, MR>(p, prow, m0, sf, out): out[i] = sum_g sf[g] * (codes . xhat) for rows m0 + i.
// Isa::dot(a, b, n): fp32 dot product. Isa::kCentred8: the 8-bit tile multiplies q - 128, not q. Isa::scales(sp, zp, ng, sf, szf): sf = s, szf = s * z.
// Scales and zeros are converted kScaleRows rows at a time: one row of a layer with few groups (SmolLM2's K = 576
// in groups of 64: 9) would otherwise leave most of a vector step to a scalar tail.
constexpr int64_t kScaleRows = 16;

template <int BITS, int G, class Isa>
void simd_rows(const QmmProblem& p, int64_t n0, int64_t n1) {
  const int64_t ng = p.K / G, rb = row_bytes(p.K, BITS);
  float* const sfb = reinterpret_cast<float*>(thread_scratch(kScratchRowScales, (size_t)(2 * ng * kScaleRows) * 4));
  float* const szfb = sfb + ng * kScaleRows;
  // 1 < M <= kOutlierRowBlock: each row's outliers with its dense pass; else after the rows (outliers.h)
  const bool fused = p.row_ptr && p.M > 1 && p.M <= kOutlierRowBlock;
  const auto h2f = [](uint16_t h) { return _cvtsh_ss(h); };
  float sparse[kOutlierRowBlock];
  for (int64_t n = n0; n < n1; ++n) {
    if (fused) row_outliers(p, n, 0, p.M, h2f, sparse);
    const int64_t nb = (n - n0) % kScaleRows;
    if (nb == 0) {  // rows [n, n + kScaleRows) are contiguous in scales and zeros
      const int64_t rows = std::min<int64_t>(kScaleRows, n1 - n);
      Isa::scales(p.scales + n * ng, p.zeros + n * ng, rows * ng, sfb, szfb);
      if constexpr (BITS == 8 && Isa::kCentred8)  // the tile summed (q - 128) x: s z x -> s (z - 128) x
        for (int64_t g = 0; g < rows * ng; ++g) szfb[g] -= 128.f * sfb[g];
    }
    const float* sf = sfb + nb * ng;
    const float* szf = szfb + nb * ng;
    const uint8_t* prow = p.qw + n * rb;
    const float b = p.bias ? p.bias[n] : 0.f;
    float out[4];
    for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
      const int64_t mr = p.M - m0 < 4 ? p.M - m0 : 4;
      switch (mr) {
        case 4: Isa::template tile<BITS, G, 4>(p, prow, m0, sf, out); break;
        case 3: Isa::template tile<BITS, G, 3>(p, prow, m0, sf, out); break;
        case 2: Isa::template tile<BITS, G, 2>(p, prow, m0, sf, out); break;
        default: Isa::template tile<BITS, G, 1>(p, prow, m0, sf, out); break;
      }
      for (int64_t i = 0; i < mr; ++i) {
        const int64_t m = m0 + i;
        const float o = fused ? sparse[m] : 0.f;  // the row's outliers, same accumulator
        p.y[m * p.N + n] = out[i] - Isa::dot(szf, p.xsum + m * ng, ng) + o + b;
      }
    }
  }
  if (p.row_ptr && !fused) outliers_after_rows(p, n0, n1, h2f);
}

template <int BITS, class Isa>
void simd_rows_bits(const QmmProblem& p, int64_t n0, int64_t n1) {
  switch (p.G) {
    case 32: simd_rows<BITS, 32, Isa>(p, n0, n1); break;
    case 64: simd_rows<BITS, 64, Isa>(p, n0, n1); break;
    default: simd_rows<BITS, 128, Isa>(p, n0, n1); break;
  }
}

// Rows [n0, n1) of y for every m, dispatched on bits and group size.
template <class Isa>
void simd_rows_dispatch(const QmmProblem& p, int64_t n0, int64_t n1) {
  switch (p.bits) {
    case 1: simd_rows_bits<1, Isa>(p, n0, n1); break;
    case 2: simd_rows_bits<2, Isa>(p, n0, n1); break;
    case 3: simd_rows_bits<3, Isa>(p, n0, n1); break;
    case 4: simd_rows_bits<4, Isa>(p, n0, n1); break;
    default: simd_rows_bits<8, Isa>(p, n0, n1); break;
  }
}

}  // namespace
}  // namespace lk
