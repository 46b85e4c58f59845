// Blocked low-bit GEMM on AMX-INT8 tiles (Sapphire Rapids and later) for many activation rows: prefill, batched
// decode, training forwards. Same math as the other kernels: y = sum_b s_g(b) xs_b (codes . xq)_b
// - sum_g s_g z_g xsum_g (+ bias), int8 activations; the integer dot products are exact, only the order of the
// fp32 additions differs from the AVX2 GEMM (quant_gemm_avx2.cpp).
//
// One output tile is 16 activation rows x 16 weight rows. Per activation block b (B = 32 or 64 values of K, the
// activation quantizer's block, so one scale xs per row and block): TDPBSUD multiplies the A tile (16 rows x B
// int8 activations, straight from xq) by the B tile (B / 4 rows of 4 codes x 16 weight rows, unsigned: a panel of
// gemm_panel.h, NR = 16) into a 16 x 16 int32 tile; that is stored (1 KB, L1) and scaled into 16 fp32 zmm
// accumulators: acc[i] += float(C[i]) * (s_g * xs[i, b]). At the end of each group, acc[i] -= s_g z_g xsum[i, g].
// Blocks alternate between two sets of A / B / C tiles (tiles are not renamed), pipelined as in tile_dot. Codes are
// unsigned (1-8 bits), so 8-bit codes need no centring (the AVX2 GEMM centres them for vpmaddubsw).
//
// Rows: the last partial 16-row tile reads a zero-padded copy of its activations. Columns: a partial panel has zero
// codes and scales, and its tile is stored masked. Tiles need the process's permission (Linux arch_prctl
// ARCH_REQ_XCOMP_PERM, asked once in cpu_features.cpp) and a per-thread configuration, loaded on every call and
// released before returning.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common.h"
#include "gemm_panel.h"
#include "outliers.h"

