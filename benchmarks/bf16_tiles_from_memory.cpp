// The bf16 decode kernel's tiles (csrc/cpu/dot_bf16.cpp, vdpbf16ps) streaming their weights from
// memory on two threads, against a plain read of the same bytes timed in the same rounds. Where
// benchmarks/bf16_stream_step.cpp asks what one core's loop can do from cache, this asks what the
// tiles keep of the memory's rate, per tile shape: R weight rows at a time by M batch rows (R = 4
// in passes of at most P batch rows over a tile, the kernel's P = 6; "4 x 8 by 4" is its earlier
// split, 4 and 4; R < 4 in one pass).
// Every shape gives each output the same chain of vdpbf16ps, so the same bits.
//
//   g++ -O3 -std=c++17 -pthread benchmarks/bf16_tiles_from_memory.cpp -o /tmp/bf16_tiles_from_memory
//   /tmp/bf16_tiles_from_memory
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "bf16_tile.h"

namespace {

double now_ns() { return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

volatile float sink;

AVX512_BF16 __attribute__((noinline)) float read_all(const uint16_t* w, int64_t n) {
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  for (int64_t i = 0; i + 128 <= n; i += 128) {
    a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_loadu_si512(w + i)));
    b = _mm512_add_ps(b, _mm512_castsi512_ps(_mm512_loadu_si512(w + i + 32)));
    c = _mm512_add_ps(c, _mm512_castsi512_ps(_mm512_loadu_si512(w + i + 64)));
    d = _mm512_add_ps(d, _mm512_castsi512_ps(_mm512_loadu_si512(w + i + 96)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

// Every tile (bf16_tile.h) of a `rows` x D block: one pass of M batch rows, or (R = 4, M > P) the
// kernel's two, P batch rows and then the rest.
template <int R, int M, int P = 6>
void all_tiles(const uint16_t* w, int64_t D, int64_t rows, const uint16_t* const* x) {
  float out[R * 8];
  for (int64_t o = 0; o + R <= rows; o += R) {
    if constexpr (R == 4 && M > P) {
      tile<R, P>(w + o * D, D, x, out);
      tile<R, M - P>(w + o * D, D, x + P, out);
    } else {
      tile<R, M>(w + o * D, D, x, out);
    }
  }
  sink = out[0];
}

double on_two_threads(const std::function<void(int)>& f) {
  const double t0 = now_ns();
  std::thread other([&] { f(1); });
  f(0);
  other.join();
  return now_ns() - t0;
}

}  // namespace

int main() {
  const int64_t bytes = int64_t{192} << 20;  // far beyond the last-level cache
  std::vector<uint16_t> w(bytes / 2 + 64 * 4096);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<uint16_t>(0x3f80 + (i & 7));
  std::vector<uint16_t> xs(2 * 8 * 4096, 0x3f80);
  for (int64_t D : {1024, 3584}) {  // Mixtral's gate/up and down projections
    const int64_t half = bytes / 2 / D / 8 * 8 / 2;  // weight rows a thread
    const uint16_t* x[2][8];
    for (int t = 0; t < 2; ++t)
      for (int m = 0; m < 8; ++m) x[t][m] = xs.data() + (t * 8 + m) * 4096;
    std::vector<std::pair<std::string, std::function<void(int)>>> cases;
    cases.emplace_back("read", [&, D](int t) { sink = read_all(w.data() + t * half * D, half * D); });
#define CASE(R, M) cases.emplace_back(#R " x " #M, [&, D](int t) { all_tiles<R, M>(w.data() + t * half * D, D, half, x[t]); })
    CASE(1, 4); CASE(4, 4); CASE(4, 5); CASE(4, 6); CASE(4, 8); CASE(3, 5); CASE(3, 6); CASE(3, 8); CASE(2, 6); CASE(2, 8);
#undef CASE
    cases.emplace_back("4 x 8 by 4", [&, D](int t) { all_tiles<4, 8, 4>(w.data() + t * half * D, D, half, x[t]); });
    std::vector<std::vector<double>> ns(cases.size());
    for (int round = 0; round < 9; ++round)  // interleaved: each round times every case once
      for (size_t c = 0; c < cases.size(); ++c) ns[c].push_back(on_two_threads(cases[c].second));
    std::vector<double> median(cases.size());
    for (size_t c = 0; c < cases.size(); ++c) {
      std::sort(ns[c].begin(), ns[c].end());
      median[c] = ns[c][ns[c].size() / 2];
    }
    for (size_t c = 0; c < cases.size(); ++c)
      std::printf("D=%-5ld %-10s %5.1f GB/s  %.2f of the read\n", static_cast<long>(D), cases[c].first.c_str(),
                  2.0 * half * D * 2 / median[c], median[0] / median[c]);
  }
  return 0;
}
