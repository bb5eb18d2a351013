// The CUDA implementations of the finteam ops (schemas in csrc/ops.cpp): argument checks,
// output and scratch allocation, the device guard and current stream, then the kernels of
// csrc/cuda/*.cu through kernels.h.
//
// Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed
// rows; D and O are a GEMM's input and output widths.
//
// Nothing here reads device memory on the host: shapes come from tensor metadata, and counts and
// offsets stay on the device, so every op can be captured in a CUDA graph. Inputs may be
// strided: the row kernels and gating take strides (stride 0 included); GEMM operands and ids
// are made contiguous once, here.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "kernels.h"

namespace finteam {
namespace {

using at::Tensor;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

void check_device(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda): ", name, " must be a CUDA tensor; got one on ", t.device());
}

void check_dim(const Tensor& t, int64_t dim, const char* op, const char* name, const char* dims) {
  TORCH_CHECK(t.dim() == dim, op, " (cuda): ", name, " must be a ", dim, "-D tensor [", dims, "]; got shape ",
              t.sizes());
}

DType dtype_of(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      TORCH_CHECK(false, op, " (cuda): ", name, " must be float32, float16 or bfloat16; got ", t.scalar_type(),
                  " (float64 runs on the triton and reference backends)");
  }
  return DType::F32;  // not reached: TORCH_CHECK(false) throws
}

// Expert ids as a contiguous int32/int64 tensor and their kind.
std::pair<Tensor, IdType> ids_of(const Tensor& ids, const char* op, const char* name) {
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op, " (cuda): ", name,
              " must be int32 or int64; got ", ids.scalar_type());
  return {ids.contiguous(), ids.scalar_type() == at::kInt ? IdType::I32 : IdType::I64};
}

// Plan indices (row_to_slot, slot_to_row) are int32 and contiguous.
Tensor index_of(const Tensor& index, int64_t n, const char* op, const char* name) {
  check_device(index, op, name);
  TORCH_CHECK(index.numel() == n, op, " (cuda): ", name, " must have ", n, " entries; got ", index.numel());
  return index.to(at::kInt).contiguous();
}

// Routing weights in fp32, contiguous, whatever dtype they came in.
Tensor weights_of(const Tensor& w, const char* op) {
  check_device(w, op, "topk_weights_TK");
  check_dim(w, 2, op, "topk_weights_TK", "T, K");
  return w.to(at::kFloat).contiguous();
}

Score score_of(c10::string_view score, const char* op) {
  TORCH_CHECK(score == "softmax" || score == "sigmoid", op, " (cuda): score must be 'softmax' or 'sigmoid'; got '",
              std::string(score), "'");
  return score == "softmax" ? Score::Softmax : Score::Sigmoid;
}

Act act_of(c10::string_view activation, const char* op) {
  TORCH_CHECK(activation == "silu" || activation == "gelu" || activation == "gelu_tanh", op,
              " (cuda): activation must be 'silu', 'gelu' or 'gelu_tanh'; got '", std::string(activation), "'");
  return activation == "silu" ? Act::SiLU : activation == "gelu" ? Act::GeLU : Act::GeLUTanh;
}

