// Internal definitions shared by the CPU kernels. No torch, no ISA flags here:
// this header is included by sources compiled with different -m options.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace lk {

// The inline helpers live in an anonymous namespace: this header is compiled into
// translation units with different ISA flags, and one shared (ODR-merged) copy
// could carry AVX-512 instructions into the generic path.
namespace {

// IEEE half <-> float in portable code (the SIMD paths use F16C instead).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3FFu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7FFFFFFFu;
  if (absx >= 0x7F800000u) return (uint16_t)(sign | 0x7C00u | (absx > 0x7F800000u ? 0x200u : 0));
  if (absx >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // overflow -> inf
  if (absx < 0x38800000u) {                                    // subnormal or zero
    if (absx < 0x33000000u) return (uint16_t)sign;
    const uint32_t e = absx >> 23;
    uint32_t m = (absx & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias exponent
  const uint32_t rem = r & 0x1FFFu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1))) ++r;
  return (uint16_t)(sign | r);
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);
  const uint32_t lsb = (x >> 16) & 1u;
  x += 0x7FFFu + lsb;
  return (uint16_t)(x >> 16);
}

// Bytes of one packed row / one packed group in the canonical layout.
inline int64_t row_bytes(int64_t K, int bits) { return K * bits / 8; }
inline int group_bytes(int G, int bits) { return G * bits / 8; }

// Scalar decode of code i (0 <= i < G) of one packed group (docs/formats.md):
// bits in {2, 4, 8}: P = 8/bits codes per byte, W = G/P; byte j holds code s*W + j
//   in bits [s*bits, (s+1)*bits).
// bits == 3: the low 2 bits as a 2-bit group (G/4 bytes), then bit 2 as one bit
//   plane (G/8 bytes; bit i%8 of byte i/8 belongs to code i).
// bits == 1: one bit plane.
inline int decode_code(const uint8_t* gp, int G, int bits, int i) {
  switch (bits) {
    case 8:
      return gp[i];
    case 4:
    case 2: {
      const int W = G * bits / 8;
      return (gp[i % W] >> ((i / W) * bits)) & ((1 << bits) - 1);
    }
    case 3: {
      const int W = G / 4;
      const int lo = (gp[i % W] >> ((i / W) * 2)) & 3;
      return lo | (((gp[W + (i >> 3)] >> (i & 7)) & 1) << 2);
    }
    default:
      return (gp[i >> 3] >> (i & 7)) & 1;
  }
}

// Activations are quantized to int8 in blocks of act_block(G) values along K:
// 64 (or the group, if smaller). Blocks of 128 lose accuracy on outlier-heavy
// inputs (SmolLM2's down_proj: +2.5% WikiText-2 perplexity at 4 bits); 64 is
// indistinguishable from fp32 activations there.
inline int act_block(int G) { return G < 64 ? G : 64; }

}  // namespace

// One quant_matmul problem after the activations were quantized.
struct QmmProblem {
  int64_t M, N, K;
  int bits, G;
  const uint8_t* qw;      // [N, row_bytes]
  const uint16_t* scales;  // fp16 [N, K/G]
  const uint16_t* zeros;   // fp16 [N, K/G]
  const int8_t* xq;        // [M, K] int8 activations
  const float* xs;         // [M, K/B] activation scale per block, B = act_block(G)
  const float* xsum;       // [M, K/G] sum over the group of xs_b * xq (the dequantized activations)
  const float* bias;       // [N] or null
  float* y;                // [M, N] fp32 result
  // Optional sparse outliers (gwq_matmul), CSR over the N rows; row_ptr null if none.
  // Their products use the unquantized activations xt (fp32, [K, M]: column k of x).
  const int32_t* row_ptr = nullptr;  // [N + 1]
  const uint16_t* col = nullptr;     // [nnz], each < K
  const uint16_t* val = nullptr;     // fp16 [nnz]
  int64_t nnz = 0;
  const float* xt = nullptr;         // [K, M]
  std::atomic<int>* bad_csr = nullptr;  // set to 1 if a row pointer or column is out of range
};

