// The bf16 FMA peak of one core with AVX512-BF16: twelve independent chains of `vdpbf16ps`
// on registers only (no memory traffic), so the figure is the most any bf16 GEMM can reach on
// this core. Each instruction does 16 lanes x 2 products x 2 FLOPs = 64 FLOPs.
//
//   gcc -O2 -mavx512f -mavx512bf16 benchmarks/bf16_peak.c -o /tmp/bf16_peak
//   /tmp/bf16_peak                        # one core
//   /tmp/bf16_peak & /tmp/bf16_peak; wait   # every core at once: add the figures
//
// The ratio of a GEMM's measured rate to the sum over its threads' cores is its share of peak
// (benchmarks/results/*/README.md quotes it where a target turns on the GEMMs).
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

enum { kChains = 12 };

int main(void) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; i++) acc[i] = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // two bf16 ones a lane
  const __m512bh b = a;
  const long rounds = 200000000;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long n = 0; n < rounds; n++) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));  // keeps the loop from being folded
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  const double seconds = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  float sum = 0;
  for (int i = 0; i < kChains; i++) sum += _mm512_reduce_add_ps(acc[i]);
  printf("%.1f GFLOP/s bf16 on one core (checksum %g)\n", rounds * kChains * 64.0 / seconds / 1e9, sum);
  return 0;
}
