// Small-batch fp32 GEMM (dot_f32.h): every output is a dot product of a weight row and a batch
// row over D, in one fixed order, so a token gets the same bits whatever batch it is in.
//
// The order is that of the portable loop below as GCC vectorises it for AVX-512 (its
// x86-64-v4 clone): lane j of a 16-lane accumulator sums w[d] * x[d] for d = j, j + 16, ...
// with one FMA each, the d past the last whole vector go into lane 0, and the 16 lanes are then
// added one after the other, lane 0 first. That last step, 15 dependent additions through
// memory for each output, took more time than the FMAs at D = 128 and 256 (the tiny team).
// The AVX-512 kernel keeps the order and does the additions 16 outputs at a time: a tile's 16
// accumulators are transposed in registers, so that lane k of every output is one vector, and
// those 16 vectors are added in turn.
#include "dot_f32.h"

#if FINTEAM_X86
#include <immintrin.h>
#endif

namespace finteam::cpu {
namespace {

// Four weight rows at a time meet each batch row in one vectorised pass over D: four
// independent accumulators keep the FMA units busy where one dot product would wait on its own
// additions, and the four rows stay in L1 while the batch rows pass over them.
FINTEAM_SIMD void small_gemm_f32_loop(const float* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1,
                                      const std::vector<const float*>& x, float* out, int64_t ldo) {
  const int64_t M = static_cast<int64_t>(x.size());
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const float *w0 = w + o * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x[m];
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t d = 0; d < D; ++d) {
        const float xv = xm[d];
        a0 += w0[d] * xv;
        a1 += w1[d] * xv;
        a2 += w2[d] * xv;
        a3 += w3[d] * xv;
      }
      float* row = out + m * ldo + (o - o0);
      row[0] = a0;
      row[1] = a1;
      row[2] = a2;
      row[3] = a3;
    }
  }
  for (; o < o1; ++o) {
    const float* wr = w + o * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x[m];
      float a = 0;
#pragma omp simd reduction(+ : a)
      for (int64_t d = 0; d < D; ++d) a += wr[d] * xm[d];
      out[m * ldo + (o - o0)] = a;
    }
  }
}

#if FINTEAM_X86
// GCC 12 warns that its own unpack intrinsics read an uninitialised "__Y" (their unused merge
// source, from _mm512_undefined_ps): not this code's.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"

// r[i][k] -> r[k][i] for 16 vectors of 16 lanes: pairs of lanes, then of pairs, then 128-bit
// quarters twice.
FINTEAM_AVX512_LOOP void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + c] holds, in each 128-bit quarter, lane c of that quarter of rows 4g to 4g + 3
  __m512 u[16];
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2])));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3])));
  }
  for (int c = 0; c < 4; ++c) {
    // quarters 0 and 2, then 1 and 3, of rows 0-3 with rows 4-7, and of rows 8-11 with 12-15
    const __m512 even_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), odd_lo = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 even_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 odd_hi = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(even_lo, even_hi, 0x88);       // lane c of every row
    r[8 + c] = _mm512_shuffle_f32x4(even_lo, even_hi, 0xdd);   // lane 8 + c
    r[4 + c] = _mm512_shuffle_f32x4(odd_lo, odd_hi, 0x88);     // lane 4 + c
    r[12 + c] = _mm512_shuffle_f32x4(odd_lo, odd_hi, 0xdd);    // lane 12 + c
  }
}