Tensor scratch(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// ---- gating ----

std::tuple<Tensor, Tensor, Tensor> topk_gating_fwd_cuda(const Tensor& logits_TE,
                                                        const std::optional<Tensor>& expert_bias_E, int64_t k,
                                                        c10::string_view score, bool renormalize, int64_t num_groups,
                                                        int64_t topk_groups, double scaling) {
  const char* op = "topk_gating";
  check_device(logits_TE, op, "logits_TE");
  check_dim(logits_TE, 2, op, "logits_TE", "T, E");
  const DType dtype = dtype_of(logits_TE, op, "logits_TE");
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK(k >= 1 && k <= E, op, " (cuda): k must be in [1, ", E, "]; got ", k);
  TORCH_CHECK(E <= topk_gating_max_experts(), op, " (cuda): at most ", topk_gating_max_experts(), " experts; got ", E);
  TORCH_CHECK(num_groups >= 1 && E % num_groups == 0, op, " (cuda): num_groups must divide E=", E, "; got ",
              num_groups);
  TORCH_CHECK(topk_groups >= 1 && topk_groups <= num_groups, op, " (cuda): topk_groups must be in [1, ", num_groups,
              "]; got ", topk_groups);
  const Score kind = score_of(score, op);
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  Tensor bias;
  if (expert_bias_E.has_value()) {
    check_device(*expert_bias_E, op, "expert_bias_E");
    TORCH_CHECK(expert_bias_E->numel() == E, op, " (cuda): expert_bias_E must have ", E, " entries; got ",
                expert_bias_E->numel());
    bias = expert_bias_E->to(at::kFloat).contiguous();
  }
  auto opts = logits_TE.options();
  Tensor weights = at::empty({T, k}, opts.dtype(at::kFloat));
  Tensor ids = at::empty({T, k}, opts.dtype(at::kInt));
  Tensor counts = at::empty({E}, opts.dtype(at::kInt));
  check_launch(topk_gating_fwd(logits_TE.data_ptr(), dtype, logits_TE.stride(0), logits_TE.stride(1),
                               bias.defined() ? bias.data_ptr<float>() : nullptr, T, E, k, kind, renormalize,
                               num_groups, topk_groups, static_cast<float>(scaling), weights.data_ptr<float>(),
                               ids.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), current_stream()),
               op);
  return {weights, ids, counts};
}

Tensor topk_gating_bwd_cuda(const Tensor& grad_weights_TK, const Tensor& logits_TE, const Tensor& ids_TK,
                            c10::string_view score, bool renormalize, double scaling) {
  const char* op = "topk_gating_bwd";
  check_device(logits_TE, op, "logits_TE");
  check_dim(logits_TE, 2, op, "logits_TE", "T, E");
  check_dim(grad_weights_TK, 2, op, "grad_weights_TK", "T, K");
  check_dim(ids_TK, 2, op, "ids_TK", "T, K");
  const DType dtype = dtype_of(logits_TE, op, "logits_TE");
  const Score kind = score_of(score, op);
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1), K = ids_TK.size(1);
  TORCH_CHECK(grad_weights_TK.sizes() == ids_TK.sizes() && ids_TK.size(0) == T, op,
              " (cuda): grad_weights_TK and ids_TK must both be [T=", T, ", K]; got ", grad_weights_TK.sizes(), " and ",
              ids_TK.sizes());
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  const Tensor grad = grad_weights_TK.to(at::kFloat);
  const Tensor ids = ids_TK.to(at::kInt).contiguous();
  Tensor grad_logits = at::empty({T, E}, logits_TE.options());
  check_launch(topk_gating_bwd(grad.data_ptr<float>(), grad.stride(0), grad.stride(1), logits_TE.data_ptr(), dtype,
                               logits_TE.stride(0), logits_TE.stride(1), ids.data_ptr<int32_t>(), T, E, K, kind,
                               renormalize, static_cast<float>(scaling), grad_logits.data_ptr(), current_stream()),
               op);
  return grad_logits;
}

std::tuple<Tensor, Tensor> router_losses_fwd_cuda(const Tensor& logits_TE, const Tensor& topk_ids_TK,
                                                  int64_t num_experts) {
  const char* op = "router_losses";
  check_device(logits_TE, op, "logits_TE");
  check_dim(logits_TE, 2, op, "logits_TE", "T, E");
  const DType dtype = dtype_of(logits_TE, op, "logits_TE");
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK(E == num_experts, op, " (cuda): logits_TE has ", E, " experts but num_experts is ", num_experts);
  check_dim(topk_ids_TK, 2, op, "topk_ids_TK", "T, K");
  TORCH_CHECK(topk_ids_TK.size(0) == T, op, " (cuda): topk_ids_TK must have T=", T, " rows; got ", topk_ids_TK.size(0));
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  auto [ids, id_type] = ids_of(topk_ids_TK, op, "topk_ids_TK");
  const int64_t K = ids.size(1);
  Tensor aux = at::empty({}, logits_TE.options().dtype(at::kFloat));
  Tensor z = at::empty({}, logits_TE.options().dtype(at::kFloat));
  Tensor work = scratch(router_losses_scratch_bytes(T, E), logits_TE);
  check_launch(
      router_losses_fwd(logits_TE.data_ptr(), dtype, logits_TE.stride(0), logits_TE.stride(1), ids.data_ptr(), id_type,
                        T, E, K, work.data_ptr(), aux.data_ptr<float>(), z.data_ptr<float>(), current_stream()),
      op);
  return {aux, z};
}

