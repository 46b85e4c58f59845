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

// Records that cross from Python, field for field (names exported below as _C.RECORDS and checked
// against lorakern.formats at import): a compressed adapter's part (LoraPartView: lk_qweight) and a
// layer bank (BankView: lk_bank).
const char* const kQWeightFields[] = {"qweight", "scales", "zeros", "N", "K", "bits", "group_size"};
const char* const kLoraParts[] = {"a_hi", "b_hi", "a_lo", "b_lo"};
const char* const kBankFields[] = {"table",   "scales", "num_slots", "dtype",    "group_a",   "group_b",
                                   "a",       "dense_rows", "bt",    "qa",       "qa_bytes",  "qa_scales",
                                   "qa_zeros", "qrows", "qb",        "qb_bytes", "qb_scales", "qb_zeros"};
const char* const kSlotColumns[] = {"kind", "rank", "row", "h", "bits_hi", "a_off", "b_off"};
static_assert(sizeof(kSlotColumns) / sizeof(*kSlotColumns) == LK_SLOT_NUM_COLUMNS, "slot columns");
constexpr size_t kNumQWeightFields = sizeof(kQWeightFields) / sizeof(*kQWeightFields);
constexpr size_t kNumBankFields = sizeof(kBankFields) / sizeof(*kBankFields);

template <class T>
const T* ptr(int64_t address) {
  return reinterpret_cast<const T*>((uintptr_t)address);
}

lk_qweight qweight_of(const std::vector<int64_t>& f) {
  if (f.size() != kNumQWeightFields) throw std::invalid_argument("a LoraPartView has 7 fields");
  return lk_qweight{ptr<uint8_t>(f[0]), ptr<uint16_t>(f[1]), ptr<uint16_t>(f[2]), f[3], f[4], (int32_t)f[5],
                    (int32_t)f[6]};
}

lk_lora lora_of(const std::vector<std::vector<int64_t>>& parts, float scale) {
  if (parts.size() != 4) throw std::invalid_argument("an adapter has 4 parts (a_hi, b_hi, a_lo, b_lo)");
  return lk_lora{qweight_of(parts[0]), qweight_of(parts[1]), qweight_of(parts[2]), qweight_of(parts[3]), scale};
}

lk_bank bank_of(const std::vector<int64_t>& f) {
  if (f.size() != kNumBankFields) throw std::invalid_argument("a BankView has 18 fields");
  return lk_bank{ptr<int64_t>(f[0]), ptr<float>(f[1]), f[2], (lk_dtype)f[3], (int32_t)f[4], (int32_t)f[5],
                 ptr<void>(f[6]), f[7], ptr<void>(f[8]), ptr<uint8_t>(f[9]), f[10], ptr<uint16_t>(f[11]),
                 ptr<uint16_t>(f[12]), f[13], ptr<uint8_t>(f[14]), f[15], ptr<uint16_t>(f[16]),
                 ptr<uint16_t>(f[17])};
}

// lk_decoder_stack (lk_decoder_stack_step): copies of the layers' records, the embedding and head weights, and
// the struct pointing into them (relinked on every copy).
struct DecoderStack {
  std::vector<lk_decoder_layer> layers;
  std::vector<const lk_decoder_layer*> ptrs;
  lk_qweight embed{}, head{};
  bool has_embed = false, has_head = false;
  lk_decoder_stack s{};
  DecoderStack() = default;
  DecoderStack(const DecoderStack& o)
      : layers(o.layers), embed(o.embed), head(o.head), has_embed(o.has_embed), has_head(o.has_head), s(o.s) {
    relink();
  }
  DecoderStack& operator=(const DecoderStack& o) {
    layers = o.layers;
    embed = o.embed;
    head = o.head;
    has_embed = o.has_embed;
    has_head = o.has_head;
    s = o.s;
    relink();
    return *this;
  }
  void relink() {
    ptrs.clear();
    for (const auto& l : layers) ptrs.push_back(&l);
    s.layers = ptrs.data();
    s.n_layers = (int64_t)ptrs.size();
    s.embed = has_embed ? &embed : nullptr;
    s.head = has_head ? &head : nullptr;
  }
};

// The slots the batch's segments use (lk_bank_resolve) and the segments renumbered to index them.
struct Resolved {
  std::vector<lk_lora_slot> slots;
  std::vector<int64_t> segments;
};

