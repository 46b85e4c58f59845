// C ABI entry points of the multi-adapter kernels: lk_lora_shrink, lk_lora_expand and the
// fused lk_multi_lora (one parallel region).
//
// Shrink: the batch's activation rows are gathered once in entry order (fp32; int8 as well
// when a compressed adapter is used), so every segment is a contiguous block of rows.
// Work items are scheduled dynamically: with many segments (decode: one token per sequence)
// one item per segment block covers every slice and row of its adapters and gathers its own
// rows (no barrier before the expand's); with few, (segment, row block of A) pairs, so that
// one busy adapter is shared by the threads. Dense adapters run an fp32 dot over rows of A
// converted four at a time; compressed ones run the quant_matmul row kernel on their high
// and 1-bit parts, each item scaling its own results into t.
// Expand: threads own tiles of output columns; each adds every segment's t B^T into its
// columns, so entries of a k-way mixture that hit the same token never race.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "common.h"
#include "driver.h"
#include "kernels.h"
#include "lorakern/lorakern.h"
#include "multi_lora.h"

namespace {

int64_t slot_rank(const lk_lora_slot& s) { return s.kind == LK_SLOT_DENSE ? s.rank : s.q.a_hi.N + s.q.a_lo.N; }

// A slot used by the batch: dense with its pointers, or compressed with parts that fit
// [N, K] (-1: that side is not used by the call).
bool slot_ok(const lk_lora_slot& s, int64_t N, int64_t K) {
  if (!std::isfinite(s.scale)) return false;
  if (s.kind == LK_SLOT_DENSE) {
    if (s.rank < 0 || (s.dtype != LK_F32 && s.dtype != LK_F16 && s.dtype != LK_BF16)) return false;
    return s.rank == 0 || ((K < 0 || s.a) && (N < 0 || s.bt));
  }
  if (s.kind != LK_SLOT_COMPRESSED) return false;
  const lk_lora& q = s.q;
  const int64_t KA = K < 0 ? (q.a_hi.N ? q.a_hi.K : q.a_lo.K) : K;
  const int64_t NB = N < 0 ? (q.b_hi.N ? q.b_hi.K : q.b_lo.K) : N;
  lk_lora l = q;
  l.scale = 0.f;
  return lk::check_lora_parts(&l, NB, KA) == LK_OK;
}

struct Checked {
  int ga = 0;        // the compressed adapters' shared group size along K (0: none)
  int64_t rmax = 0;  // the largest rank used
  bool compressed = false;
};

lk_status check_batch(const lk_lora_slot* slots, int64_t num_slots, const lk_lora_batch* b, int64_t T, int64_t N,
                      int64_t K, Checked* c) {
  if (!b || num_slots < 0 || (num_slots > 0 && !slots)) return LK_ERR_INVALID_ARG;
  if (lk_status s = lk::check_batch_entries(b, T)) return s;
  for (int64_t s = 0; s < b->num_segments; ++s) {
    const int64_t slot = b->segments[3 * s];
    if (slot < 0 || slot >= num_slots) return LK_ERR_INVALID_ARG;
    const lk_lora_slot& sl = slots[slot];
    if (!slot_ok(sl, N, K)) return LK_ERR_INVALID_ARG;
    c->rmax = std::max(c->rmax, slot_rank(sl));
    if (sl.kind == LK_SLOT_COMPRESSED && slot_rank(sl) && K >= 0) {
      const int g = sl.q.a_hi.N ? sl.q.a_hi.group_size : sl.q.a_lo.group_size;
      if (c->ga && c->ga != g) return LK_ERR_INVALID_ARG;  // one activation quantization per call
      c->ga = g;
      c->compressed = true;
    }
  }
  return LK_OK;
}

// A shrink work item: entries [m0, m1) of one segment (relative to its first) against rows [i0, i1) of one part of
// slice s0's adapter, or (part kWhole) against every row of the adapters of slices [s0, s1). Whole items gather and
// quantize their own entries' rows of x (no other item reads them): the batch of many small segments (decode: one
// token per sequence) then runs as one dynamically scheduled loop with no barrier before the expand's.
struct Item {
  int64_t s0, s1, seg;
  int part;  // 0 dense, 1 compressed high, 2 compressed low, kWhole
  int64_t i0, i1;  // rows of A (of the part)
  int64_t m0, m1;  // entries of the segment (relative to its first)
};
constexpr int kWhole = 3;

float elem_f32(const void* p, lk_dtype d, int64_t i) {
  if (d == LK_F32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return d == LK_F16 ? lk::half_to_float(h) : lk::bf16_to_float(h);
}

// Shrink (x != null) into t [E, ldt] and/or expand (y != null) from it, for output slices of one input: slice s
// (its slots, width N, first column col) writes y[:, col : col + N]; base and y are [T, ldy] of y_dtype. The
// batch's rows of x are gathered and quantized once for every slice, and one parallel region runs the shrink
// items of all slices, then the expand over all their output tiles. An external t (t_io) serves one slice.
lk_status run_multi(const void* x, lk_dtype x_dtype, int64_t T, int64_t K, const lk_lora_slice* slices, int64_t ns,
                    const lk_lora_batch* b, float* t_io, int64_t ldt, lk_dtype y_dtype, const void* base, void* y,
                    int num_threads, int64_t ldy) {
  const bool shrink = x != nullptr, expand = y != nullptr;
  if (T < 0 || (shrink && K <= 0) || ns < 0 || (t_io && ns != 1)) return LK_ERR_INVALID_ARG;
  for (lk_dtype d : {x_dtype, y_dtype})
    if (d != LK_F32 && d != LK_F16 && d != LK_BF16) return LK_ERR_INVALID_ARG;
  std::vector<Checked> cs((size_t)ns);
  int64_t rmax = 0;
  int ga = 0;
  bool one_ga = true;
  for (int64_t i = 0; i < ns; ++i) {
    const lk_lora_slice& sl = slices[i];
    if (expand && !sl.N) continue;  // no output columns: its slots are not read (N, col, ldy: checked by the entry points)
    if (lk_status st = check_batch(sl.slots, sl.num_slots, b, T, expand ? sl.N : -1, shrink ? K : -1, &cs[i]))
      return st;
    rmax = std::max(rmax, cs[i].rmax);
    if (cs[i].ga && ga && cs[i].ga != ga) one_ga = false;
    if (cs[i].ga) ga = cs[i].ga;
  }
  if (t_io && ldt < rmax) return LK_ERR_INVALID_ARG;
  if (b->num_entries > 0 && !t_io && !(shrink && expand)) return LK_ERR_INVALID_ARG;
  if (!one_ga) {  // slices whose compressed adapters quantize x in different groups: one call each
    for (int64_t i = 0; i < ns; ++i)
      if (lk_status st = run_multi(x, x_dtype, T, K, slices + i, 1, b, t_io, ldt, y_dtype, base, y, num_threads, ldy))
        return st;
    return LK_OK;
  }
  if (T == 0) return LK_OK;
  try {
    const int64_t E = b->num_entries;
    std::vector<float> tbuf;
    float* t = t_io;
    if (!t) {
      ldt = std::max<int64_t>(rmax, 1);
      tbuf.assign((size_t)(ns * E * ldt), 0.f);
      t = tbuf.data();
    }
    const bool compressed = ga != 0;
    const lk::CpuKernels& kern = lk::active_kernels();
    std::unique_ptr<float[]> xg, tq;  // uninitialized: every element used is written first
    std::vector<const float*> xrow;  // fp32 row of each entry: x's own row, or its conversion in xg
    std::unique_ptr<int8_t[]> xq;
    std::unique_ptr<float[]> xs, xsum;
    std::vector<float> coef;  // [ns, E]: weight * scale
    std::vector<Item> items;
    const int G = ga, B = G ? lk::act_block(G) : 1;
    const int nt = lk::threads_for(num_threads);
    bool whole = false;  // whole items (Item): enough segment blocks to keep every thread busy
    if (shrink && E) {
      if (x_dtype != LK_F32) xg.reset(new float[(size_t)(E * K)]);
      xrow.resize((size_t)E);
      coef.resize((size_t)(ns * E));
      const int64_t eblk = 32;  // entries per item (a segment with many tokens is split)
      int64_t nblocks = 0;
      for (int64_t s = 0; s < b->num_segments; ++s) nblocks += (b->segments[3 * s + 2] + eblk - 1) / eblk;
      whole = nblocks >= 4 * nt;
      for (int64_t i = 0; i < ns; ++i) {
        const lk_lora_slice& sc = slices[i];
        if (expand && !sc.N) continue;  // no output columns: nothing to compute
        for (int64_t s = 0; s < b->num_segments; ++s) {
          const int64_t* sg = b->segments + 3 * s;
          const lk_lora_slot& sl = sc.slots[sg[0]];
          for (int64_t e = sg[1]; e < sg[1] + sg[2]; ++e) coef[i * E + e] = b->weights[e] * sl.scale;
          const int64_t h = sl.kind == LK_SLOT_DENSE ? 0 : sl.q.a_hi.N, r = slot_rank(sl);
          if (whole || !sg[2] || !r) continue;
          // few segments: items of 16 rows of A (4 when the batch has very few, so that every thread gets work)
          const int64_t blk = b->num_segments * ns * 4 >= nt * 4 ? 16 : 4;
          for (int64_t m = 0; m < sg[2]; m += eblk)
            for (int64_t r0 = 0; r0 < r; r0 += blk) {
              const int64_t r1 = std::min(r, r0 + blk), m1 = std::min(sg[2], m + eblk);
              if (sl.kind == LK_SLOT_DENSE) {
                items.push_back({i, i + 1, s, 0, r0, r1, m, m1});
              } else {
                if (r0 < h) items.push_back({i, i + 1, s, 1, r0, std::min(r1, h), m, m1});
                if (r1 > h) items.push_back({i, i + 1, s, 2, std::max(r0, h) - h, r1 - h, m, m1});
              }
            }
        }
      }
      if (whole)
        for (int64_t s = 0; s < b->num_segments; ++s)
          for (int64_t m = 0; m < b->segments[3 * s + 2]; m += eblk)
            items.push_back({0, ns, s, kWhole, 0, 0, m, std::min(b->segments[3 * s + 2], m + eblk)});
      if (compressed) {
        tq.reset(new float[(size_t)(ns * E * ldt)]);
        xq.reset(new int8_t[(size_t)(E * K)]);
        xs.reset(new float[(size_t)(E * (K / B))]);
        xsum.reset(new float[(size_t)(E * (K / G))]);
      }
    }
    float* y32 = nullptr;
    std::unique_ptr<float[]> ybuf;
    int64_t ntiles = 0;  // output tiles of all slices, in slice order
    std::vector<int64_t> tile0((size_t)ns + 1, 0);
    if (expand) {
      y32 = static_cast<float*>(y);
      if (y_dtype != LK_F32) {  // an fp32 copy of the rows (only the slices' columns are used)
        ybuf.reset(new float[(size_t)(T * ldy)]);
        y32 = ybuf.get();
      }
      for (int64_t i = 0; i < ns; ++i) tile0[i + 1] = tile0[i] + (slices[i].N + lk::kExpandTile - 1) / lk::kExpandTile;
      ntiles = tile0[ns];
    }
    const auto sfn = kern.dense_shrink;
    const auto efn = kern.multi_expand;
    const auto rfn = kern.qmm_rows;
    const size_t xb = x_dtype == LK_F32 ? 4 : 2;
    const auto gather = [&](int64_t e) {  // entry e's row of x (fp32, and int8 for compressed adapters)
      const char* row = static_cast<const char*>(x) + (size_t)(b->tokens[e] * K) * xb;
      const float* xr = reinterpret_cast<const float*>(row);
      if (x_dtype != LK_F32) {
        float* xc = xg.get() + e * K;
        const uint16_t* hx = reinterpret_cast<const uint16_t*>(row);
        for (int64_t k = 0; k < K; ++k) xc[k] = x_dtype == LK_F16 ? lk::half_to_float(hx[k]) : lk::bf16_to_float(hx[k]);
        xr = xc;
      }
      xrow[e] = xr;
      if (compressed)
        kern.quantize_activations(xr, 1, K, G, xq.get() + e * K, xs.get() + e * (K / B), xsum.get() + e * (K / G));
    };
    // t's rows of entries [m0, m1) of segment s, slice i, from rows [i0, i1) of one part of its adapter (weight *
    // scale applied): dense directly; compressed through its [count, rows] block of tq (the segment's high block,
    // then its low block), each element scaled into t by the item that computed it
    const auto shrink_part = [&](int64_t i, int64_t s, int part, int64_t i0, int64_t i1, int64_t m0, int64_t m1) {
      const int64_t* sg = b->segments + 3 * s;
      const lk_lora_slot& sl = slices[i].slots[sg[0]];
      const int64_t e0 = sg[1] + m0, cnt = m1 - m0;
      const float* cf = coef.data() + i * E + e0;
      if (part == 0) {
        const lk::DenseShrink p{xrow.data() + e0, cnt, K, sl.a, sl.dtype, cf, t + (i * E + e0) * ldt, ldt};
        sfn(p, i0, i1);
        return;
      }
      const lk_qweight& w = part == 1 ? sl.q.a_hi : sl.q.a_lo;
      const int64_t h = sl.q.a_hi.N;
      float* out = tq.get() + (i * E + sg[1]) * ldt + (part == 1 ? 0 : sg[2] * h) + m0 * w.N;
      const lk::QmmProblem p{cnt, w.N, K, w.bits, G, w.qweight, w.scales, w.zeros, xq.get() + e0 * K,
                             xs.get() + e0 * (K / B), xsum.get() + e0 * (K / G), nullptr, out};
      rfn(p, i0, i1);
      const int64_t off = part == 1 ? 0 : h;
      for (int64_t m = 0; m < cnt; ++m) {
        float* tr = t + (i * E + e0 + m) * ldt + off;
        for (int64_t n = i0; n < i1; ++n) tr[n] = cf[m] * out[m * w.N + n];
      }
    };
    // fused: whole items that also add their own entries' expand (every slice, all columns) right after their
    // shrink, with t still in L1 and no barrier between: when no token appears in two entries (no mixtures), no two
    // items write the same row of y. Where y is not already the base, each item copies its own rows of the base
    // first (after reading x there: x may be y), and the rows without entries are copied beside the items.
    bool fused = whole && expand && !t_io;
    std::vector<uint8_t> seen;  // fused: whether row m of y has an entry
    if (fused) {
      seen.assign((size_t)T, 0);
      for (int64_t e = 0; e < E && fused; ++e) fused = !seen[(size_t)b->tokens[e]]++;
    }
    const bool copy_base = expand && (base != y || y_dtype != LK_F32);
    // y32's row m, columns [c0, c1) of slice i: the base's (fp32), or zeros
    const auto base_row = [&](int64_t m, int64_t i, int64_t c0, int64_t c1) {
      const lk_lora_slice& sc = slices[i];
      float* yr = y32 + m * ldy + sc.col;
      if (!base)
        std::fill(yr + c0, yr + c1, 0.f);
      else if (y_dtype == LK_F32)
        std::memcpy(yr + c0, static_cast<const float*>(base) + m * ldy + sc.col + c0, (size_t)(c1 - c0) * 4);
      else
        for (int64_t col = c0; col < c1; ++col) yr[col] = elem_f32(base, y_dtype, m * ldy + sc.col + col);
    };
    // hints for a whole item's rows of A (and, fused, of B^T) of every slice: the small parts of many adapters are
    // as many short streams, which the hardware prefetchers do not follow; issued together, their misses overlap
    const auto prefetch_item = [&](size_t n) {
      if (n >= items.size()) return;
      const int64_t slot = b->segments[3 * items[n].seg];
      const auto lines = [](const void* p, int64_t bytes) {
        for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 3);
      };
      for (int64_t i = items[n].s0; i < items[n].s1; ++i) {
        if (expand && !slices[i].N) continue;  // (its slots are not checked: not read)
        const lk_lora_slot& sl = slices[i].slots[slot];
        if (sl.kind == LK_SLOT_COMPRESSED) {
          lk::prefetch_part(sl.q.a_hi, 0, sl.q.a_hi.N, 0, K);
          lk::prefetch_part(sl.q.a_lo, 0, sl.q.a_lo.N, 0, K);
          if (fused) {
            lk::prefetch_part(sl.q.b_hi, 0, sl.q.b_hi.N, 0, slices[i].N);
            lk::prefetch_part(sl.q.b_lo, 0, sl.q.b_lo.N, 0, slices[i].N);
          }
        } else if (sl.rank) {
          const int64_t eb = sl.dtype == LK_F32 ? 4 : 2;
          lines(sl.a, sl.rank * K * eb);
          if (fused) lines(sl.bt, sl.rank * slices[i].N * eb);
        }
      }
    };
#pragma omp parallel num_threads(nt)
    {
      if (fused && copy_base) {  // rows without entries here; each item copies its own rows after reading x there
#pragma omp for schedule(static) nowait
        for (int64_t m = 0; m < T; ++m)
          if (!seen[(size_t)m])
            for (int64_t i = 0; i < ns; ++i) base_row(m, i, 0, slices[i].N);
      }
      if (shrink && E) {
        if (!whole) {
#pragma omp for schedule(static)
          for (int64_t e = 0; e < E; ++e) gather(e);
        }
#pragma omp for schedule(dynamic, 1)
        for (size_t n = 0; n < items.size(); ++n) {
          const Item& it = items[n];
          if (it.part != kWhole) {
            shrink_part(it.s0, it.seg, it.part, it.i0, it.i1, it.m0, it.m1);
            continue;
          }
          const int64_t* sg = b->segments + 3 * it.seg;
          prefetch_item(n);
          prefetch_item(n + (size_t)nt);  // (likely this thread's next item)
          for (int64_t e = sg[1] + it.m0; e < sg[1] + it.m1; ++e) gather(e);  // rows no other item reads
          for (int64_t i = it.s0; i < it.s1; ++i) {
            if (expand && !slices[i].N) continue;
            const lk_lora_slot& sl = slices[i].slots[sg[0]];
            if (sl.kind == LK_SLOT_DENSE) {
              if (sl.rank) shrink_part(i, it.seg, 0, 0, sl.rank, it.m0, it.m1);
            } else {
              if (sl.q.a_hi.N) shrink_part(i, it.seg, 1, 0, sl.q.a_hi.N, it.m0, it.m1);
              if (sl.q.a_lo.N) shrink_part(i, it.seg, 2, 0, sl.q.a_lo.N, it.m0, it.m1);
            }
          }
          if (!fused) continue;
          if (copy_base)  // (x may be y: its rows here were gathered above, and no other item reads them)
            for (int64_t e = sg[1] + it.m0; e < sg[1] + it.m1; ++e)
              for (int64_t i = 0; i < ns; ++i) base_row(b->tokens[e], i, 0, slices[i].N);
          const int64_t one[3] = {sg[0], sg[1] + it.m0, it.m1 - it.m0};  // this item's entries as a segment
          const lk_lora_batch part{one, 1, b->tokens, b->weights, E};
          for (int64_t i = 0; i < ns; ++i) {
            if (!slices[i].N) continue;
            const lk::MultiExpand me{slices[i].slots, &part, t + i * E * ldt, ldt, slices[i].N, y32 + slices[i].col,
                                     ldy};
            efn(me, 0, slices[i].N);
          }
        }
      }
      if (expand && !fused) {  // each thread: its own run of whole tiles across the slices, the base first, then every segment
        const int tid = omp_get_thread_num(), T_ = omp_get_num_threads();
        const int64_t u0 = ntiles * tid / T_, u1 = ntiles * (tid + 1) / T_;
        for (int64_t i = 0; i < ns; ++i) {
          const lk_lora_slice& sc = slices[i];
          const int64_t a0 = std::max(u0, tile0[i]), a1 = std::min(u1, tile0[i + 1]);
          if (a1 <= a0) continue;
          const int64_t c0 = std::min(sc.N, (a0 - tile0[i]) * lk::kExpandTile);
          const int64_t c1 = std::min(sc.N, (a1 - tile0[i]) * lk::kExpandTile);
          if (copy_base)
            for (int64_t m = 0; m < T; ++m) base_row(m, i, c0, c1);
          const lk::MultiExpand me{sc.slots, b, t + (t_io ? 0 : i * E * ldt), ldt, sc.N, y32 + sc.col, ldy};
          efn(me, c0, c1);
        }
      }
    }
    if (expand && y_dtype != LK_F32)
      for (int64_t i = 0; i < ns; ++i)
        for (int64_t m = 0; m < T; ++m)
          lk::store_output(y32 + m * ldy + slices[i].col, y_dtype, slices[i].N,
                           static_cast<uint16_t*>(y) + m * ldy + slices[i].col);
  } catch (const std::bad_alloc&) {
    return LK_ERR_ALLOC;
  }
  return LK_OK;
}

}  // namespace

