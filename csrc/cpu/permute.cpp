// permute on the CPU (the op's Python side: finteam_kernels/ops/permute.py).
//
// Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
// Forward: one copy per row (rows.h gather_rows).
// Backward: each token sums its K rows' gradients in slot order in fp32 (rows.h combine_rows;
// no atomics, deterministic).
#include "alloc.h"
#include "checks.h"
#include "ops_cpu.h"
#include "rows.h"

namespace finteam::cpu {

// The output is written through the caches. Streaming stores (past the caches, from 16 MiB) were
// dropped once outputs came from the block cache (alloc.h), where they no longer won: on a 2-core
// AMD EPYC (Zen 5, 32 MB L3), bf16, T=4096, K=2, calls alternating in one process, cached over
// streamed time 0.73-0.81 at 8 MiB, 0.98-1.03 at 16, 0.84-0.98 at 32, 0.91-0.92 at 64; each
// permute followed by a read of its output, as the GEMM after it reads it: 0.61-0.66, 0.83-0.85,
// 0.90-1.01, 0.94-0.95.
at::Tensor permute_fwd(const at::Tensor& x_TH, const at::Tensor& row_to_slot_N, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "permute: top_k must be >= 1; got ", top_k);
  check_indices(row_to_slot_N, x_TH.size(0) * top_k, "permute", "row_to_slot_N");
  const at::Tensor x = rows_dense(x_TH);
  const at::Tensor r2s = row_to_slot_N.to(at::kInt).contiguous();
  const int64_t N = r2s.numel();
  auto x_NH = empty_large({N, x.size(1)}, x.options());
  if (N > 0 && x.size(1) > 0) gather_rows(x, r2s.const_data_ptr<int32_t>(), top_k, 0, N, x_NH);
  return x_NH;
}

at::Tensor permute_bwd(const at::Tensor& grad_NH, const at::Tensor& slot_to_row_N, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "permute: top_k must be >= 1; got ", top_k);
  check_indices(slot_to_row_N, grad_NH.size(0), "permute", "slot_to_row_N");
  return combine_rows(grad_NH, slot_to_row_N, at::Tensor(), top_k);
}

}  // namespace finteam::cpu