Resolved resolve(const lk_bank& b, int64_t N, int64_t K, int64_t segments, int64_t num_segments, int64_t max_rank) {
  Resolved r{std::vector<lk_lora_slot>((size_t)num_segments), std::vector<int64_t>((size_t)(3 * num_segments))};
  int64_t failed = -1;
  const lk_status s = lk_bank_resolve(&b, N, K, ptr<int64_t>(segments), num_segments, max_rank, r.slots.data(),
                                      r.segments.data(), &failed);
  const std::string slot = "lorakern: adapter slot " + std::to_string(failed);
  switch (s) {
    case LK_OK: return r;
    case LK_ERR_SLOT_RANGE:
      throw std::out_of_range(slot + " is out of range [0, " + std::to_string(b.num_slots) + ")");
    case LK_ERR_SLOT_EMPTY: throw std::invalid_argument(slot + " is empty (the adapter was removed)");
    case LK_ERR_BAD_SLOT: throw std::invalid_argument(slot + ": bank table entry invalid or out of the slab");
    case LK_ERR_RANK:
      throw std::invalid_argument("lorakern: max_rank=" + std::to_string(max_rank) + " is below the rank of " +
                                  slot.substr(10));
    default: check(s, "lk_bank_resolve");
  }
  return r;
}

// A decode step's adapter batch from Python (segments address 0: none).
struct StepBatch {
  lk_lora_batch b{};
  const lk_lora_batch* get() const { return b.segments || b.num_entries ? &b : nullptr; }
};
StepBatch step_batch(int64_t segments, int64_t num_segments, int64_t tokens, int64_t weights, int64_t entries) {
  return StepBatch{lk_lora_batch{ptr<int64_t>(segments), num_segments, ptr<int64_t>(tokens), ptr<float>(weights),
                                 entries}};
}

// A decoder step's status as the Python exception a caller expects (the adapter errors as lk_bank_resolve's).
void check_step(lk_status s, const char* what) {
  switch (s) {
    case LK_ERR_INDEX: throw std::out_of_range("lorakern: a token id is outside the embedding table");
    case LK_ERR_SLOT_RANGE: throw std::out_of_range("lorakern: the adapter batch names a slot outside a layer's bank");
    case LK_ERR_SLOT_EMPTY:
      throw std::invalid_argument("lorakern: the adapter batch names an empty slot (the adapter was removed)");
    case LK_ERR_BAD_SLOT: throw std::invalid_argument("lorakern: a bank table entry is invalid or out of the slab");
    default: check(s, what);
  }
}

lk_lora_batch batch_of(const Resolved& r, int64_t num_segments, int64_t tokens, int64_t weights, int64_t entries) {
  return lk_lora_batch{r.segments.data(), num_segments, ptr<int64_t>(tokens), ptr<float>(weights), entries};
}

py::tuple names(const char* const* v, size_t n) {
  py::tuple t(n);
  for (size_t i = 0; i < n; ++i) t[i] = py::str(v[i]);
  return t;
}

