// The AVX-512 bf16 weight-streaming kernels (4 weight rows by up to 6 batch rows per tile with
// vdpbf16ps, by up to 4 on widened weights), their AVX2 form for CPUs without AVX-512 (4 by up
// to 2), and the choice between them and the AMX kernel (dot_amx.cpp).
//
// Designed for memory-bound decode: every weight byte is read from memory once; a tile's 4
// rows (4*D*2 bytes, 8 KB at D=1024) stay in L1 while each group of batch rows passes over
// them, so M batch rows cost M/6 (or M/4) passes over L1, not M passes over memory. 24
// accumulators, 4 weight and 1 batch register (or 16, 8 widened weights and 2 batch registers)
// fit the 32 zmm registers. Each tile
// prefetches the next one (see prefetch_tile), which a single core's hardware prefetcher does
// not keep up with.
// Per 32 weight elements and batch row a tile spends one vdpbf16ps, or two FMAs on weights
// widened to fp32 (a shift and a mask per 32 weights, shared by the batch rows).
// Small batches take the vdpbf16ps kernel one weight row at a time instead
// (DotTile::row_by_row): one stream read in memory order, which beats the tile's four where the
// core's vdpbf16ps rate leaves room (up to 5 rows on Zen 5, 3 on Zen 4; row_by_row_rows()).
#include "dot_bf16.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "dot_amx.h"
#include "vmath.h"

#if FINTEAM_X86
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace finteam::cpu {

#if FINTEAM_X86
namespace {

bool has_amx_bf16() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) != 0;
}

// Prefetches of a tile step at column d of its R rows: the next tile's rows into L2, and the
// tile's own rows a few lines ahead into L1. Prefetching the next tile straight into L1 left the
// loads waiting. Measured on a 2-core AMD EPYC (Zen 4), the Mixtral-shaped experts timed
// interleaved with the previous scheme and a plain read of the same bytes (29-33 GB/s then):
// vdpbf16ps 4% faster at 1 row per expert, 30-38% at 4-8 rows, 25% at 16; the AVX2 kernel
// 30-42% and the fma one 25-38% (86-94% of the read at 1 row, from 65-75%).
template <int R, typename T>
inline __attribute__((always_inline)) void prefetch_tile(const T* w, int64_t ldw, int64_t d) {
  constexpr int64_t kAhead = 256 / sizeof(T);  // 4 cache lines
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * ldw + d), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + d + kAhead), _MM_HINT_T0);
  }
}

__mmask32 tail_mask(int64_t left) { return left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << left) - 1u); }

template <int R, int MB>
FINTEAM_AVX512 inline void store(__m512 (&acc)[R][MB], float* out, int64_t ldo) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) out[m * ldo + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
}

// vdpbf16ps: pairs of bf16 products accumulate straight into fp32 lanes.
struct DotTile {
  static constexpr int kMaxBatch = 6;  // 24 accumulators: see tile_rows
  static constexpr int kMaxRowByRow = 5;

