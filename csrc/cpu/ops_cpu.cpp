// Registers the CPU implementation of every finteam op (schemas in csrc/ops.cpp; the kernels in
// one file per op, declared in ops_cpu.h). The CUDA library's counterpart is cuda/ops_cuda.cpp.
#include <torch/library.h>

#include "ops_cpu.h"

namespace finteam::cpu {

TORCH_LIBRARY_IMPL(finteam, CPU, m) {
  m.impl("topk_gating_fwd", &topk_gating_fwd);
  m.impl("topk_gating_bwd", &topk_gating_bwd);
  m.impl("router_losses_fwd", &router_losses_fwd);
  m.impl("router_losses_bwd", &router_losses_bwd);
  m.impl("dispatch_fwd", &dispatch_fwd);
  m.impl("permute_fwd", &permute_fwd);
  m.impl("permute_bwd", &permute_bwd);
  m.impl("unpermute_fwd", &unpermute_fwd);
  m.impl("unpermute_bwd", &unpermute_bwd);
  m.impl("grouped_gemm_fwd", &grouped_gemm_fwd);
  m.impl("grouped_gemm_bwd", &grouped_gemm_bwd);
  m.impl("moe_experts_fwd", &moe_experts_fwd);
  m.impl("moe_experts_bwd", &moe_experts_bwd);
}

}  // namespace finteam::cpu
