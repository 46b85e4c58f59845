// C++ unit tests (ctest): every ISA path against an exact double-precision
// model of the kernel's math, on random problems at odd sizes, through the C ABI
// and the internal row kernels. Output buffers are poisoned with NaN first.
// Also checks argument validation of the C ABI. Run under ASan/UBSan in CI.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "lora.h"
#include "lorakern/lorakern.h"
#include "multi_lora.h"

namespace lk {
#ifdef LORAKERN_HAVE_SIMDE
void qmm_rows_avx512_simde(const QmmProblem& p, int64_t n0, int64_t n1);
void lora_expand_avx512_simde(const LoraExpand& e, int64_t g0, int64_t g1);
void dense_shrink_avx512_simde(const DenseShrink& p, int64_t i0, int64_t i1);
void multi_expand_avx512_simde(const MultiExpand& e, int64_t c0, int64_t c1);
#endif
}

static int g_failures = 0;
#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
      ++g_failures;                                             \
    }                                                           \
  } while (0)

struct Problem {
  int64_t M, N, K;
  int bits, G;
  std::vector<uint8_t> qw;
  std::vector<uint16_t> scales, zeros;
  std::vector<float> x, bias;
  // CSR outliers (empty row_ptr: none)
  std::vector<int32_t> row_ptr;
  std::vector<uint16_t> col, val;
};

// Outlier patterns: 0 none, 1 one per row, 2 ~1%, 3 ~5%, 4 a row of only
// outliers with empty rows around it.
static void add_outliers(Problem& p, std::mt19937& rng, int pattern) {
  if (pattern == 0) return;
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  p.row_ptr.assign(1, 0);
  for (int64_t n = 0; n < p.N; ++n) {
    std::vector<uint16_t> cols;
    for (int64_t k = 0; k < p.K; ++k) {
      bool take;
      switch (pattern) {
        case 1: take = false; break;
        case 2: take = rng() % 100 == 0; break;
        case 3: take = rng() % 20 == 0; break;
        default: take = n == p.N / 2; break;
      }
      if (take) cols.push_back((uint16_t)k);
    }
    if (pattern == 1) cols.push_back((uint16_t)(rng() % p.K));
    for (uint16_t c : cols) {
      p.col.push_back(c);
      p.val.push_back(lk::float_to_half(4.f * u(rng)));
    }
    p.row_ptr.push_back((int32_t)p.col.size());
  }
}

static Problem make_problem(std::mt19937& rng, int64_t M, int64_t N, int64_t K, int bits, int G) {
  Problem p{M, N, K, bits, G, {}, {}, {}, {}, {}, {}, {}, {}};
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  p.qw.resize((size_t)(N * lk::row_bytes(K, bits)));
  for (auto& b : p.qw) b = (uint8_t)byte(rng);
  const int64_t ng = K / G;
  p.scales.resize((size_t)(N * ng));
  p.zeros.resize((size_t)(N * ng));
  for (auto& s : p.scales) s = lk::float_to_half(0.01f + 0.05f * std::fabs(u(rng)));
  for (auto& z : p.zeros) z = lk::float_to_half((float)((1 << bits) - 1) * 0.5f * (1.f + u(rng)));
  p.x.resize((size_t)(M * K));
  for (auto& v : p.x) v = u(rng) * 3.f;
  p.bias.resize((size_t)N);
  for (auto& v : p.bias) v = u(rng);
  return p;
}

// Exact model: the same int8 activations, dot products in double. abs_terms
// receives the sum of |terms| per output, which bounds the fp32 rounding.
static std::vector<double> model(const Problem& p, const std::vector<int8_t>& xq,
                                 const std::vector<float>& xs, const std::vector<float>& xsum,
                                 std::vector<double>& abs_terms) {
  const int64_t ng = p.K / p.G, rb = lk::row_bytes(p.K, p.bits);
  const int gb = lk::group_bytes(p.G, p.bits), B = lk::act_block(p.G);
  const int64_t nb = p.K / B;
  std::vector<double> y((size_t)(p.M * p.N));
  abs_terms.assign((size_t)(p.M * p.N), 0.0);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = 0; n < p.N; ++n) {
      double acc = p.bias[n], at = std::fabs(p.bias[n]);
      for (int64_t g = 0; g < ng; ++g) {
        const double s = lk::half_to_float(p.scales[n * ng + g]);
        const double z = lk::half_to_float(p.zeros[n * ng + g]);
        for (int t = 0; t < p.G / B; ++t) {
          long dot = 0, adot = 0;  // adot bounds the SIMD lanes' partial sums
          for (int i = t * B; i < (t + 1) * B; ++i) {
            const long prod = (long)lk::decode_code(&p.qw[n * rb + g * gb], p.G, p.bits, i) * xq[m * p.K + g * p.G + i];
            dot += prod;
            adot += std::labs(prod);
          }
          const double sx = s * (double)xs[m * nb + g * (p.G / B) + t];
          acc += sx * (double)dot;
          at += std::fabs(sx) * (double)adot;
        }
        acc -= s * z * (double)xsum[m * ng + g];
        at += std::fabs(s * z * (double)xsum[m * ng + g]) * (1 + p.G * 1e-7);  // xsum: fp32 sum of blocks
      }
      if (!p.row_ptr.empty()) {  // outliers against the unquantized activations
        const int64_t len = p.row_ptr[n + 1] - p.row_ptr[n];
        for (int32_t j = p.row_ptr[n]; j < p.row_ptr[n + 1]; ++j) {
          const double t = (double)lk::half_to_float(p.val[j]) * p.x[m * p.K + p.col[j]];
          acc += t;
          at += std::fabs(t) * (1.0 + (double)len / (double)(p.K / lk::act_block(p.G) + p.K / p.G + 8));
        }
      }
      y[m * p.N + n] = acc;
      abs_terms[m * p.N + n] = at;
    }
  return y;
}

using RowsFn = void (*)(const lk::QmmProblem&, int64_t, int64_t);
constexpr int64_t DECODE_CHUNK_ROWS = 32;  // outliers.h: kChunkRows (rows per running sum)

// gemm: the blocked GEMMs (quant_gemm_avx2.cpp, quant_gemm_amx.cpp), called for many rows: M up to 100 (64-row
// blocks, 4- and 16-row tiles with every remainder) and N up to 300 in one trial (several panels of 8 or 16 rows).
static void check_rows_fn(const char* name, RowsFn fn, std::mt19937& rng, bool gemm = false) {
  const int bits_list[] = {1, 2, 3, 4, 8};
  const int g_list[] = {32, 64, 128};
  for (int bits : bits_list)
    for (int G : g_list)
      for (int trial = 0; trial < 6; ++trial) {
        // M > 16 in some trials: the outliers then take the slab path (outliers.h)
        int64_t M = (trial == 2 || trial == 4) ? 17 + rng() % 23 : 1 + rng() % 9;
        if (gemm) M = trial == 3 ? 60 + rng() % 41 : lk::kGemmMinRows + rng() % 40;
        const int64_t N = gemm && trial == 1 ? 150 + rng() % 151 : 1 + rng() % 37;
        const int64_t K = gemm && trial == 1 ? (int64_t)G * 5 : (int64_t)G * (1 + rng() % 5);
        Problem p = make_problem(rng, M, N, K, bits, G);
        const int pattern = trial == 5 ? 0 : trial;  // every outlier pattern, and none twice
        add_outliers(p, rng, pattern);
        const int64_t ng = K / G;
        std::vector<int8_t> xq((size_t)(M * K));
        std::vector<float> xs((size_t)(M * (K / lk::act_block(G)))), xsum((size_t)(M * ng));
        lk::quantize_activations(p.x.data(), M, K, G, xq.data(), xs.data(), xsum.data());
        std::vector<float> y((size_t)(M * N), NAN);
        lk::QmmProblem q{M, N, K, bits, G, p.qw.data(), p.scales.data(), p.zeros.data(),
                         xq.data(), xs.data(), xsum.data(), p.bias.data(), y.data()};
        std::vector<float> xt((size_t)(M * K));
        std::atomic<int> bad{0};
        if (pattern) {
          for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k) xt[k * M + m] = p.x[m * K + k];
          q.row_ptr = p.row_ptr.data();
          q.col = p.col.data();
          q.val = p.val.data();
          q.nnz = (int64_t)p.col.size();
          q.xt = xt.data();
          q.bad_csr = &bad;
        }
        if (gemm && N > 8) {  // two threads' ranges, the second starting inside a panel's width
          const int64_t n1 = 3 + (int64_t)(rng() % (uint64_t)(N - 3));
          fn(q, 0, n1);
          fn(q, n1, N);
        } else {
          fn(q, 0, N);
        }
        CHECK(bad.load() == 0, "%s: valid CSR reported bad", name);
        std::vector<double> at;
        const std::vector<double> ref = model(p, xq, xs, xsum, at);
        // fp32: each term carries ~3 roundings (scale product, convert, FMA), then
        // K/B + K/G sequential additions and a 16-lane horizontal sum (4 levels).
        const double nterms = (double)(K / lk::act_block(G) + K / G + 3 + 4 + 1);
        // M = 1 with outliers: each row's outlier sum is the difference of a running sum over the rows of its
        // 32-row chunk (outliers.h, decode_outlier_sums), so its error is a few roundings of that running sum's
        // magnitude, not of the row's own terms: two ends, each after up to (outliers so far + 8) additions. A
        // chunk starts at its thread's first row or 32 rows after another, so the rows [n - 31, n] bound it.
        std::vector<double> run_err((size_t)N, 0.0);
        if (pattern && M == 1) {
          std::vector<double> mag((size_t)N + 1, 0.0), cnt((size_t)N + 1, 0.0);  // prefix sums over rows
          for (int64_t n = 0; n < N; ++n) {
            double m = 0;
            for (int32_t j = p.row_ptr[n]; j < p.row_ptr[n + 1]; ++j)
              m += std::fabs((double)lk::half_to_float(p.val[j]) * p.x[p.col[j]]);
            mag[n + 1] = mag[n] + m;
            cnt[n + 1] = cnt[n] + (p.row_ptr[n + 1] - p.row_ptr[n]);
          }
          for (int64_t n = 0; n < N; ++n) {
            const int64_t a = std::max<int64_t>(0, n - (DECODE_CHUNK_ROWS - 1));
            run_err[n] = 2 * (cnt[n + 1] - cnt[a] + 8) * 0x1p-24 * (mag[n + 1] - mag[a]);
          }
        }
        double worst = 0;
        for (size_t i = 0; i < y.size(); ++i) {
          const double err = std::fabs((double)y[i] - ref[i]) / (nterms * 0x1p-24 * at[i] + run_err[i % N] + 1e-30);
          worst = std::max(worst, std::isnan(y[i]) ? 1e30 : err);
        }
        CHECK(worst <= 1.0, "%s bits=%d G=%d M=%ld N=%ld K=%ld outliers=%d: error %g x its fp32 bound",
              name, bits, G, (long)M, (long)N, (long)K, pattern, worst);
      }
  std::printf("%s: checked\n", name);
}

