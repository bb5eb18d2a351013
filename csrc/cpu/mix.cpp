// The row-mixing kernel of mix.h.
//
// A tile is up to 4 output rows by 64 columns of fp32 accumulators (16 zmm registers on
// AVX-512); per q it widens 64 elements of b once and adds them, scaled, to each row, so each
// coefficient's broadcast serves 4 vector FMAs. For dW (Q = M) b's M rows stay in L1 across the
// tiles of a row block; for dX (P = M) a column block of the weight stays in L1/L2 across the
// tiles of batch rows and is read from memory once.
#include "mix.h"

#include <algorithm>

#include "vmath.h"

namespace finteam::cpu {
namespace {

constexpr int64_t kCols = 64;
constexpr int64_t kAhead = 32;  // rows of b prefetched ahead: about a memory latency of FMAs

template <int R, bool kFull, typename scalar_t>
FINTEAM_SIMD void mix_tile(const scalar_t* a, int64_t sp, int64_t sq, int64_t Q, const scalar_t* b, int64_t ldb,
                           int64_t n, scalar_t* out, int64_t ldo) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cols = kFull ? kCols : n;
  acc_t acc[R][kCols] = {};
  acc_t row[kCols];
  for (int64_t q = 0; q < Q; ++q) {
    const scalar_t* bq = b + q * ldb;
    // b's rows are often far apart (a column block of a weight): the hardware prefetcher, which
    // follows a stream within a 4 KB page, does not see the next one coming.
    __builtin_prefetch(bq + kAhead * ldb);
    __builtin_prefetch(bq + kAhead * ldb + kCols - 1);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) row[c] = vm::widen(bq[c]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const acc_t s = vm::widen(a[r * sp + q * sq]);
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) acc[r][c] += s * row[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) out[r * ldo + c] = vm::narrow<scalar_t>(acc[r][c]);
  }
}

template <bool kFull, typename scalar_t>
void mix_columns(const scalar_t* a, int64_t sp, int64_t sq, int64_t P, int64_t Q, const scalar_t* b, int64_t ldb,
                 int64_t n, scalar_t* out, int64_t ldo) {
  int64_t p = 0;
  for (; p + 4 <= P; p += 4) mix_tile<4, kFull>(a + p * sp, sp, sq, Q, b, ldb, n, out + p * ldo, ldo);
  if (p + 2 <= P) {
    mix_tile<2, kFull>(a + p * sp, sp, sq, Q, b, ldb, n, out + p * ldo, ldo);
    p += 2;
  }
  if (p < P) mix_tile<1, kFull>(a + p * sp, sp, sq, Q, b, ldb, n, out + p * ldo, ldo);
}

// Column blocks outer, row tiles inner: one block of b's columns serves every tile of rows.
template <typename scalar_t>
void mix_block(const scalar_t* a, int64_t sp, int64_t sq, int64_t P, int64_t Q, const scalar_t* b, int64_t ldb,
               int64_t c0, int64_t c1, scalar_t* out, int64_t ldo) {
  int64_t c = c0;
  for (; c + kCols <= c1; c += kCols) mix_columns<true>(a, sp, sq, P, Q, b + c, ldb, kCols, out + c - c0, ldo);
  if (c < c1) mix_columns<false>(a, sp, sq, P, Q, b + c, ldb, c1 - c, out + c - c0, ldo);
}

}  // namespace

// More output rows than terms (dW): b fits in L1 whatever the order, so the output is written
// row tile by row tile, sequentially; fewer (dX): by column blocks, so each block of b is read
// from memory once.
template <typename scalar_t>
void mix_rows(const scalar_t* a, int64_t sp, int64_t sq, int64_t P, int64_t Q, const scalar_t* b, int64_t ldb,
              int64_t c0, int64_t c1, scalar_t* out, int64_t ldo) {
  if (P <= Q) return mix_block(a, sp, sq, P, Q, b, ldb, c0, c1, out, ldo);
  for (int64_t p = 0; p < P; p += 4)
    mix_block(a + p * sp, sp, sq, std::min<int64_t>(4, P - p), Q, b, ldb, c0, c1, out + p * ldo, ldo);
}

template void mix_rows<float>(const float*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                              int64_t, float*, int64_t);
template void mix_rows<double>(const double*, int64_t, int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                               int64_t, double*, int64_t);
template void mix_rows<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, int64_t, const c10::Half*, int64_t,
                                  int64_t, int64_t, c10::Half*, int64_t);
template void mix_rows<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, const c10::BFloat16*,
                                      int64_t, int64_t, int64_t, c10::BFloat16*, int64_t);

}  // namespace finteam::cpu