Tensor router_losses_bwd_cuda(const Tensor& grad_aux, const Tensor& grad_z, const Tensor& logits_TE,
                              const Tensor& topk_ids_TK, int64_t num_experts) {
  const char* op = "router_losses_bwd";
  check_device(logits_TE, op, "logits_TE");
  check_dim(logits_TE, 2, op, "logits_TE", "T, E");
  const DType dtype = dtype_of(logits_TE, op, "logits_TE");
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK(E == num_experts, op, " (cuda): logits_TE has ", E, " experts but num_experts is ", num_experts);
  TORCH_CHECK(grad_aux.numel() == 1 && grad_z.numel() == 1, op, " (cuda): grad_aux and grad_z must be scalars");
  check_dim(topk_ids_TK, 2, op, "topk_ids_TK", "T, K");
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  auto [ids, id_type] = ids_of(topk_ids_TK, op, "topk_ids_TK");
  const Tensor ga = grad_aux.to(logits_TE.device(), at::kFloat).contiguous();
  const Tensor gz = grad_z.to(logits_TE.device(), at::kFloat).contiguous();
  Tensor grad_logits = at::empty({T, E}, logits_TE.options());
  Tensor work = scratch(E * sizeof(int32_t), logits_TE);
  check_launch(router_losses_bwd(ga.data_ptr<float>(), gz.data_ptr<float>(), logits_TE.data_ptr(), dtype,
                                 logits_TE.stride(0), logits_TE.stride(1), ids.data_ptr(), id_type, T, E, ids.size(1),
                                 work.data_ptr(), grad_logits.data_ptr(), current_stream()),
               op);
  return grad_logits;
}

// ---- dispatch plan and row movement ----

std::tuple<Tensor, Tensor, Tensor, Tensor> dispatch_fwd_cuda(const Tensor& topk_ids_TK, int64_t num_experts) {
  const char* op = "dispatch";
  check_device(topk_ids_TK, op, "topk_ids_TK");
  TORCH_CHECK(num_experts >= 1, op, " (cuda): num_experts must be >= 1; got ", num_experts);
  const int64_t N = topk_ids_TK.numel();
  TORCH_CHECK(N <= INT32_MAX, op, " (cuda): at most 2**31-1 routed rows; got ", N);
  const c10::cuda::CUDAGuard guard(topk_ids_TK.device());
  auto [ids, id_type] = ids_of(topk_ids_TK, op, "topk_ids_TK");
  auto opts = ids.options();
  Tensor offsets = at::empty({num_experts + 1}, opts.dtype(at::kLong));
  Tensor counts = at::empty({num_experts}, opts.dtype(at::kInt));
  Tensor row_to_slot = at::empty({N}, opts.dtype(at::kInt));
  Tensor slot_to_row = at::empty({N}, opts.dtype(at::kInt));
  Tensor work = scratch(dispatch_scratch_bytes(N, num_experts), ids);
  const cudaError_t err = dispatch_fwd(
      ids.data_ptr(), id_type, N, num_experts, work.data_ptr(), offsets.data_ptr<int64_t>(), counts.data_ptr<int32_t>(),
      row_to_slot.data_ptr<int32_t>(), slot_to_row.data_ptr<int32_t>(), current_stream());
  TORCH_CHECK(err != cudaErrorInvalidValue, op, " (cuda): num_experts=", num_experts, " is more than one block's ",
              "shared memory can count");
  check_launch(err, op);
  return {offsets, counts, row_to_slot, slot_to_row};
}