static void check_c_abi(std::mt19937& rng) {
  Problem p = make_problem(rng, 3, 5, 64, 4, 32);
  lk_qweight w{p.qw.data(), p.scales.data(), p.zeros.data(), p.N, p.K, 4, 32};
  std::vector<float> y(15, NAN);
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, 3, &w, nullptr, y.data(), 1) == LK_OK, "ok call");
  for (float v : y) CHECK(std::isfinite(v), "output written");
  lk_qweight bad = w;
  bad.bits = 5;
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, 3, &bad, nullptr, y.data(), 1) == LK_ERR_INVALID_ARG, "bits");
  bad.bits = 0;
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, 3, &bad, nullptr, y.data(), 1) == LK_ERR_INVALID_ARG, "bits");
  bad = w;
  bad.group_size = 48;
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, 3, &bad, nullptr, y.data(), 1) == LK_ERR_INVALID_ARG, "group");
  bad = w;
  bad.K = 65;
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, 3, &bad, nullptr, y.data(), 1) == LK_ERR_INVALID_ARG, "K");
  bad = w;
  bad.qweight = nullptr;
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, 3, &bad, nullptr, y.data(), 1) == LK_ERR_INVALID_ARG, "null");
  CHECK(lk_quant_matmul(nullptr, LK_F32, 3, &w, nullptr, y.data(), 1) == LK_ERR_INVALID_ARG, "null x");
  CHECK(lk_quant_matmul(p.x.data(), (lk_dtype)7, 3, &w, nullptr, y.data(), 1) == LK_ERR_INVALID_ARG, "dtype");
  // NaN activations give NaN outputs, never an int cast of NaN (UBSan would flag it).
  p.x[0] = NAN;
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, 3, &w, nullptr, y.data(), 1) == LK_OK, "nan call");
  CHECK(std::isnan(y[0]), "nan propagates");
  // gwq_matmul: a valid CSR matches quant_matmul plus the outliers; bad ones are refused.
  p.x[0] = 0.5f;
  std::vector<int32_t> rp = {0, 1, 1, 3, 3, 4};
  std::vector<uint16_t> col = {0, 5, 63, 7}, val(4, lk::float_to_half(2.f));
  lk_outliers o{rp.data(), col.data(), val.data(), 4};
  std::vector<float> y0(15, NAN), y1(15, NAN);
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, 3, &w, nullptr, y0.data(), 1) == LK_OK, "dense");
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 3, &w, &o, nullptr, y1.data(), 2) == LK_OK, "gwq ok");
  for (int m = 0; m < 3; ++m) {
    const float* xm = &p.x[m * 64];
    const float want[5] = {2.f * xm[0], 0.f, 2.f * (xm[5] + xm[63]), 0.f, 2.f * xm[7]};
    for (int n = 0; n < 5; ++n)
      CHECK(std::fabs(y1[m * 5 + n] - y0[m * 5 + n] - want[n]) <= 1e-5f * (1.f + std::fabs(y0[m * 5 + n])),
            "gwq m=%d n=%d", m, n);
  }
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 3, &w, nullptr, nullptr, y1.data(), 1) == LK_ERR_INVALID_ARG, "null csr");
  col[2] = 64;  // column out of range
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 3, &w, &o, nullptr, y1.data(), 1) == LK_ERR_INVALID_ARG, "col");
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 1, &w, &o, nullptr, y1.data(), 1) == LK_ERR_INVALID_ARG, "col M=1");
  col[2] = 63;
  rp[2] = 5;  // row pointers decrease, run past nnz
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 3, &w, &o, nullptr, y1.data(), 1) == LK_ERR_INVALID_ARG, "row_ptr");
  rp[2] = 1;
  rp[1] = 3;  // row pointers decrease inside [0, nnz] (decode reads them clamped, and must still refuse)
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 1, &w, &o, nullptr, y1.data(), 1) == LK_ERR_INVALID_ARG, "row_ptr M=1");
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 3, &w, &o, nullptr, y1.data(), 1) == LK_ERR_INVALID_ARG, "row_ptr M=3");
  rp[1] = 1;
  rp[5] = 3;  // last pointer != nnz
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 3, &w, &o, nullptr, y1.data(), 1) == LK_ERR_INVALID_ARG, "nnz");
  rp[5] = 4;
  rp[0] = -1;
  CHECK(lk_gwq_matmul(p.x.data(), LK_F32, 3, &w, &o, nullptr, y1.data(), 1) == LK_ERR_INVALID_ARG, "rp0");
  rp[0] = 0;
  // half round trip on a few values
  const float vals[] = {0.f, 1.f, -2.5f, 65504.f, 6.103515625e-05f, 5.9604644775390625e-08f, -0.33325195f};
  for (float v : vals) CHECK(lk::half_to_float(lk::float_to_half(v)) == v, "half %g", v);
  std::printf("c abi: checked\n");
}

// The expand of the LoRA kernels: y += scale * sum_i t[m, i] * Bt[i, :] over a high part
// (2/3/4/8 bits) and a 1-bit low part, against a double-precision model.
using ExpandFn = void (*)(const lk::LoraExpand&, int64_t, int64_t);

static void check_expand_fn(const char* name, ExpandFn fn, std::mt19937& rng) {
  const int bits_list[] = {2, 3, 4, 8};
  const int g_list[] = {32, 64, 128};
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int bits : bits_list)
    for (int G : g_list)
      for (int trial = 0; trial < 4; ++trial) {  // trial 3: decode over 40 groups (16-group chunks, one ragged)
        const int64_t M = trial == 2 ? 20 + rng() % 30 : trial == 3 ? 1 + rng() % 2 : 1 + rng() % 5;
        const int64_t N = (int64_t)G * (trial == 3 ? 40 : 1 + rng() % 4);
        const int64_t h = trial == 1 ? 0 : 1 + rng() % 6, rl = trial == 0 ? 0 : 1 + rng() % 12;
        Problem hi = make_problem(rng, 1, h, N, bits, G), lo = make_problem(rng, 1, rl, N, 1, G);
        std::vector<float> t_hi((size_t)(M * h)), t_lo((size_t)(M * rl)), y((size_t)(M * N));
        for (auto& v : t_hi) v = 4.f * u(rng);
        for (auto& v : t_lo) v = 4.f * u(rng);
        for (auto& v : y) v = u(rng);
        const std::vector<float> y0 = y;
        const float scale = 0.75f + u(rng);
        const lk::LoraExpand e{M, N, G,
                               {{hi.qw.data(), hi.scales.data(), hi.zeros.data(), h, bits, t_hi.data(), h},
                                {lo.qw.data(), lo.scales.data(), lo.zeros.data(), rl, 1, t_lo.data(), rl}},
                               scale, y.data()};
        const int64_t ng = N / G;
        fn(e, 0, ng / 2);  // two calls over disjoint column ranges, as two threads would
        fn(e, ng / 2, ng);
        double worst = 0;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double acc = y0[m * N + n], at = std::fabs(acc);
            const int64_t g = n / G;
            for (const Problem* p : {&hi, &lo}) {
              const int64_t rows = p == &hi ? h : rl;
              const float* t = p == &hi ? t_hi.data() : t_lo.data();
              for (int64_t i = 0; i < rows; ++i) {
                const double sc = lk::half_to_float(p->scales[i * ng + g]);
                const double z = lk::half_to_float(p->zeros[i * ng + g]);
                const int q = lk::decode_code(&p->qw[i * lk::row_bytes(N, p->bits) + g * lk::group_bytes(G, p->bits)],
                                              G, p->bits, (int)(n % G));
                const double term = (double)scale * t[m * rows + i] * sc * (q - z);
                acc += term;
                at += std::fabs(term);
              }
            }
            // fp32: the weight, the coefficient and the product-add round once each, then r additions
            const double bound = (double)(h + rl + 4) * 0x1p-24 * at + 1e-30;
            const double err = std::fabs((double)y[m * N + n] - acc) / bound;
            worst = std::max(worst, std::isnan(y[m * N + n]) ? 1e30 : err);
          }
        CHECK(worst <= 1.0, "%s expand bits=%d G=%d M=%ld N=%ld h=%ld r-h=%ld: error %g x its fp32 bound", name,
              bits, G, (long)M, (long)N, (long)h, (long)rl, worst);
      }
  std::printf("%s expand: checked\n", name);
}