lk_isa isa_from_name(const std::string& name) {
  if (name == "generic") return LK_ISA_GENERIC;
  if (name == "avx2") return LK_ISA_AVX2;
  if (name == "avx512") return LK_ISA_AVX512;
  if (name == "amx") return LK_ISA_AMX;
  throw std::invalid_argument("unknown ISA '" + name + "' (expected generic, avx2, avx512 or amx)");
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
      throw std::runtime_error("ISA '" + name + "' is not available here: CPU, OS permission or build (best: " +
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
         int64_t N, int64_t K, int bits, int group_size, uintptr_t bias, uintptr_t row_ptr, uintptr_t col_idx,
         uintptr_t values, int64_t nnz, uintptr_t y, int num_threads) {
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
      py::arg("zeros"), py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("group_size"), py::arg("bias"),
      py::arg("row_ptr"), py::arg("col_idx"), py::arg("values"), py::arg("nnz"),
      py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "quant_matmul_grad_input",
      [](uintptr_t dy, int dy_dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t N,
         int64_t K, int bits, int group_size, uintptr_t row_ptr, uintptr_t col_idx, uintptr_t values, int64_t nnz,
         uintptr_t dx, int num_threads) {
        const lk_qweight w = make_qweight(qweight, scales, zeros, N, K, bits, group_size);
        const lk_outliers o{reinterpret_cast<const int32_t*>(row_ptr), reinterpret_cast<const uint16_t*>(col_idx),
                            reinterpret_cast<const uint16_t*>(values), nnz};
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_quant_matmul_grad_input(reinterpret_cast<const void*>(dy), (lk_dtype)dy_dtype, M, &w,
                                         row_ptr ? &o : nullptr, reinterpret_cast<void*>(dx), num_threads);
        }
        check(s, "lk_quant_matmul_grad_input");
      },
      py::arg("dy"), py::arg("dy_dtype"), py::arg("M"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("group_size"), py::arg("row_ptr"), py::arg("col_idx"),
      py::arg("values"), py::arg("nnz"), py::arg("dx"), py::arg("num_threads") = 0);
  m.def(
      "quant_matmul_qalora",
      [](uintptr_t x, int x_dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t N,
         int64_t K, int bits, int group_size, uintptr_t bias, uintptr_t a, uintptr_t bt, int64_t rank, float scale,
         uintptr_t y, int num_threads) {
        const lk_qweight w = make_qweight(qweight, scales, zeros, N, K, bits, group_size);
        const lk_qalora q{reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(bt), rank, scale};
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_quant_matmul_qalora(reinterpret_cast<const void*>(x), (lk_dtype)x_dtype, M, &w,
                                     reinterpret_cast<const float*>(bias), &q, reinterpret_cast<void*>(y),
                                     num_threads);
        }
        check(s, "lk_quant_matmul_qalora");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
      py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("group_size"), py::arg("bias"), py::arg("a"),
      py::arg("bt"), py::arg("rank"), py::arg("scale"), py::arg("y"), py::arg("num_threads") = 0);
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
      "route_top_k",
      [](uintptr_t logits, int64_t T, int64_t E, int64_t k, uintptr_t segments, uintptr_t tokens,
         uintptr_t weights) {
        check(lk_route_top_k(reinterpret_cast<const float*>(logits), T, E, k, reinterpret_cast<int64_t*>(segments),
                             reinterpret_cast<int64_t*>(tokens), reinterpret_cast<float*>(weights)),
              "lk_route_top_k");
      },
      py::arg("logits"), py::arg("T"), py::arg("E"), py::arg("k"), py::arg("segments"), py::arg("tokens"),
      py::arg("weights"));
  // Named records: Python checks its NamedTuples against these at import (lorakern/_native.py).
  py::dict records;
  records["LoraPartView"] = names(kQWeightFields, kNumQWeightFields);
  records["LoraParts"] = names(kLoraParts, 4);
  records["BankView"] = names(kBankFields, kNumBankFields);
  records["SlotRow"] = names(kSlotColumns, LK_SLOT_NUM_COLUMNS);
  records["SlotKind"] = py::make_tuple(py::make_tuple("EMPTY", (int)LK_SLOT_EMPTY),
                                       py::make_tuple("DENSE", (int)LK_SLOT_DENSE),
                                       py::make_tuple("COMPRESSED", (int)LK_SLOT_COMPRESSED));
  m.attr("RECORDS") = records;
  // A compressed adapter as the core reads it (lk_lora: its four LoraPartView parts and the scale), built once
  // from Python and passed by reference: no per-call conversion of the parts.
  py::class_<lk_lora>(m, "LoraRecord")
      .def(py::init([](const std::vector<std::vector<int64_t>>& parts, float scale) { return lora_of(parts, scale); }),
           py::arg("parts"), py::arg("scale"))
      .def_readonly("scale", &lk_lora::scale);
  // One decoder layer (lk_decoder_layer) built once from Python: dims (hidden, n_heads, n_kv_heads, head_dim,
  // intermediate), the two norm weights' addresses, and per projection (qkv, o, gate_up, down) its LoraPartView
  // fields, its outliers (row_ptr, col_idx, values, nnz; or empty) and its bias address (0: none); adapters: empty,
  // or a BankView per lk_projection (q, k, v, o, gate, up, down; empty: none).
  py::class_<lk_decoder_layer>(m, "DecoderLayerRecord")
      .def(py::init([](const std::vector<int64_t>& dims, float rms_eps, float attn_scale, int64_t input_norm,
                       int64_t post_norm, const std::vector<std::vector<int64_t>>& weights,
                       const std::vector<std::vector<int64_t>>& outliers, const std::vector<int64_t>& biases,
                       const std::vector<std::vector<int64_t>>& adapters) {
             if (dims.size() != 5 || weights.size() != 4 || outliers.size() != 4 || biases.size() != 4)
               throw std::invalid_argument("DecoderLayerRecord: 5 dims and 4 weights, outliers and biases");
             if (!adapters.empty() && adapters.size() != LK_NUM_PROJ)
               throw std::invalid_argument("DecoderLayerRecord: adapters: none, or one BankView (or []) per projection");
             lk_decoder_layer L{};
             for (size_t p = 0; p < adapters.size(); ++p)
               if (!adapters[p].empty()) L.adapters[p] = bank_of(adapters[p]);
             L.hidden = dims[0];
             L.n_heads = dims[1];
             L.n_kv_heads = dims[2];
             L.head_dim = dims[3];
             L.intermediate = dims[4];
             L.rms_eps = rms_eps;
             L.attn_scale = attn_scale;
             L.input_norm = ptr<float>(input_norm);
             L.post_norm = ptr<float>(post_norm);
             lk_qweight* w[] = {&L.qkv, &L.o, &L.gate_up, &L.down};
             lk_outliers* o[] = {&L.qkv_outliers, &L.o_outliers, &L.gate_up_outliers, &L.down_outliers};
             const float** b[] = {&L.qkv_bias, &L.o_bias, &L.gate_up_bias, &L.down_bias};
             for (int i = 0; i < 4; ++i) {
               *w[i] = qweight_of(weights[i]);
               *o[i] = lk_outliers{nullptr, nullptr, nullptr, 0};
               if (!outliers[i].empty()) {
                 if (outliers[i].size() != 4) throw std::invalid_argument("outliers: row_ptr, col_idx, values, nnz");
                 *o[i] = lk_outliers{ptr<int32_t>(outliers[i][0]), ptr<uint16_t>(outliers[i][1]),
                                     ptr<uint16_t>(outliers[i][2]), outliers[i][3]};
               }
               *b[i] = ptr<float>(biases[i]);
             }
             return L;
           }),
           py::arg("dims"), py::arg("rms_eps"), py::arg("attn_scale"), py::arg("input_norm"), py::arg("post_norm"),
           py::arg("weights"), py::arg("outliers"), py::arg("biases"),
           py::arg("adapters") = std::vector<std::vector<int64_t>>{});
  m.def(
      "decoder_layer_step",
      [](const lk_decoder_layer& L, int64_t x, int64_t B, int64_t cos, int64_t sin, int64_t pos, int64_t k_cache,
         int64_t v_cache, int64_t max_len, int64_t key_mask, int64_t y, int num_threads, int64_t segments,
         int64_t num_segments, int64_t tokens, int64_t weights, int64_t num_entries) {
        const StepBatch b = step_batch(segments, num_segments, tokens, weights, num_entries);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_decoder_layer_step(&L, ptr<float>(x), B, ptr<float>(cos), ptr<float>(sin), pos,
                                    (float*)(uintptr_t)k_cache, (float*)(uintptr_t)v_cache, max_len,
                                    ptr<uint8_t>(key_mask), b.get(), (float*)(uintptr_t)y, num_threads);
        }
        check_step(s, "lk_decoder_layer_step");
      },
      py::arg("layer"), py::arg("x"), py::arg("B"), py::arg("cos"), py::arg("sin"), py::arg("pos"),
      py::arg("k_cache"), py::arg("v_cache"), py::arg("max_len"), py::arg("key_mask"), py::arg("y"),
      py::arg("num_threads") = 0, py::arg("segments") = 0, py::arg("num_segments") = 0, py::arg("tokens") = 0,
      py::arg("weights") = 0, py::arg("num_entries") = 0);
  // The decoder stack (lk_decoder_stack): its layers' records in order; the embedding table and the head as
  // LoraPartView fields (empty: none); the rotary inverse frequencies, final norm weight and head bias addresses
  // (0: none).
  py::class_<DecoderStack>(m, "DecoderStackRecord")
      .def(py::init([](const std::vector<lk_decoder_layer>& layers, const std::vector<int64_t>& embed,
                       int64_t rope_inv_freq, float rope_scaling, int64_t final_norm, float final_eps,
                       const std::vector<int64_t>& head, int64_t head_bias) {
             if (layers.empty()) throw std::invalid_argument("DecoderStackRecord: no layers");
             DecoderStack st;
             st.layers = layers;
             st.has_embed = !embed.empty();
             st.has_head = !head.empty();
             if (st.has_embed) st.embed = qweight_of(embed);
             if (st.has_head) st.head = qweight_of(head);
             st.s.rope_inv_freq = ptr<float>(rope_inv_freq);
             st.s.rope_scaling = rope_scaling;
             st.s.final_norm = ptr<float>(final_norm);
             st.s.final_eps = final_eps;
             st.s.head_bias = ptr<float>(head_bias);
             st.relink();
             return st;
           }),
           py::arg("layers"), py::arg("embed"), py::arg("rope_inv_freq"), py::arg("rope_scaling"),
           py::arg("final_norm"), py::arg("final_eps"), py::arg("head"), py::arg("head_bias"))
      .def("__len__", [](const DecoderStack& st) { return st.layers.size(); });
  m.def(
      "decoder_stack_step",
      [](const DecoderStack& st, int64_t B, int64_t ids, int64_t x, int64_t positions, int64_t cos, int64_t sin,
         const std::vector<int64_t>& lengths, const std::vector<int64_t>& k_caches,
         const std::vector<int64_t>& v_caches, int64_t max_len, int64_t key_mask, int64_t y, int num_threads,
         int64_t segments, int64_t num_segments, int64_t tokens, int64_t weights, int64_t num_entries) {
        const StepBatch b = step_batch(segments, num_segments, tokens, weights, num_entries);
        const size_t n = st.ptrs.size();
        if (lengths.size() != n || k_caches.size() != n || v_caches.size() != n)
          throw std::invalid_argument("decoder_stack_step: one length, key cache and value cache per layer");
        std::vector<int64_t*> len(n);
        std::vector<float*> kc(n), vc(n);
        for (size_t i = 0; i < n; ++i) {
          len[i] = (int64_t*)(uintptr_t)lengths[i];
          kc[i] = (float*)(uintptr_t)k_caches[i];
          vc[i] = (float*)(uintptr_t)v_caches[i];
        }
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_decoder_stack_step(&st.s, B, ptr<int64_t>(ids), ptr<float>(x), ptr<int64_t>(positions),
                                    ptr<float>(cos), ptr<float>(sin), len.data(), kc.data(), vc.data(), max_len,
                                    ptr<uint8_t>(key_mask), b.get(), (float*)(uintptr_t)y, num_threads);
        }
        check_step(s, "lk_decoder_stack_step");
      },
      py::arg("stack"), py::arg("B"), py::arg("ids"), py::arg("x"), py::arg("positions"), py::arg("cos"),
      py::arg("sin"), py::arg("lengths"), py::arg("k_caches"), py::arg("v_caches"), py::arg("max_len"),
      py::arg("key_mask"), py::arg("y"), py::arg("num_threads") = 0, py::arg("segments") = 0,
      py::arg("num_segments") = 0, py::arg("tokens") = 0, py::arg("weights") = 0, py::arg("num_entries") = 0);
  m.def(
      "lora_mixed",
      [](int64_t x, int x_dtype, int64_t M, const lk_lora& l, int64_t base, int64_t y, int num_threads) {
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_lora_mixed(ptr<void>(x), (lk_dtype)x_dtype, M, &l, ptr<void>(base), (void*)(uintptr_t)y,
                            num_threads);
        }
        check(s, "lk_lora_mixed");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("M"), py::arg("lora"), py::arg("base"), py::arg("y"),
      py::arg("num_threads") = 0);
  m.def(
      "quant_matmul_lora",
      [](uintptr_t x, int x_dtype, int64_t M, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, int64_t N,
         int64_t K, int bits, int group_size, uintptr_t bias, const lk_lora& l, uintptr_t y, int num_threads) {
        const lk_qweight w = make_qweight(qweight, scales, zeros, N, K, bits, group_size);
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
      py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("group_size"), py::arg("bias"), py::arg("lora"),
      py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "lora_shrink",
      [](int64_t x, int x_dtype, int64_t T, int64_t K, int64_t N, const std::vector<int64_t>& bank, int64_t segments,
         int64_t num_segments, int64_t tokens, int64_t weights, int64_t num_entries, int64_t t, int64_t ldt,
         int num_threads) {
        const Resolved r = resolve(bank_of(bank), N, K, segments, num_segments, ldt);
        const lk_lora_batch batch = batch_of(r, num_segments, tokens, weights, num_entries);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_lora_shrink(ptr<void>(x), (lk_dtype)x_dtype, T, K, r.slots.data(), num_segments, &batch,
                             (float*)(uintptr_t)t, ldt, num_threads);
        }
        check(s, "lk_lora_shrink");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("T"), py::arg("K"), py::arg("N"), py::arg("bank"),
      py::arg("segments"), py::arg("num_segments"), py::arg("tokens"), py::arg("weights"), py::arg("num_entries"),
      py::arg("t"), py::arg("ldt"), py::arg("num_threads") = 0);
  m.def(
      "lora_expand",
      [](int64_t t, int64_t ldt, int64_t T, int64_t K, int64_t N, const std::vector<int64_t>& bank,
         int64_t segments, int64_t num_segments, int64_t tokens, int64_t weights, int64_t num_entries,
         int y_dtype, int64_t base, int64_t y, int num_threads) {
        const Resolved r = resolve(bank_of(bank), N, K, segments, num_segments, ldt);
        const lk_lora_batch batch = batch_of(r, num_segments, tokens, weights, num_entries);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_lora_expand(ptr<float>(t), ldt, r.slots.data(), num_segments, &batch, (lk_dtype)y_dtype, T, N,
                             ptr<void>(base), (void*)(uintptr_t)y, num_threads);
        }
        check(s, "lk_lora_expand");
      },
      py::arg("t"), py::arg("ldt"), py::arg("T"), py::arg("K"), py::arg("N"), py::arg("bank"), py::arg("segments"),
      py::arg("num_segments"), py::arg("tokens"), py::arg("weights"), py::arg("num_entries"), py::arg("y_dtype"),
      py::arg("base"), py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "multi_lora",
      [](int64_t x, int x_dtype, int64_t T, int64_t K, int64_t N, const std::vector<int64_t>& bank, int64_t segments,
         int64_t num_segments, int64_t tokens, int64_t weights, int64_t num_entries, int64_t max_rank, int64_t base,
         int64_t y, int num_threads) {
        const Resolved r = resolve(bank_of(bank), N, K, segments, num_segments, max_rank);
        const lk_lora_batch batch = batch_of(r, num_segments, tokens, weights, num_entries);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_multi_lora(ptr<void>(x), (lk_dtype)x_dtype, T, K, N, r.slots.data(), num_segments, &batch,
                            ptr<void>(base), (void*)(uintptr_t)y, num_threads);
        }
        check(s, "lk_multi_lora");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("T"), py::arg("K"), py::arg("N"), py::arg("bank"),
      py::arg("segments"), py::arg("num_segments"), py::arg("tokens"), py::arg("weights"), py::arg("num_entries"),
      py::arg("max_rank"), py::arg("base"), py::arg("y"), py::arg("num_threads") = 0);
  m.def(
      "multi_lora_slices",
      [](int64_t x, int x_dtype, int64_t T, int64_t K, const std::vector<std::vector<int64_t>>& banks,
         const std::vector<int64_t>& widths, int64_t segments, int64_t num_segments, int64_t tokens,
         int64_t weights, int64_t num_entries, int64_t max_rank, int64_t base, int64_t y, int64_t ldy,
         int num_threads) {
        if (banks.size() != widths.size()) throw std::invalid_argument("one width per bank");
        std::vector<Resolved> res;
        std::vector<lk_lora_slice> slices;
        int64_t col = 0;
        for (size_t i = 0; i < banks.size(); ++i) {
          res.push_back(resolve(bank_of(banks[i]), widths[i], K, segments, num_segments, max_rank));
          slices.push_back(lk_lora_slice{res.back().slots.data(), num_segments, widths[i], col});
          col += widths[i];
        }
        if (res.empty()) throw std::invalid_argument("at least one slice");
        // every slice's segments are renumbered the same way (segment s -> its slot s)
        const lk_lora_batch batch = batch_of(res[0], num_segments, tokens, weights, num_entries);
        lk_status s;
        {
          py::gil_scoped_release nogil;
          s = lk_multi_lora_slices(ptr<void>(x), (lk_dtype)x_dtype, T, K, slices.data(), (int64_t)slices.size(),
                                   &batch, ldy, ptr<void>(base), (void*)(uintptr_t)y, num_threads);
        }
        check(s, "lk_multi_lora_slices");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("T"), py::arg("K"), py::arg("banks"), py::arg("widths"),
      py::arg("segments"), py::arg("num_segments"), py::arg("tokens"), py::arg("weights"), py::arg("num_entries"),
      py::arg("max_rank"), py::arg("base"), py::arg("y"), py::arg("ldy"), py::arg("num_threads") = 0);
}
