// What binds the bf16 decode kernel (csrc/cpu/dot_bf16.cpp, vdpbf16ps) once memory is fast: its
// inner loop on one core, over weights that sit in L2 or L3, against the register-only peak
// of benchmarks/bf16_peak.c and the latency of one dependent chain, timed in the same run.
//
//   g++ -O3 -std=c++17 -mavx512f -mavx512bw -mavx512bf16 benchmarks/bf16_stream_step.cpp -o /tmp/bf16_stream_step
//   /tmp/bf16_stream_step
//
// Each output of the kernel is one chain of vdpbf16ps along its weight row (its bits do not
// depend on the batch), so a weight row against M batch rows runs M chains at once. The kernel
// reads one weight row at a time for up to 5 batch rows (`1 x M` below: one memory stream,
// which memory serves best), tiles of 4 weight rows beyond (`4 x 4`). `2 x M` (two rows at a
// time, the same bits) is what twice the chains would give; it reads two streams.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "bf16_tile.h"

namespace {

double now_ns() { return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// vdpbf16ps a nanosecond: `chains` independent chains on registers only (12: the peak; 1: the
// latency of one, as its inverse).
template <int kChains>
AVX512_BF16 double register_rate() {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  const long rounds = 50000000;
  const double t0 = now_ns();
  for (long n = 0; n < rounds; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, a);
    __asm__ volatile("" : "+v"(a));
  }
  const double ns = now_ns() - t0;
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  if (sum == 42) std::printf(" ");  // keeps the sums alive
  return rounds * kChains / ns;
}

// Every weight row of a `rows` x D block against M batch rows, R rows a tile; best of 20 passes.
template <int R, int MB>
void stream(const char* name, int64_t D, int64_t rows, double peak) {
  std::vector<uint16_t> w((rows + R) * D, 0x3f80), xs(MB * D, 0x3f80);
  std::vector<const uint16_t*> x(MB);
  for (int m = 0; m < MB; ++m) x[m] = xs.data() + m * D;
  float out[R * MB];
  double best = 1e30;
  for (int pass = 0; pass < 20; ++pass) {
    const double t0 = now_ns();
    for (int64_t o = 0; o + R <= rows; o += R) tile<R, MB>(w.data() + o * D, D, x.data(), out);
    best = std::min(best, now_ns() - t0);
  }
  const double dp = double(rows) * MB * (D / 32) / best;
  std::printf("%-6s D=%-5ld %5.0f KB of weights: %.2f vdpbf16ps/ns (%3.0f%% of peak), %5.1f GB/s of weights\n", name,
              static_cast<long>(D), rows * D * 2 / 1024.0, dp, 100 * dp / peak, rows * D * 2 / best);
}

}  // namespace

int main() {
  const double peak = register_rate<12>(), chain = register_rate<1>();
  std::printf("one core: peak %.2f vdpbf16ps/ns (12 chains, registers only); one chain %.2f/ns (latency %.2f ns)\n",
              peak, chain, 1 / chain);
  for (int64_t D : {1024, 3584}) {
    for (int64_t kb : {512, 8192}) {  // in L2, in L3
      const int64_t rows = kb * 1024 / (2 * D);
      stream<1, 1>("1 x 1", D, rows, peak);
      stream<1, 2>("1 x 2", D, rows, peak);
      stream<1, 4>("1 x 4", D, rows, peak);
      stream<2, 4>("2 x 4", D, rows, peak);
      stream<4, 4>("4 x 4", D, rows, peak);
    }
  }
  return 0;
}