// The AVX2 activation quantization is bitwise the portable one (finite values, zeros, NaN and Inf blocks).
// lk_multi_lora / lk_lora_shrink / lk_lora_expand: a dense fp32 adapter and a compressed one in one batch,
// with a token on no adapter and a two-way mixture; against lk_lora_mixed (compressed) and a double loop
// (dense); outputs poisoned first; every bad slot, segment and token index refused.
static void check_multi_lora_abi(std::mt19937& rng) {
  const int64_t T = 5, N = 96, K = 128, h = 3, rl = 5, rd = 7;
  Problem w = make_problem(rng, T, N, K, 4, 64);  // for x
  Problem ah = make_problem(rng, 1, h, K, 2, 64), al = make_problem(rng, 1, rl, K, 1, 64);
  Problem bh = make_problem(rng, 1, h, N, 2, 32), bl = make_problem(rng, 1, rl, N, 1, 32);
  lk_lora q{{ah.qw.data(), ah.scales.data(), ah.zeros.data(), h, K, 2, 64},
            {bh.qw.data(), bh.scales.data(), bh.zeros.data(), h, N, 2, 32},
            {al.qw.data(), al.scales.data(), al.zeros.data(), rl, K, 1, 64},
            {bl.qw.data(), bl.scales.data(), bl.zeros.data(), rl, N, 1, 32}, 1.5f};
  std::normal_distribution<float> nd(0.f, 0.3f);
  std::vector<float> A((size_t)(rd * K)), Bt((size_t)(rd * N));
  for (float& v : A) v = nd(rng);
  for (float& v : Bt) v = nd(rng);
  lk_lora_slot slots[3] = {};
  slots[0].kind = LK_SLOT_DENSE;
  slots[0].dtype = LK_F32;
  slots[0].rank = rd;
  slots[0].a = A.data();
  slots[0].bt = Bt.data();
  slots[0].scale = 0.5f;
  slots[1].kind = LK_SLOT_COMPRESSED;
  slots[1].q = q;
  slots[1].scale = 1.5f;
  slots[2].kind = LK_SLOT_EMPTY;
  // tokens: 0 -> dense, 1 -> compressed, 2 -> none, 3 -> 0.25 dense + 0.75 compressed, 4 -> compressed
  const int64_t segs[6] = {0, 0, 2, 1, 2, 3};
  const int64_t toks[5] = {0, 3, 1, 3, 4};
  const float wts[5] = {1.f, 0.25f, 1.f, 0.75f, 1.f};
  const lk_lora_batch batch{segs, 2, toks, wts, 5};
  std::vector<float> base((size_t)(T * N));
  for (float& v : base) v = nd(rng);
  std::vector<float> y((size_t)(T * N), NAN), y2((size_t)(T * N), NAN), t((size_t)(5 * 8), NAN);
  CHECK(lk_multi_lora(w.x.data(), LK_F32, T, K, N, slots, 3, &batch, base.data(), y.data(), 2) == LK_OK, "multi");
  CHECK(lk_lora_shrink(w.x.data(), LK_F32, T, K, slots, 3, &batch, t.data(), 8, 2) == LK_OK, "shrink");
  CHECK(lk_lora_expand(t.data(), 8, slots, 3, &batch, LK_F32, T, N, base.data(), y2.data(), 1) == LK_OK, "expand");
  CHECK(y == y2, "shrink + expand differ from the fused call");
  // references: the compressed adapter alone (lk_lora_mixed), the dense one in double
  std::vector<float> qdelta((size_t)(T * N), NAN);
  CHECK(lk_lora_mixed(w.x.data(), LK_F32, T, &q, nullptr, qdelta.data(), 1) == LK_OK, "lora_mixed");
  const double wd[5] = {1.0, 0.0, 0.0, 0.25, 0.0}, wq[5] = {0.0, 1.0, 0.0, 0.75, 1.0};
  double worst = 0;
  for (int64_t m = 0; m < T; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double d = 0;
      for (int64_t i = 0; i < rd; ++i) {
        double xa = 0;
        for (int64_t k = 0; k < K; ++k) xa += (double)w.x[m * K + k] * A[i * K + k];
        d += xa * Bt[i * N + n];
      }
      const double want = base[m * N + n] + wd[m] * 0.5 * d + wq[m] * qdelta[m * N + n];
      const double err = std::fabs(y[m * N + n] - want) / (1e-4 * (1.0 + std::fabs(want)));
      worst = std::max(worst, err);
    }
  CHECK(worst <= 1.0, "multi_lora: error %g x its bound", worst);
  for (int64_t n = 0; n < N; ++n) CHECK(y[2 * N + n] == base[2 * N + n], "token without adapter changed");
  // in place (base == y)
  std::vector<float> inplace = base;
  CHECK(lk_multi_lora(w.x.data(), LK_F32, T, K, N, slots, 3, &batch, inplace.data(), inplace.data(), 1) == LK_OK,
        "in place");
  CHECK(inplace == y, "in-place multi_lora differs");
  // bad batches
  auto refused = [&](const int64_t* sg, int64_t nseg, const int64_t* tk, int64_t E) {
    const lk_lora_batch bb{sg, nseg, tk, wts, E};
    return lk_multi_lora(w.x.data(), LK_F32, T, K, N, slots, 3, &bb, base.data(), y.data(), 1) == LK_ERR_INVALID_ARG;
  };
  const int64_t s_oob[6] = {0, 0, 2, 3, 2, 3}, s_empty[6] = {0, 0, 2, 2, 2, 3}, s_gap[6] = {0, 0, 2, 1, 3, 2};
  const int64_t s_long[6] = {0, 0, 2, 1, 2, 4}, s_neg[6] = {-1, 0, 2, 1, 2, 3};
  const int64_t t_oob[5] = {0, 3, 1, 5, 4}, t_neg[5] = {0, -1, 1, 3, 4};
  CHECK(refused(s_oob, 2, toks, 5), "slot out of range");
  CHECK(refused(s_neg, 2, toks, 5), "negative slot");
  CHECK(refused(s_empty, 2, toks, 5), "empty slot");
  CHECK(refused(s_gap, 2, toks, 5), "segments with a gap");
  CHECK(refused(s_long, 2, toks, 5), "segment past the entries");
  CHECK(refused(segs, 1, toks, 5), "entries not covered");
  CHECK(refused(segs, 2, t_oob, 5), "token out of range");
  CHECK(refused(segs, 2, t_neg, 5), "negative token");
  CHECK(lk_lora_shrink(w.x.data(), LK_F32, T, K, slots, 3, &batch, t.data(), 7, 1) == LK_ERR_INVALID_ARG, "ldt");
  CHECK(lk_multi_lora(w.x.data(), LK_F32, T, K, N, slots, 3, nullptr, base.data(), y.data(), 1) == LK_ERR_INVALID_ARG,
        "null batch");
  lk_lora_slot bad[3] = {slots[0], slots[1], slots[2]};
  bad[1].q.b_lo.group_size = 64;
  CHECK(lk_multi_lora(w.x.data(), LK_F32, T, K, N, bad, 3, &batch, base.data(), y.data(), 1) == LK_ERR_INVALID_ARG,
        "compressed groups");
  bad[1] = slots[1];
  bad[0].a = nullptr;
  CHECK(lk_multi_lora(w.x.data(), LK_F32, T, K, N, bad, 3, &batch, base.data(), y.data(), 1) == LK_ERR_INVALID_ARG,
        "dense null");
  std::printf("multi lora c abi: checked\n");
}

// The per-ISA multi-adapter pieces against the generic ones (the C ABI covers the native paths; this also
// reaches the AVX-512 code through SIMDe): dense shrink of 1 and 5 entries for every dtype, and the expand
// of dense (every dtype, 1 and 3 entries) and compressed slots over a ragged column range.
using DenseShrinkFn = void (*)(const lk::DenseShrink&, int64_t, int64_t);
using MultiExpandFn = void (*)(const lk::MultiExpand&, int64_t, int64_t);
static void check_multi_pieces(const char* name, DenseShrinkFn shrink, MultiExpandFn expand, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t K = 200, N = 96 + 40, r = 11;  // K, N not multiples of 16 / 32
  std::vector<float> x((size_t)(5 * K));
  for (float& v : x) v = nd(rng);
  std::vector<const float*> rows;
  for (int e = 0; e < 5; ++e) rows.push_back(x.data() + e * K);
  const float coef[5] = {1.f, -0.5f, 2.f, 0.25f, 1.5f};
  double worst = 0;
  for (lk_dtype dt : {LK_F32, LK_F16, LK_BF16}) {
    std::vector<uint16_t> a16((size_t)(r * K)), b16((size_t)(r * N));
    std::vector<float> a32((size_t)(r * K)), b32((size_t)(r * N));
    for (size_t i = 0; i < a32.size(); ++i) {
      a32[i] = nd(rng);
      a16[i] = dt == LK_F16 ? lk::float_to_half(a32[i]) : (uint16_t)(lk::float_to_bf16(a32[i]));
    }
    for (size_t i = 0; i < b32.size(); ++i) {
      b32[i] = nd(rng);
      b16[i] = dt == LK_F16 ? lk::float_to_half(b32[i]) : (uint16_t)(lk::float_to_bf16(b32[i]));
    }
    const void* a = dt == LK_F32 ? (const void*)a32.data() : (const void*)a16.data();
    const void* bt = dt == LK_F32 ? (const void*)b32.data() : (const void*)b16.data();
    for (int64_t cnt : {1, 5}) {
      std::vector<float> t0((size_t)(cnt * 16), NAN), t1((size_t)(cnt * 16), NAN);
      lk::dense_shrink_generic(lk::DenseShrink{rows.data(), cnt, K, a, dt, coef, t0.data(), 16}, 0, r);
      shrink(lk::DenseShrink{rows.data(), cnt, K, a, dt, coef, t1.data(), 16}, 0, r);
      // two fp32 summation orders of K products: each within K * 2^-24 of the sum of |products| (the
      // result itself can cancel to ~0, so a bound relative to it fails at random)
      for (int64_t e = 0; e < cnt; ++e)
        for (int64_t i = 0; i < r; ++i) {
          double at = 0;
          for (int64_t k = 0; k < K; ++k) {
            const float ak = dt == LK_F32 ? a32[i * K + k]
                                          : (dt == LK_F16 ? lk::half_to_float(a16[i * K + k]) : lk::bf16_to_float(a16[i * K + k]));
            at += std::fabs((double)rows[e][k] * ak * coef[e]);
          }
          worst = std::max(worst, std::fabs((double)t1[e * 16 + i] - t0[e * 16 + i]) / (2.0 * K * 0x1p-24 * at + 1e-30));
        }
    }
    lk_lora_slot sl{};
    sl.kind = LK_SLOT_DENSE;
    sl.dtype = dt;
    sl.rank = r;
    sl.a = a;
    sl.bt = bt;
    sl.scale = 1.f;
    for (int64_t cnt : {1, 3}) {
      const int64_t seg[3] = {0, 0, cnt}, tok[3] = {2, 0, 3};
      const float w[3] = {1.f, 1.f, 1.f};
      const lk_lora_batch b{seg, 1, tok, w, cnt};
      std::vector<float> t((size_t)(cnt * 16));
      for (float& v : t) v = nd(rng);
      std::vector<float> y0((size_t)(4 * N)), y1;
      for (float& v : y0) v = nd(rng);
      y1 = y0;
      lk::multi_expand_generic(lk::MultiExpand{&sl, &b, t.data(), 16, N, y0.data(), N}, 0, N);
      expand(lk::MultiExpand{&sl, &b, t.data(), 16, N, y1.data(), N}, 0, N);
      for (size_t i = 0; i < y0.size(); ++i)
        worst = std::max(worst, std::fabs((double)y1[i] - y0[i]) / (1e-5 * (1 + std::fabs(y0[i]))));
    }
  }
  // compressed: the expand from the codes (1 entry) and through the fp32 tile (3 entries)
  const int64_t Nq = 256, h = 3, rl = 6;
  Problem bh = make_problem(rng, 1, h, Nq, 2, 128), bl = make_problem(rng, 1, rl, Nq, 1, 128);
  lk_lora_slot q{};
  q.kind = LK_SLOT_COMPRESSED;
  q.q.b_hi = lk_qweight{bh.qw.data(), bh.scales.data(), bh.zeros.data(), h, Nq, 2, 128};
  q.q.b_lo = lk_qweight{bl.qw.data(), bl.scales.data(), bl.zeros.data(), rl, Nq, 1, 128};
  q.q.a_hi.N = h;
  q.q.a_lo.N = rl;
  for (int64_t cnt : {1, 3}) {
    const int64_t seg[3] = {0, 0, cnt}, tok[3] = {1, 3, 0};
    const float w[3] = {1.f, 1.f, 1.f};
    const lk_lora_batch b{seg, 1, tok, w, cnt};
    std::vector<float> t((size_t)(cnt * 16));
    for (float& v : t) v = nd(rng);
    std::vector<float> y0((size_t)(4 * Nq)), y1;
    for (float& v : y0) v = nd(rng);
    y1 = y0;
    lk::multi_expand_generic(lk::MultiExpand{&q, &b, t.data(), 16, Nq, y0.data(), Nq}, 128, Nq);
    expand(lk::MultiExpand{&q, &b, t.data(), 16, Nq, y1.data(), Nq}, 128, Nq);
    for (size_t i = 0; i < y0.size(); ++i)
      worst = std::max(worst, std::fabs((double)y1[i] - y0[i]) / (1e-5 * (1 + std::fabs(y0[i]))));
  }
  CHECK(worst <= 1.0, "%s multi-adapter pieces differ from generic: %g x the bound", name, worst);
  std::printf("%s multi-adapter pieces: checked\n", name);
}


