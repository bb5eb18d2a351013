// The CPU implementations of the finteam ops, one file per op (csrc/README.md maps each op to
// its files in every language); ops_cpu.cpp registers them for the schemas of csrc/ops.cpp.
//
// Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed
// rows; D and O are a GEMM's input and output widths.
#pragma once

#include <optional>
#include <tuple>

#include "common.h"

namespace finteam::cpu {

// topk_gating.cpp: (weights_TK fp32/fp64, ids_TK int32, tokens_per_expert_E int32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_fwd(const at::Tensor& logits_TE,
                                                               const std::optional<at::Tensor>& expert_bias_E,
                                                               int64_t k, c10::string_view score, bool renormalize,
                                                               int64_t num_groups, int64_t topk_groups,
                                                               double scaling);
at::Tensor topk_gating_bwd(const at::Tensor& grad_weights_TK, const at::Tensor& logits_TE, const at::Tensor& ids_TK,
                           c10::string_view score, bool renormalize, double scaling);

// router_losses.cpp: (aux_loss, z_loss) as 0-D tensors.
std::tuple<at::Tensor, at::Tensor> router_losses_fwd(const at::Tensor& logits_TE, const at::Tensor& topk_ids_TK,
                                                     int64_t num_experts);
at::Tensor router_losses_bwd(const at::Tensor& grad_aux, const at::Tensor& grad_z, const at::Tensor& logits_TE,
                             const at::Tensor& topk_ids_TK, int64_t num_experts);

// dispatch.cpp: (expert_offsets_E1 int64, tokens_per_expert_E int32, row_to_slot_N int32,
// slot_to_row_N int32): a stable counting sort of the N slots by expert.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_fwd(const at::Tensor& topk_ids_TK,
                                                                        int64_t num_experts);

// permute.cpp
at::Tensor permute_fwd(const at::Tensor& x_TH, const at::Tensor& row_to_slot_N, int64_t top_k);
at::Tensor permute_bwd(const at::Tensor& grad_NH, const at::Tensor& slot_to_row_N, int64_t top_k);

// unpermute.cpp
at::Tensor unpermute_fwd(const at::Tensor& y_NH, const at::Tensor& slot_to_row_N, const at::Tensor& topk_weights_TK);
std::tuple<at::Tensor, at::Tensor> unpermute_bwd(const at::Tensor& grad_TH, const at::Tensor& y_NH,
                                                 const at::Tensor& row_to_slot_N, const at::Tensor& slot_to_row_N,
                                                 const at::Tensor& topk_weights_TK);

// grouped_gemm.cpp
at::Tensor grouped_gemm_fwd(const at::Tensor& x_ND, const at::Tensor& w_EOD, const at::Tensor& expert_offsets_E1);
std::tuple<at::Tensor, at::Tensor> grouped_gemm_bwd(const at::Tensor& grad_NO, const at::Tensor& x_ND,
                                                    const at::Tensor& w_EOD, const at::Tensor& expert_offsets_E1);

// moe_experts.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_fwd(
    const at::Tensor& x_TH, const at::Tensor& topk_ids_TK, const at::Tensor& topk_weights_TK,
    const at::Tensor& w_gate_up_E2IH, const at::Tensor& w_down_EHI, c10::string_view activation, bool needs_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd(
    const at::Tensor& grad_TH, const at::Tensor& x_TH, const at::Tensor& topk_weights_TK,
    const at::Tensor& w_gate_up_E2IH, const at::Tensor& w_down_EHI, const at::Tensor& h_N2I,
    const at::Tensor& expert_offsets_E1, const at::Tensor& row_to_slot_N, const at::Tensor& slot_to_row_N,
    c10::string_view activation);

}  // namespace finteam::cpu