  // Batches of up to this many rows read one weight row at a time, in memory order (row_by_row);
  // larger ones go in tiles of 4 weight rows. Both give the same bits. The tiles' 4 interleaved
  // streams read memory slower than one, but a weight row against M batch rows runs only M
  // dependent chains of vdpbf16ps, so the core's vdpbf16ps rate decides how far row by row pays.
  // Measured with Mixtral-shaped experts, every expert at M rows, each call's time over a plain
  // read of the same bytes in the same rounds, 2 threads (the tiles then in passes of 4 batch rows):
  //   AMD Zen 5 (family 26; 512-bit vdpbf16ps, 7.6 a ns a core): row by row against tiles at
  //     M=5 0.90-0.93 of the read against 0.81-0.85, M=6 0.77 against 0.85, M=8 0.60 against
  //     0.79 (a row spends M+1 loads on M vdpbf16ps, a tile 4+M on 4M): up to 5 rows.
  //   AMD Zen 4 (family 25; 512-bit ops in two halves, 3.7 a ns a core, latency 1.64 ns; in cache
  //     one row against 4 batch rows streams 34 GB/s a core, a 4-row tile 45-51): row by row
  //     against tiles at M=1 0.93-1.06 against 0.69, M=2 0.86-0.90 against 0.72, M=3 0.77-0.82
  //     against 0.71, M=4 0.59-0.65 against 0.74-0.75, M=5 0.47-0.48 against 0.75-0.77 (host
  //     reading 39-51 GB/s): up to 3 rows. Other CPUs that take this kernel (unmeasured) get 3 too.
  // FINTEAM_CPU_ROW_BY_ROW=0..5 sets another limit (to test each path on any CPU).
  static int64_t row_by_row_rows() {
    static const int64_t rows = [] {
      if (const char* wanted = std::getenv("FINTEAM_CPU_ROW_BY_ROW")) {
        char* end = nullptr;
        const long value = std::strtol(wanted, &end, 10);
        TORCH_CHECK(end != wanted && *end == '\0' && value >= 0 && value <= kMaxRowByRow,
                    "FINTEAM_CPU_ROW_BY_ROW must be an integer in [0, ", kMaxRowByRow, "]; got '", wanted, "'");
        return static_cast<int64_t>(value);
      }
      return int64_t{amd_family() >= 0x1A ? kMaxRowByRow : 3};
    }();
    return rows;
  }

  // Rows [0, rows) of w against MB batch rows, one weight row at a time: a 1-row tile (run's
  // body) in a loop, so each output is the same sum as in the tiles (a token's bits do not depend
  // on its batch). Two accumulators per batch row (even and odd steps, another order) measured
  // no faster.
  template <int MB>
  FINTEAM_AVX512_BF16 static void row_by_row(const uint16_t* w, int64_t ldw, int64_t D, int64_t rows,
                                             const uint16_t* const* x, float* out, int64_t ldo) {
    for (int64_t o = 0; o < rows; ++o) tile<1, MB>(w + o * ldw, ldw, D, x, out + o, ldo);
  }

  static void rows(const uint16_t* w, int64_t ldw, int64_t D, int64_t rows, const uint16_t* const* x, int64_t M,
                   float* out, int64_t ldo) {
    static_assert(kMaxRowByRow == 5);
    switch (M) {
      case 1: row_by_row<1>(w, ldw, D, rows, x, out, ldo); break;
      case 2: row_by_row<2>(w, ldw, D, rows, x, out, ldo); break;
      case 3: row_by_row<3>(w, ldw, D, rows, x, out, ldo); break;
      case 4: row_by_row<4>(w, ldw, D, rows, x, out, ldo); break;
      default: row_by_row<5>(w, ldw, D, rows, x, out, ldo); break;
    }
  }

  template <int R, int MB>
  FINTEAM_AVX512_BF16 static inline __attribute__((always_inline)) void step(
      __m512 (&acc)[R][MB], const uint16_t* w, int64_t ldw, const uint16_t* const* x, int64_t d, __mmask32 mask) {
    __m512i wv[R];
    // One weight row against one batch row reads memory in order, which the hardware prefetcher
    // follows alone: without the software prefetches it ran 2-3% faster with 2 threads and 7%
    // with 1 (T=1, Mixtral-shaped experts, calls in shuffled order on the 2-core AMD EPYC, Zen 4).
    if constexpr (R > 1 || MB > 1) prefetch_tile<R>(w, ldw, d);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * ldw + d);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x[m] + d);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
    }
  }

  // R weight rows against MB batch rows, all of D.
  template <int R, int MB>
  FINTEAM_AVX512_BF16 static inline __attribute__((always_inline)) void tile(
      const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const* x, float* out, int64_t ldo) {
    __m512 acc[R][MB];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) step<R, MB>(acc, w, ldw, x, d, ~__mmask32(0));
    if (d < D) step<R, MB>(acc, w, ldw, x, d, tail_mask(D - d));
    store<R, MB>(acc, out, ldo);
  }

  template <int R, int MB>
  FINTEAM_AVX512_BF16 static void run(const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const* x,
                                      const float*, int64_t, float* out, int64_t ldo) {
    tile<R, MB>(w, ldw, D, x, out, ldo);
  }
};

