// Small-batch fp32 GEMM against weights read in place, for an fp32 expert with few rows
// (decode): there an ATen GEMM call's fixed cost (tens of microseconds on 2 cores, two calls
// per expert, plus the gather and the buffers around them) is most of the layer's time.
//
// Shape legend: D the reduction width, O output rows of the weight, M the batch rows.
#pragma once

#include <vector>

#include "common.h"

namespace finteam::cpu {

// Rows per expert up to which the experts' forward takes small_gemm_f32 instead of ATen's GEMM
// (on the 2-core AMD EPYC, AVX2: faster up to about 48 rows at H=128, I=256 and about 128 at
// H=1024, I=3584; 32 keeps a margin on both).
constexpr int64_t kSmallRowsF32 = 32;

// out[m * ldo + (o - o0)] = sum_{d < D} x[m][d] * w[o * ldw + d], for o in [o0, o1) and
// m < x.size(), in fp32. Single-threaded: callers split the rows o.
void small_gemm_f32(const float* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1, const std::vector<const float*>& x,
                    float* out, int64_t ldo);

}  // namespace finteam::cpu