// out[r] = scale[index[r]] * src[index[r] / index_div] for r < rows (scale may be undefined).
Tensor gather(const Tensor& src, const Tensor& index, int64_t index_div, const Tensor& scale, int64_t rows,
              const char* op) {
  Tensor out = at::empty({rows, src.size(1)}, src.options());
  check_launch(gather_rows(src.data_ptr(), dtype_of(src, op, "x"), src.stride(0), src.stride(1),
                           index.data_ptr<int32_t>(), index_div, scale.defined() ? scale.data_ptr<float>() : nullptr,
                           rows, src.size(1), out.data_ptr(), current_stream()),
               op);
  return out;
}

// out[t] = sum_j weight[t*K + j] * src[index[t*K + j]], in fp32 (weight may be undefined).
Tensor combine(const Tensor& src, const Tensor& index, const Tensor& weight, int64_t T, int64_t K, const char* op) {
  Tensor out = at::empty({T, src.size(1)}, src.options());
  check_launch(combine_rows(src.data_ptr(), dtype_of(src, op, "y"), src.stride(0), src.stride(1),
                            index.data_ptr<int32_t>(), weight.defined() ? weight.data_ptr<float>() : nullptr, T, K,
                            src.size(1), out.data_ptr(), current_stream()),
               op);
  return out;
}

int64_t top_k_of(int64_t N, int64_t top_k, const char* op) {
  TORCH_CHECK(top_k >= 1, op, " (cuda): top_k must be >= 1; got ", top_k);
  TORCH_CHECK(N % top_k == 0, op, " (cuda): the plan's ", N, " rows are not a multiple of top_k=", top_k);
  return N / top_k;
}

Tensor permute_fwd_cuda(const Tensor& x_TH, const Tensor& row_to_slot_N, int64_t top_k) {
  const char* op = "permute";
  check_device(x_TH, op, "x_TH");
  check_dim(x_TH, 2, op, "x_TH", "T, H");
  const int64_t N = row_to_slot_N.numel();
  TORCH_CHECK(top_k_of(N, top_k, op) == x_TH.size(0), op, " (cuda): the plan routes ", N / top_k,
              " tokens but x_TH has ", x_TH.size(0));
  const c10::cuda::CUDAGuard guard(x_TH.device());
  return gather(x_TH, index_of(row_to_slot_N, N, op, "row_to_slot_N"), top_k, Tensor(), N, op);
}

Tensor permute_bwd_cuda(const Tensor& grad_NH, const Tensor& slot_to_row_N, int64_t top_k) {
  const char* op = "permute_bwd";
  check_device(grad_NH, op, "grad_NH");
  check_dim(grad_NH, 2, op, "grad_NH", "N, H");
  const int64_t N = grad_NH.size(0), T = top_k_of(N, top_k, op);
  const c10::cuda::CUDAGuard guard(grad_NH.device());
  return combine(grad_NH, index_of(slot_to_row_N, N, op, "slot_to_row_N"), Tensor(), T, top_k, op);
}

Tensor unpermute_fwd_cuda(const Tensor& y_NH, const Tensor& slot_to_row_N, const Tensor& topk_weights_TK) {
  const char* op = "unpermute";
  check_device(y_NH, op, "y_NH");
  check_dim(y_NH, 2, op, "y_NH", "N, H");
  const Tensor weights = weights_of(topk_weights_TK, op);
  const int64_t T = weights.size(0), K = weights.size(1);
  TORCH_CHECK(y_NH.size(0) == T * K, op, " (cuda): y_NH must have T*K=", T * K, " rows; got ", y_NH.size(0));
  const c10::cuda::CUDAGuard guard(y_NH.device());
  return combine(y_NH, index_of(slot_to_row_N, T * K, op, "slot_to_row_N"), weights, T, K, op);
}

