// unpermute on the CPU (the op's Python side: finteam_kernels/ops/unpermute.py).
//
// Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
// Forward: each token reduces its K rows, weighted, in slot order in fp32 (rows.h combine_rows;
// no atomics, deterministic). Backward: one pass over each token's K rows gives both the rows'
// gradients and the weights' (a dot product per row). Memory-bound: one read and one write of
// each row.
#include <vector>

#include "alloc.h"
#include "checks.h"
#include "ops_cpu.h"
#include "rows.h"
#include "vmath.h"

namespace finteam::cpu {
namespace {

template <typename scalar_t, typename acc_t>
FINTEAM_SIMD void unpermute_grad_kernel(const scalar_t* g, int64_t stride_g, const scalar_t* y, int64_t stride_y,
                                        const int32_t* slot_to_row, const acc_t* w, int64_t K, int64_t H, int64_t t0,
                                        int64_t t1, scalar_t* grad_NH, acc_t* grad_w) {
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* gt = g + t * stride_g;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t r = slot_to_row[t * K + j];
      const scalar_t* yr = y + r * stride_y;
      scalar_t* dy = grad_NH + r * H;
      const acc_t wt = w[t * K + j];
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t h = 0; h < H; ++h) {
        const acc_t gv = vm::widen(gt[h]);
        dy[h] = vm::narrow<scalar_t>(gv * wt);
        dot += gv * vm::widen(yr[h]);
      }
      grad_w[t * K + j] = dot;
    }
  }
}

}  // namespace

at::Tensor unpermute_fwd(const at::Tensor& y_NH, const at::Tensor& slot_to_row_N, const at::Tensor& topk_weights_TK) {
  TORCH_CHECK(slot_to_row_N.numel() == topk_weights_TK.numel(), "unpermute: slot_to_row_N must hold T*K = ",
              topk_weights_TK.numel(), " rows, one per slot of topk_weights_TK; got ", slot_to_row_N.numel());
  check_indices(slot_to_row_N, y_NH.size(0), "unpermute", "slot_to_row_N");
  return combine_rows(y_NH, slot_to_row_N, topk_weights_TK, topk_weights_TK.size(1));
}

std::tuple<at::Tensor, at::Tensor> unpermute_bwd(const at::Tensor& grad_TH, const at::Tensor& y_NH_in,
                                                 const at::Tensor& row_to_slot_N, const at::Tensor& slot_to_row_N,
                                                 const at::Tensor& topk_weights_TK) {
  const at::Tensor y_NH = rows_dense(y_NH_in);
  const at::Tensor grad = rows_dense(grad_TH.to(y_NH.scalar_type()));
  const int64_t T = topk_weights_TK.size(0), K = topk_weights_TK.size(1), H = y_NH.size(1);
  TORCH_CHECK(slot_to_row_N.numel() == T * K && y_NH.size(0) == T * K, "unpermute: slot_to_row_N and y_NH must ",
              "have T*K = ", T * K, " rows; got ", slot_to_row_N.numel(), " and ", y_NH.size(0));
  // every row of grad_NH is written through slot_to_row_N: a repeat would leave another unwritten
  check_permutation(slot_to_row_N, "unpermute", "slot_to_row_N");
  auto grad_NH = empty_large({y_NH.size(0), H}, y_NH.options());
  const auto acc = acc_dtype(y_NH.scalar_type());
  const at::Tensor w = topk_weights_TK.to(acc).contiguous();
  auto grad_w = at::empty({T, K}, w.options());
  if (T > 0 && H == 0) grad_w.zero_();
  if (T > 0 && H > 0) {
    const at::Tensor s2r = slot_to_row_N.to(at::kInt).contiguous();
    FINTEAM_DISPATCH_FLOATS(y_NH.scalar_type(), "unpermute_bwd", [&] {
      using acc_t = acc_type<scalar_t>;
      at::parallel_for(0, T, grain(2 * H * K), [&](int64_t t0, int64_t t1) {
        unpermute_grad_kernel<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), grad.stride(0),
                                               y_NH.const_data_ptr<scalar_t>(), y_NH.stride(0),
                                               s2r.const_data_ptr<int32_t>(), w.const_data_ptr<acc_t>(), K, H, t0, t1,
                                               grad_NH.data_ptr<scalar_t>(), grad_w.data_ptr<acc_t>());
      });
    });
  }
  return {grad_NH, grad_w.to(topk_weights_TK.scalar_type())};
}

}  // namespace finteam::cpu