// FMAs on weights widened to fp32: a 32-bit lane holds bf16 elements 2i (low half) and 2i+1
// (high half), so a shift gives the even elements and a mask the odd ones, matched by the batch
// rows stored as [16 even | 16 odd] per 32 elements.
struct FmaTile {
  static constexpr int kMaxBatch = 4;
  // No row_by_row: one row's chain of two dependent FMAs per step is too slow.

  template <int R, int MB>
  FINTEAM_AVX512 static inline __attribute__((always_inline)) void step(
      __m512 (&acc)[R][MB], const uint16_t* w, int64_t ldw, const float* x, int64_t ldx, int64_t d, __mmask32 mask) {
    __m512 even[R], odd[R];
    prefetch_tile<R>(w, ldw, d);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi16(mask, w + r * ldw + d);
      even[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      odd[r] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512 xe = _mm512_loadu_ps(x + m * ldx + d), xo = _mm512_loadu_ps(x + m * ldx + d + 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(odd[r], xo, _mm512_fmadd_ps(even[r], xe, acc[r][m]));
    }
  }

  template <int R, int MB>
  FINTEAM_AVX512 static void run(const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const*, const float* x,
                                 int64_t ldx, float* out, int64_t ldo) {
    __m512 acc[R][MB];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) step<R, MB>(acc, w, ldw, x, ldx, d, ~__mmask32(0));
    if (d < D) step<R, MB>(acc, w, ldw, x, ldx, d, tail_mask(D - d));
    store<R, MB>(acc, out, ldo);
  }
};

// AVX2 (no AVX-512): the FmaTile method on 256-bit registers, 16 weights per load, the batch
// rows stored as [8 even | 8 odd] per 16 elements. 16 ymm registers hold R*MB accumulators, the
// R weight loads and the two widened halves of one of them: R=4 by MB up to 2. The batch rows
// are FMA memory operands (they sit in L1/L2; the loads are cheaper than the FMAs). A tail of
// D % 16 weights is copied into a zero-padded block first (the batch rows are zero-padded).
struct Avx2Tile {
  static constexpr int kMaxBatch = 2;

  template <int R, int MB>
  FINTEAM_AVX2 static inline __attribute__((always_inline)) void step(
      __m256 (&acc)[R][MB], const uint16_t* w, int64_t ldw, const float* x, int64_t ldx) {
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    __m256i v[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v[r], 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v[r], high));
#pragma GCC unroll 2
      for (int m = 0; m < MB; ++m) {
        acc[r][m] = _mm256_fmadd_ps(even, _mm256_loadu_ps(x + m * ldx), acc[r][m]);
        acc[r][m] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + m * ldx + 8), acc[r][m]);
      }
    }
  }

  template <int R, int MB>
  FINTEAM_AVX2 static void run(const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const*, const float* x,
                               int64_t ldx, float* out, int64_t ldo) {
    __m256 acc[R][MB];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    }
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      prefetch_tile<R>(w, ldw, d);  // one cache line per row and 32 weights (see the file comment)
      step<R, MB>(acc, w + d, ldw, x + d, ldx);
      step<R, MB>(acc, w + d + 16, ldw, x + d + 16, ldx);
    }
    for (; d + 16 <= D; d += 16) step<R, MB>(acc, w + d, ldw, x + d, ldx);
    if (d < D) {
      alignas(32) uint16_t tail[R][16] = {};
      for (int r = 0; r < R; ++r) std::memcpy(tail[r], w + r * ldw + d, (D - d) * sizeof(uint16_t));
      step<R, MB>(acc, &tail[0][0], 16, x + d, ldx);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int m = 0; m < MB; ++m) {
        const __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
        const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
        out[m * ldo + r] = _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
      }
    }
  }
};

