// The tiled fp32 experts forward (tile_f32.h).
//
// Register blocking: the inner loop runs over the reduction width d; per d it loads 32 columns of
// the transposed input (two zmm) and broadcasts one element of each of R weight rows, for 2R
// FMAs into 2R accumulators (R = 12: 24 accumulators, 2 input and 1 broadcast register of the
// 32). R weight rows are R*D*4 bytes (6 KB at D=128), kept in L1 while the tile's column blocks
// pass over them. The gate/up block takes 6 gate rows and the 6 matching up rows, so the gated
// unit pairs accumulators of the same block; the down block takes 12 rows of W_down. Leftover
// rows (I not a multiple of 6, H not of 12) take the next smaller block.
#include "tile_f32.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#if FINTEAM_X86
#include <immintrin.h>
#endif

namespace finteam::cpu {

#if FINTEAM_X86
namespace {

#define FINTEAM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

constexpr int64_t kTileRows = 64;  // an expert's rows per task: the columns of x^T, act^T and y^T
constexpr int64_t kCols = 32;      // columns per register block: two zmm
constexpr int kGateRows = 6;       // gate rows per block (and as many up rows): 24 accumulators
constexpr int kDownRows = 12;      // W_down rows per block: 24 accumulators

// acc[r][j] = sum_{d < D} w[r][d] * xt[d * kTileRows + 16 j], for r < R, j < 2.
template <int R>
FINTEAM_AVX512 inline __attribute__((always_inline)) void block(const float* const (&w)[R], int64_t D, const float* xt,
                                                               __m512 (&acc)[R][2]) {
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 x0 = _mm512_loadu_ps(xt + d * kTileRows), x1 = _mm512_loadu_ps(xt + d * kTileRows + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_set1_ps(w[r][d]);
      acc[r][0] = _mm512_fmadd_ps(wv, x0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(wv, x1, acc[r][1]);
    }
  }
}

// act^T rows [n0, n0+R) at columns [m0, m0+32): f(gate) * up from W_gate_up rows n0.. and I+n0..
template <int R>
FINTEAM_AVX512 void gate_up_block(const float* w, int64_t H, int64_t I, int64_t n0, const float* xt, int64_t m0,
                                  Activation act, float* actT) {
  const float* rows[2 * R];
  for (int r = 0; r < R; ++r) {
    rows[r] = w + (n0 + r) * H;
    rows[R + r] = w + (I + n0 + r) * H;
  }
  __m512 acc[2 * R][2];
  block<2 * R>(rows, H, xt + m0, acc);
  alignas(64) float h[2 * R][kCols];
  for (int r = 0; r < 2 * R; ++r) {
    _mm512_store_ps(h[r], acc[r][0]);
    _mm512_store_ps(h[r] + 16, acc[r][1]);
  }
  for (int r = 0; r < R; ++r) glu_f32(h[r], h[R + r], kCols, act, actT + (n0 + r) * kTileRows + m0);
}

// y^T rows [h0, h0+R) at columns [m0, m0+32) from W_down rows h0..
template <int R>
FINTEAM_AVX512 void down_block(const float* w, int64_t I, int64_t h0, const float* actT, int64_t m0, float* yT) {
  const float* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w + (h0 + r) * I;
  __m512 acc[R][2];
  block<R>(rows, I, actT + m0, acc);
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(yT + (h0 + r) * kTileRows + m0, acc[r][0]);
    _mm512_storeu_ps(yT + (h0 + r) * kTileRows + m0 + 16, acc[r][1]);
  }
}

// fn.template operator()<R>(first) over [first, end) in blocks of R rows, the leftover in the
// largest smaller blocks.
template <int R, typename Fn>
inline void in_blocks(int64_t first, int64_t end, Fn&& fn) {
  for (; first + R <= end; first += R) fn.template operator()<R>(first);
  if constexpr (R > 1) {
    if (first < end) in_blocks<R - 1>(first, end, fn);
  }
}

struct Scratch {
  std::vector<float> xt, actT, yT;
};

// One task: rows [r0, r0 + M) of expert e, M <= kTileRows.
void tile(const float* x, int64_t ldx, const int32_t* row_to_slot, int64_t K, const float* wgu, const float* wd,
          int64_t H, int64_t I, Activation act, int64_t r0, int64_t M, float* y, Scratch& s) {
  const int64_t cols = (M + kCols - 1) / kCols * kCols;
  float* xt = s.xt.data();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + (row_to_slot[r0 + m] / K) * ldx;
    for (int64_t d = 0; d < H; ++d) xt[d * kTileRows + m] = row[d];
  }
  for (int64_t d = 0; d < H && M < cols; ++d) std::fill(xt + d * kTileRows + M, xt + d * kTileRows + cols, 0.f);
  in_blocks<kGateRows>(0, I, [&]<int R>(int64_t n0) {
    for (int64_t m0 = 0; m0 < cols; m0 += kCols) gate_up_block<R>(wgu, H, I, n0, xt, m0, act, s.actT.data());
  });
  in_blocks<kDownRows>(0, H, [&]<int R>(int64_t h0) {
    for (int64_t m0 = 0; m0 < cols; m0 += kCols) down_block<R>(wd, I, h0, s.actT.data(), m0, s.yT.data());
  });
  const float* yT = s.yT.data();
  for (int64_t m = 0; m < M; ++m) {
    float* out = y + (r0 + m) * H;
    for (int64_t h = 0; h < H; ++h) out[h] = yT[h * kTileRows + m];
  }
}

}  // namespace

bool tiled_f32_available() {
  static const bool available = [] {
    const char* wanted = std::getenv("FINTEAM_CPU_F32_TILES");
    return isa_name().rfind("avx512", 0) == 0 && !(wanted && std::string(wanted) == "0");
  }();
  return available;
}

void tiled_experts_f32(const float* x_TH, int64_t ldx, const int32_t* row_to_slot, int64_t K, const float* w_gate_up,
                       const float* w_down, int64_t H, int64_t I, Activation act, const std::vector<int64_t>& offsets,
                       const std::vector<int64_t>& experts, float* y_NH) {
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (expert, first row)
  for (int64_t e : experts) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += kTileRows) tasks.emplace_back(e, r);
  }
  parallel_tasks(
      static_cast<int64_t>(tasks.size()),
      [&] { return Scratch{std::vector<float>(H * kTileRows), std::vector<float>(I * kTileRows),
                           std::vector<float>(H * kTileRows)}; },
      [&](int64_t task, Scratch& s) {
        const auto [e, r0] = tasks[task];
        tile(x_TH, ldx, row_to_slot, K, w_gate_up + e * 2 * I * H, w_down + e * H * I, H, I, act, r0,
             std::min(kTileRows, offsets[e + 1] - r0), y_NH, s);
      });
}

#else

bool tiled_f32_available() { return false; }

void tiled_experts_f32(const float*, int64_t, const int32_t*, int64_t, const float*, const float*, int64_t, int64_t,
                       Activation, const std::vector<int64_t>&, const std::vector<int64_t>&, float*) {
  TORCH_CHECK(false, "moe_experts: the tiled fp32 forward needs an x86-64 build");
}

#endif

}  // namespace finteam::cpu
