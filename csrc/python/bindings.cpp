// Thin pybind11 bindings over the C ABI. No torch: tensors arrive as raw
// addresses plus sizes; lorakern/ops/cpu.py validates them before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "lorakern/lorakern.h"

namespace py = pybind11;

namespace {

void check(lk_status s, const char* what) {
  if (s != LK_OK) throw std::runtime_error(std::string(what) + ": " + lk_status_string(s));
}

lk_qweight make_qweight(uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t N, int64_t K,
                        int bits, int group_size) {
  return lk_qweight{reinterpret_cast<const uint8_t*>(qweight),
                    reinterpret_cast<const uint16_t*>(scales),
                    reinterpret_cast<const uint16_t*>(zeros), N, K, bits, group_size};
}

// An adapter as 4 parts x (qweight, scales, zeros, rows, cols, bits, group_size), flattened.
lk_lora make_lora(const std::vector<int64_t>& v, float scale) {
  if (v.size() != 28) throw std::invalid_argument("an adapter is 4 parts x 7 fields");
  lk_qweight q[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t* f = v.data() + 7 * i;
    q[i] = make_qweight((uintptr_t)f[0], (uintptr_t)f[1], (uintptr_t)f[2], f[3], f[4], (int)f[5], (int)f[6]);
  }
  return lk_lora{q[0], q[1], q[2], q[3], scale};
}

// A layer's adapter bank as the Python side holds it (lorakern/multilora/bank.py): a slot table
// int64 [num_slots, 7] (kind, rank, row, h, bits_hi, a_off, b_off), fp32 scales [num_slots] and
// the slabs. Fields, in order: table, scales, num_slots, dense dtype, group_a, group_b,
// dense A, dense rows, dense B^T, compressed A codes, their bytes, A scales, A zeros,
// scale rows, compressed B^T codes, their bytes, B scales, B zeros.
struct BankView {
  const int64_t* table;
  const float* scales;
  int64_t num_slots;
  lk_dtype dtype;
  int ga, gb;
  const char *da, *db;
  int64_t drows;
  const uint8_t* qa;
  int64_t qa_bytes;
  const uint16_t *qas, *qaz;
  int64_t qrows;
  const uint8_t* qb;
  int64_t qb_bytes;
  const uint16_t *qbs, *qbz;
};

BankView make_bank(const std::vector<int64_t>& f) {
  if (f.size() != 18) throw std::invalid_argument("a bank is 18 fields");
  auto p = [&](int i) { return reinterpret_cast<const char*>((uintptr_t)f[i]); };
  return BankView{reinterpret_cast<const int64_t*>(p(0)), reinterpret_cast<const float*>(p(1)), f[2],
                  (lk_dtype)f[3], (int)f[4], (int)f[5], p(6), p(8), f[7],
                  reinterpret_cast<const uint8_t*>(p(9)), f[10], reinterpret_cast<const uint16_t*>(p(11)),
                  reinterpret_cast<const uint16_t*>(p(12)), f[13], reinterpret_cast<const uint8_t*>(p(14)), f[15],
                  reinterpret_cast<const uint16_t*>(p(16)), reinterpret_cast<const uint16_t*>(p(17))};
}

// The slots the segments use, resolved to pointers after checking every offset against the
// slabs; the segments are renumbered to index the returned vector.
std::vector<lk_lora_slot> resolve_slots(const BankView& b, int64_t N, int64_t K, const int64_t* seg, int64_t nseg,
                                        std::vector<int64_t>& seg_out) {
  std::vector<lk_lora_slot> out((size_t)nseg);
  seg_out.assign(seg, seg + 3 * nseg);
  const size_t esz = b.dtype == LK_F32 ? 4 : 2;
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t id = seg[3 * s];
    if (id < 0 || id >= b.num_slots)
      throw std::out_of_range("lorakern: adapter slot " + std::to_string(id) + " is out of range [0, " +
                              std::to_string(b.num_slots) + ")");
    const int64_t* r = b.table + 7 * id;
    const int64_t kind = r[0], rank = r[1], row = r[2], h = r[3], bits = r[4], aoff = r[5], boff = r[6];
    lk_lora_slot& sl = out[(size_t)s];
    sl = lk_lora_slot{};
    sl.scale = b.scales[id];
    seg_out[3 * s] = s;
    if (kind == LK_SLOT_EMPTY)
      throw std::invalid_argument("lorakern: adapter slot " + std::to_string(id) + " is empty (the adapter was removed)");
    if (rank < 0 || row < 0) throw std::invalid_argument("lorakern: bank table: negative rank or row");
    if (kind == LK_SLOT_DENSE) {
      if (rank > b.drows - row) throw std::invalid_argument("lorakern: bank table: dense rows out of the slab");
      sl.kind = LK_SLOT_DENSE;
      sl.dtype = b.dtype;
      sl.rank = rank;
      sl.a = b.da + (size_t)(row * K) * esz;
      sl.bt = b.db + (size_t)(row * N) * esz;
      continue;
    }
    if (kind != LK_SLOT_COMPRESSED) throw std::invalid_argument("lorakern: bank table: unknown slot kind");
    if (h < 0 || h > rank || rank > b.qrows - row || aoff < 0 || boff < 0 || b.ga <= 0 || b.gb <= 0 ||
        !(bits == 2 || bits == 3 || bits == 4 || bits == 8) || K % b.ga || N % b.gb)
      throw std::invalid_argument("lorakern: bank table: bad compressed slot");
    const int64_t rl = rank - h;
    if (h * (K * bits / 8) + rl * (K / 8) > b.qa_bytes - aoff || h * (N * bits / 8) + rl * (N / 8) > b.qb_bytes - boff)
      throw std::invalid_argument("lorakern: bank table: compressed codes out of the slab");
    const int64_t nga = K / b.ga, ngb = N / b.gb;
    sl.kind = LK_SLOT_COMPRESSED;
    sl.q.a_hi = lk_qweight{b.qa + aoff, b.qas + row * nga, b.qaz + row * nga, h, K, (int32_t)bits, b.ga};
    sl.q.a_lo = lk_qweight{b.qa + aoff + h * (K * bits / 8), b.qas + (row + h) * nga, b.qaz + (row + h) * nga, rl,
                           K, 1, b.ga};
    sl.q.b_hi = lk_qweight{b.qb + boff, b.qbs + row * ngb, b.qbz + row * ngb, h, N, (int32_t)bits, b.gb};
    sl.q.b_lo = lk_qweight{b.qb + boff + h * (N * bits / 8), b.qbs + (row + h) * ngb, b.qbz + (row + h) * ngb, rl,
                           N, 1, b.gb};
  }
  return out;
}