// Each computes rows [n0, n1) of y for every m. Same math, different ISA.
void qmm_rows_generic(const QmmProblem& p, int64_t n0, int64_t n1);
void qmm_rows_avx2(const QmmProblem& p, int64_t n0, int64_t n1);
void qmm_rows_avx512(const QmmProblem& p, int64_t n0, int64_t n1);
// The blocked GEMMs (quant_gemm_avx2.cpp; quant_gemm_amx.cpp below): the same contract, for many activation rows
// (M >= kGemmMinRows).
void qmm_gemm_avx2(const QmmProblem& p, int64_t n0, int64_t n1);
// The same on AMX-INT8 tiles (quant_gemm_amx.cpp; built when the compiler knows AMX: LORAKERN_HAVE_AMX).
void qmm_gemm_amx(const QmmProblem& p, int64_t n0, int64_t n1);
// A per-thread block of at least `bytes` bytes, kept between calls (contents undefined; 64-byte aligned data is not
// promised), one per slot < kScratchSlots. Defined in kernels.cpp, compiled without ISA flags: the kernels' own
// files must not instantiate std::vector members, whose shared (weak, ODR-merged) copies could carry their AVX-512
// instructions into generic code. The blocked GEMMs keep their panels here (malloc would map and unmap a 128-256 KB
// chunk on every call); slots 0-2: panel codes, scales, scaled zeros; 3: the AMX GEMM's padded last row tile;
// kScratchDecodeStep: the native decode step's work buffers (decoder_layer.cpp); kScratchRowScales: the row kernels'
// converted scales (qmm_rows_simd.h: called once per small adapter part, where two mallocs a call showed);
// kScratchExpandTile: the multi-adapter expand's fp32 tile of B^T (multi_lora_simd.h, once per segment and slice);
// kScratchOutlierRun: the running sum of a chunk's outlier products (outliers.h: decode_outlier_sums).
constexpr int kScratchDecodeStep = 4, kScratchRowScales = 5, kScratchExpandTile = 6, kScratchOutlierRun = 7,
              kScratchSlots = 8;
uint8_t* thread_scratch(int slot, size_t bytes);
constexpr int64_t kGemmMinRows = 4;  // measured: rows and GEMM cost the same at M = 4 (SmolLM2 shapes, AVX2)
constexpr int64_t kGemmMinRows8 = 16;  // 8-bit panels cost twice the packing: measured break-even ~16 rows
// Whether a quant_matmul of M rows at this many bits takes the GEMM (every caller of the base pass uses this,
// so that the fused ops equal the separate ones bit for bit).
inline bool use_gemm(int64_t M, int bits) { return M >= (bits == 8 ? kGemmMinRows8 : kGemmMinRows); }

// The blocks every activation quantizer treats alike, in this order: one holding a NaN or Inf (codes 0, its scale
// and its group's sum NaN: NaN propagates; a NaN is never cast to int) and one whose max |x| is 0 or so small
// (below ~3.7e-37) that 127 / max|x| overflows to Inf (codes 0, scale 0: such values are zero to any fp32
// product; the Inf would turn a 0 into NaN = 0 * Inf, which the SIMD clamps let through). Returns whether the block
// was one of them (then it is done). inv: the block's 127 / max|x|, which the caller then multiplies by.
inline bool act_block_special(bool finite, float inv, int8_t* qp, int B, float* xs, float* gsum) {
  if (finite && std::isfinite(inv)) return false;
  std::memset(qp, 0, (size_t)B);
  *xs = finite ? 0.f : NAN;
  if (!finite) *gsum = NAN;
  return true;
}

// Quantize activations: x (fp32) [M, K] -> xq, xs (per block), xsum (per group).
// With xhat = xs_b * xq, the kernels compute y = xhat @ W^T (+ bias) exactly up
// to fp32 rounding.
void quantize_activations(const float* x, int64_t M, int64_t K, int G, int8_t* xq, float* xs,
                          float* xsum);
// The same with AVX2 and with AVX-512 (bitwise the same results; each ISA's kernel table uses its own).
void quantize_activations_avx2(const float* x, int64_t M, int64_t K, int G, int8_t* xq, float* xs,
                               float* xsum);
void quantize_activations_avx512(const float* x, int64_t M, int64_t K, int G, int8_t* xq, float* xs,
                                 float* xsum);

}  // namespace lk