std::tuple<Tensor, Tensor> unpermute_bwd_cuda(const Tensor& grad_TH, const Tensor& y_NH, const Tensor& row_to_slot_N,
                                              const Tensor& slot_to_row_N, const Tensor& topk_weights_TK) {
  const char* op = "unpermute_bwd";
  check_device(y_NH, op, "y_NH");
  check_dim(y_NH, 2, op, "y_NH", "N, H");
  check_dim(grad_TH, 2, op, "grad_TH", "T, H");
  const Tensor weights = weights_of(topk_weights_TK, op);
  const int64_t T = weights.size(0), K = weights.size(1), H = y_NH.size(1);
  TORCH_CHECK(grad_TH.size(0) == T && grad_TH.size(1) == H && y_NH.size(0) == T * K, op, " (cuda): expected grad_TH [",
              T, ", ", H, "] and y_NH [", T * K, ", ", H, "]; got ", grad_TH.sizes(), " and ", y_NH.sizes());
  const DType dtype = dtype_of(y_NH, op, "y_NH");
  const c10::cuda::CUDAGuard guard(y_NH.device());
  const Tensor grad = grad_TH.to(y_NH.scalar_type());
  const Tensor r2s = index_of(row_to_slot_N, T * K, op, "row_to_slot_N");
  const Tensor s2r = index_of(slot_to_row_N, T * K, op, "slot_to_row_N");
  Tensor grad_NH = gather(grad, r2s, K, weights, T * K, op);
  Tensor grad_w = at::empty({T, K}, weights.options());
  check_launch(
      row_dots(grad.data_ptr(), grad.stride(0), grad.stride(1), y_NH.data_ptr(), y_NH.stride(0), y_NH.stride(1), dtype,
               s2r.data_ptr<int32_t>(), T, K, H, grad_w.data_ptr<float>(), current_stream()),
      op);
  return {grad_NH, grad_w.to(topk_weights_TK.scalar_type())};
}

// ---- grouped GEMM and the whole expert computation ----

struct GemmShape {
  int64_t N, D, O, E;
};

GemmShape gemm_shape(const Tensor& x_ND, const Tensor& w_EOD, const Tensor& offsets_E1, const char* op) {
  check_device(x_ND, op, "x_ND");
  check_device(w_EOD, op, "w_EOD");
  check_device(offsets_E1, op, "expert_offsets_E1");
  check_dim(x_ND, 2, op, "x_ND", "N, D");
  check_dim(w_EOD, 3, op, "w_EOD", "E, O, D");
  TORCH_CHECK(x_ND.scalar_type() == w_EOD.scalar_type(), op, " (cuda): x_ND is ", x_ND.scalar_type(), " but w_EOD is ",
              w_EOD.scalar_type(), "; they must have the same dtype");
  TORCH_CHECK(w_EOD.size(2) == x_ND.size(1), op, " (cuda): w_EOD must be [E, O, D=", x_ND.size(1), "]; got ",
              w_EOD.sizes());
  TORCH_CHECK(offsets_E1.scalar_type() == at::kLong && offsets_E1.numel() == w_EOD.size(0) + 1, op,
              " (cuda): expert_offsets_E1 must be int64 [E+1=", w_EOD.size(0) + 1, "]; got ", offsets_E1.scalar_type(),
              " ", offsets_E1.sizes());
  TORCH_CHECK(w_EOD.size(0) <= 65535, op, " (cuda): at most 65535 experts; got ", w_EOD.size(0));
  return {x_ND.size(0), x_ND.size(1), w_EOD.size(1), w_EOD.size(0)};
}

Tensor grouped_gemm_fwd_cuda(const Tensor& x_ND, const Tensor& w_EOD, const Tensor& expert_offsets_E1) {
  const char* op = "grouped_gemm";
  const GemmShape s = gemm_shape(x_ND, w_EOD, expert_offsets_E1, op);
  const DType dtype = dtype_of(x_ND, op, "x_ND");
  const c10::cuda::CUDAGuard guard(x_ND.device());
  const Tensor x = x_ND.contiguous(), w = w_EOD.contiguous(), offsets = expert_offsets_E1.contiguous();
  Tensor y = at::empty({s.N, s.O}, x.options());
  check_launch(grouped_gemm_fwd(x.data_ptr(), w.data_ptr(), offsets.data_ptr<int64_t>(), dtype, s.N, s.D, s.O, s.E,
                                y.data_ptr(), current_stream()),
               op);
  return y;
}

