// permute on the CPU (the op's Python side: finteam_kernels/ops/permute.py).
//
// Shape legend: T tokens, H hidden, K top-k, N = T*K routed rows.
// Forward: one copy per row (rows.h gather_rows), past the caches for large outputs.
// Backward: each token sums its K rows' gradients in slot order in fp32 (rows.h combine_rows;
// no atomics, deterministic).
#include "alloc.h"
#include "checks.h"
#include "ops_cpu.h"
#include "rows.h"

namespace finteam::cpu {
namespace {

// Outputs from this size on are written with streaming stores: writing through the caches
// first reads every destination line in, and evicts the input rows still to be read. Measured
// on a 2-core AMD EPYC (32 MB L3), bf16, T=4096, K=2, index_select as the yardstick in
// alternating calls: at 16 MB (H=1024) streaming is 1.23-1.26x index_select against 0.91-0.98x,
// at 64 MB 1.14x against 0.98x; at 8 MB it is 0.94x against 1.02x, at 2 MB 1.30x against 1.57x.
// Measured again with outputs of 32 MiB and more from the block cache (alloc.h), each permute
// followed by a read of its output, as the GEMM after it reads it (same machine, shuffled rounds,
// streaming forced on and off): streamed / cached time 1.67x at 2 MiB, 1.59x at 4, 1.41x at 8
// (below 16 MiB the rows written through the caches are still there for the reader), 0.91x at
// 16 and 0.96x at 32. Permute alone, streaming wins from 4 MiB on; the reader is what sets 16.
constexpr int64_t kStreamedOutputBytes = int64_t(16) << 20;

}  // namespace

at::Tensor permute_fwd(const at::Tensor& x_TH, const at::Tensor& row_to_slot_N, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "permute: top_k must be >= 1; got ", top_k);
  check_indices(row_to_slot_N, x_TH.size(0) * top_k, "permute", "row_to_slot_N");
  const at::Tensor x = rows_dense(x_TH);
  const at::Tensor r2s = row_to_slot_N.to(at::kInt).contiguous();
  const int64_t N = r2s.numel();
  auto x_NH = empty_large({N, x.size(1)}, x.options());
  const bool large = N * x.size(1) * x.element_size() >= kStreamedOutputBytes;
  if (N > 0 && x.size(1) > 0) gather_rows(x, r2s.const_data_ptr<int32_t>(), top_k, 0, N, x_NH, large);
  return x_NH;
}

at::Tensor permute_bwd(const at::Tensor& grad_NH, const at::Tensor& slot_to_row_N, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "permute: top_k must be >= 1; got ", top_k);
  check_indices(slot_to_row_N, grad_NH.size(0), "permute", "slot_to_row_N");
  return combine_rows(grad_NH, slot_to_row_N, at::Tensor(), top_k);
}

}  // namespace finteam::cpu
