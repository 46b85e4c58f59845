// Weight panels of the blocked low-bit GEMMs (quant_gemm_avx2.cpp, quant_gemm_amx.cpp): the codes of NR weight
// rows (8 or 16) unpacked once into bytes, interleaved 4 codes at a time:
//   panel byte (k / 4) * (4 NR) + 4 j + k % 4 = code k of weight row j (j < NR),
// so that one load of 4 NR bytes holds 4 consecutive codes of each row: one 32-bit lane per weight row for
// vpmaddubsw (AVX2, NR = 8), and exactly AMX's "VNNI" layout of a B tile (NR = 16: tile row = 4 codes of 16
// weight rows). Compiled with the including file's flags (anonymous namespace), like unpack_avx2.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "unpack_avx2.h"

namespace lk {
namespace {

// r[s] <- dword s of every input row (8 x 8 transpose of 32-bit elements).
inline void transpose8_epi32(__m256i* r) {
  const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// Weight rows [n, n + nr) (nr <= NR) as one panel: codes (NR K bytes, layout above), sf[NR g + j] = s and
// szf[NR g + j] = s z of row n + j in group g. Rows past nr are zero codes with zero scales.
// CENTRED (8-bit codes only, for vpmaddubsw, which would saturate on u8 x s8 pairs): q' = q - 128 as s8, and
// |q'| as u8 (<= 128) NR K bytes further on (2 NR K bytes in all); the 128 moves into the zero point (z - 128).
template <int BITS, int G, int NR, bool CENTRED = false>
void pack_panel(const QmmProblem& p, int64_t n, int nr, uint8_t* codes, float* sf, float* szf) {
  static_assert(NR % 8 == 0, "panels are built from 8-row transposes");
  static_assert(!CENTRED || BITS == 8, "only 8-bit codes are centred");
  constexpr int GB = G * BITS / 8, NC = G / 32;
  const int64_t ng = p.K / G, rb = row_bytes(p.K, BITS);
  for (int64_t g = 0; g < ng; ++g) {
    for (int h = 0; h < NR / 8; ++h) {  // 8 rows at a time: 32 bytes of every 4 NR-byte step
      __m256i c[8][NC];
      for (int j = 0; j < 8; ++j) {
        if (8 * h + j < nr) {
          unpack_group<BITS, G>(p.qw + (n + 8 * h + j) * rb + g * GB, c[j]);
        } else {
          for (int q = 0; q < NC; ++q) c[j][q] = _mm256_setzero_si256();
        }
      }
      for (int q = 0; q < NC; ++q) {  // 32 codes of each row = 8 steps of 4 codes
        __m256i r[8];
        for (int j = 0; j < 8; ++j) r[j] = c[j][q];
        transpose8_epi32(r);
        uint8_t* dst = codes + (g * G + 32 * q) / 4 * (4 * NR) + 32 * h;
        for (int s = 0; s < 8; ++s) {
          if constexpr (CENTRED) {
            const __m256i c8 = _mm256_xor_si256(r[s], _mm256_set1_epi8((char)0x80));
            _mm256_storeu_si256((__m256i*)(dst + 4 * NR * s), c8);
            _mm256_storeu_si256((__m256i*)(dst + 4 * NR * s + NR * p.K), _mm256_abs_epi8(c8));
          } else {
            _mm256_storeu_si256((__m256i*)(dst + 4 * NR * s), r[s]);
          }
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const float s = j < nr ? _cvtsh_ss(p.scales[(n + j) * ng + g]) : 0.f;
      const float z = j < nr ? _cvtsh_ss(p.zeros[(n + j) * ng + g]) - (CENTRED ? 128.f : 0.f) : 0.f;
      sf[NR * g + j] = s;
      szf[NR * g + j] = s * z;
    }
  }
}

// The panels of weight rows [n0, n1), packed a chunk at a time (at most chunk_bytes of codes, at least one panel)
// into the thread's scratch (common.h: thread_scratch, slots 0-2). next() packs the following chunk, panels
// [c0, c1), and returns false when none is left.
template <int BITS, int G, int NR, bool CENTRED = false>
struct PanelChunks {
  const QmmProblem& p;
  const int64_t n0, n1, ng, panel_bytes, npan, per_chunk;
  uint8_t* const codes;
  float* const sf;
  float* const szf;
  int64_t c0 = 0, c1 = 0;

  PanelChunks(const QmmProblem& p_, int64_t n0_, int64_t n1_, int64_t chunk_bytes)
      : p(p_), n0(n0_), n1(n1_), ng(p_.K / G), panel_bytes(NR * p_.K * (CENTRED ? 2 : 1)),
        npan((n1_ - n0_ + NR - 1) / NR), per_chunk(std::min(npan, std::max<int64_t>(1, chunk_bytes / panel_bytes))),
        codes(thread_scratch(0, (size_t)(per_chunk * panel_bytes))),
        sf(reinterpret_cast<float*>(thread_scratch(1, (size_t)(per_chunk * NR * ng) * sizeof(float)))),
        szf(reinterpret_cast<float*>(thread_scratch(2, (size_t)(per_chunk * NR * ng) * sizeof(float)))) {}

  bool next() {
    if (c1 >= npan) return false;
    c0 = c1;
    c1 = std::min(npan, c0 + per_chunk);
    for (int64_t pi = c0; pi < c1; ++pi)
      pack_panel<BITS, G, NR, CENTRED>(p, row(pi), rows(pi), codes + (pi - c0) * panel_bytes,
                                       sf + (pi - c0) * NR * ng, szf + (pi - c0) * NR * ng);
    return true;
  }
  int64_t row(int64_t pi) const { return n0 + NR * pi; }                            // first weight row of panel pi
  int rows(int64_t pi) const { return (int)std::min<int64_t>(NR, n1 - row(pi)); }  // its rows (<= NR)
  const uint8_t* codes_of(int64_t pi) const { return codes + (pi - c0) * panel_bytes; }
  const float* scales_of(int64_t pi) const { return sf + (pi - c0) * NR * ng; }
  const float* szeros_of(int64_t pi) const { return szf + (pi - c0) * NR * ng; }
};

// f(bits, G) with both as std::integral_constant<int, ...>, for the problem's format (bits 1, 2, 3, 4, 8; groups
// 32, 64, 128): one switch for the GEMMs' template instances.
template <class F>
inline void with_format(const QmmProblem& p, F&& f) {
  const auto by_group = [&](auto bits) {
    switch (p.G) {
      case 32: f(bits, std::integral_constant<int, 32>{}); break;
      case 64: f(bits, std::integral_constant<int, 64>{}); break;
      default: f(bits, std::integral_constant<int, 128>{}); break;
    }
  };
  switch (p.bits) {
    case 1: by_group(std::integral_constant<int, 1>{}); break;
    case 2: by_group(std::integral_constant<int, 2>{}); break;
    case 3: by_group(std::integral_constant<int, 3>{}); break;
    case 4: by_group(std::integral_constant<int, 4>{}); break;
    default: by_group(std::integral_constant<int, 8>{}); break;
  }
}

}  // namespace
}  // namespace lk