std::tuple<Tensor, Tensor> grouped_gemm_bwd_cuda(const Tensor& grad_NO, const Tensor& x_ND, const Tensor& w_EOD,
                                                 const Tensor& expert_offsets_E1) {
  const char* op = "grouped_gemm_bwd";
  const GemmShape s = gemm_shape(x_ND, w_EOD, expert_offsets_E1, op);
  const DType dtype = dtype_of(x_ND, op, "x_ND");
  check_dim(grad_NO, 2, op, "grad_NO", "N, O");
  TORCH_CHECK(grad_NO.size(0) == s.N && grad_NO.size(1) == s.O, op, " (cuda): grad_NO must be [", s.N, ", ", s.O,
              "]; got ", grad_NO.sizes());
  const c10::cuda::CUDAGuard guard(x_ND.device());
  const Tensor grad = grad_NO.to(x_ND.scalar_type()).contiguous();
  const Tensor x = x_ND.contiguous(), w = w_EOD.contiguous(), offsets = expert_offsets_E1.contiguous();
  Tensor grad_x = at::empty({s.N, s.D}, x.options());
  Tensor grad_w = at::empty({s.E, s.O, s.D}, w.options());
  const int64_t* offs = offsets.data_ptr<int64_t>();
  check_launch(grouped_gemm_dx(grad.data_ptr(), w.data_ptr(), offs, dtype, s.N, s.D, s.O, s.E, false, grad_x.data_ptr(),
                               current_stream()),
               op);
  check_launch(grouped_gemm_dw(grad.data_ptr(), x.data_ptr(), offs, dtype, s.N, s.D, s.O, s.E, grad_w.data_ptr(),
                               current_stream()),
               op);
  return {grad_x, grad_w};
}

struct ExpertShape {
  int64_t T, H, I, E, K;
};

