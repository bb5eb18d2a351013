// Row movement shared by the ops: the gather of token rows into expert order and the weighted
// combine back into token order.
//
// Shape legend: T tokens, H hidden, E experts, K top-k, N = T*K routed rows.
#pragma once

#include <tuple>
#include <vector>

#include "common.h"

namespace finteam::cpu {

// The offsets on the host (they live there on the CPU), checked: E+1 entries, 0 to N, non-decreasing.
std::vector<int64_t> host_offsets(const at::Tensor& expert_offsets_E1, int64_t E, int64_t N, const char* op);

// dst[i] = src[i] rounded to bf16 (nearest even), for i < n.
void narrow_row(const float* src, int64_t n, c10::BFloat16* dst);

// x_NH[r] = x_TH[row_to_slot[r] / K] for r in [r0, r1), written to rows r - r0 of `out`.
void gather_rows(const at::Tensor& x_TH, const int32_t* row_to_slot_N, int64_t top_k, int64_t r0, int64_t r1,
                 at::Tensor& out);

// gather_rows' copy on the calling thread, for callers already inside a parallel task: rows of
// `bytes` bytes, x row row_to_slot_N[r] / top_k to out + (r - r0) * out_stride (strides in bytes).
void gather_rows_serial(const void* x, int64_t x_stride, const int32_t* row_to_slot_N, int64_t top_k, int64_t bytes,
                        int64_t r0, int64_t r1, void* out, int64_t out_stride);

// out_TH[t] = sum_j w[t, j] * y_NH[slot_to_row[t*K + j]], accumulated in fp32 (fp64 for fp64)
// in slot order; weights_TK undefined means all ones (permute's backward).
at::Tensor combine_rows(const at::Tensor& y_NH, const at::Tensor& slot_to_row_N, const at::Tensor& weights_TK,
                        int64_t top_k);

}  // namespace finteam::cpu
