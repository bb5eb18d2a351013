// The bf16 weight-streaming kernel: AVX512-BF16 dot products (vdpbf16ps), 4 weight rows by up
// to 4 batch rows per tile.
//
// Designed for memory-bound decode: every weight byte is read from memory once; a tile's 4
// rows (4*D*2 bytes, 8 KB at D=1024) stay in L1 while each group of 4 batch rows passes over
// them, so M batch rows cost M/4 passes over L1, not M passes over memory. 16 accumulators,
// 4 weight and 4 batch registers fit the 32 zmm registers. Per 32 elements a tile does 16
// vdpbf16ps against 8 loads. Each tile prefetches the next one, which a single core's hardware
// prefetcher does not keep up with.
#include "dot_bf16.h"

#if FINTEAM_X86
#include <immintrin.h>
#endif

namespace finteam::cpu {

bool skinny_gemm_available() { return FINTEAM_X86 && has_avx512_bf16(); }

#if FINTEAM_X86
namespace {

#define FINTEAM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

template <int R, int MB>
FINTEAM_AVX512_BF16 inline void tile_step(__m512 (&acc)[R][MB], const uint16_t* w, int64_t ldw, const uint16_t* const* x,
                                          int64_t d, __mmask32 mask) {
  __m512i wv[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * ldw + d);
    // The next tile's rows, one tile ahead: a core streams more than its hardware prefetcher
    // alone fetches (a prefetch past the end of the weight is harmless).
    _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * ldw + d), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    const __m512i xv = _mm512_maskz_loadu_epi16(mask, x[m] + d);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
  }
}

template <int R, int MB>
FINTEAM_AVX512_BF16 inline void tile(const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const* x, float* out,
                                     int64_t ldo) {
  __m512 acc[R][MB];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  }
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) tile_step<R, MB>(acc, w, ldw, x, d, ~__mmask32(0));
  if (d < D) tile_step<R, MB>(acc, w, ldw, x, d, static_cast<__mmask32>((1u << (D - d)) - 1u));
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) out[m * ldo + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
}

template <int R>
FINTEAM_AVX512_BF16 void rows_tile(const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const* x, int64_t M,
                                   float* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: tile<R, 1>(w, ldw, D, x + m0, o, ldo); break;
      case 2: tile<R, 2>(w, ldw, D, x + m0, o, ldo); break;
      case 3: tile<R, 3>(w, ldw, D, x + m0, o, ldo); break;
      default: tile<R, 4>(w, ldw, D, x + m0, o, ldo); break;
    }
  }
}

}  // namespace

void skinny_gemm_bf16(const c10::BFloat16* w_in, int64_t ldw, int64_t D, int64_t o0, int64_t o1,
                      const c10::BFloat16* const* x_rows, int64_t M, float* out, int64_t ldo) {
  TORCH_CHECK(skinny_gemm_available(), "skinny_gemm_bf16 needs AVX512-BF16");
  const auto* w = reinterpret_cast<const uint16_t*>(w_in);
  const auto* const* x = reinterpret_cast<const uint16_t* const*>(x_rows);
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) rows_tile<4>(w + o * ldw, ldw, D, x, M, out + (o - o0), ldo);
  for (; o < o1; ++o) rows_tile<1>(w + o * ldw, ldw, D, x, M, out + (o - o0), ldo);
}

#else

void skinny_gemm_bf16(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, const c10::BFloat16* const*, int64_t,
                      float*, int64_t) {
  TORCH_CHECK(false, "skinny_gemm_bf16 needs an x86-64 CPU with AVX512-BF16");
}

#endif

}  // namespace finteam::cpu