using ActQuantFn = void (*)(const float*, int64_t, int64_t, int, int8_t*, float*, float*);

static void check_act_quant(const char* name, ActQuantFn fn, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int G : {32, 64, 128})
    for (int trial = 0; trial < 20; ++trial) {
      const int64_t M = 1 + rng() % 5, K = (int64_t)G * (1 + rng() % 6);
      std::vector<float> x((size_t)(M * K));
      const float mag = std::ldexp(1.f, (int)(rng() % 40) - 20);
      for (auto& v : x) v = u(rng) * mag;
      if (trial % 4 == 1) x[rng() % x.size()] = NAN;
      if (trial % 4 == 2) x[rng() % x.size()] = -INFINITY;
      if (trial % 4 == 3) std::fill(x.begin(), x.begin() + G, 0.f);  // an all-zero block
      if (trial == 5) for (size_t i = 0; i < x.size(); ++i) x[i] = (float)((int)(i % 255) - 127) * 0.5f;  // ties
      if (trial == 6) {  // a block whose max |x| makes 127 / max overflow, with zeros in it: a zero block
        std::fill(x.begin(), x.begin() + lk::act_block(G), 0.f);
        x[1] = 1e-38f;
        x[2] = -3e-38f;
      }
      const int64_t nb = K / lk::act_block(G), ng = K / G;
      std::vector<int8_t> q0((size_t)(M * K)), q1((size_t)(M * K));
      std::vector<float> s0((size_t)(M * nb)), s1((size_t)(M * nb)), z0((size_t)(M * ng)), z1((size_t)(M * ng));
      lk::quantize_activations(x.data(), M, K, G, q0.data(), s0.data(), z0.data());
      fn(x.data(), M, K, G, q1.data(), s1.data(), z1.data());
      if (trial == 6)
        CHECK(s0[0] == 0.f && std::all_of(q0.begin(), q0.begin() + lk::act_block(G), [](int8_t q) { return q == 0; }),
              "a block of max |x| 3e-38 is not a zero block (G=%d)", G);
      CHECK(q0 == q1, "%s activation codes differ (G=%d trial %d)", name, G, trial);
      for (size_t i = 0; i < s0.size(); ++i)
        CHECK(std::memcmp(&s0[i], &s1[i], 4) == 0, "%s activation scale differs (G=%d)", name, G);
      for (size_t i = 0; i < z0.size(); ++i)
        CHECK(std::memcmp(&z0[i], &z1[i], 4) == 0, "%s activation sums differ (G=%d)", name, G);
    }
  std::printf("%s activation quantization: checked\n", name);
}

// lk_quant_matmul_lora = lk_quant_matmul then lk_lora_mixed in place (the same kernels, one call);
// lk_lora_mixed with a null base is the adapter alone; bad adapters are refused.
static void check_lora_abi(std::mt19937& rng) {
  const int64_t M = 3, N = 96, K = 128, h = 3, rl = 5;
  Problem w = make_problem(rng, M, N, K, 4, 64);
  Problem ah = make_problem(rng, 1, h, K, 2, 64), al = make_problem(rng, 1, rl, K, 1, 64);
  Problem bh = make_problem(rng, 1, h, N, 2, 32), bl = make_problem(rng, 1, rl, N, 1, 32);
  const lk_qweight wq{w.qw.data(), w.scales.data(), w.zeros.data(), N, K, 4, 64};
  lk_lora l{{ah.qw.data(), ah.scales.data(), ah.zeros.data(), h, K, 2, 64},
            {bh.qw.data(), bh.scales.data(), bh.zeros.data(), h, N, 2, 32},
            {al.qw.data(), al.scales.data(), al.zeros.data(), rl, K, 1, 64},
            {bl.qw.data(), bl.scales.data(), bl.zeros.data(), rl, N, 1, 32}, 1.5f};
  std::vector<float> fused((size_t)(M * N), NAN), two((size_t)(M * N), NAN), alone((size_t)(M * N), NAN);
  CHECK(lk_quant_matmul_lora(w.x.data(), LK_F32, M, &wq, w.bias.data(), &l, fused.data(), 2) == LK_OK, "fused");
  CHECK(lk_quant_matmul(w.x.data(), LK_F32, M, &wq, w.bias.data(), two.data(), 2) == LK_OK, "base");
  std::vector<float> base_copy = two, out_of_place((size_t)(M * N), NAN);
  CHECK(lk_lora_mixed(w.x.data(), LK_F32, M, &l, two.data(), two.data(), 2) == LK_OK, "in place");
  CHECK(lk_lora_mixed(w.x.data(), LK_F32, M, &l, base_copy.data(), out_of_place.data(), 2) == LK_OK, "out of place");
  CHECK(out_of_place == two, "out-of-place lora_mixed differs from in-place");
  CHECK(lk_lora_mixed(w.x.data(), LK_F32, M, &l, nullptr, alone.data(), 1) == LK_OK, "alone");
  double worst = 0;
  for (int64_t i = 0; i < M * N; ++i) worst = std::max(worst, (double)std::fabs(fused[i] - two[i]));
  CHECK(worst == 0.0, "fused differs from quant_matmul + lora_mixed by %g", worst);
  for (float v : alone) CHECK(std::isfinite(v), "adapter alone written");
  lk_lora bad = l;
  bad.a_lo.bits = 2;
  CHECK(lk_lora_mixed(w.x.data(), LK_F32, M, &bad, nullptr, alone.data(), 1) == LK_ERR_INVALID_ARG, "lo bits");
  bad = l;
  bad.b_hi.N = 2;
  CHECK(lk_lora_mixed(w.x.data(), LK_F32, M, &bad, nullptr, alone.data(), 1) == LK_ERR_INVALID_ARG, "ranks");
  bad = l;
  bad.b_lo.group_size = 64;
  CHECK(lk_quant_matmul_lora(w.x.data(), LK_F32, M, &wq, nullptr, &bad, fused.data(), 1) == LK_ERR_INVALID_ARG,
        "groups");
  bad = l;
  bad.a_hi.K = 64;
  CHECK(lk_quant_matmul_lora(w.x.data(), LK_F32, M, &wq, nullptr, &bad, fused.data(), 1) == LK_ERR_INVALID_ARG,
        "K");
  bad = l;
  bad.scale = NAN;
  CHECK(lk_lora_mixed(w.x.data(), LK_F32, M, &bad, nullptr, alone.data(), 1) == LK_ERR_INVALID_ARG, "scale");
  CHECK(lk_lora_mixed(w.x.data(), LK_F32, M, nullptr, nullptr, alone.data(), 1) == LK_ERR_INVALID_ARG, "null");
  std::printf("lora c abi: checked\n");
}

// Decode (M <= 2): lk_lora_mixed decodes the expand in registers straight into the output (expand_direct);
// from three tokens on it goes through the fp32 tile. Both give each token's row to fp32 rounding, on every
// ISA path, and the direct path writes every output (NaN-poisoned).
static void check_lora_direct_expand(std::mt19937& rng) {
  const int64_t N = 256, K = 128, h = 3, rl = 5;
  Problem ah = make_problem(rng, 3, h, K, 2, 64), al = make_problem(rng, 1, rl, K, 1, 64);
  Problem bh = make_problem(rng, 1, h, N, 2, 128), bl = make_problem(rng, 1, rl, N, 1, 128);
  const lk_lora l{{ah.qw.data(), ah.scales.data(), ah.zeros.data(), h, K, 2, 64},
                  {bh.qw.data(), bh.scales.data(), bh.zeros.data(), h, N, 2, 128},
                  {al.qw.data(), al.scales.data(), al.zeros.data(), rl, K, 1, 64},
                  {bl.qw.data(), bl.scales.data(), bl.zeros.data(), rl, N, 1, 128}, 0.75f};
  const float* x = ah.x.data();  // 3 tokens of K activations
  std::vector<float> base((size_t)(3 * N));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (float& v : base) v = nd(rng);
  for (lk_isa isa : {LK_ISA_GENERIC, LK_ISA_AVX2, LK_ISA_AVX512, LK_ISA_AMX}) {
    if (lk_set_isa(isa) != LK_OK) continue;
    std::vector<float> tile((size_t)(3 * N), NAN);
    CHECK(lk_lora_mixed(x, LK_F32, 3, &l, base.data(), tile.data(), 2) == LK_OK, "tile path");
    for (int64_t M : {1, 2}) {
      std::vector<float> direct((size_t)(M * N), NAN);
      CHECK(lk_lora_mixed(x, LK_F32, M, &l, base.data(), direct.data(), 2) == LK_OK, "direct path");
      for (int64_t i = 0; i < M * N; ++i)
        CHECK(std::isfinite(direct[i]) && std::fabs(direct[i] - tile[i]) <= 1e-5f * (1.f + std::fabs(tile[i])),
              "isa %d M=%lld: direct expand %g vs tile %g at %lld", (int)isa, (long long)M, direct[i], tile[i],
              (long long)i);
    }
  }
  lk_set_isa(lk_detected_isa());
  std::printf("lora direct expand (M <= 2): checked\n");
}

