// Run-time ISA detection (cpuid + xgetbv) and the LORAKERN_ISA override.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "lorakern/lorakern.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define LK_X86 1
#endif
#if defined(LK_X86) && defined(__linux__) && defined(LORAKERN_HAVE_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#define LK_AMX_LINUX 1
#endif

namespace {

#ifdef LK_X86
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return ((uint64_t)edx << 32) | eax;
}
#endif

// The path LORAKERN_ISA names, or -1 when it is unset or names none.
int requested_isa() {
  const char* e = std::getenv("LORAKERN_ISA");
  if (!e) return -1;
  for (lk_isa isa : {LK_ISA_GENERIC, LK_ISA_AVX2, LK_ISA_AVX512, LK_ISA_AMX})
    if (!std::strcmp(e, lk_isa_name(isa))) return isa;
  return -1;
}

// AMX-TILE and AMX-INT8 (cpuid 7.0 edx bits 24, 25), the tile state enabled in XCR0 (bits 17, 18), and Linux's
// permission for this process to use it (granted once for all its threads; refused e.g. when a thread's
// sigaltstack is too small for the larger signal frame). Without all of these the AVX-512 path is the best. The
// permission changes the whole process (larger signal frames; small sigaltstacks refused later), so it is not asked
// when LORAKERN_ISA names a lower path.
bool amx_usable(unsigned edx7, uint64_t xcr0) {
#ifdef LK_AMX_LINUX
  if (!((edx7 >> 24) & 1) || !((edx7 >> 25) & 1) || (xcr0 & 0x60000) != 0x60000) return false;
  if (const int want = requested_isa(); want >= 0 && want < LK_ISA_AMX) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h, asm/fpu/types.h
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  (void)edx7, (void)xcr0;
  return false;
#endif
}

lk_isa detect() {
#ifdef LK_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return LK_ISA_GENERIC;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29),
             avx = c & (1u << 28);
  if (!(osxsave && avx && fma && f16c)) return LK_ISA_GENERIC;
  const uint64_t xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return LK_ISA_GENERIC;  // XMM and YMM state enabled
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return LK_ISA_GENERIC;
  const bool avx2 = b & (1u << 5);
  if (!avx2) return LK_ISA_GENERIC;
  const bool avx512f = b & (1u << 16), avx512bw = b & (1u << 30), avx512vl = b & (1u << 31),
             avx512vnni = c & (1u << 11);
  const bool zmm_state = (xcr0 & 0xE6) == 0xE6;  // opmask, ZMM_Hi256, Hi16_ZMM
  if (!(avx512f && avx512bw && avx512vl && avx512vnni && zmm_state)) return LK_ISA_AVX2;
  return amx_usable(d, xcr0) ? LK_ISA_AMX : LK_ISA_AVX512;
#else
  return LK_ISA_GENERIC;
#endif
}

lk_isa detected() {
  static const lk_isa isa = detect();
  return isa;
}

std::atomic<int> g_active{-1};

lk_isa from_env() {
  const int requested = requested_isa();
  const lk_isa want = requested >= 0 ? (lk_isa)requested : detected();
  // Never run a path the CPU lacks: fall back to the best supported one.
  return want > detected() ? detected() : want;
}

}  // namespace

extern "C" {

const char* lk_isa_name(lk_isa isa) {
  switch (isa) {
    case LK_ISA_GENERIC: return "generic";
    case LK_ISA_AVX2: return "avx2";
    case LK_ISA_AVX512: return "avx512";
    case LK_ISA_AMX: return "amx";
  }
  return "unknown";
}

lk_isa lk_detected_isa(void) { return detected(); }

lk_isa lk_active_isa(void) {
  int v = g_active.load();
  if (v < 0) {
    v = (int)from_env();
    g_active.store(v);
  }
  return (lk_isa)v;
}

lk_status lk_set_isa(lk_isa isa) {
  if ((int)isa < 0 || isa > LK_ISA_AMX) return LK_ERR_INVALID_ARG;
  if (isa > detected()) return LK_ERR_UNSUPPORTED;
  g_active.store((int)isa);
  return LK_OK;
}

}  // extern "C"