lk_status lk::check_batch_entries(const lk_lora_batch* b, int64_t T) {
  if (!b || b->num_segments < 0 || b->num_entries < 0 || (b->num_segments > 0 && !b->segments) ||
      (b->num_entries > 0 && (!b->tokens || !b->weights)))
    return LK_ERR_INVALID_ARG;
  int64_t pos = 0;
  for (int64_t s = 0; s < b->num_segments; ++s) {
    const int64_t start = b->segments[3 * s + 1], count = b->segments[3 * s + 2];
    if (start != pos || count < 0 || count > b->num_entries - pos) return LK_ERR_INVALID_ARG;
    pos += count;
  }
  if (pos != b->num_entries) return LK_ERR_INVALID_ARG;
  for (int64_t e = 0; e < b->num_entries; ++e)
    if (b->tokens[e] < 0 || b->tokens[e] >= T) return LK_ERR_INVALID_ARG;
  return LK_OK;
}

extern "C" {

lk_status lk_lora_shrink(const void* x, lk_dtype x_dtype, int64_t T, int64_t K, const lk_lora_slot* slots,
                         int64_t num_slots, const lk_lora_batch* batch, float* t, int64_t ldt, int num_threads) {
  if (!batch || T < 0) return LK_ERR_INVALID_ARG;
  if (T == 0) return batch->num_entries == 0 ? LK_OK : LK_ERR_INVALID_ARG;
  if (!x) return LK_ERR_INVALID_ARG;
  const lk_lora_slice one{slots, num_slots, -1, 0};
  return run_multi(x, x_dtype, T, K, &one, 1, batch, t, ldt, LK_F32, nullptr, nullptr, num_threads, 0);
}

lk_status lk_lora_expand(const float* t, int64_t ldt, const lk_lora_slot* slots, int64_t num_slots,
                         const lk_lora_batch* batch, lk_dtype y_dtype, int64_t T, int64_t N, const void* base,
                         void* y, int num_threads) {
  if (!batch || T < 0 || N < 0) return LK_ERR_INVALID_ARG;
  if (T == 0 || N == 0) return batch->num_entries == 0 || T > 0 ? LK_OK : LK_ERR_INVALID_ARG;
  if (!y) return LK_ERR_INVALID_ARG;
  const lk_lora_slice one{slots, num_slots, N, 0};
  return run_multi(nullptr, LK_F32, T, -1, &one, 1, batch, const_cast<float*>(t), ldt, y_dtype, base, y,
                   num_threads, N);
}

lk_status lk_multi_lora(const void* x, lk_dtype x_dtype, int64_t T, int64_t K, int64_t N, const lk_lora_slot* slots,
                        int64_t num_slots, const lk_lora_batch* batch, const void* base, void* y, int num_threads) {
  if (!batch || T < 0 || N < 0) return LK_ERR_INVALID_ARG;
  if (T == 0 || N == 0) return batch->num_entries == 0 || T > 0 ? LK_OK : LK_ERR_INVALID_ARG;
  if (!x || !y) return LK_ERR_INVALID_ARG;
  const lk_lora_slice one{slots, num_slots, N, 0};
  return run_multi(x, x_dtype, T, K, &one, 1, batch, nullptr, 0, x_dtype, base, y, num_threads, N);
}

lk_status lk_multi_lora_slices(const void* x, lk_dtype x_dtype, int64_t T, int64_t K, const lk_lora_slice* slices,
                               int64_t num_slices, const lk_lora_batch* batch, int64_t ldy, const void* base, void* y,
                               int num_threads) {
  if (!batch || T < 0 || num_slices < 0 || (num_slices > 0 && !slices)) return LK_ERR_INVALID_ARG;
  int64_t width = 0;
  for (int64_t i = 0; i < num_slices; ++i) {  // every slice checked before any is computed
    const lk_lora_slice& sl = slices[i];
    if (sl.N < 0 || sl.col < 0 || sl.col > ldy - sl.N) return LK_ERR_INVALID_ARG;
    width = std::max(width, sl.col + sl.N);
  }
  if (T == 0) return batch->num_entries == 0 ? LK_OK : LK_ERR_INVALID_ARG;
  if (!x || !y || ldy < width) return LK_ERR_INVALID_ARG;
  return run_multi(x, x_dtype, T, K, slices, num_slices, batch, nullptr, 0, x_dtype, base, y, num_threads, ldy);
}

}  // extern "C"
