// The bf16 decode kernel's tile (csrc/cpu/dot_bf16.cpp, DotTile::tile) for the standalone
// benchmarks bf16_stream_step.cpp and bf16_tiles_from_memory.cpp: R weight rows (D wide, one
// after another in memory) against MB batch rows, prefetches included (none for a single row
// against a single batch row, as in the kernel); out[m * R + r] = row r . batch row m.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

template <int R, int MB>
AVX512_BF16 __attribute__((noinline)) void tile(const uint16_t* w, int64_t D, const uint16_t* const* x, float* out) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t d = 0; d + 32 <= D; d += 32) {
#pragma GCC unroll 4
    for (int r = 0; r < R && (R > 1 || MB > 1); ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * D + d), _MM_HINT_T1);  // the next tile, into L2
      _mm_prefetch(reinterpret_cast<const char*>(w + r * D + d + 128), _MM_HINT_T0);  // this one, 4 lines ahead
    }
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + r * D + d);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_loadu_si512(x[m] + d);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) out[m * R + r] = _mm512_reduce_add_ps(acc[r][m]);
}
