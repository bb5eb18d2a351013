// Every schema of the compiled MoE ops, in one place, with the shape functions (Meta) that
// let torch.compile and FakeTensor trace them.
//
// Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed
// rows; D and O are a GEMM's input and output widths.
//
// These are the launcher contract of csrc/README.md: each op has the signature of the Triton
// launcher of the same name in finteam_kernels/ops/, so a compiled backend is a drop-in. The
// implementations register per device: cpu/ops_cpu.cpp (CPU), cuda/ops_cuda.cpp (CUDA). This file
// is linked into the CPU library only; the CUDA library registers against these schemas.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/chunks_f32.h"
#include "cpu/common.h"
#include "cpu/dot_bf16.h"
#include "cpu/gemm_f32.h"
#include "cpu/tile_f32.h"

namespace finteam {
namespace {

using c10::SymInt;

// Routing weights are fp32, or fp64 for fp64 logits (the spec's precision).
at::ScalarType routing_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gating_fwd_meta(const at::Tensor& logits_TE,
                                                                    const std::optional<at::Tensor>&, int64_t k,
                                                                    c10::string_view, bool, int64_t, int64_t,
                                                                    double) {
  const SymInt T = logits_TE.sym_size(0), E = logits_TE.sym_size(1);
  auto opts = logits_TE.options();
  return {at::empty_symint({T, k}, opts.dtype(routing_dtype(logits_TE))), at::empty_symint({T, k}, opts.dtype(at::kInt)),
          at::empty_symint({E}, opts.dtype(at::kInt))};
}

at::Tensor topk_gating_bwd_meta(const at::Tensor&, const at::Tensor& logits_TE, const at::Tensor&, c10::string_view,
                                bool, double) {
  return at::empty_symint(logits_TE.sym_sizes(), logits_TE.options());
}

std::tuple<at::Tensor, at::Tensor> router_losses_fwd_meta(const at::Tensor& logits_TE, const at::Tensor&, int64_t) {
  auto opts = logits_TE.options().dtype(routing_dtype(logits_TE));
  return {at::empty({}, opts), at::empty({}, opts)};
}

at::Tensor router_losses_bwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor& logits_TE,
                                  const at::Tensor&, int64_t) {
  return at::empty_symint(logits_TE.sym_sizes(), logits_TE.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_fwd_meta(const at::Tensor& topk_ids_TK,
                                                                             int64_t num_experts) {
  const SymInt N = topk_ids_TK.sym_numel();
  auto opts = topk_ids_TK.options();
  return {at::empty_symint({SymInt(num_experts + 1)}, opts.dtype(at::kLong)),
          at::empty_symint({SymInt(num_experts)}, opts.dtype(at::kInt)), at::empty_symint({N}, opts.dtype(at::kInt)),
          at::empty_symint({N}, opts.dtype(at::kInt))};
}

at::Tensor permute_fwd_meta(const at::Tensor& x_TH, const at::Tensor& row_to_slot_N, int64_t) {
  return at::empty_symint({row_to_slot_N.sym_size(0), x_TH.sym_size(1)}, x_TH.options());
}

at::Tensor permute_bwd_meta(const at::Tensor& grad_NH, const at::Tensor&, int64_t top_k) {
  return at::empty_symint({grad_NH.sym_size(0) / top_k, grad_NH.sym_size(1)}, grad_NH.options());
}

at::Tensor unpermute_fwd_meta(const at::Tensor& y_NH, const at::Tensor&, const at::Tensor& topk_weights_TK) {
  return at::empty_symint({topk_weights_TK.sym_size(0), y_NH.sym_size(1)}, y_NH.options());
}

std::tuple<at::Tensor, at::Tensor> unpermute_bwd_meta(const at::Tensor&, const at::Tensor& y_NH, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor& topk_weights_TK) {
  return {at::empty_symint(y_NH.sym_sizes(), y_NH.options()),
          at::empty_symint(topk_weights_TK.sym_sizes(), topk_weights_TK.options())};
}

at::Tensor grouped_gemm_fwd_meta(const at::Tensor& x_ND, const at::Tensor& w_EOD, const at::Tensor&) {
  return at::empty_symint({x_ND.sym_size(0), w_EOD.sym_size(1)}, x_ND.options());
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_bwd_meta(const at::Tensor&, const at::Tensor& x_ND,
                                                         const at::Tensor& w_EOD, const at::Tensor&) {
  return {at::empty_symint(x_ND.sym_sizes(), x_ND.options()), at::empty_symint(w_EOD.sym_sizes(), w_EOD.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_fwd_meta(
    const at::Tensor& x_TH, const at::Tensor& topk_ids_TK, const at::Tensor&, const at::Tensor& w_gate_up_E2IH,
    const at::Tensor&, c10::string_view, bool needs_grad) {
  const SymInt N = topk_ids_TK.sym_numel(), E = w_gate_up_E2IH.sym_size(0);
  auto opts = x_TH.options();
  return {at::empty_symint(x_TH.sym_sizes(), opts),
          at::empty_symint({needs_grad ? N : SymInt(0), w_gate_up_E2IH.sym_size(1)}, opts),
          at::empty_symint({E + 1}, opts.dtype(at::kLong)), at::empty_symint({N}, opts.dtype(at::kInt)),
          at::empty_symint({N}, opts.dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_experts_bwd_meta(
    const at::Tensor&, const at::Tensor& x_TH, const at::Tensor& topk_weights_TK, const at::Tensor& w_gate_up_E2IH,
    const at::Tensor& w_down_EHI, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::string_view) {
  return {at::empty_symint(x_TH.sym_sizes(), x_TH.options()),
          at::empty_symint(topk_weights_TK.sym_sizes(), topk_weights_TK.options()),
          at::empty_symint(w_gate_up_E2IH.sym_sizes(), w_gate_up_E2IH.options()),
          at::empty_symint(w_down_EHI.sym_sizes(), w_down_EHI.options())};
}

std::string cpu_capability() {
  const std::string kernel = cpu::streaming_kernel();
  // The bf16 streaming kernel comes last: tests read it as the text after "streaming: ".
  const std::string chunks = !cpu::chunks_f32_enabled() ? "none (ATen GEMM)"
                             : cpu::gemm_f32_enabled()    ? "BLAS + AVX-512 backward GEMMs"
                                                          : "BLAS";
  return cpu::isa_name() + ", fp32 training chunks: " + chunks +
         ", fp32 tiles: " + (cpu::tiled_f32_available() ? cpu::tiled_f32_kernel() : "none (ATen GEMM)") +
         (cpu::row_by_row_rows() > 0 ? ", bf16 batches of up to " + std::to_string(cpu::row_by_row_rows()) +
                                           " rows streamed one weight row at a time"
                                     : std::string()) +
         ", bf16 weight streaming: " + (kernel.empty() ? "none (ATen GEMM)" : kernel);
}

}  // namespace

TORCH_LIBRARY(finteam, m) {
  m.def(
      "topk_gating_fwd(Tensor logits_TE, Tensor? expert_bias_E, int k, str score, bool renormalize, int num_groups, "
      "int topk_groups, float scaling) -> (Tensor weights_TK, Tensor ids_TK, Tensor tokens_per_expert_E)");
  m.def(
      "topk_gating_bwd(Tensor grad_weights_TK, Tensor logits_TE, Tensor ids_TK, str score, bool renormalize, "
      "float scaling) -> Tensor grad_logits_TE");
  m.def("router_losses_fwd(Tensor logits_TE, Tensor topk_ids_TK, int num_experts) -> (Tensor aux_loss, Tensor z_loss)");
  m.def(
      "router_losses_bwd(Tensor grad_aux, Tensor grad_z, Tensor logits_TE, Tensor topk_ids_TK, int num_experts) -> "
      "Tensor grad_logits_TE");
  m.def(
      "dispatch_fwd(Tensor topk_ids_TK, int num_experts) -> (Tensor expert_offsets_E1, Tensor tokens_per_expert_E, "
      "Tensor row_to_slot_N, Tensor slot_to_row_N)");
  m.def("permute_fwd(Tensor x_TH, Tensor row_to_slot_N, int top_k) -> Tensor x_NH");
  m.def("permute_bwd(Tensor grad_NH, Tensor slot_to_row_N, int top_k) -> Tensor grad_TH");
  m.def("unpermute_fwd(Tensor y_NH, Tensor slot_to_row_N, Tensor topk_weights_TK) -> Tensor out_TH");
  m.def(
      "unpermute_bwd(Tensor grad_TH, Tensor y_NH, Tensor row_to_slot_N, Tensor slot_to_row_N, Tensor topk_weights_TK) "
      "-> (Tensor grad_NH, Tensor grad_weights_TK)");
  m.def("grouped_gemm_fwd(Tensor x_ND, Tensor w_EOD, Tensor expert_offsets_E1) -> Tensor y_NO");
  m.def(
      "grouped_gemm_bwd(Tensor grad_NO, Tensor x_ND, Tensor w_EOD, Tensor expert_offsets_E1) -> (Tensor grad_x_ND, "
      "Tensor grad_w_EOD)");
  m.def(
      "moe_experts_fwd(Tensor x_TH, Tensor topk_ids_TK, Tensor topk_weights_TK, Tensor w_gate_up_E2IH, "
      "Tensor w_down_EHI, str activation, bool needs_grad) -> (Tensor out_TH, Tensor h_N2I, Tensor expert_offsets_E1, "
      "Tensor row_to_slot_N, Tensor slot_to_row_N)");
  m.def(
      "moe_experts_bwd(Tensor grad_TH, Tensor x_TH, Tensor topk_weights_TK, Tensor w_gate_up_E2IH, Tensor w_down_EHI, "
      "Tensor h_N2I, Tensor expert_offsets_E1, Tensor row_to_slot_N, Tensor slot_to_row_N, str activation) -> "
      "(Tensor grad_x_TH, Tensor grad_weights_TK, Tensor grad_w_gate_up_E2IH, Tensor grad_w_down_EHI)");
  // Not part of the launcher contract: what the CPU kernels chose on this CPU (for info.py).
  m.def("cpu_capability() -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(finteam, Meta, m) {
  m.impl("topk_gating_fwd", &topk_gating_fwd_meta);
  m.impl("topk_gating_bwd", &topk_gating_bwd_meta);
  m.impl("router_losses_fwd", &router_losses_fwd_meta);
  m.impl("router_losses_bwd", &router_losses_bwd_meta);
  m.impl("dispatch_fwd", &dispatch_fwd_meta);
  m.impl("permute_fwd", &permute_fwd_meta);
  m.impl("permute_bwd", &permute_bwd_meta);
  m.impl("unpermute_fwd", &unpermute_fwd_meta);
  m.impl("unpermute_bwd", &unpermute_bwd_meta);
  m.impl("grouped_gemm_fwd", &grouped_gemm_fwd_meta);
  m.impl("grouped_gemm_bwd", &grouped_gemm_bwd_meta);
  m.impl("moe_experts_fwd", &moe_experts_fwd_meta);
  m.impl("moe_experts_bwd", &moe_experts_bwd_meta);
}

}  // namespace finteam
