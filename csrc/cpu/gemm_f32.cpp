// See gemm_f32.h.
#include "gemm_f32.h"

#include <cstdlib>
#include <string>

#if FINTEAM_X86
#include <immintrin.h>
#endif

namespace finteam::cpu {

#if FINTEAM_X86
namespace {

constexpr int kRows = 12;  // rows of C per register block
constexpr int64_t kCols = 32;  // columns of C per register block: two vectors

// C rows [0, R) at columns [n0, n0 + 32) (mask0 / mask1: the columns inside N of each vector).
template <int R>
__attribute__((target("avx512f,fma"))) void block(bool a_t, int64_t K, const float* A, int64_t lda, const float* B,
                                                   int64_t ldb, float* C, int64_t ldc, __mmask16 mask0,
                                                   __mmask16 mask1) {
  __m512 acc[R][2];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t step_r = a_t ? 1 : lda, step_k = a_t ? lda : 1;
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(mask0, B + k * ldb), b1 = _mm512_maskz_loadu_ps(mask1, B + k * ldb + 16);
    const float* a = A + k * step_k;
    // Read by columns, A gives each step a new cache line lda floats on: the weight-gradient
    // GEMMs' dh (2I floats a row, 2 KB at the tiny team's I=256) puts two of them in a 4 KB page,
    // too few for the hardware prefetcher. Fetched 8 steps ahead: the tiny team's
    // dW_gate_up on one core of a 2-core AMD EPYC (Zen 4), caches evicted before each pass, 65-80
    // GFLOP/s before, 83-92 after; the op's forward and backward there (fp32, 1024 tokens, 2
    // threads, interleaved with the old build) 0.967-0.979 of the time, the same bits. Packing
    // A or B instead (each column block's panel copied first) gained no more.
    if (a_t) _mm_prefetch(reinterpret_cast<const char*>(a + 8 * step_k), _MM_HINT_T0);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * step_r]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, mask0, acc[r][0]);
    _mm512_mask_storeu_ps(C + r * ldc + 16, mask1, acc[r][1]);
  }
}

__mmask16 columns(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? 0 : __mmask16((1u << left) - 1u); }

}  // namespace

bool gemm_f32_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FINTEAM_CPU_GEMM_F32");
    if (v != nullptr && std::string(v) == "0") return false;
    return isa_name().rfind("avx512", 0) == 0 && !intel_cpu();
  }();
  return on;
}

void gemm_f32(bool a_t, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
              float* C, int64_t ldc) {
  // Column blocks outside, so that a block of B's columns (K rows of 128 bytes) stays in L1 while
  // every row block of A passes over it.
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    const __mmask16 mask0 = columns(N - n0), mask1 = columns(N - n0 - 16);
    in_blocks<kRows>(0, M, [&]<int R>(int64_t m0) {
      block<R>(a_t, K, A + m0 * (a_t ? 1 : lda), lda, B + n0, ldb, C + m0 * ldc + n0, ldc, mask0, mask1);
    });
  }
}

#else

bool gemm_f32_enabled() { return false; }

void gemm_f32(bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "gemm_f32 needs an x86-64 build");
}

#endif

}  // namespace finteam::cpu
