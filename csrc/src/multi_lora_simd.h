// The multi-adapter loops shared by every ISA path (compiled in each ISA's file with its
// flags, like lora_expand_simd.h). Isa supplies, besides the expand hooks:
//   Isa::to_f32(src, dtype, n, out)      n values of fp32/fp16/bf16 as fp32
//   Isa::dot4(x, a, lda, K, out)         out[j] = x . a[j * lda : j * lda + K], j < 4
//   Isa::dot_rows(x, src, ld, dtype, nr, K, out)
//                                        out[j] = x . src[j * ld : j * ld + K] (src of dtype), j < nr <= 4
//   Isa::qpart_layout(bits, G, c0, c1, rows)  whether axpy_qpart takes this layout and column range
//   Isa::axpy_qpart(y, coef, part, c0, c1)  y[0:c1-c0] += coef . part's rows (columns [c0, c1)), decoded in
//                                        registers
//   Isa::axpy_rows(y, coef, src, ld, dtype, r, w)
//                                        y[0:w] += sum_i coef[i] * src[i * ld : i * ld + w] (w % 32 == 0)
#pragma once
#include <algorithm>
#include <vector>

#include "lora_expand_simd.h"
#include "multi_lora.h"

namespace lk {
namespace {

inline size_t dtype_bytes(lk_dtype d) { return d == LK_F32 ? 4 : 2; }

// Rows of A are converted to fp32 four at a time (in L1/L2), then every activation row of
// the segment meets all four in one pass.
template <class Isa>
void dense_shrink_rows(const DenseShrink& p, int64_t i0, int64_t i1) {
  const int64_t K = p.K;
  const char* abase = static_cast<const char*>(p.a);
  const size_t rb = (size_t)K * dtype_bytes(p.dtype);
  if (p.count <= 2) {  // one or two activation rows: read A once, converting in registers
    for (int64_t i = i0; i < i1; i += 4) {
      const int nr = (int)std::min<int64_t>(4, i1 - i);
      for (int64_t e = 0; e < p.count; ++e) {
        float d[4];
        Isa::dot_rows(p.x[e], abase + (size_t)i * rb, K, p.dtype, nr, K, d);
        for (int j = 0; j < nr; ++j) p.t[e * p.ldt + i + j] = p.coef[e] * d[j];
      }
    }
    return;
  }
  std::vector<float> a4((size_t)(4 * K));
  for (int64_t i = i0; i < i1; i += 4) {
    const int nr = (int)std::min<int64_t>(4, i1 - i);
    for (int j = 0; j < 4; ++j) {
      if (j < nr)
        Isa::to_f32(abase + (size_t)(i + j) * rb, p.dtype, K, a4.data() + j * K);
      else
        std::fill(a4.begin() + j * K, a4.begin() + (j + 1) * K, 0.f);
    }
    for (int64_t e = 0; e < p.count; ++e) {
      float d[4];
      Isa::dot4(p.x[e], a4.data(), K, K, d);
      for (int j = 0; j < nr; ++j) p.t[e * p.ldt + i + j] = p.coef[e] * d[j];
    }
  }
}

// One compressed part's rows, columns [c0, c1), as an fp32 tile W[p.N, c1 - c0]; returns its rows.
template <class Isa>
int64_t part_tile(const lk_qweight& p, int64_t N, int64_t c0, int64_t c1, float* W) {
  if (!p.N) return 0;
  const int64_t w = c1 - c0;
  const int G = p.group_size;
  const int64_t rb = row_bytes(N, p.bits), ng = N / G;
  const int gbytes = group_bytes(G, p.bits);
  for (int64_t i = 0; i < p.N; ++i)
    for (int64_t g = c0 / G; g < c1 / G; ++g)
      dequant_group<Isa>(p.qweight + i * rb + g * gbytes, p.bits, G, Isa::h2f(p.scales[i * ng + g]),
                         Isa::h2f(p.zeros[i * ng + g]), W + i * w + (g * G - c0));
  return p.N;
}

// One slot's B^T columns [c0, c1) as an fp32 tile W[r, c1 - c0] (compressed: dequantized
// group by group, high rows then low rows).
template <class Isa>
int64_t slot_tile(const lk_lora_slot& s, int64_t N, int64_t c0, int64_t c1, float* W) {
  const int64_t w = c1 - c0;
  if (s.kind == LK_SLOT_DENSE) {
    const size_t eb = dtype_bytes(s.dtype);
    for (int64_t i = 0; i < s.rank; ++i)
      Isa::to_f32(static_cast<const char*>(s.bt) + ((size_t)(i * N + c0)) * eb, s.dtype, w, W + i * w);
    return s.rank;
  }
  int64_t j = 0;
  for (const lk_qweight* p : {&s.q.b_hi, &s.q.b_lo}) j += part_tile<Isa>(*p, N, c0, c1, W + j * w);
  return j;
}

// y[token, t0 : t0 + w] += coef . W for every entry of segment sg: W the tile [rows, w], coef the entry's row of t
// from column coef_off.
template <class Isa>
void add_tile(const MultiExpand& e, const int64_t* sg, int64_t t0, int64_t w, const float* W, int64_t rows,
              int64_t coef_off) {
  for (int64_t k = sg[1]; k < sg[1] + sg[2]; ++k) {
    float* y = e.y32 + e.batch->tokens[k] * e.ldy + t0;
    const float* coef = e.t + k * e.ldt + coef_off;
    if (w % 32 == 0) {
      Isa::accumulate(y, y, coef, W, rows, (int)w);
    } else {  // a ragged last tile (dense adapters, N not a multiple of 32)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < w; ++c) y[c] += coef[i] * W[i * w + c];
    }
  }
}

// Each segment in turn over the whole column range [c0, c1) (one thread's share): B^T's rows are
// read as long contiguous runs. A dense adapter with one or two entries streams its rows straight
// into the output (Isa::axpy_rows: conversion and FMA in registers); otherwise a tile of B^T is
// made fp32 once (dequantized for compressed adapters) and applied to every entry.
template <class Isa>
void multi_expand_cols(const MultiExpand& e, int64_t c0, int64_t c1) {
  const lk_lora_batch& b = *e.batch;
  int64_t rmax = 0;
  for (int64_t s = 0; s < b.num_segments; ++s) {
    const lk_lora_slot& sl = e.slots[b.segments[3 * s]];
    rmax = std::max(rmax, sl.kind == LK_SLOT_DENSE ? sl.rank : sl.q.a_hi.N + sl.q.a_lo.N);
  }
  float* const W = reinterpret_cast<float*>(thread_scratch(kScratchExpandTile, (size_t)(rmax * kExpandTile) * 4));
  const auto prefetch = [&](int64_t s) {  // a compressed segment's B^T columns [c0, c1)
    if (s >= b.num_segments || !b.segments[3 * s + 2]) return;
    const lk_lora_slot& sl = e.slots[b.segments[3 * s]];
    if (sl.kind != LK_SLOT_COMPRESSED) return;
    prefetch_part(sl.q.b_hi, 0, sl.q.b_hi.N, c0, c1);
    prefetch_part(sl.q.b_lo, 0, sl.q.b_lo.N, c0, c1);
  };
  prefetch(0);
  for (int64_t s = 0; s < b.num_segments; ++s) {
    const int64_t* sg = b.segments + 3 * s;
    const lk_lora_slot& sl = e.slots[sg[0]];
    const int64_t r = sl.kind == LK_SLOT_DENSE ? sl.rank : sl.q.a_hi.N + sl.q.a_lo.N;
    prefetch(s + 1);  // the next segment's data arrives while this one is added
    if (!sg[2] || !r) continue;
    if (sl.kind == LK_SLOT_DENSE && sg[2] <= 2) {
      const size_t eb = dtype_bytes(sl.dtype);
      const int64_t w = c1 - c0, w32 = w & ~int64_t(31);
      for (int64_t k = sg[1]; k < sg[1] + sg[2]; ++k) {
        float* y = e.y32 + b.tokens[k] * e.ldy + c0;
        const float* coef = e.t + k * e.ldt;
        const char* src = static_cast<const char*>(sl.bt) + (size_t)c0 * eb;
        for (int64_t i0 = 0; i0 < r; i0 += 8)  // 8 rows at a time: 8 streams for the prefetchers, y in L1
          Isa::axpy_rows(y, coef + i0, src + (size_t)(i0 * e.N) * eb, e.N, sl.dtype, std::min<int64_t>(8, r - i0), w32);
        for (int64_t i = 0; i < r && w32 < w; ++i) {  // ragged tail columns
          float tail[32];
          Isa::to_f32(src + ((size_t)(i * e.N + w32)) * eb, sl.dtype, w - w32, tail);
          for (int64_t c = w32; c < w; ++c) y[c] += coef[i] * tail[c - w32];
        }
      }
      continue;
    }
    const lk_qweight& qh = sl.q.b_hi;
    const lk_qweight& ql = sl.q.b_lo;
    const bool dh = qh.N && Isa::qpart_layout(qh.bits, qh.group_size, c0, c1, qh.N);
    const bool dl = ql.N && Isa::qpart_layout(ql.bits, ql.group_size, c0, c1, ql.N);
    if (sl.kind == LK_SLOT_COMPRESSED && sg[2] <= 2 && (dh || dl)) {
      // the parts whose layout allows it decoded in registers straight into the output; the other part (e.g.
      // 2-bit high rows in groups of 64) through a tile of its own rows only
      for (int64_t k = sg[1]; k < sg[1] + sg[2]; ++k) {
        float* y = e.y32 + b.tokens[k] * e.ldy + c0;
        const float* coef = e.t + k * e.ldt;
        if (dh) Isa::axpy_qpart(y, coef, qh, c0, c1);
        if (dl) Isa::axpy_qpart(y, coef + qh.N, ql, c0, c1);
      }
      const lk_qweight* tiled = (qh.N && !dh) ? &qh : (ql.N && !dl) ? &ql : nullptr;
      if (tiled)
        for (int64_t t0 = c0; t0 < c1; t0 += kExpandTile) {
          const int64_t t1 = std::min(c1, t0 + kExpandTile);
          const int64_t rows = part_tile<Isa>(*tiled, e.N, t0, t1, W);
          add_tile<Isa>(e, sg, t0, t1 - t0, W, rows, tiled == &qh ? 0 : qh.N);
        }
      continue;
    }
    for (int64_t t0 = c0; t0 < c1; t0 += kExpandTile) {
      const int64_t t1 = std::min(c1, t0 + kExpandTile);
      slot_tile<Isa>(sl, e.N, t0, t1, W);
      add_tile<Isa>(e, sg, t0, t1 - t0, W, r, 0);
    }
  }
}

}  // namespace
}  // namespace lk