// One tile of R weight rows against every batch row, Tile::kMaxBatch batch rows at a time: past
// that a tile is read again (from cache) for the next batch rows. Every split gives each output
// the same sum, so the same bits.
// - Fewer weight rows against more batch rows in one pass lose: benchmarks/bf16_tiles_from_memory.cpp
//   on a 2-core AMD EPYC (Zen 4), host reading 25-30 GB/s, three runs, at 8 batch rows 4 x 8 in
//   two passes kept 0.78-0.93 of the read, 3 x 8 in one 0.68-0.89, 2 x 8 0.62-0.79.
// - Passes of up to 6 batch rows for vdpbf16ps (up to 4 before) read the tile from cache fewer
//   times. The pass over cache leaves the memory idle, which costs most when memory is fast.
//   Mixtral-shaped experts on the same CPU, every expert at M rows, timed interleaved with
//   passes of 4 (same bits), time with 6 over time with 4: M=5 1.01 (host reading 33 GB/s) and
//   0.96 (52 GB/s), M=6 0.98-0.99 and 0.86, M=7 0.97, M=8 0.97-0.98, M=12 0.92, the benchmark's
//   T=16 routing 1.00 and 0.96-0.97. 4 x 7 would need 33 registers.
template <typename Tile, int R>
void tile_rows(const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const* x, const float* wide, int64_t ldx,
               int64_t M, float* out, int64_t ldo) {
  constexpr int B = Tile::kMaxBatch;
  static_assert(B <= 6, "tile_rows runs up to 6 batch rows a pass");
  for (int64_t m0 = 0; m0 < M; m0 += B) {
    const uint16_t* const* xm = x != nullptr ? x + m0 : nullptr;
    const float* wm = wide != nullptr ? wide + m0 * ldx : nullptr;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(B, M - m0)) {
      case 1: Tile::template run<R, 1>(w, ldw, D, xm, wm, ldx, o, ldo); break;
      case 2: Tile::template run<R, 2>(w, ldw, D, xm, wm, ldx, o, ldo); break;
      case 3: if constexpr (B >= 3) Tile::template run<R, 3>(w, ldw, D, xm, wm, ldx, o, ldo); break;
      case 4: if constexpr (B >= 4) Tile::template run<R, 4>(w, ldw, D, xm, wm, ldx, o, ldo); break;
      case 5: if constexpr (B >= 5) Tile::template run<R, 5>(w, ldw, D, xm, wm, ldx, o, ldo); break;
      default: if constexpr (B >= 6) Tile::template run<R, 6>(w, ldw, D, xm, wm, ldx, o, ldo); break;
    }
  }
}

// Rows [o0, o1) of w: whole tiles of 4 rows, then single rows; or, for a batch of at most
// Tile::row_by_row_rows() rows, Tile::rows one weight row at a time.
template <typename Tile>
void stream(const uint16_t* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const uint16_t* const* x,
            const float* wide, int64_t ldx, int64_t M, float* out, int64_t ldo) {
  if constexpr (std::is_same_v<Tile, DotTile>) {  // the only kernel with a row-by-row path
    if (M <= Tile::row_by_row_rows()) return Tile::rows(w + o0 * ldw, ldw, D, o1 - o0, x, M, out, ldo);
  }
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) tile_rows<Tile, 4>(w + o * ldw, ldw, D, x, wide, ldx, M, out + (o - o0), ldo);
  for (; o < o1; ++o) tile_rows<Tile, 1>(w + o * ldw, ldw, D, x, wide, ldx, M, out + (o - o0), ldo);
}

}  // namespace

const char* streaming_kernel() {
  static const char* kernel = [] {
    const std::string& isa = isa_name();
    const bool dot = isa == "avx512_bf16", fma = dot || isa == "avx512", avx2 = fma || isa == "avx2";
    // FINTEAM_CPU_STREAMING picks any kernel this CPU can run (to test each of them anywhere),
    // or "none" (ATen's GEMM).
    const std::string wanted = std::getenv("FINTEAM_CPU_STREAMING") ? std::getenv("FINTEAM_CPU_STREAMING") : "";
    if (wanted == "none") return "";
    if (wanted == "vdpbf16ps" && dot) return "vdpbf16ps";
    if (wanted == "fma" && fma) return "fma";
    if (wanted == "avx2" && avx2) return "avx2";
    if (fma && amx::available()) return "amx";
    if (dot && !has_amx_bf16()) return "vdpbf16ps";
    return fma ? "fma" : avx2 ? "avx2" : "";
  }();
  return kernel;
}