ExpertShape expert_shape(const Tensor& x_TH, const Tensor& weights_TK, const Tensor& w_gate_up_E2IH,
                         const Tensor& w_down_EHI, const char* op) {
  check_device(x_TH, op, "x_TH");
  check_device(w_gate_up_E2IH, op, "w_gate_up_E2IH");
  check_device(w_down_EHI, op, "w_down_EHI");
  check_dim(x_TH, 2, op, "x_TH", "T, H");
  check_dim(w_gate_up_E2IH, 3, op, "w_gate_up_E2IH", "E, 2I, H");
  check_dim(w_down_EHI, 3, op, "w_down_EHI", "E, H, I");
  const int64_t T = x_TH.size(0), H = x_TH.size(1), E = w_gate_up_E2IH.size(0), I = w_down_EHI.size(2);
  TORCH_CHECK(w_gate_up_E2IH.size(1) == 2 * I && w_gate_up_E2IH.size(2) == H, op,
              " (cuda): w_gate_up_E2IH must be [E, 2I=", 2 * I, ", H=", H, "]; got ", w_gate_up_E2IH.sizes());
  TORCH_CHECK(w_down_EHI.size(0) == E && w_down_EHI.size(1) == H, op, " (cuda): w_down_EHI must be [E=", E, ", H=", H,
              ", I]; got ", w_down_EHI.sizes());
  TORCH_CHECK(x_TH.scalar_type() == w_gate_up_E2IH.scalar_type() && x_TH.scalar_type() == w_down_EHI.scalar_type(), op,
              " (cuda): x_TH, w_gate_up_E2IH and w_down_EHI must share one dtype; got ", x_TH.scalar_type(), ", ",
              w_gate_up_E2IH.scalar_type(), " and ", w_down_EHI.scalar_type());
  TORCH_CHECK(weights_TK.size(0) == T, op, " (cuda): topk_weights_TK must have T=", T, " rows; got ",
              weights_TK.size(0));
  TORCH_CHECK(E <= 65535, op, " (cuda): at most 65535 experts; got ", E);
  return {T, H, I, E, weights_TK.size(1)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> moe_experts_fwd_cuda(const Tensor& x_TH, const Tensor& topk_ids_TK,
                                                                        const Tensor& topk_weights_TK,
                                                                        const Tensor& w_gate_up_E2IH,
                                                                        const Tensor& w_down_EHI,
                                                                        c10::string_view activation, bool needs_grad) {
  const char* op = "moe_experts";
  const Tensor weights = weights_of(topk_weights_TK, op);
  const ExpertShape s = expert_shape(x_TH, weights, w_gate_up_E2IH, w_down_EHI, op);
  TORCH_CHECK(topk_ids_TK.dim() == 2 && topk_ids_TK.sizes() == weights.sizes(), op,
              " (cuda): topk_ids_TK must be [T, K] like topk_weights_TK ", weights.sizes(), "; got ",
              topk_ids_TK.sizes());
  const Act act = act_of(activation, op);
  const DType dtype = dtype_of(x_TH, op, "x_TH");
  const c10::cuda::CUDAGuard guard(x_TH.device());
  const cudaStream_t stream = current_stream();
  auto [offsets, counts, row_to_slot, slot_to_row] = dispatch_fwd_cuda(topk_ids_TK, s.E);
  const int64_t N = s.T * s.K;
  const Tensor w_gate_up = w_gate_up_E2IH.contiguous(), w_down = w_down_EHI.contiguous();
  const int64_t* offs = offsets.data_ptr<int64_t>();
  Tensor h = at::empty({N, 2 * s.I}, x_TH.options());
  {
    const Tensor x_NH = gather(x_TH, row_to_slot, s.K, Tensor(), N, op);
    check_launch(grouped_gemm_fwd(x_NH.data_ptr(), w_gate_up.data_ptr(), offs, dtype, N, s.H, 2 * s.I, s.E,
                                  h.data_ptr(), stream),
                 op);
  }
  Tensor y = at::empty({N, s.H}, x_TH.options());
  {
    Tensor a = at::empty({N, s.I}, x_TH.options());
    check_launch(glu_fwd(h.data_ptr(), dtype, N, s.I, act, nullptr, nullptr, a.data_ptr(), stream), op);
    check_launch(grouped_gemm_fwd(a.data_ptr(), w_down.data_ptr(), offs, dtype, N, s.I, s.H, s.E, y.data_ptr(), stream),
                 op);
  }
  Tensor out = combine(y, slot_to_row, weights, s.T, s.K, op);
  if (!needs_grad) h = at::empty({0, 2 * s.I}, x_TH.options());
  return {out, h, offsets, row_to_slot, slot_to_row};
}

// The backward recomputes the activation from h_N2I instead of keeping it, and never forms the
// down projection's output: with g the permuted incoming gradient (unweighted) and
// da = g @ W_down (fp32), the routing weight's gradient is <da, act(gate) * up>, the down
// weights' gradient is g^T (w * a), and dh is w * da through the gated unit.
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_experts_bwd_cuda(
    const Tensor& grad_TH, const Tensor& x_TH, const Tensor& topk_weights_TK, const Tensor& w_gate_up_E2IH,
    const Tensor& w_down_EHI, const Tensor& h_N2I, const Tensor& expert_offsets_E1, const Tensor& row_to_slot_N,
    const Tensor& slot_to_row_N, c10::string_view activation) {
  const char* op = "moe_experts_bwd";
  const Tensor weights = weights_of(topk_weights_TK, op);
  const ExpertShape s = expert_shape(x_TH, weights, w_gate_up_E2IH, w_down_EHI, op);
  const Act act = act_of(activation, op);
  const DType dtype = dtype_of(x_TH, op, "x_TH");
  const int64_t N = s.T * s.K;
  check_dim(grad_TH, 2, op, "grad_TH", "T, H");
  TORCH_CHECK(grad_TH.size(0) == s.T && grad_TH.size(1) == s.H, op, " (cuda): grad_TH must be [", s.T, ", ", s.H,
              "]; got ", grad_TH.sizes());
  TORCH_CHECK(h_N2I.dim() == 2 && h_N2I.size(0) == N && h_N2I.size(1) == 2 * s.I, op, " (cuda): h_N2I must be [N=", N,
              ", 2I=", 2 * s.I, "] (the forward ran with needs_grad=True); got ", h_N2I.sizes());
  TORCH_CHECK(expert_offsets_E1.scalar_type() == at::kLong && expert_offsets_E1.numel() == s.E + 1, op,
              " (cuda): expert_offsets_E1 must be int64 [E+1=", s.E + 1, "]");
  const c10::cuda::CUDAGuard guard(x_TH.device());
  const cudaStream_t stream = current_stream();
  const Tensor r2s = index_of(row_to_slot_N, N, op, "row_to_slot_N");
  const Tensor s2r = index_of(slot_to_row_N, N, op, "slot_to_row_N");
  const Tensor offsets = expert_offsets_E1.contiguous();
  const int64_t* offs = offsets.data_ptr<int64_t>();
  const Tensor h = h_N2I.to(x_TH.scalar_type()).contiguous();
  const Tensor w_gate_up = w_gate_up_E2IH.contiguous(), w_down = w_down_EHI.contiguous();
  const float* w = weights.data_ptr<float>();
  const int32_t* row_to_slot = r2s.data_ptr<int32_t>();

  Tensor grad_w_down = at::empty({s.E, s.H, s.I}, w_down.options());
  Tensor grad_h = at::empty({N, 2 * s.I}, h.options());
  Tensor grad_weights = at::empty({s.T, s.K}, weights.options());
  {
    const Tensor g_NH = gather(grad_TH.to(x_TH.scalar_type()), r2s, s.K, Tensor(), N, op);
    {
      Tensor wa_NI = at::empty({N, s.I}, h.options());
      check_launch(glu_fwd(h.data_ptr(), dtype, N, s.I, act, w, row_to_slot, wa_NI.data_ptr(), stream), op);
      check_launch(grouped_gemm_dw(g_NH.data_ptr(), wa_NI.data_ptr(), offs, dtype, N, s.I, s.H, s.E,
                                   grad_w_down.data_ptr(), stream),
                   op);
    }
    Tensor da_NI = at::empty({N, s.I}, h.options().dtype(at::kFloat));
    check_launch(grouped_gemm_dx(g_NH.data_ptr(), w_down.data_ptr(), offs, dtype, N, s.I, s.H, s.E, true,
                                 da_NI.data_ptr(), stream),
                 op);
    check_launch(glu_bwd(da_NI.data_ptr<float>(), h.data_ptr(), dtype, N, s.I, act, w, row_to_slot, grad_h.data_ptr(),
                         grad_weights.data_ptr<float>(), stream),
                 op);
  }
  Tensor grad_w_gate_up = at::empty({s.E, 2 * s.I, s.H}, w_gate_up.options());
  Tensor dx_NH = at::empty({N, s.H}, x_TH.options());
  {
    const Tensor x_NH = gather(x_TH, r2s, s.K, Tensor(), N, op);
    check_launch(grouped_gemm_dw(grad_h.data_ptr(), x_NH.data_ptr(), offs, dtype, N, s.H, 2 * s.I, s.E,
                                 grad_w_gate_up.data_ptr(), stream),
                 op);
  }
  check_launch(grouped_gemm_dx(grad_h.data_ptr(), w_gate_up.data_ptr(), offs, dtype, N, s.H, 2 * s.I, s.E, false,
                               dx_NH.data_ptr(), stream),
               op);
  Tensor grad_x = combine(dx_NH, s2r, Tensor(), s.T, s.K, op);
  return {grad_x, grad_weights.to(topk_weights_TK.scalar_type()), grad_w_gate_up, grad_w_down};
}

}  // namespace

TORCH_LIBRARY_IMPL(finteam, CUDA, m) {
  m.impl("topk_gating_fwd", &topk_gating_fwd_cuda);
  m.impl("topk_gating_bwd", &topk_gating_bwd_cuda);
  m.impl("router_losses_fwd", &router_losses_fwd_cuda);
  m.impl("router_losses_bwd", &router_losses_bwd_cuda);
  m.impl("dispatch_fwd", &dispatch_fwd_cuda);
  m.impl("permute_fwd", &permute_fwd_cuda);
  m.impl("permute_bwd", &permute_bwd_cuda);
  m.impl("unpermute_fwd", &unpermute_fwd_cuda);
  m.impl("unpermute_bwd", &unpermute_bwd_cuda);
  m.impl("grouped_gemm_fwd", &grouped_gemm_fwd_cuda);
  m.impl("grouped_gemm_bwd", &grouped_gemm_bwd_cuda);
  m.impl("moe_experts_fwd", &moe_experts_fwd_cuda);
  m.impl("moe_experts_bwd", &moe_experts_bwd_cuda);
}

}  // namespace finteam
