// The AVX-512 bf16 weight-streaming kernels (4 weight rows by up to 4 batch rows per tile), and
// the choice between them and the AMX kernel (dot_amx.cpp).
//
// Designed for memory-bound decode: every weight byte is read from memory once; a tile's 4
// rows (4*D*2 bytes, 8 KB at D=1024) stay in L1 while each group of 4 batch rows passes over
// them, so M batch rows cost M/4 passes over L1, not M passes over memory. 16 accumulators,
// 4 (or 8 widened) weight and 1-2 batch registers fit the 32 zmm registers. Each tile
// prefetches the next one, which a single core's hardware prefetcher does not keep up with.
// Per 32 weight elements and batch row a tile spends one vdpbf16ps, or two FMAs on weights
// widened to fp32 (a shift and a mask per 32 weights, shared by the batch rows).
#include "dot_bf16.h"

#include <cstdlib>
#include <string>

#include "dot_amx.h"
#include "vmath.h"

#if FINTEAM_X86
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace finteam::cpu {

#if FINTEAM_X86
namespace {

#define FINTEAM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FINTEAM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))

bool has_amx_bf16() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) != 0;
}

__mmask32 tail_mask(int64_t left) { return left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << left) - 1u); }

template <int R, int MB>
FINTEAM_AVX512 inline void store(__m512 (&acc)[R][MB], float* out, int64_t ldo) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) out[m * ldo + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
}

// vdpbf16ps: pairs of bf16 products accumulate straight into fp32 lanes.
struct DotTile {
  template <int R, int MB>
  FINTEAM_AVX512_BF16 static inline __attribute__((always_inline)) void step(
      __m512 (&acc)[R][MB], const uint16_t* w, int64_t ldw, const uint16_t* const* x, int64_t d, __mmask32 mask) {
    __m512i wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * ldw + d);
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
  FINTEAM_AVX512_BF16 static void run(const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const* x,
                                      const float*, int64_t, float* out, int64_t ldo) {
    __m512 acc[R][MB];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    }
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) step<R, MB>(acc, w, ldw, x, d, ~__mmask32(0));
    if (d < D) step<R, MB>(acc, w, ldw, x, d, tail_mask(D - d));
    store<R, MB>(acc, out, ldo);
  }
};

// FMAs on weights widened to fp32: a 32-bit lane holds bf16 elements 2i (low half) and 2i+1
// (high half), so a shift gives the even elements and a mask the odd ones, matched by the batch
// rows stored as [16 even | 16 odd] per 32 elements.
struct FmaTile {
  template <int R, int MB>
  FINTEAM_AVX512 static inline __attribute__((always_inline)) void step(
      __m512 (&acc)[R][MB], const uint16_t* w, int64_t ldw, const float* x, int64_t ldx, int64_t d, __mmask32 mask) {
    __m512 even[R], odd[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi16(mask, w + r * ldw + d);
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * ldw + d), _MM_HINT_T0);
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

// One tile of R weight rows against every batch row, 4 batch rows at a time.
template <typename Tile, int R>
void tile_rows(const uint16_t* w, int64_t ldw, int64_t D, const uint16_t* const* x, const float* wide, int64_t ldx,
               int64_t M, float* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const uint16_t* const* xm = x != nullptr ? x + m0 : nullptr;
    const float* wm = wide != nullptr ? wide + m0 * ldx : nullptr;
    float* o = out + m0 * ldo;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: Tile::template run<R, 1>(w, ldw, D, xm, wm, ldx, o, ldo); break;
      case 2: Tile::template run<R, 2>(w, ldw, D, xm, wm, ldx, o, ldo); break;
      case 3: Tile::template run<R, 3>(w, ldw, D, xm, wm, ldx, o, ldo); break;
      default: Tile::template run<R, 4>(w, ldw, D, xm, wm, ldx, o, ldo); break;
    }
  }
}

// Rows [o0, o1) of w: whole tiles of 4 rows, then single rows.
template <typename Tile>
void stream(const uint16_t* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const uint16_t* const* x,
            const float* wide, int64_t ldx, int64_t M, float* out, int64_t ldo) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) tile_rows<Tile, 4>(w + o * ldw, ldw, D, x, wide, ldx, M, out + (o - o0), ldo);
  for (; o < o1; ++o) tile_rows<Tile, 1>(w + o * ldw, ldw, D, x, wide, ldx, M, out + (o - o0), ldo);
}

}  // namespace

const char* streaming_kernel() {
  static const char* kernel = [] {
    const std::string& isa = isa_name();
    const bool dot = isa == "avx512_bf16", fma = dot || isa == "avx512";
    // FINTEAM_CPU_STREAMING picks any kernel this CPU can run (to test each of them anywhere).
    const std::string wanted = std::getenv("FINTEAM_CPU_STREAMING") ? std::getenv("FINTEAM_CPU_STREAMING") : "";
    if (wanted == "vdpbf16ps" && dot) return "vdpbf16ps";
    if (wanted == "fma" && fma) return "fma";
    if (fma && amx::available()) return "amx";
    if (dot && !has_amx_bf16()) return "vdpbf16ps";
    return fma ? "fma" : "";
  }();
  return kernel;
}

#else

const char* streaming_kernel() { return ""; }

#endif

int64_t skinny_max_rows() { return std::string(streaming_kernel()) == "amx" ? 1024 : 32; }

SkinnyRows::SkinnyRows(const c10::BFloat16* const* rows, int64_t M, int64_t D, bool whole_tiles)
    : M_(M), stride_((D + 31) / 32 * 32), rows_(rows, rows + M) {
  TORCH_CHECK(M <= skinny_max_rows(), "SkinnyRows: at most ", skinny_max_rows(), " rows; got ", M);
  const std::string kernel = streaming_kernel();
  const auto* const* src = reinterpret_cast<const uint16_t* const*>(rows);
  const bool tiles = kernel == "amx" && D % 32 == 0;
  if (tiles) tiles_ = amx::pack(src, M, D);
  if (kernel != "fma" && !(kernel == "amx" && !(tiles && whole_tiles))) return;
  wide_.assign(M * stride_, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    float* dst = wide_.data() + m * stride_;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t block = d / 32 * 32, lane = d % 32;
      dst[block + (lane % 2) * 16 + lane / 2] = vm::from_bits(static_cast<uint32_t>(src[m][d]) << 16);
    }
  }
}

void skinny_gemm_bf16(const c10::BFloat16* w_in, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const SkinnyRows& x,
                      float* out, int64_t ldo) {
#if FINTEAM_X86
  const auto* w = reinterpret_cast<const uint16_t*>(w_in);
  const std::string kernel = streaming_kernel();
  TORCH_CHECK(!kernel.empty(), "skinny_gemm_bf16 needs AVX-512");
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
  TORCH_CHECK(false, "skinny_gemm_bf16 needs an x86-64 CPU with AVX-512");
#endif
}

}  // namespace finteam::cpu
