// The tiled fp32 experts forward (tile_f32.h): one body (tile_f32_body.h) compiled for AVX-512
// and for AVX2, the one to run chosen when the library loads.
//
// Register blocking: the inner loop runs over the reduction width d; per d it loads two
// registers of columns of the transposed input and broadcasts one element of each of R weight
// rows, for 2R FMAs into 2R accumulators. AVX-512: R = 12, 24 accumulators, 2 input and 1
// broadcast register of the 32; AVX2: R = 6, 12 + 2 + 1 of the 16. R weight rows are R*D*4
// bytes (6 KB at D=128 with AVX-512), kept in L1 while the tile's column blocks pass over them.
// The gate/up block takes R/2 gate rows and the R/2 matching up rows, so the gated unit pairs
// accumulators of the same block; the down block takes R rows of W_down. Leftover rows (I not a
// multiple of R/2, H not of R) take the next smaller block.
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

constexpr int64_t kTileRows = 64;  // an expert's rows per task: the columns of x^T, act^T and y^T

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace avx512 {
using Vec = __m512;
constexpr int kWidth = 16, kGateRows = 6, kDownRows = 12;
inline __attribute__((always_inline)) Vec vzero() { return _mm512_setzero_ps(); }
inline __attribute__((always_inline)) Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline __attribute__((always_inline)) Vec vset1(float v) { return _mm512_set1_ps(v); }
inline __attribute__((always_inline)) Vec vfmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline __attribute__((always_inline)) void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
#include "tile_f32_body.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using Vec = __m256;
constexpr int kWidth = 8, kGateRows = 3, kDownRows = 6;
inline __attribute__((always_inline)) Vec vzero() { return _mm256_setzero_ps(); }
inline __attribute__((always_inline)) Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline __attribute__((always_inline)) Vec vset1(float v) { return _mm256_set1_ps(v); }
inline __attribute__((always_inline)) Vec vfmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline __attribute__((always_inline)) void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
#include "tile_f32_body.h"
}  // namespace avx2
#pragma GCC pop_options

// "avx512", "avx2" or "" (none), from the ISA level and FINTEAM_CPU_F32_TILES.
const std::string& tile_kernel() {
  static const std::string kernel = [] {
    const char* wanted = std::getenv("FINTEAM_CPU_F32_TILES");
    if (wanted && std::string(wanted) == "0") return std::string();
    const std::string& isa = isa_name();
    return isa.rfind("avx512", 0) == 0 ? std::string("avx512") : isa == "avx2" ? std::string("avx2") : std::string();
  }();
  return kernel;
}

struct Tile {
  int64_t expert, first_row, rows;
};

// Each expert's rows in tiles of at most kTileRows, so that each block of weight rows meets two
// blocks of columns while it is in L1. One or two experts with a few dozen rows each (a short
// fp32 prefill) would make fewer tiles than threads, and a thread would idle while another
// computed them all, padded to whole blocks: at one expert with 33 rows (H=512, I=1792, 2
// threads), 2.8x the time of 32 rows (which take small_gemm_f32). So while there are fewer tiles
// than threads, the expert with the largest tiles takes one more, and with no more tiles than
// threads each expert's rows are split evenly, in whole registers of columns (`width` rows): 96
// rows make two tiles of 48, not 64 and 32. With more tiles than threads they stay kTileRows
// rows (an even split of 130 rows, 48 + 48 + 34 on 2 threads, took 1.2x the time of 64 + 64 + 2,
// where the thread that takes the short tile balances the other). A column's sums are the same
// whatever its tile.
std::vector<Tile> tiles_of(const std::vector<int64_t>& offsets, const std::vector<int64_t>& experts, int64_t width) {
  if (experts.empty()) return {};
  const auto rows_of = [&](size_t i) { return offsets[experts[i] + 1] - offsets[experts[i]]; };
  std::vector<int64_t> count(experts.size());  // every expert here has rows: at least one tile
  int64_t total = 0;
  for (size_t i = 0; i < experts.size(); ++i) total += count[i] = (rows_of(i) + kTileRows - 1) / kTileRows;
  const int64_t threads = at::get_num_threads();
  for (; total < threads; ++total) {
    size_t widest = 0;  // the expert whose tiles hold the most rows
    for (size_t i = 1; i < experts.size(); ++i) {
      if (rows_of(i) * count[widest] > rows_of(widest) * count[i]) widest = i;
    }
    if (rows_of(widest) <= width * count[widest]) break;  // each tile is one register
    ++count[widest];
  }
  std::vector<Tile> tiles;
  for (size_t i = 0; i < experts.size(); ++i) {
    const int64_t rows = rows_of(i);
    const int64_t each = total > threads ? kTileRows : ((rows + count[i] - 1) / count[i] + width - 1) / width * width;
    for (int64_t r = 0; r < rows; r += each) tiles.push_back({experts[i], offsets[experts[i]] + r, std::min(each, rows - r)});
  }
  return tiles;
}

}  // namespace

const char* tiled_f32_kernel() { return tile_kernel().c_str(); }

void tiled_experts_f32(const float* x_TH, int64_t ldx, const int32_t* row_to_slot, int64_t K, const float* w_gate_up,
                       const float* w_down, int64_t H, int64_t I, Activation act, const std::vector<int64_t>& offsets,
                       const std::vector<int64_t>& experts, float* y_NH, float* h_N2I) {
  TORCH_CHECK(tiled_f32_available(), "moe_experts: the tiled fp32 forward does not run on this CPU");
  const bool wide = tile_kernel() == "avx512";
  const std::vector<Tile> tiles = tiles_of(offsets, experts, wide ? avx512::kWidth : avx2::kWidth);
  parallel_tasks(
      static_cast<int64_t>(tiles.size()), [&] { return std::vector<float>((2 * H + I) * kTileRows); },
      [&](int64_t task, std::vector<float>& scratch) {
        const auto [e, r0, M] = tiles[task];
        float* xt = scratch.data();
        float* actT = xt + H * kTileRows;
        float* yT = actT + I * kTileRows;
        const float *wgu = w_gate_up + e * 2 * I * H, *wd = w_down + e * H * I;
        if (wide) {
          avx512::tile(x_TH, ldx, row_to_slot, K, wgu, wd, H, I, act, r0, M, y_NH, h_N2I, xt, actT, yT);
        } else {
          avx2::tile(x_TH, ldx, row_to_slot, K, wgu, wd, H, I, act, r0, M, y_NH, h_N2I, xt, actT, yT);
        }
      });
}

#else

const char* tiled_f32_kernel() { return ""; }

void tiled_experts_f32(const float*, int64_t, const int32_t*, int64_t, const float*, const float*, int64_t, int64_t,
                       Activation, const std::vector<int64_t>&, const std::vector<int64_t>&, float*, float*) {
  TORCH_CHECK(false, "moe_experts: the tiled fp32 forward needs an x86-64 build");
}

#endif

}  // namespace finteam::cpu
