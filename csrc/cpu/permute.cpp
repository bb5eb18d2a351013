// permute on the CPU (the op's Python side: finteam_kernels/ops/permute.py).
//
// Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
// Forward: one memcpy per row (rows.h gather_rows). Backward: each token sums its K rows'
// gradients in slot order in fp32 (rows.h combine_rows; no atomics, deterministic).
#include "checks.h"
#include "ops_cpu.h"
#include "rows.h"

namespace finteam::cpu {

at::Tensor permute_fwd(const at::Tensor& x_TH, const at::Tensor& row_to_slot_N, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "permute: top_k must be >= 1; got ", top_k);
  check_indices(row_to_slot_N, x_TH.size(0) * top_k, "permute", "row_to_slot_N");
  const at::Tensor x = rows_dense(x_TH);
  const at::Tensor r2s = row_to_slot_N.to(at::kInt).contiguous();
  const int64_t N = r2s.numel();
  auto x_NH = at::empty({N, x.size(1)}, x.options());
  if (N > 0 && x.size(1) > 0) gather_rows(x, r2s.const_data_ptr<int32_t>(), top_k, 0, N, x_NH);
  return x_NH;
}

at::Tensor permute_bwd(const at::Tensor& grad_NH, const at::Tensor& slot_to_row_N, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "permute: top_k must be >= 1; got ", top_k);
  check_indices(slot_to_row_N, grad_NH.size(0), "permute", "slot_to_row_N");
  return combine_rows(grad_NH, slot_to_row_N, at::Tensor(), top_k);
}

}  // namespace finteam::cpu
