// Small-batch bf16 GEMM for weights streamed from memory (decode-sized batches of an expert).
//
// Shape legend: D the reduction width, O output rows of the weight, M the batch rows.
#pragma once

#include "common.h"

namespace finteam::cpu {

// Rows per expert up to which streaming the weight through skinny_gemm_bf16 beats ATen's GEMM
// (measured on the reference CPU; above it the GEMM's blocking wins).
constexpr int64_t kSkinnyMaxRows = 32;

// Whether skinny_gemm_bf16 can run here (it needs AVX512-BF16); callers fall back to at::mm.
bool skinny_gemm_available();

// out[m * ldo + (o - o0)] = sum_{d < D} x_rows[m][d] * w[o * ldw + d], for o in [o0, o1) and
// m in [0, M), accumulated in fp32. Single-threaded: callers split the rows o between threads.
void skinny_gemm_bf16(const c10::BFloat16* w, int64_t ldw, int64_t D, int64_t o0, int64_t o1,
                      const c10::BFloat16* const* x_rows, int64_t M, float* out, int64_t ldo);

}  // namespace finteam::cpu
