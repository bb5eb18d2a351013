// See gemm.h.
#include "gemm.h"

#include <ATen/ops/from_blob.h>

#include <vector>
#include <ATen/ops/mm.h>

#include "rows.h"
#include "vmath.h"

namespace finteam::cpu {
namespace {

bool widen_16bit() {
  static const bool widen = isa_name() == "avx2" || isa_name() == "baseline";
  return widen;
}

template <typename scalar_t>
FINTEAM_SIMD void widen_kernel(const scalar_t* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = vm::widen(src[i]);
}

// Scratch memory kept between calls: a fresh allocation of tens of MB costs its page faults
// (the kernel zero-fills each page) every call, about as much as the widening itself.
float* scratch(std::vector<float>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// t in fp32, in `buffer`: a dense block (contiguous, or the transpose of a contiguous one, as
// w[e].t() is) widened in one parallel pass with the same strides; anything else through ATen.
at::Tensor widened(const at::Tensor& t, std::vector<float>& buffer) {
  const bool transposed = !t.is_contiguous() && t.dim() == 2 && t.t().is_contiguous();
  const at::Tensor base = transposed ? t.t() : t;
  if (!base.is_contiguous()) return t.to(at::kFloat);
  float* dst = scratch(buffer, base.numel());
  auto out = at::from_blob(dst, base.sizes(), base.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, base.scalar_type(), "widened", [&] {
    const scalar_t* src = base.const_data_ptr<scalar_t>();
    at::parallel_for(0, base.numel(), 1 << 16,
                     [&](int64_t b, int64_t e) { widen_kernel<scalar_t>(src + b, e - b, dst + b); });
  });
  return transposed ? out.t() : out;
}

}  // namespace

void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto dtype = out.scalar_type();
  if ((dtype != at::kBFloat16 && dtype != at::kHalf) || !widen_16bit() || out.numel() == 0 || a.size(1) == 0) {
    at::mm_out(out, a, b);
    return;
  }
  thread_local std::vector<float> a_wide, b_wide, product;
  auto c = at::from_blob(scratch(product, out.numel()), out.sizes(), out.options().dtype(at::kFloat));
  at::mm_out(c, widened(a, a_wide), widened(b, b_wide));
  if (dtype != at::kBFloat16 || out.stride(1) != 1) {
    out.copy_(c);
    return;
  }
  const float* src = c.const_data_ptr<float>();
  auto* dst = out.data_ptr<c10::BFloat16>();
  const int64_t cols = out.size(1), ld = out.stride(0);
  at::parallel_for(0, out.size(0), grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) narrow_row(src + r * cols, cols, dst + r * ld);
  });
}

}  // namespace finteam::cpu