int64_t row_by_row_rows() { return std::string(streaming_kernel()) == "vdpbf16ps" ? DotTile::row_by_row_rows() : 0; }

#else

const char* streaming_kernel() { return ""; }
int64_t row_by_row_rows() { return 0; }

#endif

int64_t skinny_max_rows() {
  static const int64_t rows = [] {  // the kernel is chosen once, so is its limit
    const std::string kernel = streaming_kernel();
    return kernel == "amx" ? 1024 : kernel == "vdpbf16ps" ? 96 : 32;
  }();
  return rows;
}

SkinnyRows::SkinnyRows(const c10::BFloat16* const* rows, int64_t M, int64_t D, bool whole_tiles)
    : M_(M), stride_((D + 31) / 32 * 32), rows_(rows, rows + M) {
  TORCH_CHECK(M <= skinny_max_rows(), "SkinnyRows: at most ", skinny_max_rows(), " rows; got ", M);
  const std::string kernel = streaming_kernel();
  const auto* const* src = reinterpret_cast<const uint16_t* const*>(rows);
  const bool tiles = kernel == "amx" && D % 32 == 0;
  if (tiles) tiles_ = amx::pack(src, M, D);
  if (kernel != "fma" && kernel != "avx2" && !(kernel == "amx" && !(tiles && whole_tiles))) return;
  // Blocks of 32 elements as [16 even | 16 odd] for the AVX-512 FMA kernel, of 16 as [8 | 8] for AVX2.
  const int64_t width = kernel == "avx2" ? 16 : 32;
  wide_.assign(M * stride_, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = wide_.data() + m * stride_;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t block = d / width * width, lane = d % width;
      dst[block + (lane % 2) * (width / 2) + lane / 2] = vm::from_bits(static_cast<uint32_t>(src[m][d]) << 16);
    }
  }
}

void skinny_gemm_bf16(const c10::BFloat16* w_in, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const SkinnyRows& x,
                      float* out, int64_t ldo) {
#if FINTEAM_X86
  const auto* w = reinterpret_cast<const uint16_t*>(w_in);
  const std::string kernel = streaming_kernel();
  TORCH_CHECK(!kernel.empty(), "skinny_gemm_bf16 needs AVX2 or AVX-512");
  if (kernel == "avx2") {
    stream<Avx2Tile>(w, ldw, D, o0, o1, nullptr, x.wide_.data(), x.stride_, x.M_, out, ldo);
    return;
  }
  if (kernel == "vdpbf16ps") {
    const auto* const* rows = reinterpret_cast<const uint16_t* const*>(x.rows_.data());
    stream<DotTile>(w, ldw, D, o0, o1, rows, nullptr, 0, x.M_, out, ldo);
    return;
  }
  int64_t o = o0;
  if (!x.tiles_.empty()) {
    const int64_t blocks = (o1 - o0) / 16;
    amx::stream(w, ldw, D, o0, blocks, x.tiles_.data(), x.M_, out, ldo);
    o += blocks * 16;
  }
  if (o < o1) {
    TORCH_CHECK(!x.wide_.empty(), "skinny_gemm_bf16: rows left over from whole tiles, for a batch prepared without them");
    stream<FmaTile>(w, ldw, D, o, o1, nullptr, x.wide_.data(), x.stride_, x.M_, out + (o - o0), ldo);
  }
#else
  TORCH_CHECK(false, "skinny_gemm_bf16 needs an x86-64 CPU with AVX2 or AVX-512");
#endif
}

}  // namespace finteam::cpu
