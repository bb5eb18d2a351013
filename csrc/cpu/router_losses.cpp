// router_losses on the CPU (the op's Python side: finteam_kernels/ops/router_losses.py).
//
// Shape legend: T tokens, E experts, K top-k.
// Each block of tokens sums its softmax rows and squared logsumexps; blocks are reduced in a
// fixed order, so the result does not depend on the thread count.
#include <cmath>
#include <vector>

#include "checks.h"
#include "ops_cpu.h"
#include "vmath.h"

namespace finteam::cpu {
namespace {

constexpr int64_t kLossBlock = 64;

template <typename scalar_t, typename acc_t>
FINTEAM_SIMD void softmax_lse_rows(const scalar_t* logits, int64_t stride_t, int64_t E, int64_t t0, int64_t t1,
                                   acc_t* s, acc_t* lse_T) {
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* x = logits + t * stride_t;
    acc_t* p = s + (t - t0) * E;
    acc_t m = -kInf<acc_t>;
    bool nan = false;
    for (int64_t e = 0; e < E; ++e) {
      acc_t v = vm::widen(x[e]);
      nan |= v != v;
      m = v > m ? v : m;
    }
    m = nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
    // torch's logsumexp shifts by the max only when it is finite.
    const acc_t shift = (m == kInf<acc_t> || m == -kInf<acc_t>) ? acc_t(0) : m;
    acc_t sum = 0, shifted_sum = 0;
#pragma omp simd reduction(+ : sum, shifted_sum)
    for (int64_t e = 0; e < E; ++e) {
      acc_t v = vm::widen(x[e]);
      acc_t q = vm::exp(v - m);
      p[e] = q;
      sum += q;
      shifted_sum += vm::exp(v - shift);
    }
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) p[e] = p[e] / sum;
    lse_T[t] = std::log(shifted_sum) + shift;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> router_losses_fwd(const at::Tensor& logits_TE, const at::Tensor& topk_ids_TK,
                                                     int64_t num_experts) {
  const at::Tensor logits = rows_dense(logits_TE);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E == num_experts, "router_losses: logits_TE has ", E, " experts but num_experts is ", num_experts);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  auto aux = at::zeros({}, opts), z = at::zeros({}, opts);
  if (T == 0) return {aux, z};
  check_indices(topk_ids_TK, E, "router_losses", "topk_ids_TK");
  const at::Tensor ids = topk_ids_TK.contiguous();
  const IndexView idx = index_view(ids);
  FINTEAM_DISPATCH_FLOATS(logits.scalar_type(), "router_losses_fwd", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t blocks = (T + kLossBlock - 1) / kLossBlock;
    std::vector<acc_t> p_sums(blocks * E, 0), z_sums(blocks, 0), lse(T);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> s(kLossBlock * E);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t t0 = b * kLossBlock, t1 = std::min(T, t0 + kLossBlock);
        softmax_lse_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), logits.stride(0), E, t0, t1, s.data(),
                                          lse.data());
        acc_t* acc = p_sums.data() + b * E;
        for (int64_t t = t0; t < t1; ++t) {
          for (int64_t e = 0; e < E; ++e) acc[e] += s[(t - t0) * E + e];
          z_sums[b] += lse[t] * lse[t];
        }
      }
    });
    std::vector<acc_t> f(E, 0);
    for (int64_t n = 0; n < ids.numel(); ++n) f[idx[n]] += 1;
    acc_t aux_sum = 0, z_sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      acc_t p = 0;
      for (int64_t b = 0; b < blocks; ++b) p += p_sums[b * E + e];
      aux_sum += (f[e] / T) * (p / T);
    }
    for (int64_t b = 0; b < blocks; ++b) z_sum += z_sums[b];
    aux.fill_(static_cast<double>(aux_sum * static_cast<acc_t>(E)));
    z.fill_(static_cast<double>(z_sum / T));
  });
  return {aux, z};
}

at::Tensor router_losses_bwd(const at::Tensor& grad_aux, const at::Tensor& grad_z, const at::Tensor& logits_TE,
                             const at::Tensor& topk_ids_TK, int64_t num_experts) {
  const at::Tensor logits = rows_dense(logits_TE);
  const int64_t T = logits.size(0), E = logits.size(1);
  auto grad_TE = at::empty({T, E}, logits.options());
  if (T == 0) return grad_TE;
  check_indices(topk_ids_TK, E, "router_losses", "topk_ids_TK");
  const at::Tensor ids = topk_ids_TK.contiguous();
  const IndexView idx = index_view(ids);
  const double g_aux = grad_aux.item<double>(), g_z = grad_z.item<double>();
  FINTEAM_DISPATCH_FLOATS(logits.scalar_type(), "router_losses_bwd", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> f(E, 0);
    for (int64_t n = 0; n < ids.numel(); ++n) f[idx[n]] += 1;
    for (auto& v : f) v /= T;
    const acc_t c_aux = static_cast<acc_t>(g_aux * num_experts / T), c_z = static_cast<acc_t>(2.0 * g_z / T);
    at::parallel_for(0, T, grain(E * 4), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> s((t1 - t0) * E), lse(T);
      softmax_lse_rows<scalar_t, acc_t>(logits.const_data_ptr<scalar_t>(), logits.stride(0), E, t0, t1, s.data(),
                                        lse.data());
      for (int64_t t = t0; t < t1; ++t) {
        const acc_t* p = s.data() + (t - t0) * E;
        acc_t fp = 0;
        for (int64_t e = 0; e < E; ++e) fp += f[e] * p[e];
        scalar_t* dx = grad_TE.data_ptr<scalar_t>() + t * E;
        for (int64_t e = 0; e < E; ++e) dx[e] = vm::narrow<scalar_t>(p[e] * (c_aux * (f[e] - fp) + c_z * lse[t]));
      }
    });
  });
  return grad_TE;
}

}  // namespace finteam::cpu