namespace lk {
namespace {

constexpr int NR = 16;                        // weight rows per panel / tile columns (int32)
constexpr int MR = 16;                        // activation rows per tile
constexpr int64_t kChunkBytes = 256 * 1024;  // packed codes per chunk of panels (L2)
constexpr int64_t kAmxMinRows = 8;           // fewer rows: the AVX2 GEMM (qmm_gemm_amx)

struct alignas(64) TileConfig {  // the LDTILECFG memory operand, palette 1
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0, 1: C (16 x 16 int32); 2, 3: A (16 rows x B bytes); 4, 5: B (B / 4 rows x 64 bytes).
void configure_tiles(int B) {
  TileConfig c;
  for (int t = 0; t < 2; ++t) {
    c.rows[t] = 16, c.colsb[t] = 64;
    c.rows[2 + t] = 16, c.colsb[2 + t] = (uint16_t)B;
    c.rows[4 + t] = (uint8_t)(B / 4), c.colsb[4 + t] = 64;
  }
  _tile_loadconfig(&c);
}

// Block b's 16 x 16 int32 dot products into tile set 0 (C tile 0, A tile 2, B tile 4) or 1 (tiles 1, 3, 5):
// activation rows a (stride lda) from k = b B on, and the panel's codes of that block. (GCC's tile intrinsics
// paste their tile numbers into the assembly text: they must be literals, hence one function per set.)
template <int B>
inline void issue_block0(const int8_t* a, int64_t lda, const uint8_t* pc, int64_t b) {
  _tile_loadd(2, a + b * B, lda);
  _tile_loadd(4, pc + b * (B / 4) * 64, 64);
  _tile_zero(0);
  _tile_dpbsud(0, 2, 4);
}
template <int B>
inline void issue_block1(const int8_t* a, int64_t lda, const uint8_t* pc, int64_t b) {
  _tile_loadd(3, a + b * B, lda);
  _tile_loadd(5, pc + b * (B / 4) * 64, 64);
  _tile_zero(1);
  _tile_dpbsud(1, 3, 5);
}

// One 16 x 16 output tile over all of K: activation rows a (16 rows, stride K) with their block scales xs (stride
// nb) and group sums xsum (stride ng); the panel's codes pc and scales ps / pz. Rows i < R of the result (+ bias
// bv) go to y (row stride ldy), the columns in mask.
//
// Pipeline: blocks alternate between tile sets 0 and 1. Block b + 1's loads and product are issued before block b's
// tile is stored, and block b's products are read back (to be scaled) only after block b + 1's tile was stored in
// turn: a tile store does not forward to the vector loads behind it, which would otherwise wait for it.
template <int G>
void tile_dot(int64_t K, const int8_t* a, const float* xs, const float* xsum, const uint8_t* pc, const float* ps,
              const float* pz, int R, __mmask16 mask, __m512 bv, float* y, int64_t ldy) {
  constexpr int B = G < 64 ? G : 64, BPG = G / B;
  const int64_t nb = K / B, ng = K / G;
  alignas(64) int32_t C0[MR * NR], C1[MR * NR];
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  // acc[i] += float(C[i]) * s_g * xs[i, e] for block e, then the zero point at the end of its group.
  auto scale = [&](const int32_t* C, int64_t e) {
    const int64_t g = e / BPG;
    const __m512 sv = _mm512_loadu_ps(ps + NR * g);
    for (int i = 0; i < MR; ++i)
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(C + 16 * i)),
                               _mm512_mul_ps(sv, _mm512_set1_ps(xs[i * nb + e])), acc[i]);
    if ((e + 1) % BPG == 0) {
      const __m512 zv = _mm512_loadu_ps(pz + NR * g);
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_fnmadd_ps(zv, _mm512_set1_ps(xsum[i * ng + g]), acc[i]);
    }
  };
  issue_block0<B>(a, K, pc, 0);
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {  // block b in set 0, b + 1 in set 1
    issue_block1<B>(a, K, pc, b + 1);
    _tile_stored(0, C0, 64);
    if (b > 0) scale(C1, b - 1);
    if (b + 2 < nb) issue_block0<B>(a, K, pc, b + 2);
    _tile_stored(1, C1, 64);
    scale(C0, b);
  }
  if (b < nb) {  // an odd count: the last block is in set 0
    _tile_stored(0, C0, 64);
    if (b > 0) scale(C1, b - 1);
    scale(C0, b);
  } else {
    scale(C1, nb - 1);
  }
  for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(y + i * ldy, mask, _mm512_add_ps(acc[i], bv));
}

template <int BITS, int G>
void gemm_rows(const QmmProblem& p, int64_t n0, int64_t n1) {
  constexpr int B = G < 64 ? G : 64;
  const int64_t K = p.K, ng = K / G, nb = K / B;
  // The last partial tile of rows: its activations, block scales and group sums zero-padded to 16 rows (A tiles
  // always load 16), in one scratch block.
  const int64_t mfull = p.M / MR * MR, mtail = p.M - mfull;
  int8_t* ta = nullptr;
  float *txs = nullptr, *txsum = nullptr;
  if (mtail) {
    const size_t tail_floats = (size_t)(MR * (nb + ng)), bytes = tail_floats * sizeof(float) + (size_t)(MR * K);
    uint8_t* t = thread_scratch(3, bytes);
    std::memset(t, 0, bytes);
    txs = reinterpret_cast<float*>(t);
    txsum = txs + MR * nb;
    ta = reinterpret_cast<int8_t*>(t + tail_floats * sizeof(float));
    std::memcpy(ta, p.xq + mfull * K, (size_t)(mtail * K));
    std::memcpy(txs, p.xs + mfull * nb, (size_t)(mtail * nb) * sizeof(float));
    std::memcpy(txsum, p.xsum + mfull * ng, (size_t)(mtail * ng) * sizeof(float));
  }
  PanelChunks<BITS, G, NR> pan(p, n0, n1, kChunkBytes);
  configure_tiles(B);
  while (pan.next()) {
    for (int64_t m0 = 0; m0 < p.M; m0 += MR) {
      const bool tail = m0 == mfull;
      const int8_t* a = tail ? ta : p.xq + m0 * K;
      const float* xs = tail ? txs : p.xs + m0 * nb;
      const float* xsum = tail ? txsum : p.xsum + m0 * ng;
      const int R = (int)std::min<int64_t>(MR, p.M - m0);
      for (int64_t pi = pan.c0; pi < pan.c1; ++pi) {
        const int64_t n = pan.row(pi);
        const __mmask16 mask = (__mmask16)((1u << pan.rows(pi)) - 1);
        const __m512 bv = p.bias ? _mm512_maskz_loadu_ps(mask, p.bias + n) : _mm512_setzero_ps();
        tile_dot<G>(K, a, xs, xsum, pan.codes_of(pi), pan.scales_of(pi), pan.szeros_of(pi), R, mask, bv,
                    p.y + m0 * p.N + n, p.N);
      }
    }
  }
  _tile_release();
  if (p.row_ptr) slab_outliers(p, n0, n1, [](uint16_t h) { return _cvtsh_ss(h); });
}

}  // namespace

// Rows [n0, n1) of y for every m (the contract of qmm_rows). Fewer than kAmxMinRows rows take the AVX2 GEMM: a
// 16-row tile mostly of padding costs more than it saves (measured on SmolLM2's shapes, 4-bit: 0.8x at M = 4,
// 1.0-1.2x at 8, 1.4-1.6x at 16, 2x at 64).
void qmm_gemm_amx(const QmmProblem& p, int64_t n0, int64_t n1) {
  if (p.M < kAmxMinRows) return qmm_gemm_avx2(p, n0, n1);
  with_format(p, [&](auto bits, auto g) { gemm_rows<decltype(bits)::value, decltype(g)::value>(p, n0, n1); });
}

}  // namespace lk
