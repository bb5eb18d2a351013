// Small-batch fp32 GEMM (dot_f32.h). Four weight rows at a time meet each batch row in one
// vectorised pass over D: four independent accumulators keep the FMA units busy where one dot
// product would wait on its own additions (at M = 1, decode, that is the whole difference), and
// the four rows (16 bytes x D) stay in L1 while the batch rows pass over them.
#include "dot_f32.h"

namespace finteam::cpu {

FINTEAM_SIMD void small_gemm_f32(const float* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1,
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

}  // namespace finteam::cpu
