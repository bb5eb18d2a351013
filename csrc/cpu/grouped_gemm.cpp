// grouped_gemm on the CPU: y_NO[rows of e] = x_ND[rows of e] @ w_EOD[e]^T.
//
// Shape legend: E experts (groups), N rows, D input width, O output width.
// An expert with few rows is weight-bound: its rows stream w[e] once through the bf16 kernel
// (dot_bf16.h), with all such experts' weight rows split between the threads in one parallel
// pass. An expert with many rows is a real GEMM and goes to ATen (gemm.h: oneDNN, which blocks
// for the caches and the matrix units, or fp32 on widened operands where 16-bit GEMMs are slow). The backward: dx = dy @ w[e], dw[e] = dy^T @ x, for an expert
// with few rows as sums of scaled rows (mix.h), all such experts in one parallel pass, for one
// with many through ATen; an expert with no rows gets an exactly zero dw.

#include <vector>

#include "alloc.h"
#include "dot_bf16.h"
#include "gemm.h"
#include "ops_cpu.h"
#include "mix.h"
#include "rows.h"
#include "vmath.h"

namespace finteam::cpu {
namespace {

constexpr int64_t kRowsPerTask = 64;

// The experts whose rows go through the streaming kernel; all of them in one parallel pass.
void skinny_experts(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& offsets,
                    const std::vector<int64_t>& experts, at::Tensor& y) {
  const int64_t D = x.size(1), O = w.size(1), count = static_cast<int64_t>(experts.size());
  const int64_t tasks_per_expert = (O + kRowsPerTask - 1) / kRowsPerTask;
  const auto* xp = x.const_data_ptr<c10::BFloat16>();
  const auto* wp = w.const_data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  std::vector<SkinnyRows> batches;
  for (int64_t e : experts) {
    std::vector<const c10::BFloat16*> rows;
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) rows.push_back(xp + r * x.stride(0));
    batches.emplace_back(rows.data(), static_cast<int64_t>(rows.size()), D, O % 16 == 0);
  }
  parallel_tasks(
      count * tasks_per_expert, [] { return std::vector<float>(skinny_max_rows() * kRowsPerTask); },
      [&](int64_t task, std::vector<float>& out) {
        const int64_t i = task / tasks_per_expert, e = experts[i];
        const int64_t o0 = (task % tasks_per_expert) * kRowsPerTask, o1 = std::min(O, o0 + kRowsPerTask);
        const int64_t first = offsets[e], M = offsets[e + 1] - first;
        skinny_gemm_bf16(wp + e * w.stride(0), w.stride(1), D, o0, o1, batches[i], out.data(), kRowsPerTask);
        for (int64_t m = 0; m < M; ++m) narrow_row(out.data() + m * kRowsPerTask, o1 - o0, yp + (first + m) * O + o0);
      });
}

}  // namespace

at::Tensor grouped_gemm_fwd(const at::Tensor& x_ND, const at::Tensor& w_EOD, const at::Tensor& expert_offsets_E1) {
  const at::Tensor x = rows_dense(x_ND), w = rows_dense(w_EOD);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "grouped_gemm: x_ND and w_EOD must have the same dtype");
  const int64_t N = x.size(0), E = w.size(0), O = w.size(1);
  auto y_NO = empty_large({N, O}, x.options());
  const auto offsets = host_offsets(expert_offsets_E1, E, N, "grouped_gemm");
  const bool streaming = x.scalar_type() == at::kBFloat16 && skinny_gemm_available() && x.size(1) > 0;
  std::vector<int64_t> skinny;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    if (streaming && rows <= skinny_max_rows()) {
      skinny.push_back(e);
    } else {
      auto out = y_NO.narrow(0, offsets[e], rows);
      gemm_out(out, x.narrow(0, offsets[e], rows), w[e].t());
    }
  }
  if (!skinny.empty()) skinny_experts(x, w, offsets, skinny, y_NO);
  return y_NO;
}

namespace {

// The backward of the experts in `few` as row mixes (mix.h), in one parallel pass: per expert,
// row blocks of dw[e] = dy^T @ x (each written once) and column blocks of dx = dy @ w[e] (each
// weight row read once).
template <typename scalar_t>
void few_rows_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& offsets,
                  const std::vector<int64_t>& few, at::Tensor& grad_x, at::Tensor& grad_w) {
  const int64_t D = x.size(1), O = w.size(1), ldg = grad.stride(0), ldx = x.stride(0);
  const int64_t rows = (O + kMixRowsPerTask - 1) / kMixRowsPerTask, cols = (D + kMixColsPerTask - 1) / kMixColsPerTask;
  const auto* gp = grad.const_data_ptr<scalar_t>();
  const auto* xp = x.const_data_ptr<scalar_t>();
  const auto* wp = w.const_data_ptr<scalar_t>();
  auto* dxp = grad_x.data_ptr<scalar_t>();
  auto* dwp = grad_w.data_ptr<scalar_t>();
  parallel_tasks(
      static_cast<int64_t>(few.size()) * (rows + cols), [] { return 0; },
      [&](int64_t task, int) {
        const int64_t e = few[task / (rows + cols)], k = task % (rows + cols);
        const int64_t first = offsets[e], M = offsets[e + 1] - first;
        if (k < rows) {
          const int64_t o0 = k * kMixRowsPerTask, o1 = std::min(O, o0 + kMixRowsPerTask);
          mix_rows(gp + first * ldg + o0, 1, ldg, o1 - o0, M, xp + first * ldx, ldx, 0, D, dwp + (e * O + o0) * D, D);
        } else {
          const int64_t c0 = (k - rows) * kMixColsPerTask, c1 = std::min(D, c0 + kMixColsPerTask);
          mix_rows(gp + first * ldg, ldg, 1, M, O, wp + e * w.stride(0), w.stride(1), c0, c1, dxp + first * D + c0, D);
        }
      });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> grouped_gemm_bwd(const at::Tensor& grad_NO, const at::Tensor& x_ND,
                                                    const at::Tensor& w_EOD, const at::Tensor& expert_offsets_E1) {
  const at::Tensor x = rows_dense(x_ND), w = rows_dense(w_EOD);
  const at::Tensor grad = rows_dense(grad_NO.to(x.scalar_type()));
  const int64_t N = x.size(0), E = w.size(0);
  auto grad_x = empty_large(x.sizes(), x.options());
  auto grad_w = empty_large(w.sizes(), w.options());
  const auto offsets = host_offsets(expert_offsets_E1, E, N, "grouped_gemm");
  std::vector<int64_t> few;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = offsets[e + 1] - offsets[e];
    auto dw = grad_w[e];
    if (rows == 0) {
      dw.zero_();
      continue;
    }
    if (rows <= kFewRows) {
      few.push_back(e);
      continue;
    }
    const auto g = grad.narrow(0, offsets[e], rows);
    auto dx = grad_x.narrow(0, offsets[e], rows);
    gemm_out(dx, g, w[e]);
    gemm_out(dw, g.t(), x.narrow(0, offsets[e], rows));
  }
  if (!few.empty()) {
    FINTEAM_DISPATCH_FLOATS(x.scalar_type(), "grouped_gemm_bwd",
                            [&] { few_rows_bwd<scalar_t>(grad, x, w, offsets, few, grad_x, grad_w); });
  }
  return {grad_x, grad_w};
}


}  // namespace finteam::cpu