// lk_route_top_k: against a direct double-precision model (softmax, stable top-k, renormalisation, grouping by
// expert with tokens ascending); ties, k = E, E = 1, T = 0; non-finite logits and bad k refused.
static void check_route_top_k(std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 2.f);
  const int64_t cases[][3] = {{1, 1, 1}, {0, 4, 2}, {37, 8, 2}, {9, 5, 5}, {64, 6, 3}, {3, 7, 1}};
  for (const auto& c : cases) {
    const int64_t T = c[0], E = c[1], k = c[2];
    std::vector<float> logits((size_t)(T * E));
    for (auto& v : logits) v = nd(rng);
    if (T > 2) {
      for (int64_t e = 0; e < E; ++e) logits[(size_t)(E + e)] = 0.5f;  // row 1: every expert ties
    }
    std::vector<int64_t> seg((size_t)(3 * E), -7), tok((size_t)(T * k), -7);
    std::vector<float> w((size_t)(T * k), NAN);
    CHECK(lk_route_top_k(logits.data(), T, E, k, seg.data(), tok.data(), w.data()) == LK_OK, "route ok");
    // model: per token the k best (stable), then entries grouped by expert in token order
    std::vector<std::vector<std::pair<int64_t, double>>> by_expert((size_t)E);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int64_t> order((size_t)E);
      for (int64_t e = 0; e < E; ++e) order[(size_t)e] = e;
      const float* l = &logits[(size_t)(t * E)];
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return l[a] > l[b]; });
      double m = *std::max_element(l, l + E), z = 0, kept = 0;
      for (int64_t e = 0; e < E; ++e) z += std::exp((double)l[e] - m);
      for (int64_t j = 0; j < k; ++j) kept += std::exp((double)l[order[(size_t)j]] - m) / z;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = order[(size_t)j];
        by_expert[(size_t)e].push_back({t, std::exp((double)l[e] - m) / z / kept});
      }
    }
    int64_t at = 0;
    for (int64_t e = 0; e < E; ++e) {
      CHECK(seg[(size_t)(3 * e)] == e && seg[(size_t)(3 * e + 1)] == at &&
                seg[(size_t)(3 * e + 2)] == (int64_t)by_expert[(size_t)e].size(),
            "route T=%ld E=%ld k=%ld: segment %ld", (long)T, (long)E, (long)k, (long)e);
      for (const auto& [t, wt] : by_expert[(size_t)e]) {
        CHECK(tok[(size_t)at] == t && std::fabs(w[(size_t)at] - wt) <= 1e-6 * (1 + wt),
              "route T=%ld E=%ld k=%ld: entry %ld", (long)T, (long)E, (long)k, (long)at);
        ++at;
      }
    }
    CHECK(at == T * k, "every entry placed");
    CHECK(lk_route_top_k(logits.data(), T, E, E + 1, seg.data(), tok.data(), w.data()) == LK_ERR_INVALID_ARG,
          "k > E refused");
    CHECK(lk_route_top_k(logits.data(), T, E, 0, seg.data(), tok.data(), w.data()) == LK_ERR_INVALID_ARG,
          "k = 0 refused");
    if (T > 0) {
      logits[0] = NAN;
      CHECK(lk_route_top_k(logits.data(), T, E, k, seg.data(), tok.data(), w.data()) == LK_ERR_INVALID_ARG,
            "NaN logits refused");
      logits[0] = 0.f;
      logits[(size_t)(T * E - 1)] = NAN;  // not the first value of its row either (when E > 1)
      CHECK(lk_route_top_k(logits.data(), T, E, k, seg.data(), tok.data(), w.data()) == LK_ERR_INVALID_ARG,
            "NaN logits refused");
      logits[(size_t)(T * E - 1)] = -INFINITY;
      CHECK(lk_route_top_k(logits.data(), T, E, k, seg.data(), tok.data(), w.data()) == LK_ERR_INVALID_ARG,
            "Inf logits refused");
    }
  }
  CHECK(lk_route_top_k(nullptr, 2, 3, 1, nullptr, nullptr, nullptr) == LK_ERR_INVALID_ARG, "null refused");
}

// lk_bank_resolve: a dense and a compressed slot decode to the right pointers; every kind of bad row
// (slot out of range, empty, rows or codes past the slabs, bad bits, rank above max_rank) is refused.
static void check_bank_resolve() {
  const int64_t N = 64, K = 96;
  std::vector<float> a((size_t)(6 * K)), bt((size_t)(6 * N));
  const int64_t h = 1, r = 4, bits = 2;
  const int64_t qa_bytes = h * K * bits / 8 + (r - h) * K / 8 + 5, qb_bytes = h * N * bits / 8 + (r - h) * N / 8;
  std::vector<uint8_t> qa((size_t)qa_bytes), qb((size_t)qb_bytes);
  std::vector<uint16_t> qas((size_t)(6 * K / 32)), qaz(qas.size()), qbs((size_t)(6 * N / 32)), qbz(qbs.size());
  int64_t table[4 * LK_SLOT_NUM_COLUMNS] = {};
  auto row = [&](int s) { return table + s * LK_SLOT_NUM_COLUMNS; };
  row(0)[LK_SLOT_KIND] = LK_SLOT_DENSE, row(0)[LK_SLOT_RANK] = 3, row(0)[LK_SLOT_ROW] = 2;
  row(1)[LK_SLOT_KIND] = LK_SLOT_COMPRESSED, row(1)[LK_SLOT_RANK] = r, row(1)[LK_SLOT_ROW] = 1;
  row(1)[LK_SLOT_H] = h, row(1)[LK_SLOT_BITS_HI] = bits, row(1)[LK_SLOT_A_OFF] = 5, row(1)[LK_SLOT_B_OFF] = 0;
  row(3)[LK_SLOT_KIND] = LK_SLOT_DENSE;  // rank 0: the adapter does not touch this layer
  const float scales[4] = {0.5f, 2.f, 0.f, 0.f};
  const lk_bank b{table, scales, 4, LK_F32, 32, 32, a.data(), 6, bt.data(), qa.data(), qa_bytes, qas.data(),
                  qaz.data(), 6, qb.data(), qb_bytes, qbs.data(), qbz.data()};
  const int64_t segs[9] = {1, 0, 2, 0, 2, 1, 3, 3, 0};
  lk_lora_slot out[3];
  int64_t segs_out[9], failed = -1;
  CHECK(lk_bank_resolve(&b, N, K, segs, 3, 4, out, segs_out, &failed) == LK_OK, "bank resolves");
  CHECK(out[1].kind == LK_SLOT_DENSE && out[1].rank == 3 && out[1].a == a.data() + 2 * K &&
            out[1].bt == bt.data() + 2 * N && out[1].scale == 0.5f, "dense slot");
  CHECK(out[0].kind == LK_SLOT_COMPRESSED && out[0].q.a_hi.qweight == qa.data() + 5 && out[0].q.a_hi.N == h &&
            out[0].q.a_lo.qweight == qa.data() + 5 + h * K * bits / 8 && out[0].q.a_lo.N == r - h &&
            out[0].q.b_lo.scales == qbs.data() + 2 * (N / 32) && out[0].q.a_hi.bits == bits && out[0].scale == 2.f,
        "compressed slot");
  CHECK(out[2].kind == LK_SLOT_DENSE && out[2].rank == 0, "rank-0 slot");
  CHECK(segs_out[0] == 0 && segs_out[3] == 1 && segs_out[4] == 2 && segs_out[6] == 2 && segs_out[8] == 0,
        "segments renumbered");
  auto refused = [&](int64_t id, lk_status want, int64_t max_rank = -1) {
    const int64_t one[3] = {id, 0, 1};
    lk_lora_slot sl;
    failed = -1;
    return lk_bank_resolve(&b, N, K, one, 1, max_rank, &sl, nullptr, &failed) == want && failed == id;
  };
  CHECK(refused(4, LK_ERR_SLOT_RANGE) && refused(-1, LK_ERR_SLOT_RANGE), "slot out of range");
  CHECK(refused(2, LK_ERR_SLOT_EMPTY), "empty slot");
  CHECK(refused(1, LK_ERR_RANK, 3), "rank above max_rank");
  const int64_t saved[LK_SLOT_NUM_COLUMNS] = {row(1)[0], row(1)[1], row(1)[2], row(1)[3], row(1)[4], row(1)[5], row(1)[6]};
  const int64_t hostile[][2] = {{LK_SLOT_A_OFF, 6}, {LK_SLOT_B_OFF, -1}, {LK_SLOT_ROW, 3}, {LK_SLOT_BITS_HI, 5},
                                {LK_SLOT_H, 5}, {LK_SLOT_KIND, 7}};
  for (const auto& hv : hostile) {
    row(1)[hv[0]] = hv[1];
    CHECK(refused(1, LK_ERR_BAD_SLOT), "hostile compressed row refused");
    std::copy(saved, saved + LK_SLOT_NUM_COLUMNS, row(1));
  }
  row(0)[LK_SLOT_ROW] = 4;  // rows 4..6 of a 6-row slab
  CHECK(refused(0, LK_ERR_BAD_SLOT), "dense rows past the slab");
  CHECK(lk_bank_resolve(nullptr, N, K, segs, 3, -1, out, nullptr, nullptr) == LK_ERR_INVALID_ARG, "null bank");
  std::printf("bank resolve: checked\n");
}