lk_isa isa_from_name(const std::string& name) {
  if (name == "generic") return LK_ISA_GENERIC;
  if (name == "avx2") return LK_ISA_AVX2;
  if (name == "avx512") return LK_ISA_AVX512;
  throw std::invalid_argument("unknown ISA '" + name + "' (expected generic, avx2 or avx512)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorakern CPU kernels (C++; see csrc/include/lorakern/lorakern.h)";
  m.def("version", &lk_version);
  m.def("detected_isa", [] { return std::string(lk_isa_name(lk_detected_isa())); });
  m.def("active_isa", [] { return std::string(lk_isa_name(lk_active_isa())); });
  m.def("set_isa", [](const std::string& name) {
    const lk_status s = lk_set_isa(isa_from_name(name));
    if (s == LK_ERR_UNSUPPORTED)
      throw std::runtime_error("ISA '" + name + "' is not supported by this CPU (best: " +
                               lk_isa_name(lk_detected_isa()) + ")");
    check(s, "set_isa");
  });
  m.def(
      "quant_matmul",
      [](uintptr_t x, int x_dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         int64_t N, int64_t K, int bits, int group_size, uintptr_t bias, uintptr_t y,
         int num_threads) {
        const lk_qweight w = make_qweight(qweight, scales, zeros, N, K, bits, group_size);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_quant_matmul(reinterpret_cast<const void*>(x), (lk_dtype)x_dtype, M, &w,
                              reinterpret_cast<const float*>(bias), reinterpret_cast<void*>(y),
                              num_threads);
        }
        check(s, "lk_quant_matmul");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("qweight"), py::arg("scales"),
      py::arg("zeros"), py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("group_size"),
      py::arg("bias"), py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "gwq_matmul",
      [](uintptr_t x, int x_dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros,
         int64_t N, int64_t K, int bits, int group_size, uintptr_t row_ptr, uintptr_t col_idx,
         uintptr_t values, int64_t nnz, uintptr_t bias, uintptr_t y, int num_threads) {
        const lk_qweight w = make_qweight(qweight, scales, zeros, N, K, bits, group_size);
        const lk_outliers o{reinterpret_cast<const int32_t*>(row_ptr),
                            reinterpret_cast<const uint16_t*>(col_idx),
                            reinterpret_cast<const uint16_t*>(values), nnz};
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_gwq_matmul(reinterpret_cast<const void*>(x), (lk_dtype)x_dtype, M, &w, &o,
                            reinterpret_cast<const float*>(bias), reinterpret_cast<void*>(y),
                            num_threads);
        }
        check(s, "lk_gwq_matmul");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("qweight"), py::arg("scales"),
      py::arg("zeros"), py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("group_size"),
      py::arg("row_ptr"), py::arg("col_idx"), py::arg("values"), py::arg("nnz"), py::arg("bias"),
      py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "dequantize",
      [](uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t N, int64_t K, int bits,
         int group_size, uintptr_t out, int num_threads) {
        const lk_qweight w = make_qweight(qweight, scales, zeros, N, K, bits, group_size);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_dequantize(&w, reinterpret_cast<float*>(out), num_threads);
        }
        check(s, "lk_dequantize");
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("N"), py::arg("K"),
      py::arg("bits"), py::arg("group_size"), py::arg("out"), py::arg("num_threads") = 0);
  m.def(
      "lora_mixed",
      [](uintptr_t x, int x_dtype, int64_t M, const std::vector<int64_t>& parts, float scale, uintptr_t base,
         uintptr_t y, int num_threads) {
        const lk_lora l = make_lora(parts, scale);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_lora_mixed(reinterpret_cast<const void*>(x), (lk_dtype)x_dtype, M, &l,
                            reinterpret_cast<const void*>(base), reinterpret_cast<void*>(y), num_threads);
        }
        check(s, "lk_lora_mixed");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("parts"), py::arg("scale"), py::arg("base"),
      py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "quant_matmul_lora",
      [](uintptr_t x, int x_dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t N,
         int64_t K, int bits, int group_size, uintptr_t bias, const std::vector<int64_t>& parts, float scale,
         uintptr_t y, int num_threads) {
        const lk_qweight w = make_qweight(qweight, scales, zeros, N, K, bits, group_size);
        const lk_lora l = make_lora(parts, scale);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_quant_matmul_lora(reinterpret_cast<const void*>(x), (lk_dtype)x_dtype, M, &w,
                                   reinterpret_cast<const float*>(bias), &l, reinterpret_cast<void*>(y),
                                   num_threads);
        }
        check(s, "lk_quant_matmul_lora");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("group_size"), py::arg("bias"), py::arg("parts"),
      py::arg("scale"), py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "multi_lora",
      [](int mode, uintptr_t x, int x_dtype, int64_t T, int64_t K, int64_t N, const std::vector<int64_t>& bank,
         uintptr_t segments, int64_t num_segments, uintptr_t tokens, uintptr_t weights, int64_t num_entries,
         uintptr_t t, int64_t ldt, uintptr_t base, uintptr_t y, int num_threads) {
        // mode 0: shrink (x -> t), 1: expand (t, base -> y), 2: both (x, base -> y)
        const BankView b = make_bank(bank);
        std::vector<int64_t> seg;
        const std::vector<lk_lora_slot> slots =
            resolve_slots(b, N, K, reinterpret_cast<const int64_t*>(segments), num_segments, seg);
        if (mode == 2)  // the fused call keeps its intermediate; ldt is the caller's max_rank, checked all the same
          for (const lk_lora_slot& sl : slots)
            if ((sl.kind == LK_SLOT_DENSE ? sl.rank : sl.q.a_hi.N + sl.q.a_lo.N) > ldt)
              throw std::invalid_argument("lorakern: max_rank=" + std::to_string(ldt) +
                                          " is below the rank of an adapter in the batch");
        const lk_lora_batch batch{seg.data(), num_segments, reinterpret_cast<const int64_t*>(tokens),
                                  reinterpret_cast<const float*>(weights), num_entries};
        lk_status s;
        {
          py::gil_scoped_release nogil;
          const auto* xp = reinterpret_cast<const void*>(x);
          if (mode == 0)
            s = lk_lora_shrink(xp, (lk_dtype)x_dtype, T, K, slots.data(), num_segments, &batch,
                               reinterpret_cast<float*>(t), ldt, num_threads);
          else if (mode == 1)
            s = lk_lora_expand(reinterpret_cast<const float*>(t), ldt, slots.data(), num_segments, &batch,
                               (lk_dtype)x_dtype, T, N, reinterpret_cast<const void*>(base),
                               reinterpret_cast<void*>(y), num_threads);
          else
            s = lk_multi_lora(xp, (lk_dtype)x_dtype, T, K, N, slots.data(), num_segments, &batch,
                              reinterpret_cast<const void*>(base), reinterpret_cast<void*>(y), num_threads);
        }
        check(s, "lk_multi_lora");
      },
      py::arg("mode"), py::arg("x"), py::arg("x_dtype"), py::arg("T"), py::arg("K"), py::arg("N"), py::arg("bank"),
      py::arg("segments"), py::arg("num_segments"), py::arg("tokens"), py::arg("weights"), py::arg("num_entries"),
      py::arg("t"), py::arg("ldt"), py::arg("base"), py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "multi_lora_slices",
      [](uintptr_t x, int x_dtype, int64_t T, int64_t K, const std::vector<std::vector<int64_t>>& banks,
         const std::vector<int64_t>& widths, uintptr_t segments, int64_t num_segments, uintptr_t tokens,
         uintptr_t weights, int64_t num_entries, int64_t max_rank, uintptr_t base, uintptr_t y, int64_t ldy,
         int num_threads) {
        if (banks.size() != widths.size()) throw std::invalid_argument("one width per bank");
        std::vector<std::vector<lk_lora_slot>> slots(banks.size());
        std::vector<lk_lora_slice> slices(banks.size());
        std::vector<int64_t> seg;
        int64_t col = 0;
        for (size_t i = 0; i < banks.size(); ++i) {
          const BankView b = make_bank(banks[i]);
          slots[i] = resolve_slots(b, widths[i], K, reinterpret_cast<const int64_t*>(segments), num_segments, seg);
          for (const lk_lora_slot& sl : slots[i])
            if ((sl.kind == LK_SLOT_DENSE ? sl.rank : sl.q.a_hi.N + sl.q.a_lo.N) > max_rank)
              throw std::invalid_argument("lorakern: max_rank=" + std::to_string(max_rank) +
                                          " is below the rank of an adapter in the batch");
          slices[i] = lk_lora_slice{slots[i].data(), num_segments, widths[i], col};
          col += widths[i];
        }
        // resolve_slots renumbers the segments to index each slice's own slot vector (the same numbering)
        const lk_lora_batch batch{seg.data(), num_segments, reinterpret_cast<const int64_t*>(tokens),
                                  reinterpret_cast<const float*>(weights), num_entries};
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_multi_lora_slices(reinterpret_cast<const void*>(x), (lk_dtype)x_dtype, T, K, slices.data(),
                                   (int64_t)slices.size(), &batch, ldy, reinterpret_cast<const void*>(base),
                                   reinterpret_cast<void*>(y), num_threads);
        }
        check(s, "lk_multi_lora_slices");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("T"), py::arg("K"), py::arg("banks"), py::arg("widths"),
      py::arg("segments"), py::arg("num_segments"), py::arg("tokens"), py::arg("weights"), py::arg("num_entries"),
      py::arg("max_rank"), py::arg("base"), py::arg("y"), py::arg("ldy"), py::arg("num_threads") = 0);
}
