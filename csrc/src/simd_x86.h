// x86 SIMD intrinsics. Normal builds use the compiler's <immintrin.h> with the
// per-file -m flags set in CMakeLists.txt. The C++ tests also compile the
// AVX-512 kernel with LORAKERN_SIMDE: SIMDe then emulates every intrinsic in
// portable code, so the AVX-512 path is checked on CPUs that lack AVX-512.
#pragma once
#ifdef LORAKERN_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>

#include "common.h"

// Intrinsics that SIMDe 0.7 does not provide, written from Intel's definitions.
typedef simde__mmask64 __mmask64;
typedef simde__mmask16 __mmask16;
typedef simde__mmask8 __mmask8;
#ifndef _mm512_shuffle_i64x2
#define _mm512_shuffle_i64x2(a, b, imm) simde_mm512_shuffle_i64x2(a, b, imm)
#endif
inline simde__m512 lk_emu_cvtepi32_ps(simde__m512i a) {
  simde__m512i_private a_ = simde__m512i_to_private(a);
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = (float)a_.i32[i];
  return simde__m512_from_private(r);
}
inline float lk_emu_reduce_add_ps(simde__m512 a) {
  simde__m512_private a_ = simde__m512_to_private(a);
  // Intel's sequence: halves added pairwise (tree order).
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = a_.f32[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
  return t[0];
}
inline simde__m512 lk_emu_cvtph_ps(simde__m256i a) {
  simde__m256i_private a_ = simde__m256i_to_private(a);
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = lk::half_to_float(a_.u16[i]);
  return simde__m512_from_private(r);
}
inline simde__m512 lk_emu_maskz_loadu_ps(simde__mmask16 k, const float* p) {
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = ((k >> i) & 1) ? p[i] : 0.f;
  return simde__m512_from_private(r);
}
inline simde__m512i lk_emu_maskz_loadu_epi8(simde__mmask64 k, const void* p) {
  simde__m512i_private r;
  for (int i = 0; i < 64; ++i) r.i8[i] = ((k >> i) & 1) ? static_cast<const int8_t*>(p)[i] : 0;
  return simde__m512i_from_private(r);
}
inline simde__m512i lk_emu_cvtepu8_epi32(simde__m128i a) {
  simde__m128i_private a_ = simde__m128i_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = a_.u8[i];
  return simde__m512i_from_private(r);
}
inline simde__m512i lk_emu_cvtepu16_epi32(simde__m256i a) {
  simde__m256i_private a_ = simde__m256i_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; ++i) r.i32[i] = a_.u16[i];
  return simde__m512i_from_private(r);
}
inline float lk_emu_cvtsh_ss(unsigned short h) { return lk::half_to_float(h); }
#define _cvtsh_ss lk_emu_cvtsh_ss
#define _mm512_cvtepu8_epi32 lk_emu_cvtepu8_epi32
#define _mm512_cvtepu16_epi32 lk_emu_cvtepu16_epi32
#define _mm512_cvtepi32_ps lk_emu_cvtepi32_ps
#define _mm512_reduce_add_ps lk_emu_reduce_add_ps
#define _mm512_cvtph_ps lk_emu_cvtph_ps
#define _mm512_maskz_loadu_ps lk_emu_maskz_loadu_ps
#define _mm512_maskz_loadu_epi8 lk_emu_maskz_loadu_epi8
#else
#include <immintrin.h>
#endif