// lk_quant_matmul_grad_input (with and without outliers) against a double model dy @ (W + S) with W from
// lk_dequantize; lk_quant_matmul_qalora against lk_quant_matmul plus the adapter on the same pooled int8
// activations (xsum, read back through lk_quant_matmul of a weight that is 1 on one group). Outputs are
// NaN-poisoned first.
// lk_decoder_layer_step: run under the sanitizers at two positions with a key mask and GWQ outliers on one
// projection; every output written (NaN-poisoned first) and finite, the same input gives the same output, and
// bad arguments are refused. (Its values are checked against transformers' LlamaDecoderLayer in
// tests/test_native_decode.py.)
static void check_decoder_layer(std::mt19937& rng) {
  const int64_t H = 64, Hq = 4, Hkv = 2, D = 16, I = 96, B = 2, L = 8;
  Problem qkv = make_problem(rng, 1, (Hq + 2 * Hkv) * D, H, 4, 32), o = make_problem(rng, 1, H, Hq * D, 3, 32);
  Problem gu = make_problem(rng, 1, 2 * I, H, 4, 32), dn = make_problem(rng, 1, H, I, 2, 32);
  add_outliers(dn, rng, 2);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> n1(H), n2(H), x(B * H), cs(B * D), sn(B * D), kc(B * Hkv * L * D, 0.f), vc(kc.size(), 0.f);
  for (auto* v : {&n1, &n2, &x, &cs, &sn})
    for (auto& e : *v) e = u(rng);
  const auto w = [](const Problem& p) {
    return lk_qweight{p.qw.data(), p.scales.data(), p.zeros.data(), p.N, p.K, p.bits, p.G};
  };
  lk_decoder_layer Lr{};
  Lr.hidden = H; Lr.n_heads = Hq; Lr.n_kv_heads = Hkv; Lr.head_dim = D; Lr.intermediate = I;
  Lr.rms_eps = 1e-5f; Lr.attn_scale = 0.25f; Lr.input_norm = n1.data(); Lr.post_norm = n2.data();
  Lr.qkv = w(qkv); Lr.o = w(o); Lr.gate_up = w(gu); Lr.down = w(dn);
  Lr.down_outliers = lk_outliers{dn.row_ptr.data(), dn.col.data(), dn.val.data(), (int64_t)dn.col.size()};
  Lr.gate_up_bias = gu.bias.data();
  std::vector<uint8_t> mask(B * L, 1);
  mask[1 * L + 0] = 0;  // sequence 1 does not attend to position 0
  std::vector<float> y(B * H, NAN), y2(B * H, NAN);
  for (int64_t pos = 0; pos < 2; ++pos) {
    std::fill(y.begin(), y.end(), NAN);
    CHECK(lk_decoder_layer_step(&Lr, x.data(), B, cs.data(), sn.data(), pos, kc.data(), vc.data(), L, mask.data(), nullptr,
                                y.data(), 2) == LK_OK, "decoder layer step at %lld", (long long)pos);
    for (float v : y) CHECK(std::isfinite(v), "decoder layer output finite (pos %lld)", (long long)pos);
  }
  CHECK(lk_decoder_layer_step(&Lr, x.data(), B, cs.data(), sn.data(), 1, kc.data(), vc.data(), L, mask.data(), nullptr,
                              y2.data(), 1) == LK_OK && y2 == y, "decoder layer step repeatable");
  CHECK(lk_decoder_layer_step(&Lr, x.data(), B, cs.data(), sn.data(), L, kc.data(), vc.data(), L, nullptr, nullptr, y.data(),
                              1) == LK_ERR_INVALID_ARG, "position past the cache refused");
  CHECK(lk_decoder_layer_step(&Lr, nullptr, B, cs.data(), sn.data(), 0, kc.data(), vc.data(), L, nullptr, nullptr, y.data(),
                              1) == LK_ERR_INVALID_ARG, "null x refused");
  // adapters: dense banks on q and down, slot 0 with zero B (adds nothing), slot 1 random; a batch of
  // sequence 0 on slot 1 and sequence 1 on slot 0
  {
    const int64_t r = 3, NQ = Hq * D;
    std::vector<float> aq(2 * r * H), bq(2 * r * NQ, 0.f), ad(2 * r * I), bd(2 * r * H, 0.f);
    for (auto* v : {&aq, &ad})
      for (auto& e : *v) e = u(rng);
    for (int64_t i = r * NQ; i < 2 * r * NQ; ++i) bq[i] = u(rng);
    for (int64_t i = r * H; i < 2 * r * H; ++i) bd[i] = u(rng);
    const int64_t table[2 * LK_SLOT_NUM_COLUMNS] = {LK_SLOT_DENSE, r, 0, 0, 0, 0, 0, LK_SLOT_DENSE, r, r, 0, 0, 0, 0};
    const float scales[2] = {0.5f, 0.5f};
    const auto bank = [&](const std::vector<float>& a, const std::vector<float>& bt) {
      lk_bank b{};
      b.table = table; b.scales = scales; b.num_slots = 2; b.dtype = LK_F32; b.a = a.data(); b.bt = bt.data();
      b.dense_rows = 2 * r;
      return b;
    };
    lk_decoder_layer La = Lr;
    La.adapters[LK_PROJ_Q] = bank(aq, bq);
    La.adapters[LK_PROJ_DOWN] = bank(ad, bd);
    const int64_t seg[6] = {0, 0, 1, 1, 1, 1}, tok[2] = {1, 0};
    const float wts[2] = {1.f, 1.f};
    const lk_lora_batch batch{seg, 2, tok, wts, 2};
    std::vector<float> kc2 = kc, vc2 = vc, ya(B * H, NAN), yb(B * H, NAN);
    CHECK(lk_decoder_layer_step(&Lr, x.data(), B, cs.data(), sn.data(), 1, kc.data(), vc.data(), L, mask.data(),
                                nullptr, yb.data(), 2) == LK_OK, "layer step without adapters");
    CHECK(lk_decoder_layer_step(&La, x.data(), B, cs.data(), sn.data(), 1, kc2.data(), vc2.data(), L, mask.data(),
                                &batch, ya.data(), 2) == LK_OK, "layer step with adapters");
    bool same1 = true, diff0 = false;
    for (int64_t i = 0; i < H; ++i) {
      CHECK(std::isfinite(ya[i]) && std::isfinite(ya[H + i]), "adapter output finite");
      same1 &= std::fabs(ya[H + i] - yb[H + i]) <= 1e-6f * (1.f + std::fabs(yb[H + i]));
      diff0 |= std::fabs(ya[i] - yb[i]) > 1e-3f;
    }
    CHECK(same1 && diff0, "a zero adapter adds nothing, a random one changes its sequence");
    const int64_t far[3] = {7, 0, 2};
    const lk_lora_batch out_of_bank{far, 1, tok, wts, 2};
    std::fill(ya.begin(), ya.end(), NAN);
    const std::vector<float> k_before = kc2;
    CHECK(lk_decoder_layer_step(&La, x.data(), B, cs.data(), sn.data(), 1, kc2.data(), vc2.data(), L, nullptr,
                                &out_of_bank, ya.data(), 1) == LK_ERR_SLOT_RANGE && kc2 == k_before &&
              std::isnan(ya[0]),
          "a slot outside the bank refused before anything is written");
    const int64_t bad_tok[2] = {B, 0};
    const lk_lora_batch past_rows{seg, 2, bad_tok, wts, 2};
    CHECK(lk_decoder_layer_step(&La, x.data(), B, cs.data(), sn.data(), 1, kc2.data(), vc2.data(), L, nullptr,
                                &past_rows, ya.data(), 1) == LK_ERR_INVALID_ARG && kc2 == k_before,
          "a token outside the step's rows refused");
  }
  lk_decoder_layer bad = Lr;
  bad.n_kv_heads = 3;
  CHECK(lk_decoder_layer_step(&bad, x.data(), B, cs.data(), sn.data(), 0, kc.data(), vc.data(), L, nullptr, nullptr, y.data(),
                              1) == LK_ERR_INVALID_ARG, "heads not a multiple of the KV heads refused");
  bad = Lr;
  bad.intermediate = 64;  // the gate/up and down weights do not match
  CHECK(lk_decoder_layer_step(&bad, x.data(), B, cs.data(), sn.data(), 0, kc.data(), vc.data(), L, nullptr, nullptr, y.data(),
                              1) == LK_ERR_INVALID_ARG, "weight shapes checked");
}