// OB weight rows (from w) against MB batch rows (from x): out[r * ldo + q] for q < OB, r < MB.
// Accumulator i = r * OB + q; unused ones stay 0 through the transpose and are not stored.
template <int OB, int MB>
FINTEAM_AVX512 void dot_tile(const float* w, int64_t ldw, int64_t D, const float* const* x, float* out, int64_t ldo) {
  static_assert(OB * MB <= 16, "a tile holds at most 16 accumulators");
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const int64_t D16 = D & ~int64_t{15};
  for (int64_t d = 0; d < D16; d += 16) {
    __m512 wv[OB], xv[MB];
    for (int q = 0; q < OB; ++q) wv[q] = _mm512_loadu_ps(w + q * ldw + d);
    for (int r = 0; r < MB; ++r) xv[r] = _mm512_loadu_ps(x[r] + d);
    for (int r = 0; r < MB; ++r) {
      for (int q = 0; q < OB; ++q) acc[r * OB + q] = _mm512_fmadd_ps(xv[r], wv[q], acc[r * OB + q]);
    }
  }
  transpose16(acc);
  if (D16 < D) {  // the leftover d, one FMA each into lane 0
    alignas(64) float lane0[16];
    _mm512_store_ps(lane0, acc[0]);
    for (int i = 0; i < OB * MB; ++i) {
      const float* wr = w + (i % OB) * ldw;
      const float* xr = x[i / OB];
      for (int64_t d = D16; d < D; ++d) lane0[i] = __builtin_fmaf(xr[d], wr[d], lane0[i]);
    }
    acc[0] = _mm512_load_ps(lane0);
  }
  __m512 sum = _mm512_add_ps(_mm512_setzero_ps(), acc[0]);  // the reduction's 0 first, as the loop's
  for (int k = 1; k < 16; ++k) sum = _mm512_add_ps(sum, acc[k]);
  for (int r = 0; r < MB; ++r) {
    // lanes r * OB to r * OB + OB - 1 land at out[r * ldo], ..., out[r * ldo + OB - 1]
    const __mmask16 lanes = static_cast<__mmask16>(((1u << OB) - 1) << (r * OB));
    _mm512_mask_storeu_ps(out + r * ldo - r * OB, lanes, sum);
  }
}

// The tiles of OB weight rows from w against every batch row: MB at a time, then one by one.
template <int OB, int MB>
FINTEAM_AVX512 void dot_rows(const float* w, int64_t ldw, int64_t D, const float* const* x, int64_t M, float* out,
                             int64_t ldo) {
  int64_t m = 0;
  for (; m + MB <= M; m += MB) dot_tile<OB, MB>(w, ldw, D, x + m, out + m * ldo, ldo);
  for (; m < M; ++m) dot_tile<OB, 1>(w, ldw, D, x + m, out + m * ldo, ldo);
}

FINTEAM_AVX512 void small_gemm_f32_avx512(const float* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1,
                                          const std::vector<const float*>& x, float* out, int64_t ldo) {
  const int64_t M = static_cast<int64_t>(x.size());
  const float* const* xs = x.data();
  int64_t o = o0;
  // 16 weight rows (at most 16 KB at D = 256) stay in L1 while the batch passes: 4 rows x 4
  // batch rows a tile (8 loads for 16 FMAs), then 8 x 2, then 16 x 1.
  for (; o + 16 <= o1; o += 16) {
    const float* wo = w + o * ldw;
    float* oo = out + (o - o0);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      for (int q = 0; q < 16; q += 4) dot_tile<4, 4>(wo + q * ldw, ldw, D, xs + m, oo + m * ldo + q, ldo);
    }
    for (; m + 2 <= M; m += 2) {
      for (int q = 0; q < 16; q += 8) dot_tile<8, 2>(wo + q * ldw, ldw, D, xs + m, oo + m * ldo + q, ldo);
    }
    if (m < M) dot_tile<16, 1>(wo, ldw, D, xs + m, oo + m * ldo, ldo);
  }
  for (; o + 4 <= o1; o += 4) dot_rows<4, 4>(w + o * ldw, ldw, D, xs, M, out + (o - o0), ldo);
  for (; o < o1; ++o) dot_rows<1, 4>(w + o * ldw, ldw, D, xs, M, out + (o - o0), ldo);
}
#pragma GCC diagnostic pop
#endif

}  // namespace

void small_gemm_f32(const float* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const std::vector<const float*>& x,
                    float* out, int64_t ldo) {
#if FINTEAM_X86
  if (avx512_loops()) return small_gemm_f32_avx512(w, ldw, D, o0, o1, x, out, ldo);
#endif
  small_gemm_f32_loop(w, ldw, D, o0, o1, x, out, ldo);
}

}  // namespace finteam::cpu
