// The AVX-512 kernel compiled against SIMDe (portable emulation). Defines
// lk::qmm_rows_avx512_simde; see csrc/src/simd_x86.h.
#include "../src/quant_matmul_avx512.cpp"