// lk_decoder_stack_step (embedding lookup, rotary from inv_freq, two layers, final RMSNorm, head) against the same
// pieces called one by one (lk_dequantize of the token rows, lk_decoder_layer_step, the norm, lk_quant_matmul) at
// two positions, outputs NaN-poisoned; the counts advance once each (also a count two layers share); refusals
// (counts out of step, a token id outside the table) write nothing.
static void check_decoder_stack(std::mt19937& rng) {
  const int64_t H = 64, Hq = 4, Hkv = 2, D = 16, I = 96, B = 2, L = 6, V = 50, NL = 2;
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const auto w = [](const Problem& p) {
    return lk_qweight{p.qw.data(), p.scales.data(), p.zeros.data(), p.N, p.K, p.bits, p.G};
  };
  std::vector<Problem> probs;
  std::vector<std::vector<float>> norms;
  for (int64_t l = 0; l < NL; ++l) {
    probs.push_back(make_problem(rng, 1, (Hq + 2 * Hkv) * D, H, 4, 32));
    probs.push_back(make_problem(rng, 1, H, Hq * D, 3, 32));
    probs.push_back(make_problem(rng, 1, 2 * I, H, 4, 32));
    probs.push_back(make_problem(rng, 1, H, I, 2, 32));
    for (int k = 0; k < 2; ++k) {
      norms.emplace_back(H);
      for (auto& e : norms.back()) e = u(rng);
    }
  }
  std::vector<lk_decoder_layer> layers(NL);
  for (int64_t l = 0; l < NL; ++l) {
    lk_decoder_layer& Lr = layers[l];
    Lr.hidden = H; Lr.n_heads = Hq; Lr.n_kv_heads = Hkv; Lr.head_dim = D; Lr.intermediate = I;
    Lr.rms_eps = 1e-5f; Lr.attn_scale = 0.25f; Lr.input_norm = norms[2 * l].data();
    Lr.post_norm = norms[2 * l + 1].data();
    Lr.qkv = w(probs[4 * l]); Lr.o = w(probs[4 * l + 1]); Lr.gate_up = w(probs[4 * l + 2]);
    Lr.down = w(probs[4 * l + 3]);
  }
  const Problem emb = make_problem(rng, 1, V, H, 8, 32), head = make_problem(rng, 1, V, H, 4, 32);
  const lk_qweight ew = w(emb), hw = w(head);
  std::vector<float> fnorm(H), inv(D / 2);
  for (auto& e : fnorm) e = u(rng);
  for (int64_t i = 0; i < D / 2; ++i) inv[i] = std::pow(10000.f, -2.f * (float)i / (float)D);
  const lk_decoder_layer* lp[NL] = {&layers[0], &layers[1]};
  lk_decoder_stack S{};
  S.layers = lp; S.n_layers = NL; S.embed = &ew; S.rope_inv_freq = inv.data(); S.rope_scaling = 1.f;
  S.final_norm = fnorm.data(); S.final_eps = 1e-6f; S.head = &hw; S.head_bias = head.bias.data();
  const size_t csz = (size_t)(B * Hkv * L * D);
  std::vector<std::vector<float>> kc(NL, std::vector<float>(csz, 0.f)), vc = kc, kr = kc, vr = kc;
  int64_t len[NL] = {0, 0};
  int64_t* lens[NL] = {&len[0], &len[1]};
  float* kcp[NL] = {kc[0].data(), kc[1].data()};
  float* vcp[NL] = {vc[0].data(), vc[1].data()};
  const int64_t ids[B] = {3, V - 1}, positions[B] = {0, 0};
  std::vector<uint8_t> mask(B * L, 1);
  for (int64_t pos = 0; pos < 2; ++pos) {
    const int64_t pp[B] = {pos, positions[1] + pos + 4};  // sequence 1 at another rotary position
    std::vector<float> y((size_t)(B * V), NAN), want((size_t)(B * V), NAN);
    CHECK(lk_decoder_stack_step(&S, B, ids, nullptr, pp, nullptr, nullptr, lens, kcp, vcp, L, mask.data(), nullptr, y.data(),
                                2) == LK_OK, "stack step at %lld", (long long)pos);
    CHECK(len[0] == pos + 1 && len[1] == pos + 1, "stack counts advanced");
    // the same, piece by piece
    std::vector<float> x((size_t)(B * H)), cs((size_t)(B * D)), sn((size_t)(B * D)), h((size_t)(B * H));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t rb = ew.K * ew.bits / 8, ng = ew.K / ew.group_size;
      const lk_qweight row{ew.qweight + ids[b] * rb, ew.scales + ids[b] * ng, ew.zeros + ids[b] * ng, 1, H, ew.bits,
                           ew.group_size};
      CHECK(lk_dequantize(&row, x.data() + b * H, 1) == LK_OK, "embedding row");
      for (int64_t i = 0; i < D / 2; ++i) {
        const float f = (float)pp[b] * inv[i];
        cs[b * D + i] = cs[b * D + i + D / 2] = std::cos(f);
        sn[b * D + i] = sn[b * D + i + D / 2] = std::sin(f);
      }
    }
    for (int64_t l = 0; l < NL; ++l) {
      CHECK(lk_decoder_layer_step(&layers[l], x.data(), B, cs.data(), sn.data(), pos, kr[l].data(), vr[l].data(), L,
                                  mask.data(), nullptr, h.data(), 2) == LK_OK, "layer %lld", (long long)l);
      x = h;
    }
    for (int64_t b = 0; b < B; ++b) {
      double ss = 0;
      for (int64_t i = 0; i < H; ++i) ss += (double)x[b * H + i] * x[b * H + i];
      const float r = 1.f / std::sqrt((float)(ss / (double)H) + 1e-6f);
      for (int64_t i = 0; i < H; ++i) h[b * H + i] = fnorm[i] * (x[b * H + i] * r);
    }
    CHECK(lk_quant_matmul(h.data(), LK_F32, B, &hw, head.bias.data(), want.data(), 2) == LK_OK, "head");
    float mx = 0.f, err = 0.f;
    for (size_t i = 0; i < y.size(); ++i) {
      mx = std::max(mx, std::fabs(want[i]));
      err = std::max(err, std::fabs(y[i] - want[i]));
    }
    CHECK(err <= 1e-5f * std::max(mx, 1.f), "stack step equals its pieces (pos %lld: %g of %g)", (long long)pos,
          (double)err, (double)mx);
    CHECK(kc[1] == kr[1] && vc[1] == vr[1], "stack cache writes equal the layer's");
  }
  // refusals: nothing written
  std::vector<float> y((size_t)(B * V), NAN);
  const std::vector<float> k0 = kc[0];
  len[1] = 5;
  CHECK(lk_decoder_stack_step(&S, B, ids, nullptr, nullptr, nullptr, nullptr, lens, kcp, vcp, L, nullptr, nullptr, y.data(),
                              1) == LK_ERR_INVALID_ARG && len[0] == 2 && len[1] == 5 && kc[0] == k0,
        "counts out of step refused, nothing written");
  len[1] = 2;
  const int64_t bad[B] = {3, V};
  CHECK(lk_decoder_stack_step(&S, B, bad, nullptr, nullptr, nullptr, nullptr, lens, kcp, vcp, L, nullptr, nullptr, y.data(),
                              1) == LK_ERR_INDEX && len[0] == 2 && kc[0] == k0 && std::isnan(y[0]),
        "token id outside the table refused");
  int64_t shared = 2;
  int64_t* sl[NL] = {&shared, &shared};
  CHECK(lk_decoder_stack_step(&S, B, ids, nullptr, nullptr, nullptr, nullptr, sl, kcp, vcp, L, nullptr, nullptr, y.data(),
                              1) == LK_OK && shared == 3, "a count two layers share advances once");
  lk_decoder_stack S2 = S;
  S2.rope_inv_freq = nullptr;  // then cos / sin must be given
  CHECK(lk_decoder_stack_step(&S2, B, ids, nullptr, nullptr, nullptr, nullptr, lens, kcp, vcp, L, nullptr, nullptr, y.data(),
                              1) == LK_ERR_INVALID_ARG, "missing cos / sin refused");
}

static void check_grad_and_qalora(std::mt19937& rng) {
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int pattern : {0, 3}) {
    Problem p = make_problem(rng, 1, 131, 192, 3, 64);  // rows cross the 128-row tile
    add_outliers(p, rng, pattern);
    const lk_qweight w{p.qw.data(), p.scales.data(), p.zeros.data(), p.N, p.K, p.bits, p.G};
    const lk_outliers o{p.row_ptr.data(), p.col.data(), p.val.data(), (int64_t)p.col.size()};
    std::vector<float> wd((size_t)(p.N * p.K));
    CHECK(lk_dequantize(&w, wd.data(), 2) == LK_OK, "dequantize");
    if (pattern)
      for (int64_t n = 0; n < p.N; ++n)
        for (int32_t j = p.row_ptr[n]; j < p.row_ptr[n + 1]; ++j)
          wd[(size_t)(n * p.K + p.col[j])] += lk::half_to_float(p.val[j]);
    for (int64_t M : {1, 2, 5}) {
      std::vector<float> dy((size_t)(M * p.N)), dx((size_t)(M * p.K), NAN);
      for (float& v : dy) v = nd(rng);
      CHECK(lk_quant_matmul_grad_input(dy.data(), LK_F32, M, &w, pattern ? &o : nullptr, dx.data(), 2) == LK_OK,
            "grad_input");
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < p.K; ++k) {
          double e = 0, a = 0;
          for (int64_t n = 0; n < p.N; ++n) {
            e += (double)dy[(size_t)(m * p.N + n)] * wd[(size_t)(n * p.K + k)];
            a += std::fabs((double)dy[(size_t)(m * p.N + n)] * wd[(size_t)(n * p.K + k)]);
          }
          const float got = dx[(size_t)(m * p.K + k)];
          CHECK(std::isfinite(got) && std::fabs(got - e) <= 200 * 6e-8 * a + 1e-6,
                "grad_input isa %d pattern %d M=%lld: %g vs %g", (int)lk_active_isa(), pattern, (long long)M, got, e);
        }
    }
    if (pattern) {  // a column out of range is refused, never read or written
      std::vector<uint16_t> bad = p.col;
      bad[0] = (uint16_t)p.K;
      const lk_outliers ob{p.row_ptr.data(), bad.data(), p.val.data(), (int64_t)bad.size()};
      std::vector<float> dy((size_t)p.N, 1.f), dx((size_t)p.K);
      CHECK(lk_quant_matmul_grad_input(dy.data(), LK_F32, 1, &w, &ob, dx.data(), 2) == LK_ERR_INVALID_ARG,
            "bad CSR refused");
    }
  }
  // QA-LoRA fused = quant_matmul + scale/G * (xsum A^T) B^T. xsum (the pooled int8 activations) is what
  // quant_matmul gives for a weight of scale 1, codes 0 and zero -1 in one group: w = 1 there.
  Problem p = make_problem(rng, 3, 40, 128, 4, 32);
  const int64_t ng = p.K / p.G, r = 5;
  const lk_qweight w{p.qw.data(), p.scales.data(), p.zeros.data(), p.N, p.K, p.bits, p.G};
  std::vector<float> a((size_t)(r * ng)), bt((size_t)(r * p.N));
  for (float& v : a) v = nd(rng);
  for (float& v : bt) v = 0.1f * nd(rng);
  const lk_qalora q{a.data(), bt.data(), r, 1.5f};
  std::vector<uint8_t> ones_q((size_t)(ng * lk::row_bytes(p.K, 4)), 0);
  std::vector<uint16_t> ones_s((size_t)(ng * ng), 0), ones_z((size_t)(ng * ng), 0);
  for (int64_t g = 0; g < ng; ++g) {  // row g: 1 on group g only
    ones_s[(size_t)(g * ng + g)] = lk::float_to_half(1.f);
    ones_z[(size_t)(g * ng + g)] = lk::float_to_half(-1.f);
  }
  const lk_qweight ones{ones_q.data(), ones_s.data(), ones_z.data(), ng, p.K, 4, p.G};
  std::vector<float> base((size_t)(p.M * p.N)), xsum((size_t)(p.M * ng)), y((size_t)(p.M * p.N), NAN);
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, p.M, &w, p.bias.data(), base.data(), 2) == LK_OK, "base");
  CHECK(lk_quant_matmul(p.x.data(), LK_F32, p.M, &ones, nullptr, xsum.data(), 2) == LK_OK, "xsum");
  CHECK(lk_quant_matmul_qalora(p.x.data(), LK_F32, p.M, &w, p.bias.data(), &q, y.data(), 2) == LK_OK, "qalora");
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = 0; n < p.N; ++n) {
      double e = base[(size_t)(m * p.N + n)], mag = std::fabs(e);
      for (int64_t j = 0; j < r; ++j) {
        double t = 0;
        for (int64_t g = 0; g < ng; ++g) t += (double)a[(size_t)(j * ng + g)] * xsum[(size_t)(m * ng + g)];
        e += 1.5 / p.G * t * bt[(size_t)(j * p.N + n)];
        mag += std::fabs(1.5 / p.G * t * bt[(size_t)(j * p.N + n)]);
      }
      const float got = y[(size_t)(m * p.N + n)];
      CHECK(std::isfinite(got) && std::fabs(got - e) <= 1e-5 * (mag + 1.0), "qalora isa %d: %g vs %g",
            (int)lk_active_isa(), got, e);
    }
  const lk_qalora bad{a.data(), nullptr, r, 1.5f};
  CHECK(lk_quant_matmul_qalora(p.x.data(), LK_F32, p.M, &w, nullptr, &bad, y.data(), 2) == LK_ERR_INVALID_ARG,
        "qalora without B refused");
}

