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
}