// The native decode step's SiLU gating and attention (decode_math.h) of one ISA table against double precision:
// exp within a few ulp over the normal range (0 below it, Inf above, NaN for NaN); silu(g) u; one head's
// softmax(scale q.k) . v with masked positions, a NaN score (NaN output) and every position masked (zeros).
static void check_decode_math(const char* name, const lk::CpuKernels& kern, std::mt19937& rng) {
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  // exp through silu: silu(g) * 1 = g / (1 + exp(-g)); sweep -g over [-90, 90] and the special values
  std::vector<float> g, u;
  for (float v = -90.f; v <= 90.f; v += 0.01173f) g.push_back(v);
  for (float v : {0.f, -0.f, 1e-30f, -1e-30f, 87.3f, -87.3f, 88.7f, -88.7f, 89.f, -89.f, 1e4f, -1e4f, INFINITY, -INFINITY,
                  NAN})
    g.push_back(v);
  for (size_t i = 0; i < 999; ++i) g.push_back(U(rng) * 20.f);
  u.assign(g.size(), 1.f);
  for (size_t i = 0; i < u.size(); i += 3) u[i] = U(rng);
  std::vector<float> out = g;
  kern.silu_mul(out.data(), u.data(), (int64_t)out.size());
  int bad = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    // (torch's silu: inf at +inf, NaN at -inf, -inf / (1 + inf), as the formula in fp32 gives)
    const double x = g[i], want = std::isinf(x) ? (x > 0 ? (double)u[i] * INFINITY : NAN) : x / (1.0 + std::exp(-x)) * u[i];
    const double got = out[i];
    if (std::isnan(x) || (std::isinf(x) && x < 0)) {
      bad += !std::isnan(got);
    } else if (std::isinf(x) && x > 0) {
      bad += !(got == want || (u[i] == 0.f && std::isnan(got)));
    } else {
      // exp's error (a few ulp) shrinks by the derivative of 1 / (1 + e); the division and product round twice.
      // Below g = -88.7 exp(-g) overflows and the result is 0 against < 1e-37 (as x / (1 + exp(-x)) in torch)
      const bool off = !(std::fabs(got - want) <= 6e-7 * std::fabs(want) + 1e-36);
      if (off && bad < 5) std::printf("  %s silu(%.9g) * %g = %.9g, want %.9g\n", name, x, u[i], got, want);
      bad += off;
    }
  }
  CHECK(bad == 0, "%s silu_mul: %d of %zu values off", name, bad, g.size());
  for (float x : {0.f, 0.1f, 0.5f, 1.f, 3.f, 10.f, 50.f, 88.f, 88.5f, 88.72f}) {  // where 1 + exp(x) keeps exp's digits
    float gg[1] = {-x}, uu[1] = {1.f};  // silu(-x) = -x / (1 + exp(x)): exp(x) recovered from it
    kern.silu_mul(gg, uu, 1);
    const double e = x == 0.f ? 1.0 : (double)-x / gg[0] - 1.0;
    CHECK(x == 0.f || std::fabs(e - std::exp((double)x)) <= 1e-6 * std::exp((double)x) + 1e-30,
          "%s exp(%g): %g against %g", name, x, e, std::exp((double)x));
  }
  // exp of negative arguments, exactly, through attention: D = 1, keys {0, -t}, values {0, 1}, q = 1, scale 1
  // give o = e / (1 + e) with e = exp(-t), so e = o / (1 - o) keeps exp's precision (silu hides it there)
  for (float t = 0.25f; t < 87.f; t += 0.37f) {
    const float q1[1] = {1.f}, k2[2] = {0.f, -t}, v2[2] = {0.f, 1.f};
    float p2[2], o1[1] = {NAN};
    kern.attend(q1, k2, v2, nullptr, 2, 1, 1.f, p2, o1);
    const double e = (double)o1[0] / (1.0 - (double)o1[0]), want = std::exp(-(double)t);
    CHECK(std::fabs(e - want) <= 5e-7 * want, "%s exp(%g): %g against %g", name, -t, e, want);
  }
  // attention: random heads, D in {64, 37}, npos in {1, 5, 40, 203}, some masked positions
  for (int64_t D : {64, 37})
    for (int64_t npos : {1, 5, 40, 203}) {
      std::vector<float> q(D), kc(npos * D), vc(npos * D), p(npos), o(D, NAN);
      std::vector<uint8_t> mk(npos, 1);
      for (auto& v : q) v = U(rng) * 3.f;
      for (auto& v : kc) v = U(rng) * 3.f;
      for (auto& v : vc) v = U(rng);
      for (int64_t j = 1; j < npos; j += 3) mk[j] = 0;
      const float scale = 0.125f;
      kern.attend(q.data(), kc.data(), vc.data(), mk.data(), npos, D, scale, p.data(), o.data());
      std::vector<double> sc(npos), w(npos);
      double mx = -INFINITY, sum = 0;
      for (int64_t j = 0; j < npos; ++j) {
        double d = 0;
        for (int64_t k = 0; k < D; ++k) d += (double)q[k] * kc[j * D + k];
        sc[j] = mk[j] ? d * scale : -INFINITY;
        mx = std::max(mx, sc[j]);
      }
      for (int64_t j = 0; j < npos; ++j) sum += (w[j] = mk[j] ? std::exp(sc[j] - mx) : 0.0);
      double worst = 0;
      for (int64_t k = 0; k < D; ++k) {
        double want = 0, mag = 0;
        for (int64_t j = 0; j < npos; ++j) {
          want += w[j] / sum * vc[j * D + k];
          mag += w[j] / sum * std::fabs(vc[j * D + k]);
        }
        worst = std::max(worst, std::fabs(o[k] - want) / (1e-5 * (mag + 1e-3)));
      }
      CHECK(worst <= 1.0, "%s attend D=%ld npos=%ld: error %g x its bound", name, (long)D, (long)npos, worst);
      std::vector<uint8_t> none(npos, 0);
      kern.attend(q.data(), kc.data(), vc.data(), none.data(), npos, D, scale, p.data(), o.data());
      CHECK(std::all_of(o.begin(), o.end(), [](float v) { return v == 0.f; }), "%s attend: all masked -> zeros", name);
      q[0] = NAN;
      kern.attend(q.data(), kc.data(), vc.data(), nullptr, npos, D, scale, p.data(), o.data());
      CHECK(std::all_of(o.begin(), o.end(), [](float v) { return std::isnan(v); }), "%s attend: NaN score -> NaN", name);
    }
}

int main() {
  // Fresh inputs every run; LORAKERN_TEST_SEED reproduces one.
  const char* env_seed = std::getenv("LORAKERN_TEST_SEED");
  const unsigned seed = env_seed ? (unsigned)std::strtoul(env_seed, nullptr, 10) : std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  for (lk_isa isa : {LK_ISA_GENERIC, LK_ISA_AVX2, LK_ISA_AVX512, LK_ISA_AMX}) {  // every table this CPU can run
    const lk::CpuKernels& kern = lk::cpu_kernels(isa);
    CHECK(kern.qmm_rows && kern.qmm_gemm && kern.quantize_activations && kern.lora_expand && kern.dense_shrink &&
              kern.multi_expand && kern.silu_mul && kern.attend, "kernel table filled");
    if (isa > lk_detected_isa()) {  // (a build without the AMX kernels hands out the AVX-512 table for amx)
      std::printf("%s (native): skipped (CPU, OS or build lacks it)\n", lk_isa_name(isa));
      continue;
    }
    CHECK(kern.isa == isa, "kernel table of its own ISA");
    check_rows_fn(lk_isa_name(isa), kern.qmm_rows, rng);
    check_rows_fn((std::string(lk_isa_name(isa)) + " gemm").c_str(), kern.qmm_gemm, rng, true);
    check_expand_fn(lk_isa_name(isa), kern.lora_expand, rng);
    if (isa != LK_ISA_GENERIC) check_multi_pieces(lk_isa_name(isa), kern.dense_shrink, kern.multi_expand, rng);
    check_decode_math(lk_isa_name(isa), kern, rng);
  }
#ifdef LORAKERN_HAVE_SIMDE
  check_rows_fn("avx512 (SIMDe emulation)", lk::qmm_rows_avx512_simde, rng);
#endif
#ifdef LORAKERN_HAVE_SIMDE
  if (lk_detected_isa() >= LK_ISA_AVX2)  // decode (M <= 2) expands 3-bit parts and partial groups through the AVX2 decoder
    check_expand_fn("avx512 (SIMDe emulation)", lk::lora_expand_avx512_simde, rng);
#endif
#ifdef LORAKERN_HAVE_SIMDE
  if (lk_detected_isa() >= LK_ISA_AVX2)  // the SIMDe build's compressed expand calls the AVX2 decoder (3-bit, partial groups)
    check_multi_pieces("avx512 (SIMDe emulation)", lk::dense_shrink_avx512_simde, lk::multi_expand_avx512_simde, rng);
#endif
  if (lk_detected_isa() >= LK_ISA_AVX2) check_act_quant("avx2", lk::quantize_activations_avx2, rng);
  if (lk_detected_isa() >= LK_ISA_AVX512) check_act_quant("avx512", lk::quantize_activations_avx512, rng);
  check_c_abi(rng);
  check_bank_resolve();
  check_route_top_k(rng);
  check_lora_direct_expand(rng);
  check_decoder_layer(rng);
  check_decoder_stack(rng);
  for (lk_isa isa : {LK_ISA_GENERIC, LK_ISA_AVX2, LK_ISA_AVX512, LK_ISA_AMX})
    if (lk_set_isa(isa) == LK_OK) {
      check_lora_abi(rng);
      check_multi_lora_abi(rng);
      check_grad_and_qalora(rng);
    }
  if (g_failures) {
    std::printf("%d failures\n", g_failures);
    return 1;
  }
  std::printf("all C++ kernel tests passed\n");
  return 0;
}
